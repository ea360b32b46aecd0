"""Paper 1's claims tested on an experiment's summaries: holds, does not hold, or inconclusive.

``findings_command`` reads the summary of every model in ``cfg.experiment.models`` and writes

- ``results/<experiment>/<model>/summary/findings.json``: one model's claims (1, 3, 5), with the
  numbers behind each verdict;
- ``results/<experiment>/findings.json`` and ``findings.md``: every model, and the claims that
  compare models (2, 4);
- ``results/findings.md``: every experiment's verdicts side by side, rebuilt from each
  ``results/*/findings.json`` (also ``python -m gradspec.findings overall [overrides]``).

A claim that the experiment's files cannot test (e.g. no irrelevant responses, no Detailed CoT)
is reported as not testable, not as a verdict.

The claims, from paper 1 (fast vs. slow thinking), on the nuclear norm of correct responses:

1. Detailed CoT gives smaller gradients than None and Simplified CoT: a lower mean over layers
   of the mean curve and a smaller MAD across layers; also asked at equal response length.
2. Base models are less affected by the instability of fast thinking than instruct models.
3. With Detailed CoT the gradients tell correct from irrelevant responses; without CoT they don't.
4. Instruct models are no better than base models at telling correct from irrelevant responses.
5. On knowledge data, longer responses do not give the Detailed CoT pattern.

The verdict rules are in :data:`RULES` and are written into the Markdown file verbatim.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from gradspec import paths
from gradspec.config import compose

log = logging.getLogger(__name__)

METRIC = "nuclear_norm"
GROUP = "all"
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
COMPARED_TO_DETAILED = ("none", "simplified")
LAYER_GROUPS = ("early", "middle", "late")

# Claim 5: the knowledge data's short answers and the longer answers compared with them.
SHORT_KIND = "words_100"
LONGER_KINDS = ("words_500", "words_1000")
# Claim 5: a reduction by more than this share of the short answers' value is Detailed-like.
DETAILED_LIKE_REDUCTION = 0.5
# Claim 4: differences in separation within this margin count as "no better".
EQUIVALENCE_MARGIN = 0.05

STATEMENTS = {
    "1": "Detailed CoT gives smaller gradients (nuclear norm: lower mean over layers) and a "
    "smaller MAD across layers than None and Simplified CoT (correct responses).",
    "2": "Base models are less affected than instruct models by the instability of fast "
    "thinking: with None and Simplified CoT, the MAD across layers (relative to the curve's "
    "level) is larger for the instruct model.",
    "3": "With Detailed CoT the gradients tell correct from irrelevant responses to the same "
    "instructions (significant paired difference); without CoT (None) they do not.",
    "4": "Instruct models are no better than base models at telling correct from irrelevant "
    "Detailed CoT responses.",
    "5": "On knowledge data (Wikipedia), longer responses (100 -> 500 -> 1000 words) do not "
    "reduce the nuclear norm or its MAD the way Detailed CoT does.",
}
RULES = {
    "cell": "A comparison cell (task, kind pair, statistic, module) is compared on "
    "`difference = Detailed - other` with its percentile bootstrap interval (files resampled "
    "independently): **holds** when the whole interval is below zero, **does not hold** when the "
    "whole interval is above zero, **inconclusive** when it contains zero.",
    "length": "Claim 1 at equal length: the same cell rule on `b_kind` of the per-sample "
    "regression `y = b0 + b_kind [Detailed] + b_len log(n_response_tokens)` (y: a sample's mean "
    "over layers, or its own MAD across layers), each file resampled independently. Where the "
    "kinds' lengths do not overlap (length_overlap = 0), b_kind extrapolates along the fitted "
    "slope and is to be read with that in mind.",
    "early": "Claim 1, where the faster kinds' larger gradients lie: per task, faster kind "
    "(None, Simplified CoT), statistic and module, the gap `other - Detailed` of the level "
    "(mean curve) or MAD in the early, middle and late layers, each with its bootstrap "
    "interval: **holds** when the early gap's interval lies above both other groups' intervals "
    "(most in early layers), **does not hold** when it lies below either one, **inconclusive** "
    "otherwise (overlapping intervals).",
    "separation": "For one task, take the paired Wilcoxon test of each module on the per-sample "
    "mean over layers (irrelevant - correct, same instructions), Holm-adjusted over modules, "
    "significant when the adjusted p is below alpha. With s_D and s_N the shares of modules "
    "significant for Detailed CoT and for None (Simplified CoT where a task has no None, as in "
    "MATH): **holds** when s_D > 1/2 and s_N <= 1/2; "
    "**does not hold** when s_N > 1/2 (None responses are told apart too); **inconclusive** "
    "otherwise (neither kind is told apart in most modules, which can be a lack of samples).",
    "instability": "Claim 2, per pair (instruct model with its chat template; model prompted "
    "with the base template), task, fast kind (None, Simplified CoT) and module: r = MAD / level "
    "of the mean curve over all layers (scale-free, so models of different size and family can "
    "be compared), d = r_instruct - r_base with the percentile interval of the replicate "
    "differences (models resampled independently): **holds** when the interval is above zero, "
    "**does not hold** when below zero, **inconclusive** otherwise.",
    "no_better": "Claim 4, per pair, task and module: s = |(irrelevant - correct) / correct| of "
    "the Detailed CoT level over all layers (paired bootstrap within each model), d = "
    "s_instruct - s_base with the interval of the replicate differences: **does not hold** when "
    f"the interval is above zero (instruct better); **holds** when it is below zero or lies "
    f"within +-{EQUIVALENCE_MARGIN} (equivalent); **inconclusive** otherwise.",
    "longer": f"Claim 5, per model, task with {SHORT_KIND} answers, longer kind "
    f"({', '.join(LONGER_KINDS)}), statistic (level, MAD) and module: the relative change "
    f"q = (longer - {SHORT_KIND}) / {SHORT_KIND} with its bootstrap interval: **holds** when the "
    f"interval lies above -{DETAILED_LIKE_REDUCTION} (surely less than a "
    f"{DETAILED_LIKE_REDUCTION:.0%} reduction), **does not hold** when it lies below "
    f"-{DETAILED_LIKE_REDUCTION} (a Detailed-like reduction), **inconclusive** otherwise. The "
    "Detailed CoT reduction measured on the reasoning data is shown beside it in the overall "
    "findings.",
    "aggregate": "A claim's verdict over many cells or tasks: **holds** when more than half hold "
    "and none does not hold; **does not hold** when more than half do not hold and none holds; "
    "**inconclusive** otherwise.",
}
LENGTH_CAVEAT = (
    "A per-sample gradient of a projection is a sum of one outer product per token, so its rank "
    "is at most the number of tokens, and with the loss averaged over response tokens its norms "
    "depend on the response length. Detailed CoT responses are much longer than None or "
    "Simplified CoT responses, so part of any difference between kinds can be length alone: the "
    "mean response tokens are reported next to every comparison. Two controls: claim 1 is also "
    "judged on the kind coefficient of a regression on log(n_response_tokens) (rule `length`), "
    "and the whole experiment can be rerun with the loss summed over response tokens "
    "(`overrides='prompt.loss_reduction=sum'` with another `results_dir`), where each token's "
    "gradient counts in full instead of 1/T."
)
MODEL_CAVEAT = (
    "SmolLM2-135M-Instruct and Gemma-3-270M differ in family, size and training data as well as "
    "in tuning, so a difference between them is not the effect of instruction tuning alone. "
    "smollm2_135m_instruct_base is the same SmolLM2 weights prompted with the base template: "
    "that pair asks the question of the same weights, with the chat markup as the only change."
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
    selected = contrasts[contrasts["group"] == GROUP]
    columns = ["value_a", "value_b", "difference", "ci_low", "ci_high"]
    return _detailed_cell_verdicts(selected, columns)


def detailed_against_faster(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of correct responses comparing Detailed CoT (a) with None or Simplified CoT (b)."""
    return frame[
        (frame["condition"] == "correct")
        & (frame["metric"] == METRIC)
        & (frame["kind_a"] == "detailed")
        & (frame["kind_b"].isin(COMPARED_TO_DETAILED))
    ]


