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
    claim_one,
    claim_three,
    findings_command,
    interval_verdict,
    separation_verdict,
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
