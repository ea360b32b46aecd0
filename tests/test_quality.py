"""Paper 2's analyses: AUROC, Spearman and length matching against hand computations, the
verdict rules on constructed inputs, the whole step on constructed spectra, and the DAG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats as sps

from gradspec import paths, quality
from gradspec.config import compose
from gradspec.extract import SCHEMA
from gradspec.quality import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    aggregate,
    all_cells,
    auroc,
    auroc_many,
    both,
    claim_five,
    claim_three,
    curve_verdict,
    interval_side,
    match_lengths,
    missing_scores,
    near_zero,
    partial_spearman,
    quality_command,
)
from gradspec.spectra import METRICS

ROOT = Path(__file__).resolve().parents[1]


def test_auroc_by_hand_and_by_mann_whitney():
    """high [3, 1, 4] vs low [1, 2]: of the 6 pairs, 3 > 1, 3 > 2, 4 > 1, 4 > 2 and the tie
    1 = 1 (1/2) favour high: 4.5 / 6 = 0.75; scipy's U of the first sample is 4.5 too."""
    high, low = np.array([3.0, 1.0, 4.0]), np.array([1.0, 2.0])
    assert auroc(high, low) == pytest.approx(0.75)
    u = sps.mannwhitneyu(high, low).statistic
    assert auroc(high, low) == pytest.approx(u / 6)
    assert auroc_many(np.array([high, high]), np.array([low, low])) == pytest.approx([0.75] * 2)


def test_spearman_and_partial_spearman_by_hand():
    """x = [1, 2, 3, 4], y = [1, 3, 2, 4]: sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8."""
    assert sps.spearmanr([1, 2, 3, 4], [1, 3, 2, 4]).statistic == pytest.approx(0.8)

    rng = np.random.default_rng(0)
    z = rng.normal(size=30)
    x, y = z + rng.normal(size=30), z + rng.normal(size=30)
    # Second source: Pearson correlation of the rank residuals after regressing on rank(z).
    rx, ry, rz = (sps.rankdata(v) for v in (x, y, z))
    design = np.column_stack([np.ones(30), rz])
    residual = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    expected = np.corrcoef(*residual)[0, 1]
    assert partial_spearman(x, y, z) == pytest.approx(expected, abs=1e-12)


def test_length_matching_on_a_constructed_example():
    """Caliper log 1.25: 100~110 (log 1.1) and 200~190 match, 1000 has no partner within 25%;
    when two compete for one, the closer (120 vs 110: log 1.09 < log 1.1) wins."""
    assert match_lengths([100, 200, 1000], [110, 190, 400]) == [(0, 0), (1, 1)]
    assert match_lengths([100, 120], [110]) == [(1, 0)]
    assert match_lengths([10], [100]) == []


