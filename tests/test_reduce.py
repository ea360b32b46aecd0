"""Reduce on tiny synthetic spectra whose expected statistics are worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from gradspec import paths
from gradspec import stats as st
from gradspec.config import compose
from gradspec.reduce import (
    load_spectra,
    ok_rows,
    reduce_command,
    spectra_sources,
    status_counts,
)

METRIC_NAMES = (
    "nuclear_norm",
    "spectral_norm",
    "spectral_ratio",
    "frobenius_norm",
    "effective_rank",
    "stable_rank",
)
KINDS = ("none", "simplified", "detailed")
# Per-sample nuclear norms of q_proj on 4 layers, by kind, for the correct responses.
CORRECT_Q = {
    "none": [[4.0, 6.0, 5.0, 9.0], [2.0, 2.0, 3.0, 3.0], [6.0, 7.0, 4.0, 6.0]],
    "simplified": [[3.0, 5.0, 4.0, 8.0], [1.0, 2.0, 2.0, 2.0], [5.0, 5.0, 3.0, 5.0]],
    "detailed": [[1.0, 2.0, 1.0, 3.0], [1.0, 1.0, 2.0, 1.0], [2.0, 2.0, 1.0, 2.0]],
}
# Irrelevant = correct + shift per sample (kind-specific), so the paired difference is known.
SHIFT = {"none": [0.0, 0.1, -0.1], "simplified": [0.2, 0.1, 0.3], "detailed": [1.0, 2.0, 3.0]}


def spectra_rows(file: str, dataset: str, values: list[list[float]], statuses=None) -> pd.DataFrame:
    """Rows of the extraction schema for samples 0..n-1 on 4 layers, modules q_proj and gate_proj.

    q_proj's nuclear norm is ``values[sample][layer]``; gate_proj's is twice that; every other
    metric is the nuclear norm divided by 10. A sample whose status is not ok has one row.
    """
    statuses = statuses or ["ok"] * len(values)
    rows = []
    for sample, (curve, status) in enumerate(zip(values, statuses, strict=True)):
        base = {
            "record_index": sample,
            "sample_id": f"{file}-{sample}",
            "dataset": dataset,
            "file": file,
            "loss": 1.0,
            "n_prompt_tokens": 5,
            "n_response_tokens": 10 * (sample + 1),
            "n_tokens": 5 + 10 * (sample + 1),
            "truncated": False,
            "status": status,
            "reason": "" if status == "ok" else "synthetic",
        }
        if status != "ok":
            rows.append(
                {**base, "layer": None, "module": None, **dict.fromkeys(METRIC_NAMES, np.nan)}
            )
            continue
        for layer, value in enumerate(curve):
            for module, scale in (("q_proj", 1.0), ("gate_proj", 2.0)):
                metrics = {name: scale * value / 10 for name in METRIC_NAMES}
                metrics["nuclear_norm"] = scale * value
                rows.append({**base, "layer": layer, "module": module, **metrics})
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def irrelevant_values(kind: str) -> list[list[float]]:
    return [
        [v + shift for v in curve]
        for curve, shift in zip(CORRECT_Q[kind], SHIFT[kind], strict=True)
    ]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return compose(
        [
            f"results_dir={tmp_path_factory.mktemp('results')}",
            "experiment=quickstart",
            "model=smollm2_135m_instruct",
            "reduce.n_bootstrap=200",
            "wandb.mode=disabled",
        ]
    )


@pytest.fixture(scope="module")
def written(cfg):
    """The quickstart's six spectra files; sample 1 of the irrelevant none file failed."""
    for source in spectra_sources(cfg, cfg.model.name):
        kind = source.spec.kind
        if source.spec.condition == "correct":
            frame = spectra_rows(source.spec.file, source.spec.dataset, CORRECT_Q[kind])
        else:
            statuses = ["ok", "out_of_memory", "ok"] if kind == "none" else None
            frame = spectra_rows(
                source.spec.file, source.spec.dataset, irrelevant_values(kind), statuses
            )
        source.path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(source.path, index=False)
    return cfg


