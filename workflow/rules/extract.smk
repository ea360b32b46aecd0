# Per-sample, per-layer gradient spectra of one data file under one model.
#
# GPUs: the job asks for `gpu` (extract.gpus_per_job) and Snakemake keeps the sum of running
# jobs' gpu within --resources gpu=N (the default profile says 1). Which device a job gets is
# decided by workflow/scripts/with-gpus: it takes a free device under a file lock held for the
# job's lifetime and sets CUDA_VISIBLE_DEVICES, so two jobs never share one. Under SLURM the
# scheduler's CUDA_VISIBLE_DEVICES is kept; with 0 GPUs the job sees none.


rule extract:
    input:
        model=model_input,
        data=f"{DATA_ROOT}/{{dataset}}/{{file}}.jsonl",
    output:
        spectra=f"{EXP_DIR}/{{model}}/spectra/{{dataset}}/{{file}}.parquet",
        meta=f"{EXP_DIR}/{{model}}/spectra/{{dataset}}/{{file}}.meta.json",
    conda:
        CONDA_ENV
    log:
        f"{LOGS}/extract/{{model}}/{{dataset}}/{{file}}.log",
    benchmark:
        f"{EXP_DIR}/{{model}}/benchmarks/extract/{{dataset}}/{{file}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=lambda wildcards: model_mem_mb(wildcards.model),
        runtime=lambda wildcards: model_runtime(wildcards.model),
        gpu=gpus_per_job(),
    params:
        experiment=EXPERIMENT,
        overrides=OVERRIDES,
        locks=f"{RESULTS}/.gpu-locks",
    shell:
        "workflow/scripts/with-gpus {resources.gpu} {params.locks}"
        " gradspec extract experiment={params.experiment} model={wildcards.model}"
        " dataset={wildcards.dataset} data.file={wildcards.file} data.path={input.data}"
        " output={output.spectra} {params.overrides} > {log} 2>&1"
