"""Spectra Parquet files -> per-layer curves with intervals, MAD, contrasts and paired tests.

``reduce_command`` summarises one model (``cfg.model.name``) of one experiment, because the
workflow runs the step once per model and each model's summary then depends on that model's
spectra only. It writes, under ``results/<experiment>/<model>/summary/``:

- ``curves.parquet``: mean over samples per (file, layer, module, metric) with its bootstrap
  interval;
- ``mad.parquet``: per (file, module, metric, layer group) the MAD and the level (mean over the
  group's layers) of the mean curve, each with a bootstrap interval;
- ``contrasts.parquet``: differences in level and MAD between response kinds of one task and
  condition (e.g. detailed - none), absolute and relative to the second kind, with an interval
  from independent resampling of each file;
- ``kind_tests.parquet``: kind against kind on the same instructions (e.g. detailed - none),
  paired tests of each sample's level and own MAD across layers, and per layer;
- ``length_regression.parquet``: the kind difference at equal response length, from a regression
  of each sample's level (or own MAD) on log(n_response_tokens) with kind as a factor;
- ``replicates.parquet``: the bootstrap replicates of the all-layer level and MAD (and of the
  correct/irrelevant relative differences) of the nuclear norm, for comparisons across models;
- ``relative_difference.parquet``: (irrelevant - correct) / correct per layer, of the levels and
  of the MADs, on the instructions that have an ok sample in both files, with a paired interval;
- ``paired_tests.parquet``: correct against irrelevant on the same instructions;
- ``status_counts.csv`` and the resolved ``config.yaml``.

Only samples of status "ok" enter any statistic; the others are counted and dropped in one place
(:func:`ok_rows`).
"""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from gradspec import paths, tracking
from gradspec import stats as st
from gradspec.config import MODULES, FileSpec, experiment_files, to_yaml
from gradspec.spectra import METRICS

log = logging.getLogger(__name__)

LABELS = ("model", "dataset", "condition", "task", "kind", "file")
# Paper 1's response kinds from the least to the most reasoning; other kinds keep config order.
KIND_ORDER = ("none", "simplified", "detailed")
CORRECT, IRRELEVANT = "correct", "irrelevant"


@dataclass(frozen=True)
class SpectraSource:
    """One spectra file and the labels of the data file it was extracted from."""

    model: str
    spec: FileSpec
    path: Path


@dataclass
class FileSamples:
    """One file's ok samples as arrays: ``values`` is (sample, layer, module, metric)."""

    labels: dict[str, str]
    record_index: np.ndarray
    layers: np.ndarray
    modules: tuple[str, ...]
    metrics: tuple[str, ...]
    values: np.ndarray
    response_tokens: np.ndarray

    @property
    def n(self) -> int:
        return int(self.record_index.size)

    def flat(self) -> np.ndarray:
        """(sample, layer, module * metric): the shape the statistics work on."""
        return self.values.reshape(self.values.shape[0], self.values.shape[1], -1)


@dataclass
class FileSummary:
    """A file's group statistics and their bootstrap replicates, kept for the contrasts."""

    samples: FileSamples
    level: np.ndarray
    mad: np.ndarray
    level_replicates: np.ndarray
    mad_replicates: np.ndarray


def spectra_sources(cfg: DictConfig, model: str) -> list[SpectraSource]:
    """Every spectra file of the experiment for one model, with its data file's labels."""
    return [
        SpectraSource(
            model,
            spec,
            paths.spectra(cfg.results_dir, cfg.experiment.name, model, spec.dataset, spec.file),
        )
        for spec in experiment_files(cfg)
    ]


def load_spectra(sources: Iterable[SpectraSource]) -> pd.DataFrame:
    """Read spectra files, every row, labelled with model, dataset, condition, task and kind.

    Rows of every status are kept so that they can be counted; :func:`ok_rows` drops them.
    A missing file is an error: a summary over part of an experiment would look complete.
    """
    sources = list(sources)
    missing = [str(source.path) for source in sources if not source.path.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} spectra file(s) missing: {', '.join(missing)}")

    frames = []
    for source in sources:
        frame = pd.read_parquet(source.path)
        frame = frame.assign(
            model=source.model,
            dataset=source.spec.dataset,
            condition=source.spec.condition,
            task=source.spec.task,
            kind=source.spec.kind,
            file=source.spec.file,
        )
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*LABELS, "record_index", "layer", "module", "status"])
    frame = pd.concat(frames, ignore_index=True)
    log.info("loaded %d rows from %d spectra files", len(frame), len(sources))
    return frame