@pytest.fixture(scope="module")
def summary(written):
    reduce_command(written)
    directory = paths.summary_dir(written.results_dir, written.experiment.name, written.model.name)
    return {
        name: pd.read_parquet(directory / f"{name}.parquet")
        for name in (
            "curves",
            "mad",
            "contrasts",
            "relative_difference",
            "paired_tests",
            "kind_tests",
            "replicates",
        )
    } | {"status_counts": pd.read_csv(directory / "status_counts.csv"), "dir": directory}


def hand_mad(curve: list[float], start: int, stop: int) -> float:
    pairs = [abs(curve[i + 1] - curve[i]) for i in range(start, stop - 1)]
    return sum(pairs) / len(pairs) if pairs else float("nan")


def hand_mean_curve(values: list[list[float]]) -> list[float]:
    return [sum(sample[layer] for sample in values) / len(values) for layer in range(4)]


@pytest.mark.parametrize(
    ("n_layers", "expected"),
    [
        (28, {"early": (0, 7), "middle": (7, 21), "late": (21, 28)}),
        (32, {"early": (0, 10), "middle": (10, 20), "late": (20, 32)}),
        (26, {"early": (0, 7), "middle": (7, 20), "late": (20, 26)}),
        (42, {"early": (0, 12), "middle": (12, 30), "late": (30, 42)}),
        (30, {"early": (0, 8), "middle": (8, 23), "late": (23, 30)}),
        (18, {"early": (0, 5), "middle": (5, 14), "late": (14, 18)}),
    ],
)
def test_layer_groups(n_layers, expected):
    groups = st.layer_groups(n_layers)
    assert groups == {**expected, "all": (0, n_layers)}


def test_quarter_rule_matches_the_papers_where_it_can():
    assert st.round_half_up(28 / 4) == 7 and st.round_half_up(3 * 28 / 4) == 21
    assert (st.round_half_up(26 / 4), st.round_half_up(3 * 26 / 4)) == (7, 20)


def test_mad_counts_only_pairs_inside_the_group():
    curve = np.array([1.0, 4.0, 2.0, 7.0, 7.5])[:, None]
    assert st.mad(curve, 0, 2)[0] == pytest.approx(3.0)
    assert st.mad(curve, 2, 5)[0] == pytest.approx((5.0 + 0.5) / 2)
    assert st.mad(curve, 0, 5)[0] == pytest.approx((3 + 2 + 5 + 0.5) / 4)
    assert np.isnan(st.mad(curve, 4, 5)[0])


def test_status_counts_and_ok_rows(written):
    frame = load_spectra(spectra_sources(written, written.model.name))
    counts = status_counts(frame)
    failed = counts[(counts.dataset == "cot_500_irrelevant") & (counts.kind == "none")]
    assert dict(zip(failed.status, failed["count"], strict=True)) == {"ok": 2, "out_of_memory": 1}
    assert counts["count"].sum() == 18
    ok = ok_rows(frame)
    assert (ok.status == "ok").all()
    assert ok.drop_duplicates(["dataset", "file", "record_index"]).shape[0] == 17


def test_curves_are_hand_means(summary):
    curves = summary["curves"]
    for kind in KINDS:
        expected = hand_mean_curve(CORRECT_Q[kind])
        rows = curves[
            (curves.condition == "correct")
            & (curves.kind == kind)
            & (curves.module == "q_proj")
            & (curves.metric == "nuclear_norm")
        ].sort_values("layer")
        assert rows["mean"].tolist() == pytest.approx(expected)
        assert (rows["n"] == 3).all()
        assert (rows["mean_response_tokens"] == 20.0).all()
        assert (rows.ci_low <= rows["mean"]).all() and (rows["mean"] <= rows.ci_high).all()
    gate = curves[
        (curves.condition == "correct")
        & (curves.kind == "none")
        & (curves.module == "gate_proj")
        & (curves.metric == "spectral_ratio")
    ].sort_values("layer")
    assert gate["mean"].tolist() == pytest.approx(
        [2 * v / 10 for v in hand_mean_curve(CORRECT_Q["none"])]
    )