def _detailed_cell_verdicts(frame: pd.DataFrame, value_columns: list[str]) -> dict:
    """The cell rule on every Detailed-vs-faster row of correct responses, and its aggregates."""
    cells = detailed_against_faster(frame).copy()
    if cells.empty:
        return {"testable": False}
    cells["verdict"] = [
        interval_verdict(low, high) for low, high in zip(cells.ci_low, cells.ci_high, strict=True)
    ]
    labels = ["task", "kind_a", "kind_b", "statistic", "module"]
    sizes = ["n_a", "n_b", "response_tokens_a", "response_tokens_b", "verdict"]
    verdicts = cells["verdict"].tolist()
    return {
        "testable": True,
        "verdict": aggregate(verdicts),
        "counts": counts(verdicts),
        "by_statistic": {
            statistic: aggregate(part["verdict"].tolist())
            for statistic, part in cells.groupby("statistic", sort=False)
        },
        "cells": records(cells[labels + value_columns + sizes]),
    }


def response_tokens(mad: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """Mean response tokens per (condition, task, kind)."""
    per_file = mad.drop_duplicates(["condition", "task", "kind"])
    return {
        (row.condition, row.task, row.kind): float(row.mean_response_tokens)
        for row in per_file.itertuples()
    }


def fast_kind(kinds) -> str | None:
    """The kind claim 3 sets against Detailed CoT: None, else Simplified CoT (MATH has no None)."""
    return next((kind for kind in COMPARED_TO_DETAILED if kind in kinds), None)


def claim_three(paired: pd.DataFrame, relative: pd.DataFrame, tokens: dict) -> dict:
    """Claim 3 on the paired tests of Detailed CoT and None (or Simplified CoT), task by task."""
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
        fast = fast_kind(kinds)
        if "detailed" not in kinds or fast is None:
            continue
        shares = {
            kind: float(rows.loc[rows["kind"] == kind, "significant"].mean())
            for kind in ("detailed", fast)
        }
        modules = rows[rows["kind"].isin(["detailed", fast])].merge(
            levels[["task", "kind", "module", "relative_difference", "ci_low", "ci_high"]],
            on=["task", "kind", "module"],
            how="left",
        )
        tasks.append(
            {
                "task": task,
                "share_significant_detailed": shares["detailed"],
                "fast_kind": fast,
                "share_significant_fast": shares[fast],
                "verdict": separation_verdict(shares["detailed"], shares[fast]),
                "response_tokens": {
                    f"{condition}_{kind}": tokens.get((condition, task, kind))
                    for condition in ("correct", "irrelevant")
                    for kind in ("detailed", fast)
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


def claim_one_length(regression: pd.DataFrame) -> dict:
    """Claim 1 at equal response length: the cell rule on the regression's kind coefficient."""
    if regression.empty:
        return {"testable": False}
    columns = ["raw_difference", "kind_coefficient", "ci_low", "ci_high", "length_coefficient",
               "length_overlap"]  # fmt: skip
    return _detailed_cell_verdicts(regression, columns)


def early_verdict(early: tuple[float, float], others: list[tuple[float, float]]) -> str:
    """The rule `early` on (low, high) gap intervals: early above every other group's interval."""
    if any(math.isnan(v) for v in (*early, *(v for other in others for v in other))):
        return INCONCLUSIVE
    if all(early[0] > high for _, high in others):
        return HOLDS
    if any(early[1] < low for low, _ in others):
        return FAILS
    return INCONCLUSIVE


def claim_one_early(contrasts: pd.DataFrame) -> dict:
    """Claim 1's "most in early layers": the faster kinds' gap over Detailed CoT per layer group."""
    if contrasts.empty:
        return {"testable": False}
    rows = detailed_against_faster(contrasts)
    rows = rows[rows["group"].isin(LAYER_GROUPS)]
    if rows.empty:
        return {"testable": False}
    cells = []
    for (task, kind, statistic, module), part in rows.groupby(
        ["task", "kind_b", "statistic", "module"], sort=False
    ):
        # The contrast is Detailed - other; the gap is its negative, interval flipped.
        gaps = {
            row.group: (-row.difference, -row.ci_high, -row.ci_low) for row in part.itertuples()
        }
        if set(gaps) != set(LAYER_GROUPS):
            continue
        early = gaps["early"][1:]
        verdict = early_verdict(early, [gaps[g][1:] for g in LAYER_GROUPS[1:]])
        cells.append(
            {
                "task": task,
                "kind": kind,
                "statistic": statistic,
                "module": module,
                **{f"gap_{g}": gaps[g][0] for g in LAYER_GROUPS},
                **{f"gap_{g}_low": gaps[g][1] for g in LAYER_GROUPS},
                **{f"gap_{g}_high": gaps[g][2] for g in LAYER_GROUPS},
                "verdict": verdict,
            }  # fmt: skip
        )
    if not cells:
        return {"testable": False}
    verdicts = [cell["verdict"] for cell in cells]
    by_statistic = {}
    for cell in cells:
        by_statistic.setdefault(cell["statistic"], []).append(cell["verdict"])
    return {
        "testable": True,
        "verdict": aggregate(verdicts),
        "counts": counts(verdicts),
        "by_statistic": {k: aggregate(v) for k, v in by_statistic.items()},
        "cells": [{k: clean(v) for k, v in cell.items()} for cell in cells],
    }


def longer_verdict(low: float, high: float, reduction: float = DETAILED_LIKE_REDUCTION) -> str:
    """Claim 5's rule on the interval of a relative change (see :data:`RULES`)."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > -reduction:
        return HOLDS
    if high < -reduction:
        return FAILS
    return INCONCLUSIVE


def claim_five(contrasts: pd.DataFrame) -> dict:
    """Claim 5 on the longer-minus-short contrasts of correct knowledge answers."""
    if contrasts.empty:
        return {"testable": False}
    cells = contrasts[
        (contrasts["condition"] == "correct")
        & (contrasts["metric"] == METRIC)
        & (contrasts["group"] == GROUP)
        & (contrasts["kind_b"] == SHORT_KIND)
        & (contrasts["kind_a"].isin(LONGER_KINDS))
    ].copy()
    if cells.empty:
        return {"testable": False}
    cells["verdict"] = [
        longer_verdict(low, high)
        for low, high in zip(cells.relative_low, cells.relative_high, strict=True)
    ]
    columns = [
        "task",
        "kind_a",
        "kind_b",
        "statistic",
        "module",
        "value_a",
        "value_b",
        "relative",
        "relative_low",
        "relative_high",
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


def detailed_reduction(contrasts: pd.DataFrame) -> dict[str, float]:
    """Median relative change Detailed vs None (correct, all layers) per statistic, for context."""
    if contrasts.empty:
        return {}
    rows = contrasts[
        (contrasts["condition"] == "correct")
        & (contrasts["metric"] == METRIC)
        & (contrasts["group"] == GROUP)
        & (contrasts["kind_a"] == "detailed")
        & (contrasts["kind_b"] == "none")
    ]
    return {
        statistic: float(part["relative"].median())
        for statistic, part in rows.groupby("statistic", sort=False)
    }


def loss_reduction(summary: Path) -> str | None:
    """How the loss was reduced over response tokens in the run behind the summary."""
    config = summary / "config.yaml"
    if not config.exists():
        return None
    return OmegaConf.select(OmegaConf.load(config), "prompt.loss_reduction")


def model_findings(summary: Path, model: str, experiment: str, confidence: float) -> dict:
    """One model's claims (1, 3, 5) and the numbers behind them."""
    mad = read_optional(summary / "mad.parquet")
    tokens = response_tokens(mad) if len(mad) else {}
    contrasts = read_optional(summary / "contrasts.parquet")
    claims = {
        "1": claim_one(contrasts),
        "3": claim_three(
            read_optional(summary / "paired_tests.parquet"),
            read_optional(summary / "relative_difference.parquet"),
            tokens,
        ),
        "5": claim_five(contrasts),
    }
    claims["1"]["length_controlled"] = claim_one_length(
        read_optional(summary / "length_regression.parquet")
    )
    claims["1"]["early_layers"] = claim_one_early(contrasts)
    for key, claim in claims.items():
        claim["statement"] = STATEMENTS[key]
    return {
        "model": model,
        "experiment": experiment,
        "metric": METRIC,
        "confidence": confidence,
        "alpha": 1 - confidence,
        "loss_reduction": loss_reduction(summary),
        "detailed_vs_none_relative": detailed_reduction(contrasts),
        "rules": RULES,
        "claims": claims,
    }


# ------------------------------------------------------------------------------------------
# Claims across models


def model_role(name: str) -> dict:
    """A model's tuning, template and source, from its config entry."""
    model = compose([f"model={name}"]).model
    source = model.hf_id or f"{model.package}:{model.gguf_file}"
    return {
        "name": name,
        "family": model.family,
        "tuning": model.tuning,
        "template": model.template,
        "source": source,
    }


def model_pairs(roles: list[dict]) -> list[dict]:
    """(instruct, base) pairs: an instruct model with its chat template against each model that
    is prompted as a base model (a base model, or instruct weights with the base template)."""
    instruct = [r for r in roles if r["tuning"] == "instruct" and r["template"] == "chat"]
    base = [r for r in roles if r["tuning"] == "base" or r["template"] == "base"]
    pairs = []
    for first in instruct:
        for second in base:
            if first["source"] == second["source"]:
                relation = "same weights, base template"
            elif first["family"] == second["family"]:
                relation = "same family"
            else:
                relation = "different family and tuning"
            pairs.append({"instruct": first["name"], "base": second["name"], "relation": relation})
    return pairs


def replicate_values(replicates: pd.DataFrame, statistic: str, condition: str) -> pd.DataFrame:
    """Replicates of one statistic indexed by (task, kind, module, replicate)."""
    rows = replicates[
        (replicates["statistic"] == statistic)
        & (replicates["condition"] == condition)
        & (replicates["metric"] == METRIC)
    ]
    return rows.set_index(["task", "kind", "module", "replicate"])["value"]


def instability(replicates: pd.DataFrame) -> pd.Series:
    """MAD / level over all layers of each correct file's resampled mean curves."""
    mad = replicate_values(replicates, "mad", "correct")
    level = replicate_values(replicates, "level", "correct")
    return mad / level


def separation(replicates: pd.DataFrame) -> pd.Series:
    """|relative difference of the level|, irrelevant vs correct, of each paired resample."""
    return replicate_values(replicates, "relative_difference_level", "irrelevant_vs_correct").abs()


def difference_cells(first: pd.Series, second: pd.Series, kinds, confidence: float):
    """Per (task, kind, module): the percentile interval of ``first - second`` over replicates.

    The two models' samples are resampled independently, so replicate b of one model paired with
    replicate b of the other is a draw of the difference (two-sample bootstrap).
    """
    joined = pd.concat({"first": first, "second": second}, axis=1, join="inner").dropna()
    joined = joined[joined.index.get_level_values("kind").isin(kinds)]
    joined["difference"] = joined["first"] - joined["second"]
    tail = (1 - confidence) / 2
    grouped = joined.groupby(level=["task", "kind", "module"], sort=False)
    cells = grouped.agg(
        first_median=("first", "median"),
        second_median=("second", "median"),
        ci_low=("difference", lambda d: float(np.quantile(d, tail))),
        ci_high=("difference", lambda d: float(np.quantile(d, 1 - tail))),
    )
    return cells.reset_index()


def point_instability(mad: pd.DataFrame) -> pd.Series:
    rows = mad[
        (mad["condition"] == "correct") & (mad["metric"] == METRIC) & (mad["group"] == GROUP)
    ]
    return rows.set_index(["task", "kind", "module"]).eval("mad / level")


def point_separation(relative: pd.DataFrame) -> pd.Series:
    rows = relative[
        (relative["scope"] == "level")
        & (relative["group"] == GROUP)
        & (relative["metric"] == METRIC)
    ]
    return rows.set_index(["task", "kind", "module"])["relative_difference"].abs()


def no_better_verdict(low: float, high: float, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Claim 4's rule on the interval of s_instruct - s_base (see :data:`RULES`)."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > 0:
        return FAILS
    if high < 0 or (low >= -margin and high <= margin):
        return HOLDS
    return INCONCLUSIVE


def compare_models(
    summaries: dict[str, Path], pair: dict, claim: str, confidence: float
) -> dict | None:
    """Claim 2 or 4 for one (instruct, base) pair; None when either summary lacks the data."""
    tables = {}
    for role in ("instruct", "base"):
        directory = summaries[pair[role]]
        replicates = read_optional(directory / "replicates.parquet")
        if replicates.empty:
            return None
        if claim == "2":
            point = point_instability(read_optional(directory / "mad.parquet"))
            tables[role] = (instability(replicates), point)
        else:
            relative = read_optional(directory / "relative_difference.parquet")
            if relative.empty:
                return None
            tables[role] = (separation(replicates), point_separation(relative))
    kinds = COMPARED_TO_DETAILED if claim == "2" else ("detailed",)
    cells = difference_cells(tables["instruct"][0], tables["base"][0], kinds, confidence)
    if cells.empty:
        return None
    keys = list(zip(cells.task, cells.kind, cells.module, strict=True))
    cells["instruct"] = tables["instruct"][1].reindex(keys).to_numpy()
    cells["base"] = tables["base"][1].reindex(keys).to_numpy()
    cells["difference"] = cells["instruct"] - cells["base"]
    if claim == "2":
        rule = [
            interval_verdict(-high, -low)
            for low, high in zip(cells.ci_low, cells.ci_high, strict=True)
        ]
    else:
        rule = [
            no_better_verdict(low, high)
            for low, high in zip(cells.ci_low, cells.ci_high, strict=True)
        ]
    cells["verdict"] = rule
    verdicts = cells["verdict"].tolist()
    columns = ["task", "kind", "module", "instruct", "base", "difference", "ci_low", "ci_high",
               "verdict"]  # fmt: skip
    return {
        **pair,
        "verdict": aggregate(verdicts),
        "counts": counts(verdicts),
        "cells": records(cells[columns]),
    }


def cross_model_claims(summaries: dict[str, Path], confidence: float) -> dict:
    """Claims 2 and 4 for every (instruct, base) pair of the experiment's models."""
    pairs = model_pairs([model_role(name) for name in summaries])
    claims = {}
    for key in ("2", "4"):
        compared = [compare_models(summaries, pair, key, confidence) for pair in pairs]
        compared = [item for item in compared if item is not None]
        claims[key] = {
            "statement": STATEMENTS[key],
            "testable": bool(compared),
            "pairs": compared,
        }
        if compared:
            claims[key]["verdict"] = aggregate([item["verdict"] for item in compared])
    return claims


def number(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def claim_three_section(result: dict) -> list[str]:
    claim = result["claims"]["3"]
    lines = [f"### {result['model']}", ""]
    if not claim["testable"]:
        return [
            *lines,
            "Not testable: needs correct and irrelevant Detailed CoT and None or Simplified CoT.",
            "",
        ]
    lines += [f"**{claim['verdict']}** (tasks: {counts_text(claim['counts'])})", ""]
    for task in claim["tasks"]:
        tokens = ", ".join(f"{k} {number(v, 3)}" for k, v in task["response_tokens"].items())
        lines += [
            f"- {task['task']}: **{task['verdict']}**; share of modules significant: Detailed "
            f"{task['share_significant_detailed']:.2f}, {task['fast_kind']} "
            f"{task['share_significant_fast']:.2f}; "
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
        fewest = min((module["n_pairs"] for module in task["modules"]), default=0)
        if smallest_wilcoxon_p(fewest) >= result["alpha"]:
            lines += [
                f"With {fewest} pairs the smallest two-sided Wilcoxon p is "
                f"{smallest_wilcoxon_p(fewest):.3g}, not below alpha = {result['alpha']:.3g}: "
                "no module can be significant, so this task is inconclusive by its sample size "
                "alone (the bootstrap intervals of the relative difference still show the "
                "direction).",
                "",
            ]
    return lines


def smallest_wilcoxon_p(pairs: int) -> float:
    """The exact two-sided Wilcoxon signed-rank test's smallest p for this many pairs: 2 / 2^n."""
    return min(1.0, 2.0 / 2**pairs) if pairs > 0 else 1.0


def interval_text(value, low, high) -> str:
    return f"{number(value)} [{number(low)}, {number(high)}]"


def verdict_line(claim: dict) -> list[str]:
    """A claim's verdict with its verdict per statistic and its tally of cells."""
    by_statistic = ", ".join(f"{k}: {v}" for k, v in claim["by_statistic"].items())
    return [f"**{claim['verdict']}** ({by_statistic}; cells: {counts_text(claim['counts'])})", ""]


def claim_one_section(result: dict) -> list[str]:
    claim = result["claims"]["1"]
    lines = [f"### {result['model']}", ""]
    if not claim["testable"]:
        return [*lines, "Not testable: no Detailed CoT with None or Simplified CoT.", ""]
    lines += verdict_line(claim)
    rows = [
        [
            cell["task"],
            f"{cell['kind_a']} - {cell['kind_b']}",
            cell["statistic"],
            cell["module"],
            number(cell["value_a"]),
            number(cell["value_b"]),
            interval_text(cell["difference"], cell["ci_low"], cell["ci_high"]),
            f"{number(cell['response_tokens_a'], 3)} / {number(cell['response_tokens_b'], 3)}",
            f"{cell['n_a']} / {cell['n_b']}",
            cell["verdict"],
        ]
        for cell in claim["cells"]
    ]
    header = ["task", "kinds", "statistic", "module", "detailed", "other", "difference [CI]",
              "response tokens", "n", "verdict"]  # fmt: skip
    lines += [*markdown_table(header, rows), ""]
    lines += length_section(claim.get("length_controlled", {"testable": False}))
    return lines + early_section(claim.get("early_layers", {"testable": False}))


def early_section(claim: dict) -> list[str]:
    lines = ["Where the faster kinds' larger gradients lie (rule `early`):", ""]
    if not claim["testable"]:
        return [*lines, "Not testable: no early, middle and late contrasts.", ""]
    lines += verdict_line(claim)
    rows = [
        [
            cell["task"],
            f"{cell['kind']} - detailed",
            cell["statistic"],
            cell["module"],
            *(
                interval_text(cell[f"gap_{g}"], cell[f"gap_{g}_low"], cell[f"gap_{g}_high"])
                for g in LAYER_GROUPS
            ),
            cell["verdict"],
        ]
        for cell in claim["cells"]
    ]
    header = ["task", "gap", "statistic", "module", *(f"{g} [CI]" for g in LAYER_GROUPS),
              "verdict"]  # fmt: skip
    return [*lines, *markdown_table(header, rows), ""]


def length_section(claim: dict) -> list[str]:
    lines = ["At equal response length (rule `length`):", ""]
    if not claim["testable"]:
        return [*lines, "Not testable: no per-sample token counts or no kinds to compare.", ""]
    lines += verdict_line(claim)
    rows = [
        [
            cell["task"],
            f"{cell['kind_a']} - {cell['kind_b']}",
            cell["statistic"],
            cell["module"],
            number(cell["raw_difference"]),
            interval_text(cell["kind_coefficient"], cell["ci_low"], cell["ci_high"]),
            number(cell["length_coefficient"]),
            number(cell["length_overlap"], 2),
            f"{number(cell['response_tokens_a'], 3)} / {number(cell['response_tokens_b'], 3)}",
            cell["verdict"],
        ]
        for cell in claim["cells"]
    ]
    header = ["task", "kinds", "statistic", "module", "raw difference", "b_kind [CI]", "b_len",
              "length overlap", "response tokens", "verdict"]  # fmt: skip
    return [*lines, *markdown_table(header, rows), ""]


def claim_five_section(result: dict) -> list[str]:
    claim = result["claims"]["5"]
    lines = [f"### {result['model']}", ""]
    if not claim["testable"]:
        return [*lines, f"Not testable: no {SHORT_KIND} answers with longer ones.", ""]
    lines += verdict_line(claim)
    rows = [
        [
            cell["task"],
            f"{cell['kind_a']} vs {cell['kind_b']}",
            cell["statistic"],
            cell["module"],
            number(cell["value_a"]),
            number(cell["value_b"]),
            interval_text(cell["relative"], cell["relative_low"], cell["relative_high"]),
            f"{number(cell['response_tokens_a'], 3)} / {number(cell['response_tokens_b'], 3)}",
            cell["verdict"],
        ]
        for cell in claim["cells"]
    ]
    header = ["task", "kinds", "statistic", "module", "longer", "short", "relative change [CI]",
              "response tokens", "verdict"]  # fmt: skip
    return [*lines, *markdown_table(header, rows), ""]


def cross_model_section(claim: dict, value_name: str) -> list[str]:
    if not claim["testable"]:
        return ["Not testable: needs an instruct model (chat template) and a model prompted as a "
                "base model, each with a summary.", ""]  # fmt: skip
    lines = [f"**{claim['verdict']}** over {len(claim['pairs'])} pair(s)", ""]
    for pair in claim["pairs"]:
        lines += [
            f"- {pair['instruct']} vs {pair['base']} ({pair['relation']}): **{pair['verdict']}** "
            f"(cells: {counts_text(pair['counts'])})",
            "",
        ]
        rows = [
            [
                cell["task"],
                cell["kind"],
                cell["module"],
                number(cell["instruct"]),
                number(cell["base"]),
                interval_text(cell["difference"], cell["ci_low"], cell["ci_high"]),
                cell["verdict"],
            ]
            for cell in pair["cells"]
        ]
        header = ["task", "kind", "module", f"{value_name} instruct", f"{value_name} base",
                  "difference [CI]", "verdict"]  # fmt: skip
        lines += [*markdown_table(header, rows), ""]
    return lines


def findings_markdown(
    experiment: str, results: list[dict], missing: list[str], cross: dict | None = None
) -> str:
    """The whole findings file: rules, caveats, then each claim for each model or pair."""
    lines = [f"# Findings: {experiment}", ""]
    if results:
        reductions = sorted({str(r.get("loss_reduction")) for r in results})
        lines += [
            f"Metric: {METRIC}; layer group: {GROUP}; intervals: {results[0]['confidence']:.0%} "
            f"percentile bootstrap over samples; alpha = {results[0]['alpha']:.3g}; loss "
            f"reduced over response tokens by: {', '.join(reductions)}.",
            "",
        ]
    lines += ["## Verdict rules", ""]
    lines += [f"- {name}: {text}" for name, text in RULES.items()]
    lines += ["", "## Response length", "", LENGTH_CAVEAT, ""]
    lines += ["## Models", "", MODEL_CAVEAT, ""]
    if missing:
        lines += [f"Models without a summary (not reduced): {', '.join(missing)}.", ""]
    sections = (("1", claim_one_section), ("3", claim_three_section), ("5", claim_five_section))
    for key, section in sections:
        lines += [f"## Claim {key}", "", STATEMENTS[key], ""]
        for result in results:
            lines += section(result)
    for key, value_name in (("2", "MAD/level"), ("4", "|relative difference|")):
        lines += [f"## Claim {key}", "", STATEMENTS[key], ""]
        lines += cross_model_section((cross or {}).get(key, {"testable": False}), value_name)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Every experiment


def verdict_of(claim: dict) -> str:
    return claim.get("verdict", INCONCLUSIVE) if claim.get("testable") else "not testable"


def experiment_record(experiment: str, results: list[dict], cross: dict, missing) -> dict:
    """The experiment's verdicts in brief, per model and per pair, for the overall findings."""
    per_model = {}
    for result in results:
        claims = result["claims"]
        per_model[result["model"]] = {
            "1": verdict_of(claims["1"]),
            "1_length_controlled": verdict_of(claims["1"].get("length_controlled", {})),
            "1_early_layers": verdict_of(claims["1"].get("early_layers", {})),
            "3": verdict_of(claims["3"]),
            "5": verdict_of(claims["5"]),
            "loss_reduction": result.get("loss_reduction"),
            "detailed_vs_none_relative": result.get("detailed_vs_none_relative", {}),
        }
    per_pair = {
        key: [
            {k: pair[k] for k in ("instruct", "base", "relation", "verdict", "counts")}
            for pair in claim.get("pairs", [])
        ]
        for key, claim in cross.items()
    }
    return {
        "experiment": experiment,
        "models": per_model,
        "pairs": per_pair,
        "missing": list(missing),
        "claims": cross,
    }


def overall_markdown(records_: list[dict]) -> str:
    """Every experiment's verdicts: one table per claim, rows experiment x model (or pair)."""
    lines = ["# Findings: every experiment", "", "Rules, numbers and caveats: each experiment's "
             "findings.md. Models differ in family as well as tuning (see there).", ""]  # fmt: skip
    for key, label in (("1", "1"), ("1_length_controlled", "1 at equal length"),
                       ("1_early_layers", "1, most in early layers"), ("3", "3"),
                       ("5", "5")):  # fmt: skip
        lines += [f"## Claim {label}", "", STATEMENTS[key.split("_")[0]], ""]
        rows = [
            [
                record["experiment"],
                model,
                verdicts.get(key, "not testable"),
                str(verdicts.get("loss_reduction")),
            ]
            for record in records_
            for model, verdicts in record["models"].items()
        ]
        lines += [*markdown_table(["experiment", "model", "verdict", "loss"], rows), ""]
        if key == "5":
            context = [
                [record["experiment"], model, ", ".join(
                    f"{k} {number(v, 3)}" for k, v in verdicts["detailed_vs_none_relative"].items()
                )]
                for record in records_
                for model, verdicts in record["models"].items()
                if verdicts.get("detailed_vs_none_relative")
            ]  # fmt: skip
            if context:
                lines += ["Detailed vs None relative change (median over tasks and modules), for "
                          "comparison with the longer answers:", ""]  # fmt: skip
                lines += [*markdown_table(["experiment", "model", "relative change"], context), ""]
    for key in ("2", "4"):
        lines += [f"## Claim {key}", "", STATEMENTS[key], ""]
        rows = [
            [record["experiment"], f"{pair['instruct']} vs {pair['base']}", pair["relation"],
             pair["verdict"], counts_text(pair["counts"])]
            for record in records_
            for pair in record["pairs"].get(key, [])
        ]  # fmt: skip
        header = ["experiment", "pair", "relation", "verdict", "cells"]
        lines += [*markdown_table(header, rows), ""] if rows else ["Not testable anywhere.", ""]
    return "\n".join(lines)


def write_overall(results_dir: str | Path) -> Path:
    """``results/findings.md`` from every ``results/*/findings.json``."""
    root = Path(results_dir)
    found = []
    for path in sorted(root.glob("*/findings.json")):
        try:
            found.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            log.warning("skipping unreadable %s", path)
    target = root / "findings.md"
    root.mkdir(parents=True, exist_ok=True)
    target.write_text(overall_markdown(found))
    log.info("overall findings of %d experiments in %s", len(found), target)
    return target


def findings_command(cfg: DictConfig) -> int:
    """Verdicts for every model of the experiment that has a summary (see module docstring)."""
    started = time.perf_counter()
    experiment = cfg.experiment.name
    models = list(cfg.experiment.models) or [cfg.model.name]
    results, missing, summaries = [], [], {}
    for model in models:
        summary = paths.summary_dir(cfg.results_dir, experiment, model)
        if not (summary / "mad.parquet").exists():
            missing.append(model)
            continue
        result = model_findings(summary, model, experiment, cfg.reduce.confidence)
        (summary / "findings.json").write_text(json.dumps(result, indent=2) + "\n")
        results.append(result)
        summaries[model] = summary
    if missing:
        log.warning("no summary for %s", ", ".join(missing))
    cross = cross_model_claims(summaries, cfg.reduce.confidence)

    directory = paths.experiment_dir(cfg.results_dir, experiment)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "findings.md").write_text(findings_markdown(experiment, results, missing, cross))
    record = experiment_record(experiment, results, cross, missing)
    (directory / "findings.json").write_text(json.dumps(record, indent=2) + "\n")
    write_overall(cfg.results_dir)
    log.info(
        "findings for %d models in %s (%.2fs)",
        len(results),
        directory,
        time.perf_counter() - started,
    )
    return 0


def overall_command(cfg: DictConfig) -> int:
    """Rebuild ``results/findings.md`` from the experiments' findings.json files."""
    write_overall(cfg.results_dir)
    return 0


if __name__ == "__main__":
    import sys

    arguments = sys.argv[1:]
    if not arguments or arguments[0] != "overall":
        sys.exit("usage: python -m gradspec.findings overall [key=value ...]")
    logging.basicConfig(level=logging.INFO)
    sys.exit(overall_command(compose(arguments[1:])))