def status_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Samples (not rows) per file and status."""
    samples = frame.drop_duplicates([*LABELS, "record_index"])
    counts = samples.groupby([*LABELS, "status"], sort=False).size().rename("count")
    return counts.reset_index()


def ok_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of ok samples: the only ones any mean, interval or test sees."""
    ok = frame["status"] == "ok"
    dropped = frame.loc[~ok].drop_duplicates([*LABELS, "record_index"])
    if len(dropped):
        by_status = dropped["status"].value_counts().to_dict()
        log.info("excluding %d samples that are not ok: %s", len(dropped), by_status)
    rows = frame.loc[ok]
    if rows["layer"].isna().any() or rows["module"].isna().any():
        raise ValueError("an ok sample has a row without layer or module")
    return rows


def ordered_kinds(kinds: Iterable[str]) -> list[str]:
    """Paper 1's kinds in its order, other kinds after them in the order they come."""
    kinds = list(dict.fromkeys(kinds))
    known = [kind for kind in KIND_ORDER if kind in kinds]
    return known + [kind for kind in kinds if kind not in KIND_ORDER]


def sample_arrays(ok: pd.DataFrame) -> dict[tuple[str, str], FileSamples]:
    """Each file's ok samples as dense arrays on the layers and modules found in the data."""
    layers = np.sort(ok["layer"].dropna().unique().astype(int))
    if layers.size:
        layers = np.arange(layers.max() + 1)
    modules = tuple(m for m in MODULES if m in set(ok["module"])) + tuple(
        sorted(set(ok["module"]) - set(MODULES))
    )
    metrics = tuple(m for m in METRICS if m in ok.columns)
    columns = pd.MultiIndex.from_product([metrics, layers, modules])

    result: dict[tuple[str, str], FileSamples] = {}
    for key, rows in ok.groupby(["dataset", "file"], sort=False):
        wide = rows.set_index(["record_index", "layer", "module"])[list(metrics)]
        wide = wide.unstack(["layer", "module"]).reindex(columns=columns).sort_index()
        values = wide.to_numpy(dtype=float).reshape(len(wide), len(metrics), len(layers), -1)
        tokens = rows.groupby("record_index")["n_response_tokens"].first().reindex(wide.index)
        first = rows.iloc[0]
        result[key] = FileSamples(
            labels={label: str(first[label]) for label in LABELS},
            record_index=wide.index.to_numpy(dtype=np.int64),
            layers=layers,
            modules=modules,
            metrics=metrics,
            values=values.transpose(0, 2, 3, 1),
            response_tokens=tokens.astype("Float64").to_numpy(dtype=float, na_value=np.nan),
        )
    return result


def seeded_rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator fixed by the seed and a name, so each file's resamples don't depend on order."""
    return np.random.default_rng([seed, zlib.crc32("/".join(parts).encode())])


def long_frame(
    labels: dict[str, object], index: pd.MultiIndex, columns: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Rows of ``index`` (in C order of the arrays) with constant labels and array columns."""
    frame = index.to_frame(index=False)
    for name, value in columns.items():
        frame[name] = np.asarray(value).ravel()
    for name, value in reversed(labels.items()):
        frame.insert(0, name, value)
    return frame


def curve_rows(samples: FileSamples, weights: np.ndarray, confidence: float) -> pd.DataFrame:
    """Mean over samples per layer, module and metric, with a percentile bootstrap interval."""
    values = samples.values
    replicates = st.weighted_means(values, weights)
    low, high = st.percentile_interval(replicates, confidence)
    with np.errstate(invalid="ignore"):
        std = (
            np.nanstd(values, axis=0, ddof=1)
            if samples.n > 1
            else np.full(values.shape[1:], np.nan)
        )
    index = pd.MultiIndex.from_product(
        [samples.layers, samples.modules, samples.metrics], names=["layer", "module", "metric"]
    )
    frame = long_frame(
        samples.labels,
        index,
        {
            "mean": st.sample_means(values),
            "std": std,
            "ci_low": low,
            "ci_high": high,
            "n": np.isfinite(values).sum(axis=0),
        },
    )
    frame["layer"] = frame["layer"].astype("Int64")
    frame["mean_response_tokens"] = float(np.mean(samples.response_tokens)) if samples.n else np.nan
    return frame