def test_failed_sample_is_excluded_from_means(summary):
    curves = summary["curves"]
    rows = curves[
        (curves.condition == "irrelevant")
        & (curves.kind == "none")
        & (curves.module == "q_proj")
        & (curves.metric == "nuclear_norm")
    ].sort_values("layer")
    values = irrelevant_values("none")
    expected = [(values[0][layer] + values[2][layer]) / 2 for layer in range(4)]
    assert rows["mean"].tolist() == pytest.approx(expected)
    assert (rows["n"] == 2).all()
    assert (rows["mean_response_tokens"] == 20.0).all()  # samples 0 and 2: (10 + 30) / 2


def test_mad_and_level_are_hand_computed(summary):
    mad = summary["mad"]
    # 4 layers: early [0, 1), middle [1, 3), late [3, 4), all [0, 4).
    bounds = {"early": (0, 1), "middle": (1, 3), "late": (3, 4), "all": (0, 4)}
    for kind in KINDS:
        curve = hand_mean_curve(CORRECT_Q[kind])
        for group, (start, stop) in bounds.items():
            row = mad[
                (mad.condition == "correct")
                & (mad.kind == kind)
                & (mad.module == "q_proj")
                & (mad.metric == "nuclear_norm")
                & (mad.group == group)
            ].iloc[0]
            assert (row.layer_start, row.layer_stop) == (start, stop)
            expected = hand_mad(curve, start, stop)
            if np.isnan(expected):
                assert np.isnan(row["mad"])
            else:
                assert row["mad"] == pytest.approx(expected)
                assert row.mad_low <= row["mad"] + 1e-12 or np.isclose(row.mad_low, row["mad"])
            assert row["level"] == pytest.approx(sum(curve[start:stop]) / (stop - start))
            assert row["n"] == 3


def test_contrast_is_difference_of_levels(summary):
    contrasts = summary["contrasts"]
    row = contrasts[
        (contrasts.condition == "correct")
        & (contrasts.kind_a == "detailed")
        & (contrasts.kind_b == "none")
        & (contrasts.module == "q_proj")
        & (contrasts.metric == "nuclear_norm")
        & (contrasts.group == "all")
        & (contrasts.statistic == "level")
    ].iloc[0]
    detailed = sum(map(sum, CORRECT_Q["detailed"])) / 12
    none = sum(map(sum, CORRECT_Q["none"])) / 12
    assert row.difference == pytest.approx(detailed - none)
    assert row.ci_high < 0
    assert (row.response_tokens_a, row.response_tokens_b) == (20.0, 20.0)
    pairs = set(zip(contrasts.kind_a, contrasts.kind_b, strict=True))
    assert pairs == {("simplified", "none"), ("detailed", "none"), ("detailed", "simplified")}


def test_relative_difference_per_layer_and_mad(summary):
    relative = summary["relative_difference"]
    correct = hand_mean_curve(CORRECT_Q["detailed"])
    irrelevant = hand_mean_curve(irrelevant_values("detailed"))
    rows = relative[
        (relative.kind == "detailed")
        & (relative.scope == "layer")
        & (relative.module == "q_proj")
        & (relative.metric == "nuclear_norm")
    ].sort_values("layer")
    expected = [(i - c) / c for c, i in zip(correct, irrelevant, strict=True)]
    assert rows.relative_difference.tolist() == pytest.approx(expected)
    assert (rows.n_pairs == 3).all()

    mad_row = relative[
        (relative.kind == "detailed")
        & (relative.scope == "mad")
        & (relative.group == "middle")
        & (relative.module == "q_proj")
        & (relative.metric == "nuclear_norm")
    ].iloc[0]
    # A per-sample shift leaves the mean curve's shape, hence its MAD, unchanged.
    assert mad_row.relative_difference == pytest.approx(0.0, abs=1e-12)

    none_rows = relative[(relative.kind == "none") & (relative.scope == "layer")]
    assert (none_rows.n_pairs == 2).all()  # sample 1 failed in the irrelevant file


