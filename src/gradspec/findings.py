"""Paper 1's claims tested on an experiment's summaries: holds, does not hold, or inconclusive.

``findings_command`` reads the summary of every model in ``cfg.experiment.models`` and writes
``results/<experiment>/findings.md`` (all models) and ``results/<experiment>/<model>/summary/
findings.json`` (one model, machine-readable). A claim that the experiment's files cannot test
(e.g. no irrelevant responses) is reported as not testable, not as a verdict.

The claims, from paper 1 (fast vs. slow thinking), on the nuclear norm:

1. Detailed CoT gives smaller gradients than None and Simplified CoT: a lower mean over layers of
   the mean curve and a smaller MAD across layers.
3. With Detailed CoT the gradients tell correct from irrelevant responses; without CoT they don't.

The verdict rules are in :data:`RULES` and are written into the Markdown file verbatim.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from gradspec import paths

log = logging.getLogger(__name__)

METRIC = "nuclear_norm"
GROUP = "all"
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
COMPARED_TO_DETAILED = ("none", "simplified")

STATEMENTS = {
    "1": "Detailed CoT gives smaller gradients (nuclear norm: lower mean over layers) and a "
    "smaller MAD across layers than None and Simplified CoT (correct responses).",
    "3": "With Detailed CoT the gradients tell correct from irrelevant responses to the same "
    "instructions (significant paired difference); without CoT (None) they do not.",
}
RULES = {
    "cell": "A comparison cell (task, kind pair, statistic, module) is compared on "
    "`difference = Detailed - other` with its percentile bootstrap interval (files resampled "
    "independently): **holds** when the whole interval is below zero, **does not hold** when the "
    "whole interval is above zero, **inconclusive** when it contains zero.",
    "separation": "For one task, take the paired Wilcoxon test of each module on the per-sample "
    "mean over layers (irrelevant - correct, same instructions), Holm-adjusted over modules, "
    "significant when the adjusted p is below alpha. With s_D and s_N the shares of modules "
    "significant for Detailed CoT and for None: **holds** when s_D > 1/2 and s_N <= 1/2; "
    "**does not hold** when s_N > 1/2 (None responses are told apart too); **inconclusive** "
    "otherwise (neither kind is told apart in most modules, which can be a lack of samples).",
    "aggregate": "A claim's verdict over many cells or tasks: **holds** when more than half hold "
    "and none does not hold; **does not hold** when more than half do not hold and none holds; "
    "**inconclusive** otherwise.",
}
LENGTH_CAVEAT = (
    "A per-sample gradient of a projection is a sum of one outer product per token, so its rank "
    "is at most the number of tokens, and with the loss averaged over response tokens its norms "
    "depend on the response length. Detailed CoT responses are much longer than None or "
    "Simplified CoT responses, so part of any difference between kinds can be length alone: the "
    "mean response tokens are reported next to every comparison."
)


def interval_verdict(low: float, high: float) -> str:
    """The cell rule: the claimed direction is a negative difference (Detailed smaller)."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if high < 0:
        return HOLDS
    if low > 0:
        return FAILS
    return INCONCLUSIVE


def aggregate(verdicts: list[str]) -> str:
    """The aggregate rule over cells or tasks (see :data:`RULES`)."""
    if not verdicts:
        return INCONCLUSIVE
    holds, fails = verdicts.count(HOLDS), verdicts.count(FAILS)
    if holds > len(verdicts) / 2 and fails == 0:
        return HOLDS
    if fails > len(verdicts) / 2 and holds == 0:
        return FAILS
    return INCONCLUSIVE


def separation_verdict(share_detailed: float, share_none: float) -> str:
    """The separation rule for one task (see :data:`RULES`)."""
    if share_none > 0.5:
        return FAILS
    if share_detailed > 0.5:
        return HOLDS
    return INCONCLUSIVE


def counts(verdicts: list[str]) -> dict[str, int]:
    return {verdict: verdicts.count(verdict) for verdict in (HOLDS, FAILS, INCONCLUSIVE)}


def counts_text(tally: dict[str, int]) -> str:
    return ", ".join(f"{verdict} {count}" for verdict, count in tally.items())