def test_verdict_rules():
    assert interval_side(0.6, 0.9, 0.5, 1) == HOLDS
    assert interval_side(0.1, 0.4, 0.5, 1) == FAILS
    assert interval_side(0.4, 0.6, 0.5, 1) == INCONCLUSIVE
    assert interval_side(0.1, 0.4, 0.5, -1) == HOLDS
    assert interval_side(math.nan, 0.4, 0.5, -1) == INCONCLUSIVE
    assert both(HOLDS, HOLDS) == HOLDS and both(HOLDS, INCONCLUSIVE) == INCONCLUSIVE
    assert both(INCONCLUSIVE, FAILS) == FAILS
    assert aggregate([HOLDS, HOLDS, INCONCLUSIVE]) == HOLDS
    assert aggregate([HOLDS, HOLDS, FAILS]) == INCONCLUSIVE
    assert aggregate([FAILS, FAILS, INCONCLUSIVE]) == FAILS
    assert all_cells([HOLDS, HOLDS]) == HOLDS and all_cells([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_cells([HOLDS, FAILS]) == FAILS
    assert near_zero(0.01, 0.05) == HOLDS and near_zero(0.12, 0.2) == FAILS
    assert near_zero(0.05, 0.15) == INCONCLUSIVE
    assert curve_verdict(0.5, "different family") == HOLDS
    assert curve_verdict(0.05, "different family") == FAILS
    assert curve_verdict(0.05, "same family") == HOLDS


def test_claims_three_and_five_on_constructed_tables():
    reasoning = pd.DataFrame(
        [
            {"task": "s1", "against": "instruction", "auroc": 0.9, "ci_low": 0.8, "ci_high": 1},
            {"task": "gsm8k", "against": "instruction", "auroc": 0.8, "ci_low": 0.6, "ci_high": 1},
            {"task": "s1", "against": "gsm8k", "auroc": 0.6, "ci_low": 0.4, "ci_high": 0.8},
        ]
    )
    assert claim_three(reasoning)["verdict"] == INCONCLUSIVE
    reasoning.loc[2, "ci_low"] = 0.55
    assert claim_three(reasoning)["verdict"] == HOLDS
    reasoning.loc[1, ["ci_low", "ci_high"]] = [0.1, 0.3]
    assert claim_three(reasoning)["verdict"] == FAILS

    cosines = pd.DataFrame(
        {"cosine": "cosine_kv", "module": "k_proj", "mean_abs": [0.02, 0.03],
         "abs_ci_low": [0.01, 0.02], "abs_ci_high": [0.04, 0.05]}
    )  # fmt: skip
    assert claim_five(cosines)["verdict"] == HOLDS
    cosines.loc[1, ["abs_ci_low", "abs_ci_high"]] = [0.2, 0.3]
    assert claim_five(cosines)["verdict"] == FAILS
    assert claim_five(pd.DataFrame())["testable"] is False


def test_missing_scores_are_listed():
    scores = pd.DataFrame(
        {"dataset": "d", "file": "f", "record_index": [0, 1],
         **{f"{s}_problem": "" for s in ("diff", "instag", "reward", "ppl_gpt2", "ifd_gpt2")},
         "ppl_qwen7b_problem": "absent", "ifd_qwen7b_problem": "absent"}
    )  # fmt: skip
    scores.loc[1, "diff_problem"] = "absent"
    scores.loc[0, "reward_problem"] = "NaN"
    table = missing_scores(scores, {("d", "f", 0)})
    assert table[["record_index", "score", "problem", "analysed"]].values.tolist() == [
        [1, "diff", "absent", False],
        [0, "reward", "NaN", True],
    ]


# --------------------------------------------------------------------------------------------
# The step on constructed spectra: the claims built in must come out


LAYERS, MODULES, N = 4, ("q_proj", "k_proj", "v_proj"), 8


def spectra_file(path: Path, spec, model: str, seed: int) -> None:
    """N samples: highest split longer, lower nuclear norm, higher effective rank; reasoning
    a higher effective rank, s1 the highest; per-layer shapes rising for one model, falling for
    the other; cosines near zero."""
    rng = np.random.default_rng(seed)
    dataset, file, kind = spec.dataset, spec.file, spec.kind
    level = {"highest": (1.0, 20.0), "lowest": (3.0, 10.0), "reasoning": (1.0, 40.0)}[kind]
    level = (1.0, 60.0) if spec.task == "s1" else level
    kv = ("k_proj", "v_proj")
    slope = 1.0 if model.startswith("smollm2") else -1.0
    columns = {field.name: [] for field in SCHEMA}
    columns |= {"cosine_next_layer": [], "cosine_kv": []}
    for index in range(N):
        tokens = int({"highest": 300, "lowest": 100, "reasoning": 900}[kind] * (1 + index / 10))
        for layer in range(LAYERS):
            for module in MODULES:
                shape = 1 + 0.3 * slope * layer
                values = dict.fromkeys(METRICS, 1.0)
                values["nuclear_norm"] = level[0] * shape + 0.1 * rng.random()
                values["effective_rank"] = level[1] * shape + 0.1 * rng.random()
                row = {"record_index": index, "sample_id": f"{file}{index}", "dataset": dataset,
                       "file": file, "layer": layer, "module": module, **values, "loss": 1.0,
                       "n_prompt_tokens": 10, "n_response_tokens": min(tokens, 1000),
                       "n_response_tokens_full": tokens, "n_tokens": tokens + 10,
                       "truncated": tokens > 1000, "status": "ok", "reason": "",
                       "cosine_next_layer": 0.02 * rng.standard_normal()
                       if layer < LAYERS - 1 else math.nan,
                       "cosine_kv": 0.01 if module in kv else math.nan}  # fmt: skip
                for key, value in row.items():
                    columns[key].append(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns).to_parquet(path, index=False)


def test_quality_step_on_constructed_spectra(tmp_path):
    overrides = ["experiment=reasoning", f"results_dir={tmp_path}", "reduce.n_bootstrap=200"]
    cfg = compose(overrides)
    from gradspec.config import experiment_files

    models = list(cfg.experiment.models)
    for m, model in enumerate(models):
        for s, spec in enumerate(experiment_files(cfg)):
            target = paths.spectra(tmp_path, "reasoning", model, spec.dataset, spec.file)
            spectra_file(target, spec, model, 10 * m + s)

    assert quality_command(cfg) == 0

    folder = paths.model_results(tmp_path, "reasoning", models[0]) / "quality"
    findings = json.loads((folder / "findings.json").read_text())
    claims = findings["claims"]
    assert claims["1"]["verdict"] == HOLDS
    assert claims["1"]["all"]["per_metric"]["quality_diff"]["verdict"] == HOLDS
    # Both statistics separate perfectly, so d = 0 in every resample: not more robust.
    assert claims["2"]["verdict"] == INCONCLUSIVE
    assert claims["3"]["verdict"] == HOLDS
    assert claims["5"]["verdict"] == HOLDS
    # Rising against falling curves: families differ; sizes untested, so the claim is partial.
    assert claims["4"]["different family"]["verdict"] == HOLDS
    assert claims["4"]["verdict"] == INCONCLUSIVE and claims["4"]["partial"]
    for name in ("auroc", "spearman", "length_regression", "cosine", "truncation"):
        assert not pd.read_csv(folder / f"{name}.csv").empty, name
    samples = pd.read_parquet(folder / "samples.parquet")
    assert {"diff", "reward", "effective_rank", "n_response_tokens"} <= set(samples.columns)
    text = (tmp_path / "reasoning" / "findings.md").read_text()
    assert "## Rules" in text and "q is never compared with o" in text


@pytest.mark.parametrize("experiment", ["quality", "reasoning"])
def test_dry_run(experiment):
    done = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-n", "--config",
         f"experiment={experiment}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quality" in done.stdout and "\nfindings " not in done.stdout


_ = pa  # the schema's types come from extract.SCHEMA


def test_truncation_lines_name_what_was_cut():
    rows = [
        {"dataset": "reasoning", "file": "s1_r1", "samples": 3, "truncated": 3,
         "mean_response_tokens": 900.0, "mean_response_tokens_full": 4000.0,
         "max_response_tokens_full": 9000, "max_length": 1024},
        {"dataset": "quality_diff", "file": "wiz_lowest", "samples": 3, "truncated": 0,
         "mean_response_tokens": 20.0, "mean_response_tokens_full": 20.0,
         "max_response_tokens_full": 31, "max_length": 1024},
    ]  # fmt: skip
    lines = quality.truncation_lines(rows)
    assert lines[0] == "Cut at prompt.max_length = 1024 tokens (prompt first):"
    assert "| reasoning | s1_r1 | 3 of 3 | 900 | 4000 | 9000 |" in lines
    assert not any("wiz_lowest" in line for line in lines)
    assert quality.truncation_lines(rows[1:]) == []