def test_paired_tests_agree_with_scipy(summary):
    tests = summary["paired_tests"]
    row = tests[
        (tests.kind == "detailed")
        & (tests.scope == "mean_over_layers")
        & (tests.module == "q_proj")
        & (tests.metric == "nuclear_norm")
    ].iloc[0]
    correct = np.array([np.mean(curve) for curve in CORRECT_Q["detailed"]])
    irrelevant = np.array([np.mean(curve) for curve in irrelevant_values("detailed")])
    assert row.wilcoxon_p == pytest.approx(stats.wilcoxon(irrelevant - correct).pvalue)
    assert row.t_p == pytest.approx(stats.ttest_rel(irrelevant, correct).pvalue)
    differences = irrelevant - correct
    assert row.cohens_dz == pytest.approx(differences.mean() / differences.std(ddof=1))
    assert row.rank_biserial == pytest.approx(1.0)
    assert row.mean_difference == pytest.approx(2.0)
    assert row.n_pairs == 3
    # Holm over the two modules of one metric.
    gate = tests[
        (tests.kind == "detailed")
        & (tests.scope == "mean_over_layers")
        & (tests.module == "gate_proj")
        & (tests.metric == "nuclear_norm")
    ].iloc[0]
    smaller, larger = sorted([row.wilcoxon_p, gate.wilcoxon_p])
    assert min(row.p_adjusted, gate.p_adjusted) == pytest.approx(min(1.0, 2 * smaller))
    assert max(row.p_adjusted, gate.p_adjusted) == pytest.approx(max(min(1.0, 2 * smaller), larger))
    layers = tests[(tests.kind == "detailed") & (tests.scope == "layer")]
    assert len(layers) == 4 * 2 * len(METRIC_NAMES)
    assert layers.layer.notna().all()


def test_summary_files_and_config(summary):
    directory = summary["dir"]
    assert (directory / "config.yaml").read_text().startswith("model:")
    assert set(summary["status_counts"].columns) >= {"file", "status", "count"}


def test_bootstrap_is_deterministic_and_covers_the_mean():
    values = np.random.default_rng(3).normal(size=(40, 5, 2))
    intervals = []
    for _ in range(2):
        weights = st.bootstrap_weights(np.random.default_rng(7), 40, 300)
        intervals.append(st.percentile_interval(st.weighted_means(values, weights), 0.95))
    np.testing.assert_array_equal(intervals[0][0], intervals[1][0])
    mean = values.mean(axis=0)
    assert (intervals[0][0] <= mean).all() and (mean <= intervals[0][1]).all()


def test_weighted_means_equal_resampled_means():
    values = np.arange(12.0).reshape(4, 3)
    weights = np.array([[2.0, 0.0, 1.0, 1.0]])
    expected = (2 * values[0] + values[2] + values[3]) / 4
    np.testing.assert_allclose(st.weighted_means(values, weights)[0], expected)


def test_holm_and_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, np.nan])
    # Holm: sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04).
    np.testing.assert_allclose(st.holm(p)[:3], [0.03, 0.06, 0.06])
    assert np.isnan(st.holm(p)[3])
    # BH: ranks 1, 2, 3 -> 3/1*0.01, 3/2*0.03, 3/3*0.04 = 0.03, 0.045, 0.04, then the running
    # minimum from the top: 0.03, 0.04, 0.04.
    np.testing.assert_allclose(st.benjamini_hochberg(p)[:3], [0.03, 0.04, 0.04])
    assert np.isnan(st.benjamini_hochberg(p)[3])


def test_rank_biserial_by_hand():
    d = np.array([1.0, -2.0, 3.0, 0.0])[:, None]
    # Nonzero |d| ranks 1, 2, 3; W+ = 1 + 3, W- = 2.
    assert st.rank_biserial(d)[0] == pytest.approx((4 - 2) / 6)


def test_sample_mad_and_level_by_hand():
    values = np.array([[1.0, 4.0, 2.0], [0.0, 0.0, 3.0]])[:, :, None]
    np.testing.assert_allclose(st.sample_mad(values)[:, 0], [(3 + 2) / 2, (0 + 3) / 2])
    np.testing.assert_allclose(st.sample_level(values)[:, 0], [7 / 3, 1.0])


