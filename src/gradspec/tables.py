"""MAD and relative-difference tables laid out like paper 1's, as CSV, Markdown and LaTeX.

Each table is built from the summary that ``gradspec reduce`` wrote for ``cfg.model.name`` and
written under ``results/<experiment>/<model>/tables/``:

- ``mad_<metric>``: rows task x response kind x condition; columns module x layer group (early,
  middle, late, all) holding the MAD of the mean curve (paper 1, its MAD tables), then the mean
  response tokens and the number of ok samples.
- ``relative_difference_mad_<metric>`` and ``relative_difference_level_<metric>``: rows task x
  kind; columns module x group holding (irrelevant - correct) / correct of the MAD or of the mean
  over the group's layers (paper 1), then the number of matched instructions.

CSV and Markdown get flat column names ("q_proj early"); LaTeX keeps the two header rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from gradspec import paths
from gradspec.config import MODULES
from gradspec.reduce import ordered_kinds
from gradspec.stats import GROUPS

log = logging.getLogger(__name__)

CONDITION_ORDER = ("correct", "irrelevant")
FLOAT_FORMAT = "{:.4g}"


def module_order(modules) -> list[str]:
    present = list(dict.fromkeys(modules))
    return [m for m in MODULES if m in present] + [m for m in present if m not in MODULES]


def row_order(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sort rows by task (first seen), kind (paper 1's order) and condition (correct first)."""
    ranks = {
        "task": {task: i for i, task in enumerate(dict.fromkeys(frame["task"]))},
        "kind": {kind: i for i, kind in enumerate(ordered_kinds(frame["kind"]))},
        "condition": {
            c: i for i, c in enumerate([*CONDITION_ORDER, *sorted(set(frame.get("condition", [])))])
        },
    }
    return frame.sort_values(keys, key=lambda column: column.map(ranks[column.name]))


def wide_by_group(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """``value`` per row key, with (module, group) columns in the papers' order."""
    wide = frame.pivot_table(index=keys, columns=["module", "group"], values=value, dropna=False)
    columns = [
        (module, group)
        for module in module_order(frame["module"])
        for group in GROUPS
        if (module, group) in wide.columns
    ]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(columns, names=["module", "group"]))
    return wide


def with_extra_columns(
    wide: pd.DataFrame, frame: pd.DataFrame, keys: list[str], extra: dict[str, str]
) -> pd.DataFrame:
    """Append per-row columns (e.g. tokens, n) under a blank group so the header stays two rows."""
    per_row = frame.drop_duplicates(keys).set_index(keys)
    for name, source in extra.items():
        wide[(name, "")] = per_row[source].reindex(wide.index)
    ordered = row_order(wide.reset_index()[keys], keys)
    return wide.loc[pd.MultiIndex.from_frame(ordered) if len(keys) > 1 else ordered[keys[0]]]


def mad_table(mad: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Paper 1's MAD table for one metric, one row per task, kind and condition."""
    keys = ["task", "kind", "condition"]
    rows = mad[mad["metric"] == metric]
    wide = wide_by_group(rows, keys, "mad")
    return with_extra_columns(wide, rows, keys, {"tokens": "mean_response_tokens", "n": "n"})


def relative_difference_table(relative: pd.DataFrame, metric: str, scope: str) -> pd.DataFrame:
    """(irrelevant - correct) / correct of the group MAD or level, one row per task and kind."""
    keys = ["task", "kind"]
    rows = relative[(relative["metric"] == metric) & (relative["scope"] == scope)]
    wide = wide_by_group(rows, keys, "relative_difference")
    return with_extra_columns(wide, rows, keys, {"n": "n_pairs"})


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    flat = table.copy()
    flat.columns = [" ".join(part for part in column if part) for column in table.columns]
    return flat.reset_index()


def write_table(table: pd.DataFrame, stem: Path) -> list[Path]:
    """``stem``.csv, .md and .tex."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    flat = flat_columns(table)
    targets = [stem.with_suffix(suffix) for suffix in (".csv", ".md", ".tex")]
    flat.to_csv(targets[0], index=False)
    blanks = flat.astype(object).where(flat.notna(), None)
    targets[1].write_text(blanks.to_markdown(index=False, floatfmt=".4g", missingval="--") + "\n")
    latex = table.to_latex(
        float_format=FLOAT_FORMAT.format, escape=True, multicolumn=True, na_rep="--"
    )
    targets[2].write_text(latex)
    return targets


def tables_command(cfg: DictConfig) -> int:
    """Write every table of ``cfg.model.name``'s summary (see the module docstring)."""
    started = time.perf_counter()
    model = cfg.model.name
    summary = paths.summary_dir(cfg.results_dir, cfg.experiment.name, model)
    directory = paths.tables_dir(cfg.results_dir, cfg.experiment.name, model)
    mad = pd.read_parquet(summary / "mad.parquet")
    relative = pd.read_parquet(summary / "relative_difference.parquet")

    written: list[Path] = []
    for metric in dict.fromkeys(mad["metric"]) if len(mad) else []:
        written += write_table(mad_table(mad, metric), directory / f"mad_{metric}")
        if len(relative):
            for scope in ("mad", "level"):
                table = relative_difference_table(relative, metric, scope)
                written += write_table(table, directory / f"relative_difference_{scope}_{metric}")
    log.info(
        "wrote %d table files to %s (%.2fs)", len(written), directory, time.perf_counter() - started
    )
    return 0
