"""Where each step's files live. Snakemake's rules and the subcommands both use these functions,
so the layout is defined once.

    resources/models/<model>/                                     prepared weights + provenance
    resources/data/<dataset>/<file>.jsonl                         validated records with ids
    results/<experiment>/<model>/spectra/<dataset>/<file>.parquet one row per sample, layer, module
    results/<experiment>/<model>/summary/                         curves, intervals, MAD
    results/<experiment>/<model>/{figures,tables}/
    results/<experiment>/{findings.md,report.html}
"""

from __future__ import annotations

import re
from pathlib import Path

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

# What the reduce step writes into summary/: these tables as Parquet, the status counts and the
# resolved config. The workflow declares exactly these as the step's outputs.
SUMMARY_TABLES = (
    "curves",
    "mad",
    "contrasts",
    "relative_difference",
    "paired_tests",
    "kind_tests",
    "length_regression",
    "replicates",
)
SUMMARY_FILES = (
    *(f"{name}.parquet" for name in SUMMARY_TABLES),
    "status_counts.csv",
    "config.yaml",
)


def check_slug(value: str, what: str) -> str:
    """Names become folder names and Snakemake wildcards: no '/', '.', or leading '-'."""
    if not SLUG.match(value):
        raise ValueError(
            f"{what} name {value!r} cannot be a folder name: use letters, digits, '_' and '-'"
        )
    return value


def model_dir(models_dir: str | Path, model: str) -> Path:
    return Path(models_dir) / check_slug(model, "model")


def prepared_data(dataset: str, file: str, root: str | Path = "resources/data") -> Path:
    return Path(root) / check_slug(dataset, "dataset") / f"{check_slug(file, 'file')}.jsonl"


def experiment_dir(results_dir: str | Path, experiment: str) -> Path:
    return Path(results_dir) / check_slug(experiment, "experiment")


def model_results(results_dir: str | Path, experiment: str, model: str) -> Path:
    return experiment_dir(results_dir, experiment) / check_slug(model, "model")


def spectra(results_dir: str | Path, experiment: str, model: str, dataset: str, file: str) -> Path:
    base = model_results(results_dir, experiment, model) / "spectra"
    return base / check_slug(dataset, "dataset") / f"{check_slug(file, 'file')}.parquet"


def summary_dir(results_dir: str | Path, experiment: str, model: str) -> Path:
    return model_results(results_dir, experiment, model) / "summary"


def figures_dir(results_dir: str | Path, experiment: str, model: str) -> Path:
    return model_results(results_dir, experiment, model) / "figures"


def tables_dir(results_dir: str | Path, experiment: str, model: str) -> Path:
    return model_results(results_dir, experiment, model) / "tables"
