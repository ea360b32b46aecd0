# All of a model's spectra -> per-layer curves, intervals, MAD and paired tests.


rule reduce:
    input:
        lambda wildcards: spectra_of(wildcards.model),
    output:
        [f"{EXP_DIR}/{{model}}/summary/{name}" for name in SUMMARY_FILES],
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/reduce/{{model}}.log",
    params:
        experiment=EXPERIMENT,
        overrides=OVERRIDES,
        logged=LOGGED,
    shell:
        "{params.logged} {log} 'reduce {wildcards.model}' {output} --"
        " gradspec reduce experiment={params.experiment} model={wildcards.model}"
        " {params.overrides}"