def summarise_file(
    samples: FileSamples,
    groups: dict[str, tuple[int, int]],
    weights: np.ndarray,
) -> FileSummary:
    """Level and MAD of the mean curve per group, and of each resample's curve (paper 1's MAD)."""
    curve = st.sample_means(samples.flat())
    curve_replicates = st.weighted_means(samples.flat(), weights)
    return FileSummary(
        samples=samples,
        level=st.group_statistic(curve, groups, st.level),
        mad=st.group_statistic(curve, groups, st.mad),
        level_replicates=st.group_statistic(curve_replicates, groups, st.level),
        mad_replicates=st.group_statistic(curve_replicates, groups, st.mad),
    )


def group_index(samples: FileSamples, groups: dict[str, tuple[int, int]]) -> pd.MultiIndex:
    return pd.MultiIndex.from_product(
        [list(groups), samples.modules, samples.metrics], names=["group", "module", "metric"]
    )


def add_group_bounds(frame: pd.DataFrame, groups: dict[str, tuple[int, int]]) -> pd.DataFrame:
    frame.insert(
        frame.columns.get_loc("group") + 1,
        "layer_start",
        frame["group"].map({name: bounds[0] for name, bounds in groups.items()}),
    )
    frame.insert(
        frame.columns.get_loc("layer_start") + 1,
        "layer_stop",
        frame["group"].map({name: bounds[1] for name, bounds in groups.items()}),
    )
    return frame


def mad_rows(
    summary: FileSummary, groups: dict[str, tuple[int, int]], confidence: float
) -> pd.DataFrame:
    """One row per group, module and metric: MAD and level with their intervals."""
    samples = summary.samples
    mad_low, mad_high = st.percentile_interval(summary.mad_replicates, confidence)
    level_low, level_high = st.percentile_interval(summary.level_replicates, confidence)
    frame = long_frame(
        samples.labels,
        group_index(samples, groups),
        {
            "mad": summary.mad,
            "mad_low": mad_low,
            "mad_high": mad_high,
            "level": summary.level,
            "level_low": level_low,
            "level_high": level_high,
        },
    )
    frame["n"] = samples.n
    frame["mean_response_tokens"] = float(np.mean(samples.response_tokens)) if samples.n else np.nan
    return add_group_bounds(frame, groups)


def kind_pairs(kinds: list[str]) -> list[tuple[str, str]]:
    """(a, b) for every two kinds, ``a`` the later in :func:`ordered_kinds`: (detailed, none)."""
    ordered = ordered_kinds(kinds)
    return [(a, b) for b, a in itertools.combinations(ordered, 2)]


