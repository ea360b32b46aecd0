"""The statistics behind the summaries: layer groups, MAD, bootstrap intervals, paired tests.

Arrays put samples first and layers second to last: a set of per-sample values is ``(n, L, F)``
and a curve is ``(L, F)``, where ``F`` is any flattening of modules and metrics. Everything here
is plain numpy/scipy on arrays so that it can be checked against hand arithmetic.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

GROUPS = ("early", "middle", "late", "all")

# The papers' early/middle/late boundaries for the depths they studied (paper 1, Sec. 3 and the
# MAD tables of its appendix): depth -> (end of early, end of middle) as half-open layer indices.
PAPER_BOUNDARIES: dict[int, tuple[int, int]] = {
    28: (7, 21),
    32: (10, 20),
    26: (7, 20),
    42: (12, 30),
}


def round_half_up(value: float) -> int:
    """Round .5 upwards; Python's ``round`` rounds .5 to even, which would give 26 -> 6."""
    return math.floor(value + 0.5)


def layer_boundaries(n_layers: int) -> tuple[int, int]:
    """Where the early group ends and the late group starts, for a model of ``n_layers`` layers.

    The papers' boundaries where the depth matches one they used; otherwise a quarter and three
    quarters of the depth, rounded half up. The rule reproduces 28 -> (7, 21) and 26 -> (7, 20)
    exactly, but gives 32 -> (8, 24) against the papers' (10, 20) and 42 -> (11, 32) against
    (12, 30); those two depths therefore always take the papers' values. For the models here it
    gives 30 -> (8, 23) (SmolLM2) and 18 -> (5, 14) (Gemma-3-270M).
    """
    if n_layers in PAPER_BOUNDARIES:
        return PAPER_BOUNDARIES[n_layers]
    return round_half_up(n_layers / 4), round_half_up(3 * n_layers / 4)


def layer_groups(n_layers: int) -> dict[str, tuple[int, int]]:
    """Half-open layer ranges ``[start, stop)`` of the early, middle and late groups and of all."""
    early_end, late_start = layer_boundaries(n_layers)
    return {
        "early": (0, early_end),
        "middle": (early_end, late_start),
        "late": (late_start, n_layers),
        "all": (0, n_layers),
    }


