"""MAD and relative-difference tables laid out like paper 1's, as CSV, Markdown and LaTeX.

Each table is built from the summary that ``gradspec reduce`` wrote for ``cfg.model.name`` and
written under ``results/<experiment>/<model>/tables/``:

- ``mad_<metric>``: rows task x response kind x condition; columns module x layer group (early,
  middle, late, all) holding the MAD of the mean curve (paper 1, its MAD tables), then the mean
  response tokens and the number of ok samples.
- ``relative_difference_mad_<metric>`` and ``relative_difference_level_<metric>``: rows task x
  kind; columns module x group holding (irrelevant - correct) / correct of the MAD or of the mean
  over the group's layers (paper 1), then the number of matched instructions and the mean
  response tokens of the correct and the irrelevant responses.
- ``mad_ci_<metric>``, ``relative_difference_mad_ci_<metric>``: the same cells as text
  "value [low, high]" with the bootstrap interval.
- ``kind_tests_<metric>``: rows task x condition x kind pair x statistic (each sample's level and
  its own MAD across layers); columns per module: the mean paired difference a - b, Cohen's d_z
  and the Holm-adjusted Wilcoxon p, then the share of layers significant (level rows; BH over
  layers x modules) and the pairs' mean response tokens.
- ``length_regression_<metric>``: rows task x condition x kind pair x statistic; columns per
  module: the kind coefficient at equal length "b [low, high]" beside the raw difference, then
  the length overlap and mean response tokens.

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
        "dataset": {name: i for i, name in enumerate(dict.fromkeys(frame.get("dataset", [])))},
        "task": {task: i for i, task in enumerate(dict.fromkeys(frame["task"]))},
        "kind": {kind: i for i, kind in enumerate(ordered_kinds(frame["kind"]))},
        "condition": {
            c: i for i, c in enumerate([*CONDITION_ORDER, *sorted(set(frame.get("condition", [])))])
        },
    }
    return frame.sort_values(keys, key=lambda column: column.map(ranks[column.name]))


def row_keys(frame: pd.DataFrame, keys: list[str]) -> list[str]:
    """``keys``, led by the dataset where one key names files of several datasets.

    Paper 2's datasets (one per quality metric) share their tasks and kinds (wiz, highest).
    """
    if (
        "dataset" in frame.columns
        and len(frame)
        and frame.groupby(keys)["dataset"].nunique().max() > 1
    ):
        return ["dataset", *keys]
    return keys


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
    # Rows of the files present: pivot_table adds every combination of the keys' values.
    ordered = row_order(per_row.reset_index()[keys], keys)
    return wide.loc[pd.MultiIndex.from_frame(ordered) if len(keys) > 1 else ordered[keys[0]]]


def mad_table(mad: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Paper 1's MAD table for one metric, one row per task, kind and condition."""
    rows = mad[mad["metric"] == metric]
    keys = row_keys(rows, ["task", "kind", "condition"])
    wide = wide_by_group(rows, keys, "mad")
    return with_extra_columns(wide, rows, keys, {"tokens": "mean_response_tokens", "n": "n"})


def relative_difference_table(relative: pd.DataFrame, metric: str, scope: str) -> pd.DataFrame:
    """(irrelevant - correct) / correct of the group MAD or level, one row per task and kind."""
    keys = ["task", "kind"]
    rows = relative[(relative["metric"] == metric) & (relative["scope"] == scope)]
    wide = wide_by_group(rows, keys, "relative_difference")
    return with_extra_columns(wide, rows, keys, relative_extras(rows))


def interval_cells(frame: pd.DataFrame, value: str, low: str, high: str) -> pd.Series:
    """ "value [low, high]" per row, each number to four significant digits."""

    def text(number) -> str:
        return "--" if pd.isna(number) else FLOAT_FORMAT.format(number)

    return pd.Series(
        [
            f"{text(v)} [{text(lo)}, {text(hi)}]"
            for v, lo, hi in zip(frame[value], frame[low], frame[high], strict=True)
        ],
        index=frame.index,
        dtype=object,
    )


def wide_text_by_group(frame: pd.DataFrame, keys: list[str], cells: pd.Series) -> pd.DataFrame:
    """Text cells per row key with (module, group) columns in the papers' order."""
    frame = frame.assign(cell=cells)
    wide = frame.pivot(index=keys, columns=["module", "group"], values="cell")
    columns = [
        (module, group)
        for module in module_order(frame["module"])
        for group in GROUPS
        if (module, group) in wide.columns
    ]
    return wide.reindex(columns=pd.MultiIndex.from_tuples(columns, names=["module", "group"]))


