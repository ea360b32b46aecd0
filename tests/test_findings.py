"""Verdict rules on constructed summaries, and the findings files of a reduced experiment."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from test_reduce import CORRECT_Q, irrelevant_values, spectra_rows

from gradspec import paths
from gradspec.config import compose
from gradspec.findings import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    aggregate,
    claim_five,
    claim_one,
    claim_one_early,
    claim_one_length,
    claim_three,
    findings_command,
    interval_verdict,
    longer_verdict,
    model_pairs,
    model_role,
    no_better_verdict,
    separation_verdict,
    smallest_wilcoxon_p,
)
from gradspec.reduce import reduce_command, spectra_sources


def contrasts(intervals: list[tuple[float, float]]) -> pd.DataFrame:
    """Detailed - none level contrasts of one task, one module per interval."""
    rows = []
    for i, (low, high) in enumerate(intervals):
        rows.append(
            {
                "model": "m",
                "dataset": "d",
                "condition": "correct",
                "task": "t",
                "kind_a": "detailed",
                "kind_b": "none",
                "statistic": "level",
                "group": "all",
                "module": f"mod{i}",
                "metric": "nuclear_norm",
                "value_a": 1.0,
                "value_b": 2.0,
                "difference": (low + high) / 2,
                "ci_low": low,
                "ci_high": high,
                "n_a": 10,
                "n_b": 10,
                "response_tokens_a": 300.0,
                "response_tokens_b": 5.0,
            }
        )
    return pd.DataFrame(rows)


def paired(significant: dict[str, list[bool]]) -> pd.DataFrame:
    """Mean-over-layers paired tests of one task: significance per kind and module."""
    rows = []
    for kind, flags in significant.items():
        for i, flag in enumerate(flags):
            rows.append(
                {
                    "task": "t",
                    "kind": kind,
                    "module": f"mod{i}",
                    "metric": "nuclear_norm",
                    "scope": "mean_over_layers",
                    "n_pairs": 50,
                    "mean_correct": 1.0,
                    "mean_irrelevant": 2.0 if flag else 1.0,
                    "cohens_dz": 1.0 if flag else 0.0,
                    "rank_biserial": 0.9 if flag else 0.0,
                    "wilcoxon_p": 0.001 if flag else 0.6,
                    "p_adjusted": 0.003 if flag else 0.6,
                    "significant": flag,
                    "share_layers_significant": 1.0 if flag else 0.0,
                }
            )
    return pd.DataFrame(rows)


EMPTY_RELATIVE = pd.DataFrame(
    columns=[
        "task",
        "kind",
        "module",
        "metric",
        "scope",
        "group",
        "relative_difference",
        "ci_low",
        "ci_high",
    ]  # fmt: skip
)


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (-2.0, -1.0, HOLDS),
        (1.0, 2.0, FAILS),
        (-1.0, 1.0, INCONCLUSIVE),
        (math.nan, 1.0, INCONCLUSIVE),
    ],
)
def test_interval_verdict(low, high, expected):
    assert interval_verdict(low, high) == expected


def test_aggregate():
    assert aggregate([HOLDS, HOLDS, INCONCLUSIVE]) == HOLDS
    assert aggregate([HOLDS, HOLDS, FAILS]) == INCONCLUSIVE
    assert aggregate([FAILS, FAILS, INCONCLUSIVE]) == FAILS
    assert aggregate([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert aggregate([]) == INCONCLUSIVE


def test_separation_verdict():
    assert separation_verdict(1.0, 0.0) == HOLDS
    assert separation_verdict(1.0, 0.5) == HOLDS
    assert separation_verdict(1.0, 0.75) == FAILS
    assert separation_verdict(0.25, 0.0) == INCONCLUSIVE


def test_claim_one_verdicts():
    assert claim_one(contrasts([(-3.0, -1.0), (-2.0, -0.5)]))["verdict"] == HOLDS
    assert claim_one(contrasts([(0.5, 2.0), (1.0, 3.0)]))["verdict"] == FAILS
    mixed = claim_one(contrasts([(-3.0, -1.0), (-1.0, 1.0)]))
    assert mixed["verdict"] == INCONCLUSIVE
    assert mixed["counts"] == {HOLDS: 1, FAILS: 0, INCONCLUSIVE: 1}
    assert mixed["cells"][0]["response_tokens_a"] == 300.0


def grouped_contrasts(groups: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """Detailed - none level contrasts of one module, one row per layer group."""
    frame = contrasts(list(groups.values())).assign(module="q_proj")
    return frame.assign(group=list(groups))


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        # Detailed - none per group; the gap none - Detailed is the negative: early 3..5.
        ({"early": (-5.0, -3.0), "middle": (-2.0, -1.0), "late": (-2.5, -0.5)}, HOLDS),
        # Middle's gap interval [2, 4] overlaps early's [3, 5].
        ({"early": (-5.0, -3.0), "middle": (-4.0, -2.0), "late": (-2.5, -0.5)}, INCONCLUSIVE),
        # Late's gap [6, 7] lies above early's [3, 5].
        ({"early": (-5.0, -3.0), "middle": (-2.0, -1.0), "late": (-7.0, -6.0)}, FAILS),
    ],
)
def test_claim_one_early_layers(groups, expected):
    result = claim_one_early(grouped_contrasts(groups))
    assert result["testable"]
    [cell] = result["cells"]
    assert cell["verdict"] == expected
    assert (cell["gap_early"], cell["gap_early_low"], cell["gap_early_high"]) == (4.0, 3.0, 5.0)
    assert result["verdict"] == expected


def test_claim_one_early_layers_needs_every_group():
    frame = grouped_contrasts({"early": (-5.0, -3.0), "all": (-2.0, -1.0)})
    assert claim_one_early(frame) == {"testable": False}


def test_claim_one_not_testable_without_detailed():
    frame = contrasts([(-3.0, -1.0)]).assign(kind_a="simplified")
    assert claim_one(frame) == {"testable": False}


def test_claim_three_verdicts():
    holds = paired({"detailed": [True, True, False], "none": [False, False, False]})
    assert claim_three(holds, EMPTY_RELATIVE, {})["verdict"] == HOLDS
    fails = paired({"detailed": [True, True, True], "none": [True, True, False]})
    assert claim_three(fails, EMPTY_RELATIVE, {})["verdict"] == FAILS
    neither = paired({"detailed": [True, False, False], "none": [False, False, False]})
    result = claim_three(neither, EMPTY_RELATIVE, {})
    assert result["verdict"] == INCONCLUSIVE
    assert result["tasks"][0]["share_significant_detailed"] == pytest.approx(1 / 3)


def test_claim_three_needs_both_kinds():
    only = paired({"detailed": [True, True]})
    assert claim_three(only, EMPTY_RELATIVE, {}) == {"testable": False}


def test_findings_files(tmp_path):
    cfg = compose([f"results_dir={tmp_path}", "experiment=quickstart", "reduce.n_bootstrap=200"])
    for source in spectra_sources(cfg, cfg.model.name):
        kind = source.spec.kind
        values = CORRECT_Q[kind] if source.spec.condition == "correct" else irrelevant_values(kind)
        source.path.parent.mkdir(parents=True, exist_ok=True)
        spectra_rows(source.spec.file, source.spec.dataset, values).to_parquet(source.path)
    reduce_command(cfg)
    findings_command(cfg)

    summary = paths.summary_dir(tmp_path, cfg.experiment.name, cfg.model.name)
    result = json.loads((summary / "findings.json").read_text())
    claim = result["claims"]["1"]
    # Detailed curves lie far below the None curves: every level cell holds.
    levels = [cell for cell in claim["cells"] if cell["statistic"] == "level"]
    assert {cell["verdict"] for cell in levels} == {HOLDS}
    assert claim["by_statistic"]["level"] == HOLDS
    # Three pairs cannot reach significance (Wilcoxon's smallest p with n=3 is 0.25).
    assert result["claims"]["3"]["verdict"] == INCONCLUSIVE

    markdown = (paths.experiment_dir(tmp_path, cfg.experiment.name) / "findings.md").read_text()
    assert markdown.startswith("# Findings: quickstart")
    assert "## Verdict rules" in markdown and "response tokens" in markdown
    assert "## Claim 1" in markdown and "## Claim 3" in markdown


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (-0.2, 0.3, HOLDS),
        (-0.9, -0.6, FAILS),
        (-0.7, -0.1, INCONCLUSIVE),
        (math.nan, 0, INCONCLUSIVE),
    ],
)
def test_longer_verdict(low, high, expected):
    assert longer_verdict(low, high) == expected


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.01, 0.2, FAILS),
        (-0.3, -0.1, HOLDS),
        (-0.04, 0.03, HOLDS),
        (-0.2, 0.2, INCONCLUSIVE),
    ],
)
def test_no_better_verdict(low, high, expected):
    assert no_better_verdict(low, high) == expected


def test_claim_one_at_equal_length():
    frame = contrasts([(-3.0, -1.0), (-1.0, 2.0)]).rename(columns={"difference": "raw_difference"})
    frame = frame.assign(
        kind_coefficient=[-2.0, 0.5], length_coefficient=1.0, length_overlap=0.0
    ).drop(columns=["group", "value_a", "value_b"])
    result = claim_one_length(frame)
    assert result["counts"] == {HOLDS: 1, FAILS: 0, INCONCLUSIVE: 1}
    assert result["verdict"] == INCONCLUSIVE
    assert result["cells"][0]["length_overlap"] == 0.0


def test_claim_five_on_relative_changes():
    frame = contrasts([(-1.0, 1.0)] * 2).assign(
        kind_a=["words_500", "words_1000"],
        kind_b="words_100",
        relative=[-0.1, -0.8],
        relative_low=[-0.3, -0.9],
        relative_high=[0.1, -0.6],
    )
    result = claim_five(frame)
    assert [cell["verdict"] for cell in result["cells"]] == [HOLDS, FAILS]
    assert result["verdict"] == INCONCLUSIVE
    assert claim_five(frame.assign(kind_b="none")) == {"testable": False}


THREE_MODELS = ["smollm2_135m_instruct", "smollm2_135m_instruct_base", "gemma3_270m"]


def test_model_pairs_from_the_configs():
    pairs = model_pairs([model_role(name) for name in THREE_MODELS])
    assert pairs == [
        {
            "instruct": "smollm2_135m_instruct",
            "base": "smollm2_135m_instruct_base",
            "relation": "same weights, base template",
        },
        {
            "instruct": "smollm2_135m_instruct",
            "base": "gemma3_270m",
            "relation": "different family and tuning",
        },
    ]


# Every sample alike, so each bootstrap replicate equals the estimate and intervals are points.
ZIGZAG, FLAT = [1.0, 9.0, 1.0, 9.0], [5.0, 5.0, 5.0, 5.0]


def model_values(model: str, kind: str, condition: str) -> list[list[float]]:
    """The instruct model zigzags on fast kinds (MAD 8, level 5); the others are flat.

    Irrelevant Detailed responses are 1.5 x the correct ones for every model (|relative| 0.5).
    """
    curve = ZIGZAG if model == "smollm2_135m_instruct" and kind != "detailed" else FLAT
    factor = 1.5 if condition == "irrelevant" and kind == "detailed" else 1.0
    return [[factor * v for v in curve]] * 3


def test_cross_model_claims_by_hand(tmp_path):
    cfg = compose(
        [
            f"results_dir={tmp_path}",
            "experiment=quickstart",
            f"experiment.models=[{','.join(THREE_MODELS)}]",
            "reduce.n_bootstrap=50",
            "wandb.mode=disabled",
        ]
    )
    for model in THREE_MODELS:
        for source in spectra_sources(cfg, model):
            values = model_values(model, source.spec.kind, source.spec.condition)
            source.path.parent.mkdir(parents=True, exist_ok=True)
            spectra_rows(source.spec.file, source.spec.dataset, values).to_parquet(source.path)
        reduce_command(compose([*cfg_overrides(tmp_path), f"model={model}"]))
    findings_command(cfg)

    record = json.loads(
        (paths.experiment_dir(tmp_path, "quickstart") / "findings.json").read_text()
    )
    two = record["claims"]["2"]
    assert two["verdict"] == HOLDS and len(two["pairs"]) == 2
    for pair in two["pairs"]:
        for cell in pair["cells"]:
            # MAD / level: zigzag (8 / 5) against flat (0 / 5).
            assert cell["instruct"] == pytest.approx(8 / 5)
            assert cell["base"] == pytest.approx(0.0)
            assert cell["ci_low"] == pytest.approx(8 / 5) and cell["verdict"] == HOLDS
    four = record["claims"]["4"]
    for pair in four["pairs"]:
        for cell in pair["cells"]:
            assert cell["instruct"] == pytest.approx(0.5) and cell["base"] == pytest.approx(0.5)
            assert cell["difference"] == pytest.approx(0.0)
        assert pair["verdict"] == HOLDS
    assert record["models"]["gemma3_270m"]["5"] == "not testable"

    markdown = (paths.experiment_dir(tmp_path, "quickstart") / "findings.md").read_text()
    assert "## Claim 2" in markdown and "same weights, base template" in markdown
    assert "differ in family" in markdown
    overall = (tmp_path / "findings.md").read_text()
    assert overall.startswith("# Findings: every experiment")
    assert "| quickstart | smollm2_135m_instruct vs gemma3_270m |" in overall


def cfg_overrides(results) -> list[str]:
    return [f"results_dir={results}", "experiment=quickstart", "reduce.n_bootstrap=50",
            "wandb.mode=disabled"]  # fmt: skip


def test_claim_three_falls_back_to_simplified():
    """MATH has no None responses: Detailed CoT is set against Simplified CoT."""
    frame = paired({"detailed": [True, True, False], "simplified": [False, False, False]})
    result = claim_three(frame, EMPTY_RELATIVE, {})
    assert result["verdict"] == HOLDS
    assert result["tasks"][0]["fast_kind"] == "simplified"
    assert result["tasks"][0]["share_significant_fast"] == 0.0


@pytest.mark.parametrize("pairs", [2, 4, 5, 6, 8])
def test_smallest_wilcoxon_p_is_scipys_for_all_positive_differences(pairs):
    from scipy.stats import wilcoxon

    expected = wilcoxon([float(i) for i in range(1, pairs + 1)]).pvalue
    assert smallest_wilcoxon_p(pairs) == pytest.approx(expected)
    assert smallest_wilcoxon_p(4) == 0.125  # by hand: 2 of the 2^4 sign patterns are as extreme
