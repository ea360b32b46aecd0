# A dataset file as shipped -> validated records with ids, and what was dropped and why.


rule prepare_data:
    input:
        raw_data,
    output:
        records=f"{DATA_ROOT}/{{dataset}}/{{file}}.jsonl",
        meta=f"{DATA_ROOT}/{{dataset}}/{{file}}.meta.json",
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/data/{{dataset}}/{{file}}.log",
    params:
        overrides=OVERRIDES,
        logged=LOGGED,
    shell:
        "{params.logged} {log} 'prepare-data {wildcards.dataset}/{wildcards.file}' {output} --"
        " gradspec prepare-data dataset={wildcards.dataset} data.file={wildcards.file}"
        " {params.overrides}"
