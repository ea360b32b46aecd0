# Tables and figures per model, then the findings across every model of the experiment.
# Tables and figures are declared as folders: their file names belong to those steps.


rule tables:
    input:
        lambda wildcards: summary_of(wildcards.model),
    output:
        directory(f"{EXP_DIR}/{{model}}/tables"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/tables/{{model}}.log",
    params:
        experiment=EXPERIMENT,
        overrides=OVERRIDES,
    shell:
        "gradspec tables experiment={params.experiment} model={wildcards.model}"
        " {params.overrides} > {log} 2>&1"


rule plot:
    input:
        lambda wildcards: summary_of(wildcards.model),
    output:
        directory(f"{EXP_DIR}/{{model}}/figures"),
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/plot/{{model}}.log",
    params:
        experiment=EXPERIMENT,
        overrides=OVERRIDES,
    shell:
        "gradspec plot experiment={params.experiment} model={wildcards.model}"
        " {params.overrides} > {log} 2>&1"


rule findings:
    input:
        [path for model in MODELS for path in summary_of(model)],
    output:
        FINDINGS,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/findings.log",
    params:
        experiment=EXPERIMENT,
        overrides=OVERRIDES,
    shell:
        "gradspec findings experiment={params.experiment} {params.overrides} > {log} 2>&1"
