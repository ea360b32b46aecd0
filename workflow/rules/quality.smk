# Paper 2 (data quality): every model's spectra -> quality tables and findings per model, and the
# experiment's findings.md. Only for an experiment whose datasets come from paper 2's data
# (source gradient_unified); there this rule, not paper 1's `findings`, writes findings.md.
#
# Scoring a user's file: data/NAME.json (or .jsonl) -> results/score/MODEL/NAME.json with the
# scores per record, NAME.selected.json (select.by, select.fraction, select.order) and
# NAME.spectra.parquet beside it:
#   snakemake --cores 2 results/score/smollm2_135m_instruct_base/NAME.json \
#       --config overrides='select.by=effective_rank select.fraction=0.1'

_PAPER2_SOURCE = "gradient_unified"
PAPER2 = any(
    compose([*BASE_OVERRIDES, f"dataset={name}"]).dataset.source == _PAPER2_SOURCE
    for name in CFG.experiment.datasets
)
QUALITY_FILES = ("findings.json", "auroc.csv", "spearman.csv", "cosine.csv", "samples.parquet")
QUALITY_TABLES = [
    str(paths.model_results(RESULTS, EXPERIMENT, model) / "quality" / name)
    for model in MODELS
    for name in QUALITY_FILES
]


if PAPER2:

    ruleorder: quality > findings

    rule quality:
        input:
            [path for model in MODELS for path in spectra_of(model)],
        output:
            findings=FINDINGS,
            family=f"{EXP_DIR}/quality/family.csv",
            tables=QUALITY_TABLES,
        conda:
            CONDA_ENV
        log:
            f"{LOGS}/quality.log",
        params:
            experiment=EXPERIMENT,
            overrides=OVERRIDES,
            logged=LOGGED,
        shell:
            "{params.logged} {log} quality {output.findings} --"
            " gradspec quality experiment={params.experiment} {params.overrides}"


rule score:
    input:
        data="data/{name}.{ext}",
        model=model_input,
    output:
        # NAME.spectra.parquet, NAME.ifd.parquet and NAME.selected.EXT are written beside it.
        scored=f"{RESULTS}/score/{{model}}/{{name}}.{{ext}}",
    wildcard_constraints:
        ext="json|jsonl",
        name=_SLUG,
    conda:
        CONDA_ENV
    log:
        f"{RESULTS}/logs/score/{{model}}/{{name}}.{{ext}}.log",
    threads: workflow.cores
    resources:
        mem_mb=lambda wildcards: model_mem_mb(wildcards.model),
        gpu=gpus_per_job(),
    params:
        overrides=OVERRIDES,
        locks=f"{RESULTS}/.gpu-locks",
        logged=LOGGED,
    shell:
        "{params.logged} {log} 'score {wildcards.model} {wildcards.name}' {output.scored} --"
        " workflow/scripts/with-gpus {resources.gpu} {params.locks}"
        " gradspec score model={wildcards.model} data.path={input.data}"
        " output={output.scored} {params.overrides}"