def clean(value):
    """JSON-safe scalars: NaN becomes null, numpy numbers become Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def records(frame: pd.DataFrame) -> list[dict]:
    return [{key: clean(value) for key, value in row.items()} for row in frame.to_dict("records")]


def claim_one(contrasts: pd.DataFrame) -> dict:
    """Claim 1 on the Detailed - None and Detailed - Simplified contrasts of correct responses."""
    if contrasts.empty:
        return {"testable": False}
    cells = contrasts[
        (contrasts["condition"] == "correct")
        & (contrasts["metric"] == METRIC)
        & (contrasts["group"] == GROUP)
        & (contrasts["kind_a"] == "detailed")
        & (contrasts["kind_b"].isin(COMPARED_TO_DETAILED))
    ].copy()
    if cells.empty:
        return {"testable": False}
    cells["verdict"] = [
        interval_verdict(low, high) for low, high in zip(cells.ci_low, cells.ci_high, strict=True)
    ]
    columns = [
        "task",
        "kind_a",
        "kind_b",
        "statistic",
        "module",
        "value_a",
        "value_b",
        "difference",
        "ci_low",
        "ci_high",
        "n_a",
        "n_b",
        "response_tokens_a",
        "response_tokens_b",
        "verdict",
    ]
    verdicts = cells["verdict"].tolist()
    return {
        "testable": True,
        "verdict": aggregate(verdicts),
        "counts": counts(verdicts),
        "by_statistic": {
            statistic: aggregate(part["verdict"].tolist())
            for statistic, part in cells.groupby("statistic", sort=False)
        },
        "cells": records(cells[columns]),
    }


def response_tokens(mad: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """Mean response tokens per (condition, task, kind)."""
    per_file = mad.drop_duplicates(["condition", "task", "kind"])
    return {
        (row.condition, row.task, row.kind): float(row.mean_response_tokens)
        for row in per_file.itertuples()
    }


def claim_three(paired: pd.DataFrame, relative: pd.DataFrame, tokens: dict) -> dict:
    """Claim 3 on the paired tests of Detailed CoT and None, task by task."""
    if paired.empty:
        return {"testable": False}
    tests = paired[(paired["scope"] == "mean_over_layers") & (paired["metric"] == METRIC)]
    levels = relative[
        (relative["scope"] == "level")
        & (relative["group"] == GROUP)
        & (relative["metric"] == METRIC)
    ]
    tasks = []
    for task, rows in tests.groupby("task", sort=False):
        kinds = set(rows["kind"])
        if not {"detailed", "none"} <= kinds:
            continue
        shares = {
            kind: float(rows.loc[rows["kind"] == kind, "significant"].mean())
            for kind in ("detailed", "none")
        }
        modules = rows[rows["kind"].isin(["detailed", "none"])].merge(
            levels[["task", "kind", "module", "relative_difference", "ci_low", "ci_high"]],
            on=["task", "kind", "module"],
            how="left",
        )
        tasks.append(
            {
                "task": task,
                "share_significant_detailed": shares["detailed"],
                "share_significant_none": shares["none"],
                "verdict": separation_verdict(shares["detailed"], shares["none"]),
                "response_tokens": {
                    f"{condition}_{kind}": tokens.get((condition, task, kind))
                    for condition in ("correct", "irrelevant")
                    for kind in ("detailed", "none")
                },
                "modules": records(
                    modules[
                        [
                            "kind",
                            "module",
                            "n_pairs",
                            "mean_correct",
                            "mean_irrelevant",
                            "relative_difference",
                            "ci_low",
                            "ci_high",
                            "cohens_dz",
                            "rank_biserial",
                            "wilcoxon_p",
                            "p_adjusted",
                            "significant",
                            "share_layers_significant",
                        ]
                    ]
                ),
            }
        )
    if not tasks:
        return {"testable": False}
    verdicts = [task["verdict"] for task in tasks]
    return {
        "testable": True,
        "verdict": aggregate(verdicts),
        "counts": counts(verdicts),
        "tasks": tasks,
    }


def read_optional(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def model_findings(summary: Path, model: str, experiment: str, confidence: float) -> dict:
    """Both claims' verdicts and the numbers behind them for one model's summary."""
    mad = read_optional(summary / "mad.parquet")
    tokens = response_tokens(mad) if len(mad) else {}
    claims = {
        "1": claim_one(read_optional(summary / "contrasts.parquet")),
        "3": claim_three(
            read_optional(summary / "paired_tests.parquet"),
            read_optional(summary / "relative_difference.parquet"),
            tokens,
        ),
    }
    for key, claim in claims.items():
        claim["statement"] = STATEMENTS[key]
    return {
        "model": model,
        "experiment": experiment,
        "metric": METRIC,
        "confidence": confidence,
        "alpha": 1 - confidence,
        "rules": RULES,
        "claims": claims,
    }


def number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def claim_one_section(result: dict) -> list[str]:
    claim = result["claims"]["1"]
    lines = [f"### {result['model']}", ""]
    if not claim["testable"]:
        return [*lines, "Not testable: no Detailed CoT with None or Simplified CoT.", ""]
    by_statistic = ", ".join(f"{k}: {v}" for k, v in claim["by_statistic"].items())
    lines += [f"**{claim['verdict']}** ({by_statistic}; cells: {counts_text(claim['counts'])})", ""]
    rows = [
        [
            cell["task"],
            f"{cell['kind_a']} - {cell['kind_b']}",
            cell["statistic"],
            cell["module"],
            number(cell["value_a"]),
            number(cell["value_b"]),
            f"{number(cell['difference'])} [{number(cell['ci_low'])}, {number(cell['ci_high'])}]",
            f"{number(cell['response_tokens_a'], 3)} / {number(cell['response_tokens_b'], 3)}",
            f"{cell['n_a']} / {cell['n_b']}",
            cell["verdict"],
        ]
        for cell in claim["cells"]
    ]
    header = ["task", "kinds", "statistic", "module", "detailed", "other", "difference [CI]",
              "response tokens", "n", "verdict"]  # fmt: skip
    return [*lines, *markdown_table(header, rows), ""]


def claim_three_section(result: dict) -> list[str]:
    claim = result["claims"]["3"]
    lines = [f"### {result['model']}", ""]
    if not claim["testable"]:
        return [*lines, "Not testable: needs correct and irrelevant Detailed CoT and None.", ""]
    lines += [f"**{claim['verdict']}** (tasks: {counts_text(claim['counts'])})", ""]
    for task in claim["tasks"]:
        tokens = ", ".join(f"{k} {number(v, 3)}" for k, v in task["response_tokens"].items())
        lines += [
            f"- {task['task']}: **{task['verdict']}**; share of modules significant: Detailed "
            f"{task['share_significant_detailed']:.2f}, None {task['share_significant_none']:.2f}; "
            f"mean response tokens: {tokens}",
            "",
        ]
        rows = [
            [
                module["kind"],
                module["module"],
                str(module["n_pairs"]),
                f"{number(module['relative_difference'])} "
                f"[{number(module['ci_low'])}, {number(module['ci_high'])}]",
                number(module["cohens_dz"], 3),
                number(module["rank_biserial"], 3),
                number(module["p_adjusted"], 3),
                number(module["share_layers_significant"], 2),
            ]
            for module in task["modules"]
        ]
        header = ["kind", "module", "pairs", "relative difference [CI]", "d_z", "rank-biserial",
                  "p (Holm)", "share of layers significant"]  # fmt: skip
        lines += [*markdown_table(header, rows), ""]
    return lines


def findings_markdown(experiment: str, results: list[dict], missing: list[str]) -> str:
    """The whole findings file: rules, caveat, then each claim for each model."""
    lines = [f"# Findings: {experiment}", ""]
    if results:
        lines += [
            f"Metric: {METRIC}; layer group: {GROUP}; intervals: {results[0]['confidence']:.0%} "
            f"percentile bootstrap over samples; alpha = {results[0]['alpha']:.3g}.",
            "",
        ]
    lines += ["## Verdict rules", ""]
    lines += [f"- {name}: {text}" for name, text in RULES.items()]
    lines += ["", "## Response length", "", LENGTH_CAVEAT, ""]
    if missing:
        lines += [f"Models without a summary (not reduced): {', '.join(missing)}.", ""]
    for key, section in (("1", claim_one_section), ("3", claim_three_section)):
        lines += [f"## Claim {key}", "", STATEMENTS[key], ""]
        for result in results:
            lines += section(result)
    return "\n".join(lines)


def findings_command(cfg: DictConfig) -> int:
    """Verdicts for every model of the experiment that has a summary (see module docstring)."""
    started = time.perf_counter()
    experiment = cfg.experiment.name
    models = list(cfg.experiment.models) or [cfg.model.name]
    results, missing = [], []
    for model in models:
        summary = paths.summary_dir(cfg.results_dir, experiment, model)
        if not (summary / "mad.parquet").exists():
            missing.append(model)
            continue
        result = model_findings(summary, model, experiment, cfg.reduce.confidence)
        (summary / "findings.json").write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
    if missing:
        log.warning("no summary for %s", ", ".join(missing))

    target = paths.experiment_dir(cfg.results_dir, experiment) / "findings.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(findings_markdown(experiment, results, missing))
    log.info(
        "findings for %d models in %s (%.2fs)", len(results), target, time.perf_counter() - started
    )
    return 0
