"""Every cell of the MAD and relative-difference tables against hand arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_reduce import spectra_rows

from gradspec import paths
from gradspec.config import compose
from gradspec.reduce import reduce_command, spectra_sources
from gradspec.tables import tables_command

# 3 samples x 8 layers of q_proj nuclear norms; 8 layers: early [0, 2), middle [2, 6), late [6, 8).
CORRECT = {
    "none": [
        [1.0, 3.0, 2.0, 6.0, 4.0, 4.0, 9.0, 5.0],
        [2.0, 2.0, 3.0, 3.0, 5.0, 1.0, 7.0, 6.0],
        [3.0, 4.0, 1.0, 3.0, 6.0, 4.0, 8.0, 1.0],
    ],
    "simplified": [
        [1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 5.0],
        [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0],
        [1.0, 3.0, 2.0, 4.0, 3.0, 5.0, 4.0, 6.0],
    ],
    "detailed": [
        [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0],
        [0.5, 1.5, 0.5, 1.5, 0.5, 1.5, 0.5, 1.5],
        [1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0, 2.0],
    ],
}
# Irrelevant responses: every value times (1 + factor) for the kind.
FACTOR = {"none": 0.0, "simplified": 0.5, "detailed": 1.0}
BOUNDS = {"early": (0, 2), "middle": (2, 6), "late": (6, 8), "all": (0, 8)}
MODULE_SCALE = {"q_proj": 1.0, "gate_proj": 2.0}


def irrelevant(kind):
    return [[v * (1 + FACTOR[kind]) for v in sample] for sample in CORRECT[kind]]


def mean_curve(values):
    return [sum(sample[i] for sample in values) / len(values) for i in range(8)]


def hand_mad(curve, start, stop):
    pairs = [abs(curve[i + 1] - curve[i]) for i in range(start, stop - 1)]
    return sum(pairs) / len(pairs)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    cfg = compose([f"results_dir={results}", "experiment=quickstart", "reduce.n_bootstrap=20"])
    for source in spectra_sources(cfg, cfg.model.name):
        kind = source.spec.kind
        values = CORRECT[kind] if source.spec.condition == "correct" else irrelevant(kind)
        source.path.parent.mkdir(parents=True, exist_ok=True)
        spectra_rows(source.spec.file, source.spec.dataset, values).to_parquet(source.path)
    reduce_command(cfg)
    tables_command(cfg)
    return paths.tables_dir(results, cfg.experiment.name, cfg.model.name)


def test_mad_table_cells(tables):
    table = pd.read_csv(tables / "mad_nuclear_norm.csv")
    assert table[["kind", "condition"]].values.tolist() == [
        ["none", "correct"],
        ["none", "irrelevant"],
        ["simplified", "correct"],
        ["simplified", "irrelevant"],
        ["detailed", "correct"],
        ["detailed", "irrelevant"],
    ]
    for _, row in table.iterrows():
        values = CORRECT[row.kind] if row.condition == "correct" else irrelevant(row.kind)
        curve = mean_curve(values)
        for module, scale in MODULE_SCALE.items():
            for group, (start, stop) in BOUNDS.items():
                expected = scale * hand_mad(curve, start, stop)
                assert row[f"{module} {group}"] == pytest.approx(expected), (row.kind, group)
        assert row["tokens"] == pytest.approx((10 + 20 + 30) / 3)
        assert row["n"] == 3


def test_mad_table_spot_values(tables):
    table = pd.read_csv(tables / "mad_nuclear_norm.csv").set_index(["kind", "condition"])
    # Detailed, correct: mean curve 2.5/3, 4.5/3, 4.5/3, 4.5/3, 3.5/3, 5.5/3, 5.5/3, 6.5/3.
    assert table.loc[("detailed", "correct"), "q_proj early"] == pytest.approx(2 / 3)
    assert table.loc[("detailed", "correct"), "q_proj middle"] == pytest.approx(
        (0 + 1 / 3 + 2 / 3) / 3
    )
    assert table.loc[("detailed", "correct"), "q_proj all"] == pytest.approx(
        (2 + 1 + 2 + 1) / 3 / 7
    )


def test_relative_difference_table_cells(tables):
    table = pd.read_csv(tables / "relative_difference_mad_nuclear_norm.csv")
    assert table["kind"].tolist() == ["none", "simplified", "detailed"]
    for _, row in table.iterrows():
        for module in MODULE_SCALE:
            for group in BOUNDS:
                # Scaling every value by (1 + f) scales the MAD by (1 + f).
                assert row[f"{module} {group}"] == pytest.approx(FACTOR[row.kind])
        assert row["n"] == 3
    level = pd.read_csv(tables / "relative_difference_level_nuclear_norm.csv")
    assert level.set_index("kind").loc["detailed", "q_proj all"] == pytest.approx(1.0)


def test_table_formats_exist(tables):
    for stem in ("mad_nuclear_norm", "relative_difference_mad_spectral_ratio"):
        markdown = (tables / f"{stem}.md").read_text()
        assert markdown.startswith("| task")
        latex = (tables / f"{stem}.tex").read_text()
        assert "\\begin{tabular}" in latex and "q\\_proj" in latex


def sample_level(sample):
    return sum(sample) / len(sample)


def sample_mad(sample):
    return sum(abs(sample[i + 1] - sample[i]) for i in range(len(sample) - 1)) / (len(sample) - 1)


def test_interval_tables(tables):
    table = pd.read_csv(tables / "mad_ci_nuclear_norm.csv").set_index(["kind", "condition"])
    cell = table.loc[("detailed", "correct"), "q_proj early"]
    value, interval = cell.split(" [")
    low, high = (float(x) for x in interval.rstrip("]").split(", "))
    assert float(value) == pytest.approx(2 / 3, rel=1e-3) and low <= float(value) <= high
    relative = pd.read_csv(tables / "relative_difference_level_ci_nuclear_norm.csv")
    assert relative.set_index("kind").loc["detailed", "q_proj all"].startswith("1 [")
    plain = pd.read_csv(tables / "relative_difference_level_nuclear_norm.csv")
    assert plain["tokens correct"].tolist() == pytest.approx([20.0] * 3)


def test_kind_test_cells(tables):
    table = pd.read_csv(tables / "kind_tests_nuclear_norm.csv")
    for statistic, function in (("level", sample_level), ("mad", sample_mad)):
        row = table[
            (table.condition == "correct")
            & (table.kind_a == "detailed")
            & (table.kind_b == "none")
            & (table.statistic == statistic)
        ].iloc[0]
        differences = np.array(
            [
                function(d) - function(n)
                for d, n in zip(CORRECT["detailed"], CORRECT["none"], strict=True)
            ]
        )
        assert row["q_proj difference"] == pytest.approx(differences.mean())
        assert row["q_proj d_z"] == pytest.approx(differences.mean() / differences.std(ddof=1))
        assert row["gate_proj difference"] == pytest.approx(2 * differences.mean())
        # Three pairs: Wilcoxon's smallest two-sided p is 0.25, Holm over 2 modules gives 0.5.
        assert row["q_proj p (Holm)"] == pytest.approx(0.5)
        assert row["n"] == 3 and row["tokens a"] == pytest.approx(20.0)


def test_length_regression_cells(tables):
    table = pd.read_csv(tables / "length_regression_nuclear_norm.csv")
    row = table[
        (table.condition == "correct")
        & (table.kind_a == "detailed")
        & (table.kind_b == "simplified")
        & (table.statistic == "level")
    ].iloc[0]
    tokens = np.log([10.0, 20.0, 30.0] * 2)
    design = np.column_stack([np.ones(6), [1.0] * 3 + [0.0] * 3, tokens])
    y = [sample_level(s) for s in CORRECT["detailed"] + CORRECT["simplified"]]
    expected = np.linalg.lstsq(design, y, rcond=None)[0][1]
    value = float(row["q_proj b_kind [CI]"].split(" [")[0])
    assert value == pytest.approx(expected, rel=1e-3)
    raw = np.mean(y[:3]) - np.mean(y[3:])
    assert row["q_proj raw"] == pytest.approx(raw)
    assert row["length overlap"] == 1.0


def test_datasets_sharing_tasks_and_kinds_get_rows_of_their_own(tmp_path):
    """Paper 2's metrics (one dataset each) name the same files: wiz highest and lowest."""
    overrides = [
        f"results_dir={tmp_path}",
        "experiment=quality",
        "experiment.datasets=[quality_diff,quality_reward]",
        "experiment.tasks=[wiz]",
        "reduce.n_bootstrap=20",
    ]
    cfg = compose(overrides)
    model = cfg.experiment.models[0]
    # Reward's values are three times difficulty's, so a mixed-up row would show.
    scale = {"quality_diff": 1.0, "quality_reward": 3.0}
    kinds = {"highest": "detailed", "lowest": "none"}
    for source in spectra_sources(cfg, model):
        values = [
            [v * scale[source.spec.dataset] for v in sample]
            for sample in CORRECT[kinds[source.spec.kind]]
        ]
        source.path.parent.mkdir(parents=True, exist_ok=True)
        spectra_rows(source.spec.file, source.spec.dataset, values).to_parquet(source.path)
    cfg = compose([*overrides, f"model={model}"])
    reduce_command(cfg)
    tables_command(cfg)

    directory = paths.tables_dir(tmp_path, cfg.experiment.name, model)
    table = pd.read_csv(directory / "mad_nuclear_norm.csv")
    assert table[["dataset", "kind"]].values.tolist() == [
        ["quality_diff", "highest"],
        ["quality_diff", "lowest"],
        ["quality_reward", "highest"],
        ["quality_reward", "lowest"],
    ]
    for _, row in table.iterrows():
        curve = mean_curve(CORRECT[kinds[row.kind]])
        expected = scale[row.dataset] * hand_mad(curve, 0, 8)
        assert row["q_proj all"] == pytest.approx(expected), (row.dataset, row.kind)

    tests = pd.read_csv(directory / "kind_tests_nuclear_norm.csv")
    assert sorted(set(tests["dataset"])) == ["quality_diff", "quality_reward"]
    assert len(tests) == 4  # (level, mad) per dataset