def contrast_rows(
    first: FileSummary,
    second: FileSummary,
    groups: dict[str, tuple[int, int]],
    confidence: float,
) -> pd.DataFrame:
    """Level and MAD of kind ``a`` minus kind ``b`` with an interval from independent resamples.

    The two files are resampled independently (standard two-sample bootstrap); the interval is
    the percentile interval of the difference of their replicates. ``relative`` is
    ``(a - b) / b``, with the percentile interval of the same ratio over the replicates.
    """
    a, b = first.samples, second.samples
    frames = []
    for statistic in ("level", "mad"):
        value_a, value_b = getattr(first, statistic), getattr(second, statistic)
        replicates = getattr(first, f"{statistic}_replicates") - getattr(
            second, f"{statistic}_replicates"
        )
        low, high = st.percentile_interval(replicates, confidence)
        reference = getattr(second, f"{statistic}_replicates")
        relative_low, relative_high = st.percentile_interval(
            st.relative_difference(reference, reference + replicates), confidence
        )
        labels = {**kind_pair_labels(a, b)[0], "statistic": statistic}
        frames.append(
            long_frame(
                labels,
                group_index(a, groups),
                {
                    "value_a": value_a,
                    "value_b": value_b,
                    "difference": value_a - value_b,
                    "ci_low": low,
                    "ci_high": high,
                    "relative": st.relative_difference(value_b, value_a),
                    "relative_low": relative_low,
                    "relative_high": relative_high,
                },
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    frame["n_a"], frame["n_b"] = a.n, b.n
    frame["response_tokens_a"] = float(np.mean(a.response_tokens)) if a.n else np.nan
    frame["response_tokens_b"] = float(np.mean(b.response_tokens)) if b.n else np.nan
    return frame


def condition_pairs(
    arrays: dict[tuple[str, str], FileSamples],
) -> list[tuple[FileSamples, FileSamples]]:
    """(correct, irrelevant) files of the same task and kind."""
    by_key: dict[tuple[str, str, str], FileSamples] = {}
    for samples in arrays.values():
        labels = samples.labels
        by_key[(labels["condition"], labels["task"], labels["kind"])] = samples
    return [
        (samples, by_key[(IRRELEVANT, task, kind)])
        for (condition, task, kind), samples in by_key.items()
        if condition == CORRECT and (IRRELEVANT, task, kind) in by_key
    ]


def matched(correct: FileSamples, irrelevant: FileSamples) -> tuple[np.ndarray, np.ndarray]:
    """Both files' (sample, layer, feature) values on the record indices ok in both, in order.

    The irrelevant file pairs each instruction with another instruction's response, in the same
    order of instructions, so a record index names the same instruction in both files.
    """
    _, in_correct, in_irrelevant = np.intersect1d(
        correct.record_index, irrelevant.record_index, return_indices=True
    )
    return correct.flat()[in_correct], irrelevant.flat()[in_irrelevant]


def matched_tokens(first: FileSamples, second: FileSamples) -> tuple[np.ndarray, np.ndarray]:
    """Response token counts of both files on the record indices ok in both, in order."""
    _, in_first, in_second = np.intersect1d(
        first.record_index, second.record_index, return_indices=True
    )
    return first.response_tokens[in_first], second.response_tokens[in_second]


def mean_or_nan(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def pair_labels(correct: FileSamples, irrelevant: FileSamples) -> dict[str, str]:
    return {
        "model": correct.labels["model"],
        "task": correct.labels["task"],
        "kind": correct.labels["kind"],
        "file": correct.labels["file"],
        "dataset_correct": correct.labels["dataset"],
        "dataset_irrelevant": irrelevant.labels["dataset"],
    }


def relative_difference_rows(
    correct: FileSamples,
    irrelevant: FileSamples,
    groups: dict[str, tuple[int, int]],
    weights_for,
    confidence: float,
) -> pd.DataFrame:
    """Paper 1's relative difference (irrelevant - correct) / correct, per layer, level and MAD.

    Computed on the matched instructions only, and resampled in pairs (the same instructions in
    both files in every resample), so the interval reflects the pairing.
    """
    x_correct, x_irrelevant = matched(correct, irrelevant)
    weights = weights_for(x_correct.shape[0])
    curves = {name: st.sample_means(x) for name, x in (("c", x_correct), ("i", x_irrelevant))}
    replicates = {
        name: st.weighted_means(x, weights) for name, x in (("c", x_correct), ("i", x_irrelevant))
    }
    feature_index = [correct.modules, correct.metrics]
    labels = pair_labels(correct, irrelevant)
    frames = []

    def rows(scope, outer_name, outer_values, reference, other, rep_reference, rep_other):
        low, high = st.percentile_interval(
            st.relative_difference(rep_reference, rep_other), confidence
        )
        index = pd.MultiIndex.from_product(
            [outer_values, *feature_index], names=[outer_name, "module", "metric"]
        )
        frame = long_frame(
            {**labels, "scope": scope},
            index,
            {
                "correct": reference,
                "irrelevant": other,
                "relative_difference": st.relative_difference(reference, other),
                "ci_low": low,
                "ci_high": high,
            },
        )
        frames.append(frame)

    rows(
        "layer", "layer", correct.layers, curves["c"], curves["i"], replicates["c"], replicates["i"]
    )
    for scope, function in (("level", st.level), ("mad", st.mad)):
        rows(
            scope,
            "group",
            list(groups),
            st.group_statistic(curves["c"], groups, function),
            st.group_statistic(curves["i"], groups, function),
            st.group_statistic(replicates["c"], groups, function),
            st.group_statistic(replicates["i"], groups, function),
        )
    frame = pd.concat(frames, ignore_index=True)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["n_pairs"] = x_correct.shape[0]
    tokens_correct, tokens_irrelevant = matched_tokens(correct, irrelevant)
    frame["response_tokens_correct"] = mean_or_nan(tokens_correct)
    frame["response_tokens_irrelevant"] = mean_or_nan(tokens_irrelevant)
    first = [*labels, "scope", "layer", "group"]
    return frame[first + [column for column in frame.columns if column not in first]]


def paired_test_rows(correct: FileSamples, irrelevant: FileSamples, alpha: float) -> pd.DataFrame:
    """Correct against irrelevant responses to the same instructions (standard paired tests).

    Per module and metric: Wilcoxon signed-rank and paired t on each sample's mean over layers,
    Holm-adjusted over the modules of one metric. Per layer: the same tests on each layer's value,
    Benjamini-Hochberg-adjusted over layers x modules of one metric; the share of layers whose
    adjusted p is below ``alpha`` goes with the mean-over-layers row.
    """
    x_correct, x_irrelevant = matched(correct, irrelevant)
    n_modules, n_metrics = len(correct.modules), len(correct.metrics)
    labels = pair_labels(correct, irrelevant)

    overall = st.paired_tests(np.nanmean(x_correct, axis=1), np.nanmean(x_irrelevant, axis=1))
    overall_p = overall["wilcoxon_p"].reshape(n_modules, n_metrics)
    overall["p_adjusted"] = np.column_stack(
        [st.holm(overall_p[:, k]) for k in range(n_metrics)]
    ).ravel()

    layered = st.paired_tests(x_correct, x_irrelevant)
    layer_p = layered["wilcoxon_p"].reshape(-1, n_modules, n_metrics)
    adjusted = np.stack(
        [
            st.benjamini_hochberg(layer_p[..., k].ravel()).reshape(layer_p.shape[:2])
            for k in range(n_metrics)
        ],
        axis=-1,
    )
    layered["p_adjusted"] = adjusted.reshape(layer_p.shape[0], -1)
    significant_layers = np.where(np.isfinite(adjusted), adjusted < alpha, False)
    share = (
        significant_layers.mean(axis=0)
        if adjusted.shape[0]
        else np.full(adjusted.shape[1:], np.nan)
    )

    features = [correct.modules, correct.metrics]
    mean_rows = long_frame(
        {**labels, "scope": "mean_over_layers"},
        pd.MultiIndex.from_product(features, names=["module", "metric"]),
        {**rename_means(overall), "share_layers_significant": share},
    )
    mean_rows["correction"] = "holm over modules"
    layer_rows = long_frame(
        {**labels, "scope": "layer"},
        pd.MultiIndex.from_product(
            [correct.layers, *features], names=["layer", "module", "metric"]
        ),
        rename_means(layered),
    )
    layer_rows["share_layers_significant"] = np.nan
    layer_rows["correction"] = "benjamini-hochberg over layers x modules"
    mean_rows.insert(mean_rows.columns.get_loc("module"), "layer", pd.NA)

    frame = pd.concat([mean_rows, layer_rows], ignore_index=True)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["significant"] = (frame["p_adjusted"] < alpha).fillna(False).astype(bool)
    frame["n_pairs"] = frame["n_pairs"].astype("int64")
    return frame


def rename_means(results: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {"mean_first": "mean_correct", "mean_second": "mean_irrelevant"}
    return {names.get(key, key): value for key, value in results.items()}


def holm_per_metric(p_values: np.ndarray, n_modules: int, n_metrics: int) -> np.ndarray:
    """Holm's adjustment over the modules of each metric; ``p_values`` flat in (module, metric)."""
    table = p_values.reshape(n_modules, n_metrics)
    return np.column_stack([st.holm(table[:, k]) for k in range(n_metrics)]).ravel()


def bh_share(layer_p: np.ndarray, n_metrics: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg over layers x modules of each metric, and each module's share of layers
    whose adjusted p is below ``alpha``. ``layer_p`` is (layer, module * metric)."""
    by_metric = layer_p.reshape(layer_p.shape[0], -1, n_metrics)
    adjusted = np.stack(
        [
            st.benjamini_hochberg(by_metric[..., k].ravel()).reshape(by_metric.shape[:2])
            for k in range(n_metrics)
        ],
        axis=-1,
    ).reshape(layer_p.shape)
    significant = np.where(np.isfinite(adjusted), adjusted < alpha, False)
    share = significant.mean(axis=0) if adjusted.shape[0] else np.full(adjusted.shape[1:], np.nan)
    return adjusted, share


KIND_TEST_SCOPES = {"level": st.sample_level, "mad": st.sample_mad}


def kind_pair_labels(first, second) -> tuple[dict, pd.MultiIndex]:
    """The row labels of a kind-against-kind table, and its (module, metric) columns."""
    labels = {
        "model": first.labels["model"],
        "dataset": first.labels["dataset"],
        "condition": first.labels["condition"],
        "task": first.labels["task"],
        "kind_a": first.labels["kind"],
        "kind_b": second.labels["kind"],
    }
    features = pd.MultiIndex.from_product(
        [first.modules, first.metrics], names=["module", "metric"]
    )
    return labels, features


def kind_test_rows(first: FileSamples, second: FileSamples, alpha: float) -> pd.DataFrame:
    """Kind ``a`` (``first``) against kind ``b`` (``second``) on the same instructions.

    The files of one task share their instructions in the same order (checked on the data by the
    test suite), so a record index names one instruction in both. Per module and metric, on each
    instruction's pair of samples: Wilcoxon signed-rank and paired t on ``a - b`` of the level
    (mean over layers) and of the sample's own MAD across layers (:func:`stats.sample_mad`),
    Cohen's d_z and the rank-biserial correlation, Holm-adjusted over modules. Per layer: the same
    tests of the layer's value, Benjamini-Hochberg over layers x modules, and the share of
    layers significant on the level row.
    """
    x_a, x_b = matched(first, second)
    tokens_a, tokens_b = matched_tokens(first, second)
    n_modules, n_metrics = len(first.modules), len(first.metrics)
    labels, features = kind_pair_labels(first, second)
    layered = st.paired_tests(x_b, x_a)
    layered["p_adjusted"], share = bh_share(layered["wilcoxon_p"], n_metrics, alpha)

    frames = []
    for scope, statistic in KIND_TEST_SCOPES.items():
        results = st.paired_tests(statistic(x_b), statistic(x_a))
        results["p_adjusted"] = holm_per_metric(results["wilcoxon_p"], n_modules, n_metrics)
        columns = {**rename_kinds(results)}
        columns["share_layers_significant"] = (
            share if scope == "level" else np.full(share.shape, np.nan)
        )
        frame = long_frame({**labels, "scope": scope}, features, columns)
        frame.insert(frame.columns.get_loc("module"), "layer", pd.NA)
        frame["correction"] = "holm over modules"
        frames.append(frame)
    layer_rows = long_frame(
        {**labels, "scope": "layer"},
        pd.MultiIndex.from_product(
            [first.layers, first.modules, first.metrics], names=["layer", "module", "metric"]
        ),
        rename_kinds(layered),
    )
    layer_rows["share_layers_significant"] = np.nan
    layer_rows["correction"] = "benjamini-hochberg over layers x modules"
    frames.append(layer_rows)

    frame = pd.concat(frames, ignore_index=True)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["significant"] = (frame["p_adjusted"] < alpha).fillna(False).astype(bool)
    frame["n_pairs"] = frame["n_pairs"].astype("int64")
    frame["response_tokens_a"] = mean_or_nan(tokens_a)
    frame["response_tokens_b"] = mean_or_nan(tokens_b)
    return frame


def rename_kinds(results: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {"mean_first": "mean_b", "mean_second": "mean_a"}
    return {names.get(key, key): value for key, value in results.items()}


def length_regression_rows(
    first: FileSamples,
    second: FileSamples,
    weights_a: np.ndarray,
    weights_b: np.ndarray,
    confidence: float,
) -> pd.DataFrame:
    """The kind difference ``a - b`` at equal response length, per module, metric and statistic.

    See :func:`stats.length_regression`: ``kind_coefficient`` is ``b_kind`` of
    ``y ~ 1 + kind + log(n_response_tokens)`` on every ok sample of both files, where ``y`` is a
    sample's level (mean over layers) or its own MAD across layers; ``raw_difference`` is the
    plain difference of the means, for comparison. Intervals: percentile bootstrap, each file
    resampled independently with the same weights as its curves.
    """
    labels, features = kind_pair_labels(first, second)
    frames = []
    for statistic, function in KIND_TEST_SCOPES.items():
        fit = st.length_regression(
            function(first.flat()),
            first.response_tokens,
            function(second.flat()),
            second.response_tokens,
            weights_a,
            weights_b,
        )
        kind_low, kind_high = st.percentile_interval(fit["kind_replicates"], confidence)
        length_low, length_high = st.percentile_interval(fit["length_replicates"], confidence)
        frame = long_frame(
            {**labels, "statistic": statistic},
            features,
            {
                "raw_difference": fit["raw_difference"],
                "kind_coefficient": fit["kind_coefficient"],
                "ci_low": kind_low,
                "ci_high": kind_high,
                "length_coefficient": fit["length_coefficient"],
                "length_ci_low": length_low,
                "length_ci_high": length_high,
            },
        )
        frame["n_a"], frame["n_b"] = fit["n_a"], fit["n_b"]
        frame["length_overlap"] = fit["overlap"]
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["response_tokens_a"] = mean_or_nan(first.response_tokens)
    frame["response_tokens_b"] = mean_or_nan(second.response_tokens)
    return frame


REPLICATE_METRICS = ("nuclear_norm",)


def replicate_rows(
    labels: dict[str, str],
    samples: FileSamples,
    replicates: dict[str, np.ndarray],
    group: int,
) -> pd.DataFrame:
    """Long rows of bootstrap replicates (B, G, module * metric) of group ``group``.

    Kept for :data:`REPLICATE_METRICS` only: enough for the findings' comparisons across models,
    which need replicates of each model (independent samples) to form an interval of a difference.
    """
    metrics = [m for m in samples.metrics if m in REPLICATE_METRICS]
    keep = [samples.metrics.index(m) for m in metrics]
    frames = []
    for statistic, values in replicates.items():
        by_feature = values[:, group, :].reshape(values.shape[0], len(samples.modules), -1)
        chosen = by_feature[:, :, keep]
        index = pd.MultiIndex.from_product(
            [range(chosen.shape[0]), samples.modules, metrics],
            names=["replicate", "module", "metric"],
        )
        frames.append(long_frame({**labels, "statistic": statistic}, index, {"value": chosen}))
    return concat(frames)


@dataclass
class Summary:
    """Every table of one model's summary."""

    curves: pd.DataFrame
    mad: pd.DataFrame
    contrasts: pd.DataFrame
    relative_difference: pd.DataFrame
    paired_tests: pd.DataFrame
    status_counts: pd.DataFrame
    kind_tests: pd.DataFrame
    length_regression: pd.DataFrame
    replicates: pd.DataFrame


TABLES = paths.SUMMARY_TABLES


def file_statistics(arrays, groups, n_bootstrap: int, confidence: float, seed: int):
    """Curves, MAD rows, file summaries and bootstrap weights of every file."""
    curves, mads, summaries, weights = [], [], {}, {}
    for key, samples in arrays.items():
        rng = seeded_rng(seed, samples.labels["model"], *key)
        weights[key] = st.bootstrap_weights(rng, samples.n, n_bootstrap)
        curves.append(curve_rows(samples, weights[key], confidence))
        summaries[key] = summarise_file(samples, groups, weights[key])
        mads.append(mad_rows(summaries[key], groups, confidence))
    return curves, mads, summaries, weights


def kind_statistics(summaries, weights, groups, confidence: float):
    """Contrasts, paired kind tests and length regressions of every two kinds of one task."""
    by_task: dict[tuple[str, str], dict[str, tuple]] = {}
    for key, summary in summaries.items():
        labels = summary.samples.labels
        by_task.setdefault((labels["dataset"], labels["task"]), {})[labels["kind"]] = key
    contrasts, tests, regressions = [], [], []
    for kinds in by_task.values():
        for a, b in kind_pairs(list(kinds)):
            first, second = summaries[kinds[a]], summaries[kinds[b]]
            contrasts.append(contrast_rows(first, second, groups, confidence))
            tests.append(kind_test_rows(first.samples, second.samples, 1 - confidence))
            regressions.append(
                length_regression_rows(
                    first.samples,
                    second.samples,
                    weights[kinds[a]],
                    weights[kinds[b]],
                    confidence,
                )
            )
    return contrasts, tests, regressions


def condition_statistics(arrays, groups, n_bootstrap: int, confidence: float, seed: int):
    """Relative differences, paired tests and relative-difference replicates, correct/irrelevant."""
    relative, tests, replicates = [], [], []
    all_group = list(groups).index("all")
    for correct, irrelevant in condition_pairs(arrays):
        labels = correct.labels
        rng = seeded_rng(seed, labels["model"], labels["task"], labels["kind"], "paired")
        drawn: list[np.ndarray] = []

        def weights_for(n, rng=rng, drawn=drawn):
            drawn.append(st.bootstrap_weights(rng, n, n_bootstrap))
            return drawn[-1]

        relative.append(
            relative_difference_rows(correct, irrelevant, groups, weights_for, confidence)
        )
        tests.append(paired_test_rows(correct, irrelevant, 1 - confidence))
        replicates.append(
            relative_replicate_rows(correct, irrelevant, groups, drawn[-1], all_group)
        )
    return relative, tests, replicates


def relative_replicate_rows(correct, irrelevant, groups, weights, group: int) -> pd.DataFrame:
    """Replicates of (irrelevant - correct) / correct of the all-layer level and MAD (paired)."""
    x_correct, x_irrelevant = matched(correct, irrelevant)
    curves_c = st.weighted_means(x_correct, weights)
    curves_i = st.weighted_means(x_irrelevant, weights)
    replicates = {
        f"relative_difference_{name}": st.relative_difference(
            st.group_statistic(curves_c, groups, function),
            st.group_statistic(curves_i, groups, function),
        )
        for name, function in (("level", st.level), ("mad", st.mad))
    }
    labels = {
        "dataset": correct.labels["dataset"],
        "condition": "irrelevant_vs_correct",
        "task": correct.labels["task"],
        "kind": correct.labels["kind"],
        "file": correct.labels["file"],
    }
    return replicate_rows(labels, correct, replicates, group)


def summarise(frame: pd.DataFrame, n_bootstrap: int, confidence: float, seed: int) -> Summary:
    """All statistics of the loaded spectra (one model); see the module docstring."""
    started = time.perf_counter()
    counts = status_counts(frame)
    arrays = sample_arrays(ok_rows(frame))
    n_layers = max((samples.layers.size for samples in arrays.values()), default=0)
    groups = st.layer_groups(n_layers)
    log.info(
        "%d files with ok samples, %d layers, groups %s (%.2fs)",
        len(arrays),
        n_layers,
        groups,
        time.perf_counter() - started,
    )

    started = time.perf_counter()
    curves, mads, summaries, weights = file_statistics(
        arrays, groups, n_bootstrap, confidence, seed
    )
    all_group = list(groups).index("all")
    replicates = [
        replicate_rows(
            {
                key: summary.samples.labels[key]
                for key in ("dataset", "condition", "task", "kind", "file")
            },
            summary.samples,
            {"level": summary.level_replicates, "mad": summary.mad_replicates},
            all_group,
        )
        for summary in summaries.values()
    ]
    log.info("curves and MAD of %d files (%.2fs)", len(arrays), time.perf_counter() - started)

    started = time.perf_counter()
    contrasts, kind_tests, regressions = kind_statistics(summaries, weights, groups, confidence)
    log.info("%d kind comparisons (%.2fs)", len(contrasts), time.perf_counter() - started)

    started = time.perf_counter()
    relative, tests, relative_replicates = condition_statistics(
        arrays, groups, n_bootstrap, confidence, seed
    )
    log.info("%d correct/irrelevant pairs (%.2fs)", len(tests), time.perf_counter() - started)

    return Summary(
        curves=concat(curves),
        mad=concat(mads),
        contrasts=concat(contrasts),
        relative_difference=concat(relative),
        paired_tests=concat(tests),
        status_counts=counts,
        kind_tests=concat(kind_tests),
        length_regression=concat(regressions),
        replicates=concat(replicates + relative_replicates),
    )


def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [frame for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_summary(summary: Summary, directory: Path, config_text: str) -> list[Path]:
    """Write every table and the resolved config into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TABLES:
        target = directory / f"{name}.parquet"
        getattr(summary, name).to_parquet(target, index=False)
        written.append(target)
    target = directory / "status_counts.csv"
    summary.status_counts.to_csv(target, index=False)
    written.append(target)
    target = directory / "config.yaml"
    target.write_text(config_text)
    written.append(target)
    return written


def track(cfg: DictConfig, summary: Summary) -> None:
    """Log the config and the per-layer curves of the plotted metrics to W&B (if enabled)."""
    model = cfg.model.name
    with tracking.start_run(
        cfg, job_type="reduce", name=f"reduce-{model}", group=cfg.experiment.name
    ) as run:
        curves = summary.curves
        for metric in ("nuclear_norm", "spectral_ratio"):
            if len(curves) and metric in set(curves["metric"]):
                tracking.log_curves(run, curves[curves["metric"] == metric], key=f"curves/{metric}")


def reduce_command(cfg: DictConfig) -> int:
    """Summarise the spectra of ``cfg.model.name`` in ``cfg.experiment`` (see module docstring)."""
    model = cfg.model.name
    started = time.perf_counter()
    frame = load_spectra(spectra_sources(cfg, model))
    log.info("read spectra of %s (%.2fs)", model, time.perf_counter() - started)

    summary = summarise(frame, cfg.reduce.n_bootstrap, cfg.reduce.confidence, cfg.reduce.seed)

    started = time.perf_counter()
    directory = paths.summary_dir(cfg.results_dir, cfg.experiment.name, model)
    written = write_summary(summary, directory, to_yaml(cfg))
    log.info("wrote %d files to %s (%.2fs)", len(written), directory, time.perf_counter() - started)

    track(cfg, summary)
    return 0