def mad_interval_table(mad: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The MAD table's cells with their bootstrap intervals."""
    rows = mad[mad["metric"] == metric]
    keys = row_keys(rows, ["task", "kind", "condition"])
    wide = wide_text_by_group(rows, keys, interval_cells(rows, "mad", "mad_low", "mad_high"))
    return with_extra_columns(wide, rows, keys, {"tokens": "mean_response_tokens", "n": "n"})


def relative_interval_table(relative: pd.DataFrame, metric: str, scope: str) -> pd.DataFrame:
    """The relative-difference table's cells with their paired bootstrap intervals."""
    keys = ["task", "kind"]
    rows = relative[(relative["metric"] == metric) & (relative["scope"] == scope)]
    cells = interval_cells(rows, "relative_difference", "ci_low", "ci_high")
    wide = wide_text_by_group(rows, keys, cells)
    return with_extra_columns(wide, rows, keys, relative_extras(rows))


def relative_extras(rows: pd.DataFrame) -> dict[str, str]:
    extra = {"n": "n_pairs"}
    if "response_tokens_correct" in rows.columns:
        extra |= {
            "tokens correct": "response_tokens_correct",
            "tokens irrelevant": "response_tokens_irrelevant",
        }
    return extra


PAIR_KEYS = ["task", "condition", "kind_a", "kind_b", "statistic"]


def per_module(frame: pd.DataFrame, columns: dict[str, pd.Series]) -> pd.DataFrame:
    """Columns (module, quantity) per row of :data:`PAIR_KEYS`, modules in the papers' order."""
    keys = row_keys(frame, PAIR_KEYS)
    parts = []
    for name, values in columns.items():
        part = frame.assign(value=values).pivot(index=keys, columns="module", values="value")
        part.columns = pd.MultiIndex.from_product([part.columns, [name]])
        parts.append(part)
    wide = pd.concat(parts, axis=1)
    order = [(m, q) for m in module_order(frame["module"]) for q in columns if (m, q) in wide]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(order, names=["module", "quantity"]))
    return wide


def kind_test_table(tests: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Kind-vs-kind paired tests on the same instructions, one row per kind pair and statistic."""
    rows = tests[(tests["metric"] == metric) & (tests["scope"].isin(["level", "mad"]))]
    rows = rows.rename(columns={"scope": "statistic"})
    wide = per_module(
        rows,
        {
            "difference": rows["mean_difference"],
            "d_z": rows["cohens_dz"],
            "p (Holm)": rows["p_adjusted"],
            "share layers": rows["share_layers_significant"],
        },
    )
    extra = {"n": "n_pairs", "tokens a": "response_tokens_a", "tokens b": "response_tokens_b"}
    return with_pair_columns(wide, rows, extra)


def length_table(regression: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The kind difference at equal length beside the raw difference, per module."""
    rows = regression[regression["metric"] == metric]
    wide = per_module(
        rows,
        {
            "raw": rows["raw_difference"],
            "b_kind [CI]": interval_cells(rows, "kind_coefficient", "ci_low", "ci_high"),
        },
    )
    extra = {
        "length overlap": "length_overlap",
        "tokens a": "response_tokens_a",
        "tokens b": "response_tokens_b",
    }
    return with_pair_columns(wide, rows, extra)


def with_pair_columns(wide: pd.DataFrame, rows: pd.DataFrame, extra: dict[str, str]):
    keys = row_keys(rows, PAIR_KEYS)
    per_row = rows.drop_duplicates(keys).set_index(keys)
    for name, source in extra.items():
        wide[(name, "")] = per_row[source].reindex(wide.index)
    return wide


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


def read_optional(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def tables_command(cfg: DictConfig) -> int:
    """Write every table of ``cfg.model.name``'s summary (see the module docstring)."""
    started = time.perf_counter()
    model = cfg.model.name
    summary = paths.summary_dir(cfg.results_dir, cfg.experiment.name, model)
    directory = paths.tables_dir(cfg.results_dir, cfg.experiment.name, model)
    mad = pd.read_parquet(summary / "mad.parquet")
    relative = pd.read_parquet(summary / "relative_difference.parquet")
    kind_tests = read_optional(summary / "kind_tests.parquet")
    regression = read_optional(summary / "length_regression.parquet")

    written: list[Path] = []
    for metric in dict.fromkeys(mad["metric"]) if len(mad) else []:
        written += write_table(mad_table(mad, metric), directory / f"mad_{metric}")
        written += write_table(mad_interval_table(mad, metric), directory / f"mad_ci_{metric}")
        if len(relative):
            for scope in ("mad", "level"):
                stem = f"relative_difference_{scope}"
                table = relative_difference_table(relative, metric, scope)
                written += write_table(table, directory / f"{stem}_{metric}")
                table = relative_interval_table(relative, metric, scope)
                written += write_table(table, directory / f"{stem}_ci_{metric}")
        if len(kind_tests):
            table = kind_test_table(kind_tests, metric)
            written += write_table(table, directory / f"kind_tests_{metric}")
        if len(regression):
            table = length_table(regression, metric)
            written += write_table(table, directory / f"length_regression_{metric}")
    log.info(
        "wrote %d table files to %s (%.2fs)", len(written), directory, time.perf_counter() - started
    )
    return 0