def test_length_regression_recovers_a_known_kind_effect():
    """y = 1 + 0.5 [kind a] + 2 log(tokens) exactly: the fit returns 0.5 and 2, any resample too."""
    tokens_a, tokens_b = np.array([40.0, 80.0, 160.0, 60.0]), np.array([20.0, 40.0, 90.0])
    y_a = (1 + 0.5 + 2 * np.log(tokens_a))[:, None]
    y_b = (1 + 2 * np.log(tokens_b))[:, None]
    rng = np.random.default_rng(0)
    weights_a, weights_b = st.bootstrap_weights(rng, 4, 50), st.bootstrap_weights(rng, 3, 50)
    fit = st.length_regression(y_a, tokens_a, y_b, tokens_b, weights_a, weights_b)
    assert fit["kind_coefficient"][0] == pytest.approx(0.5)
    assert fit["length_coefficient"][0] == pytest.approx(2.0)
    finite = fit["kind_replicates"][np.isfinite(fit["kind_replicates"])]
    np.testing.assert_allclose(finite, 0.5, atol=1e-8)
    assert fit["raw_difference"][0] == pytest.approx(y_a.mean() - y_b.mean())
    # Of kind a's lengths 40, 80, 160, 60, all but 160 lie in kind b's range [20, 90].
    assert fit["overlap"] == pytest.approx(3 / 4)


def test_length_regression_matches_numpy_lstsq():
    rng = np.random.default_rng(1)
    tokens_a, tokens_b = rng.uniform(50, 300, 7), rng.uniform(10, 120, 6)
    y_a, y_b = rng.normal(size=(7, 2)), rng.normal(size=(6, 2))
    fit = st.length_regression(y_a, tokens_a, y_b, tokens_b, np.ones((1, 7)), np.ones((1, 6)))
    design = np.column_stack(
        [np.ones(13), np.r_[np.ones(7), np.zeros(6)], np.log(np.r_[tokens_a, tokens_b])]
    )
    expected = np.linalg.lstsq(design, np.vstack([y_a, y_b]), rcond=None)[0]
    np.testing.assert_allclose(fit["kind_coefficient"], expected[1])
    np.testing.assert_allclose(fit["length_coefficient"], expected[2])


def test_kind_tests_agree_with_scipy(summary):
    tests = summary["kind_tests"]
    for scope, function in (("level", np.mean), ("mad", lambda c: np.mean(np.abs(np.diff(c))))):
        row = tests[
            (tests.condition == "correct")
            & (tests.kind_a == "detailed")
            & (tests.kind_b == "none")
            & (tests.scope == scope)
            & (tests.module == "q_proj")
            & (tests.metric == "nuclear_norm")
        ].iloc[0]
        detailed = np.array([function(c) for c in CORRECT_Q["detailed"]])
        none = np.array([function(c) for c in CORRECT_Q["none"]])
        assert row.mean_difference == pytest.approx((detailed - none).mean())
        assert row.t_p == pytest.approx(stats.ttest_rel(detailed, none).pvalue)
        assert row.wilcoxon_p == pytest.approx(stats.wilcoxon(detailed - none).pvalue)
        assert row.n_pairs == 3
    layers = tests[
        (tests.scope == "layer") & (tests.kind_a == "detailed") & (tests.kind_b == "none")
    ]
    assert layers.layer.notna().all() and len(layers) == 2 * 4 * 2 * len(METRIC_NAMES)


def test_contrast_relative_and_replicates(summary):
    contrasts = summary["contrasts"]
    row = contrasts[
        (contrasts.condition == "correct")
        & (contrasts.kind_a == "detailed")
        & (contrasts.kind_b == "none")
        & (contrasts.module == "q_proj")
        & (contrasts.metric == "nuclear_norm")
        & (contrasts.group == "all")
        & (contrasts.statistic == "level")
    ].iloc[0]
    assert row.relative == pytest.approx(row.value_a / row.value_b - 1)
    assert row.relative_low <= row.relative <= row.relative_high
    replicates = summary["replicates"]
    assert set(replicates.statistic) == {
        "level",
        "mad",
        "relative_difference_level",
        "relative_difference_mad",
    }
    assert set(replicates.metric) == {"nuclear_norm"}
    assert replicates.replicate.nunique() == 200
