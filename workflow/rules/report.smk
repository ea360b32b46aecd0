# Tables and figures per model, then the findings across every model of the experiment, then
# one self-contained HTML report (and a W&B report) of all of it.
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
        logged=LOGGED,
    shell:
        "{params.logged} {log} 'tables {wildcards.model}' {output} --"
        " gradspec tables experiment={params.experiment} model={wildcards.model}"
        " {params.overrides}"


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
        logged=LOGGED,
    shell:
        "{params.logged} {log} 'plot {wildcards.model}' {output} --"
        " gradspec plot experiment={params.experiment} model={wildcards.model}"
        " {params.overrides}"


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
        logged=LOGGED,
    shell:
        "{params.logged} {log} findings {output} --"
        " gradspec findings experiment={params.experiment} {params.overrides}"


rule report:
    input:
        findings=FINDINGS,
        tables=[tables_out(model) for model in MODELS],
        figures=[figures_out(model) for model in MODELS],
        meta=[path for model in MODELS for path in spectra_meta_of(model)],
    output:
        REPORT,
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/report.log",
    params:
        experiment=EXPERIMENT,
        overrides=OVERRIDES,
        logged=LOGGED,
    shell:
        "{params.logged} {log} report {output} --"
        " gradspec report experiment={params.experiment} {params.overrides}"