def mad(curves: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Mean absolute difference of adjacent layers of a curve over the group ``[start, stop)``.

    Paper 1 (its MAD): ``mean_i |c[i+1] - c[i]|`` for ``i = start .. stop-2``, i.e. only pairs whose
    two layers both lie in the group. The pair that straddles two groups, ``(stop-1, stop)``,
    belongs to neither group but is counted in "all", so the MAD over all layers is not an average
    of the three group MADs. A group with fewer than two layers has no pair and gives NaN. The
    layer axis is the second to last.
    """
    if stop - start < 2:
        return np.full(curves.shape[:-2] + curves.shape[-1:], np.nan)
    segment = curves[..., start:stop, :]
    return np.abs(np.diff(segment, axis=-2)).mean(axis=-2)


def level(curves: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Mean of a curve over the layers ``[start, stop)``: the height of the curve, not its shape."""
    if stop <= start:
        return np.full(curves.shape[:-2] + curves.shape[-1:], np.nan)
    return np.nanmean(curves[..., start:stop, :], axis=-2)


def group_statistic(curves: np.ndarray, groups: dict[str, tuple[int, int]], function) -> np.ndarray:
    """``function`` over each group, stacked on a new axis in place of the layer axis."""
    return np.stack([function(curves, *groups[name]) for name in groups], axis=-2)


def bootstrap_weights(rng: np.random.Generator, n: int, n_bootstrap: int) -> np.ndarray:
    """How often each of ``n`` samples is drawn in each of ``n_bootstrap`` resamples.

    Standard nonparametric bootstrap over samples: a resample of size ``n`` drawn with
    replacement is the same as a multinomial count vector, which turns a resampled mean into a
    matrix product.
    """
    if n == 0:
        return np.zeros((n_bootstrap, 0))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(float)


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Means of ``values`` (n, ...) under each weight row (B, n), ignoring NaN entries."""
    flat = values.reshape(values.shape[0], -1)
    present = np.isfinite(flat)
    sums = weights @ np.where(present, flat, 0.0)
    counts = weights @ present.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return means.reshape((weights.shape[0],) + values.shape[1:])


def sample_means(values: np.ndarray) -> np.ndarray:
    """Mean over samples (axis 0), NaN where no sample has a value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval over axis 0 (Efron's percentile method)."""
    tail = 100 * (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanpercentile(replicates, tail, axis=0)
        high = np.nanpercentile(replicates, 100 - tail, axis=0)
    return low, high


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (standard statistics); NaN entries are no tests."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    m = tested.size
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy's); NaN entries are no tests."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.isfinite(p)
    if tested.any():
        adjusted[tested] = stats.false_discovery_control(p[tested], method="bh")
    return adjusted


def cohens_dz(differences: np.ndarray) -> np.ndarray:
    """Cohen's d_z: mean of the paired differences over their standard deviation (ddof 1)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return differences.mean(axis=0) / differences.std(axis=0, ddof=1)


def rank_biserial(differences: np.ndarray) -> np.ndarray:
    """Matched-pairs rank-biserial correlation ``(W+ - W-) / (W+ + W-)`` (standard statistics).

    Ranks are of the absolute nonzero differences, ties averaged; zero differences are dropped,
    as in Wilcoxon's signed-rank test. It lies in [-1, 1]; +1 when every difference is positive.
    """
    flat = differences.reshape(differences.shape[0], -1)
    result = np.full(flat.shape[1], np.nan)
    for column in range(flat.shape[1]):
        d = flat[:, column]
        d = d[np.isfinite(d) & (d != 0)]
        if d.size == 0:
            continue
        ranks = stats.rankdata(np.abs(d))
        positive, negative = ranks[d > 0].sum(), ranks[d < 0].sum()
        result[column] = (positive - negative) / (positive + negative)
    return result.reshape(differences.shape[1:])


def paired_tests(first: np.ndarray, second: np.ndarray) -> dict[str, np.ndarray]:
    """Paired tests of ``second - first`` over axis 0 (pairs), for every other entry at once.

    Wilcoxon's signed-rank test (zero differences dropped, scipy's default method) and the paired
    t-test, with Cohen's d_z and the rank-biserial correlation as effect sizes. A column whose
    differences are all zero has no test: its p-values are NaN.
    """
    differences = second - first
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        wilcoxon = stats.wilcoxon(differences, axis=0)
        t_test = stats.ttest_rel(second, first, axis=0)
    return {
        "n_pairs": np.isfinite(differences).sum(axis=0),
        "mean_first": sample_means(first),
        "mean_second": sample_means(second),
        "mean_difference": sample_means(differences),
        "wilcoxon_statistic": np.asarray(wilcoxon.statistic, dtype=float),
        "wilcoxon_p": np.asarray(wilcoxon.pvalue, dtype=float),
        "t_statistic": np.asarray(t_test.statistic, dtype=float),
        "t_p": np.asarray(t_test.pvalue, dtype=float),
        "cohens_dz": cohens_dz(differences),
        "rank_biserial": rank_biserial(differences),
    }


def relative_difference(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``(other - reference) / reference``: paper 1's relative difference, irrelevant vs correct."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (other - reference) / reference


def sample_mad(values: np.ndarray) -> np.ndarray:
    """Each sample's own MAD across all its layers: ``mean_l |x[l+1] - x[l]|`` per sample.

    Paper 1's MAD is of the mean curve (:func:`mad`); this per-sample version is what a paired
    test of instability needs, one number per instruction. Input (n, L, F), output (n, F).
    """
    if values.shape[-2] < 2:
        return np.full(values.shape[:-2] + values.shape[-1:], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.abs(np.diff(values, axis=-2)), axis=-2)


def sample_level(values: np.ndarray) -> np.ndarray:
    """Each sample's mean over its layers: (n, L, F) -> (n, F)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=-2)


def length_design(indicator: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The design matrix ``[1, kind, log(tokens)]`` of the length-controlled comparison."""
    return np.column_stack([np.ones_like(tokens), indicator, np.log(tokens)])


def weighted_least_squares(
    design: np.ndarray, values: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Coefficients of ``values ~ design`` under each weight row, per column, ignoring NaN.

    Ordinary least squares (normal equations ``(Xᵀ W X) b = Xᵀ W y``) where ``W`` holds each
    sample's bootstrap count, so a weight row is one resample. ``design`` is (n, p), ``values``
    (n, F), ``weights`` (B, n); the result is (B, F, p). A sample whose value is NaN drops out of
    that column's fit only. A singular system (e.g. a resample without both kinds) takes the
    pseudo-inverse, and such a replicate's coefficients are NaN.
    """
    present = np.isfinite(values)
    filled = np.where(present, values, 0.0)
    gram = np.einsum("bn,nf,ni,nj->bfij", weights, present.astype(float), design, design)
    moment = np.einsum("bn,nf,ni->bfi", weights, filled, design)
    rank = np.linalg.matrix_rank(gram)
    with np.errstate(invalid="ignore"):
        coefficients = np.einsum("bfij,bfj->bfi", np.linalg.pinv(gram), moment)
    coefficients[rank < design.shape[1]] = np.nan
    return coefficients


def length_regression(
    values_a: np.ndarray,
    tokens_a: np.ndarray,
    values_b: np.ndarray,
    tokens_b: np.ndarray,
    weights_a: np.ndarray,
    weights_b: np.ndarray,
) -> dict[str, np.ndarray]:
    """Kind ``a`` against kind ``b`` with response length held fixed (analysis of covariance).

    Fits ``y = b0 + b_kind * [sample is of kind a] + b_len * log(n_response_tokens)`` by least
    squares on the samples of both kinds, per column of ``values`` (n, F). ``b_kind`` is the
    difference between the kinds at equal length; the raw difference of means is returned next to
    it. Replicates come from resampling each kind's samples independently (``weights_a`` (B, n_a),
    ``weights_b`` (B, n_b)). When the two kinds' lengths do not overlap, ``b_kind`` is an
    extrapolation along the fitted length slope: ``overlap`` (the share of kind ``a``'s samples
    whose length lies within kind ``b``'s range) says how much the data support it.
    """
    usable_a, usable_b = tokens_a > 0, tokens_b > 0
    values = np.concatenate([values_a[usable_a], values_b[usable_b]])
    tokens = np.concatenate([tokens_a[usable_a], tokens_b[usable_b]])
    indicator = np.concatenate([np.ones(usable_a.sum()), np.zeros(usable_b.sum())])
    design = length_design(indicator, tokens)
    point = weighted_least_squares(design, values, np.ones((1, tokens.size)))[0]
    weights = np.concatenate([weights_a[:, usable_a], weights_b[:, usable_b]], axis=1)
    replicates = weighted_least_squares(design, values, weights)

    lengths_b = tokens_b[usable_b]
    overlap = (
        float(
            np.mean(
                (tokens_a[usable_a] >= lengths_b.min()) & (tokens_a[usable_a] <= lengths_b.max())
            )
        )
        if usable_a.any() and usable_b.any()
        else float("nan")
    )
    return {
        "kind_coefficient": point[:, 1],
        "kind_replicates": replicates[:, :, 1],
        "length_coefficient": point[:, 2],
        "length_replicates": replicates[:, :, 2],
        "raw_difference": sample_means(values_a[usable_a]) - sample_means(values_b[usable_b]),
        "n_a": int(usable_a.sum()),
        "n_b": int(usable_b.sum()),
        "overlap": overlap,
    }
