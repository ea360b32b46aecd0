# Per-sample, per-layer gradient spectra of one data file under one model.
#
# GPUs: the job asks for `gpu` (extract.gpus_per_job) and Snakemake keeps the sum of running
# jobs' gpu within --resources gpu=N (the default profile says 1). Which device a job gets is
# decided by workflow/scripts/with-gpus: it takes a free device under a file lock held for the
# job's lifetime and sets CUDA_VISIBLE_DEVICES, so two jobs never share one. Under SLURM the
# scheduler's CUDA_VISIBLE_DEVICES is kept; with 0 GPUs the job sees none.
#
# Sharding: with --config job_shard_size=N and data.limit above N, each file is cut into record
# ranges of N (an extract job per model, file and range, writing <file>.shards/START-STOP.parquet)
# and merge_spectra concatenates them, in order, into the file's Parquet. Record indices are
# those of the whole file, so the merged file equals a single job's. The parts are temporary.

_SPECTRA = f"{EXP_DIR}/{{model}}/spectra/{{dataset}}/{{file}}"
_EXTRACT_LOG = f"{LOGS}/extract/{{model}}/{{dataset}}/{{file}}"


if SHARDS:

    rule extract:
        input:
            model=model_input,
            data=f"{DATA_ROOT}/{{dataset}}/{{file}}.jsonl",
        output:
            spectra=temp(f"{_SPECTRA}.shards/{{shard}}.parquet"),
            meta=temp(f"{_SPECTRA}.shards/{{shard}}.meta.json"),
        conda:
            CONDA_ENV
        log:
            f"{_EXTRACT_LOG}/{{shard}}.log",
        benchmark:
            f"{EXP_DIR}/{{model}}/benchmarks/extract/{{dataset}}/{{file}}/{{shard}}.tsv"
        threads: workflow.cores
        resources:
            mem_mb=lambda wildcards: model_mem_mb(wildcards.model),
            runtime=lambda wildcards: model_runtime(wildcards.model),
            gpu=gpus_per_job(),
        params:
            experiment=EXPERIMENT,
            overrides=OVERRIDES,
            bounds=shard_bounds,
            locks=f"{RESULTS}/.gpu-locks",
            logged=LOGGED,
        shell:
            "{params.logged} {log}"
            " 'extract {wildcards.model} {wildcards.dataset}/{wildcards.file} {wildcards.shard}'"
            " {output} -- workflow/scripts/with-gpus {resources.gpu} {params.locks}"
            " gradspec extract experiment={params.experiment} model={wildcards.model}"
            " dataset={wildcards.dataset} data.file={wildcards.file} data.path={input.data}"
            " output={output.spectra} {params.overrides} {params.bounds}"

    rule merge_spectra:
        input:
            expand(f"{_SPECTRA}.shards/{{shard}}.parquet", shard=SHARDS, allow_missing=True),
            expand(f"{_SPECTRA}.shards/{{shard}}.meta.json", shard=SHARDS, allow_missing=True),
            data=f"{DATA_ROOT}/{{dataset}}/{{file}}.jsonl",
        output:
            spectra=f"{_SPECTRA}.parquet",
            meta=f"{_SPECTRA}.meta.json",
        conda:
            CONDA_ENV
        log:
            f"{_EXTRACT_LOG}.merge.log",
        params:
            experiment=EXPERIMENT,
            overrides=OVERRIDES,
            logged=LOGGED,
        shell:
            "{params.logged} {log}"
            " 'merge {wildcards.model} {wildcards.dataset}/{wildcards.file}' {output} --"
            " gradspec merge experiment={params.experiment} model={wildcards.model}"
            " dataset={wildcards.dataset} data.file={wildcards.file} data.path={input.data}"
            " output={output.spectra} {params.overrides}"

else:

    rule extract:
        input:
            model=model_input,
            data=f"{DATA_ROOT}/{{dataset}}/{{file}}.jsonl",
        output:
            spectra=f"{_SPECTRA}.parquet",
            meta=f"{_SPECTRA}.meta.json",
        conda:
            CONDA_ENV
        log:
            f"{_EXTRACT_LOG}.log",
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
            logged=LOGGED,
        shell:
            "{params.logged} {log} 'extract {wildcards.model} {wildcards.dataset}/{wildcards.file}'"
            " {output} -- workflow/scripts/with-gpus {resources.gpu} {params.locks}"
            " gradspec extract experiment={params.experiment} model={wildcards.model}"
            " dataset={wildcards.dataset} data.file={wildcards.file} data.path={input.data}"
            " output={output.spectra} {params.overrides}"
