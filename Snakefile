# gradspec: prepare model -> prepare data -> extract spectra -> reduce -> tables, figures, findings
# -> report.
#
#   snakemake --cores 2                                   the quickstart experiment
#   snakemake --cores 2 --config experiment=NAME          another experiment (config/experiment/)
#   snakemake --cores 2 --config 'data={limit: 2}'        any config value, for every job
#   snakemake --cores 2 --config overrides='data.limit=2 prompt.template=base'
#
# Snakemake's own --config parser refuses dotted keys (data.limit=2); give nested values or
# `overrides=` with Hydra syntax instead. Defaults come from profiles/default/config.yaml.
# See docs/workflow.md.

include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/reduce.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/quality.smk"


rule all:
    input:
        findings=FINDINGS,
        tables=[tables_out(model) for model in MODELS],
        figures=[figures_out(model) for model in MODELS],
        report=REPORT,
    default_target: True


rule inputs:
    """Every prepared model and data file of the experiment (what `make pull` rebuilds)."""
    input:
        models=[model_sentinel(name) for name in MODELS],
        data=[prepared(spec) for spec in FILES],
