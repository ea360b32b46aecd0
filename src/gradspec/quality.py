"""Paper 2's claims on data quality, tested on an experiment's spectra: ``gradspec quality``.

For every model of the experiment with spectra, under ``results/<exp>/<model>/quality/``:

- ``samples.parquet``: per sample and projection (and ``all``, the mean over projections) the
  mean over layers of each statistic, with length, truncation and the record's quality scores;
- ``curves.parquet``: per file, layer and projection the mean of each statistic over samples with
  its percentile bootstrap interval;
- ``auroc.csv``: highest against lowest split, per metric (dataset), source (task), projection
  and statistic, on all samples and on length-matched pairs; ``length_regression.csv``: the split
  coefficient at equal log length; ``spearman.csv``: statistic against every score, pooled and
  within each split, with the partial correlation given log length;
- ``reasoning.csv`` (claim 3), ``cosine.csv`` (claim 5), ``missing_scores.csv``,
  ``truncation.csv`` and ``findings.json`` (every claim with its numbers).

And for the experiment: ``results/<exp>/quality/family.csv`` (claim 4) and
``results/<exp>/findings.md``. The verdict rules are :data:`RULES`, written verbatim there.

"Higher quality" is the ``highest`` split for every metric. For IFD this is the paper's reading
too: a high IFD means the instruction helps the model little to produce the response, the hard
instructions its source paper selects; the files agree (``highest``: IFD 0.94-0.99 on average,
``lowest``: 0.005-0.51).
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from scipy import stats as sps

from gradspec import data, paths, reduce
from gradspec import stats as st
from gradspec.config import compose, experiment_files
from gradspec.findings import FAILS, HOLDS, INCONCLUSIVE, aggregate

log = logging.getLogger(__name__)

STATISTICS = ("nuclear_norm", "effective_rank")
# The claimed direction of high - low quality for each statistic (claim 1): -1 lower, +1 higher.
DIRECTION = {"nuclear_norm": -1, "effective_rank": 1}
HIGH, LOW, REASONING = "highest", "lowest", "reasoning"
SCORES = ("diff", "instag", "reward", "ppl_gpt2", "ifd_gpt2", "ppl_qwen7b", "ifd_qwen7b")
COSINES = ("cosine_next_layer", "cosine_kv")
ALL = "all"
# Nearest-neighbour matching on length: a pair's lengths differ by at most this in log tokens.
CALIPER = math.log(1.25)
NEAR_ZERO = 0.1
CURVE_MARGIN = 0.1
SPLIT_HALVES = 20

STATEMENTS = {
    "1": "For IFD, InsTag, difficulty and reward alike, higher-quality data has a lower nuclear "
    "norm and a higher effective rank.",
    "2": "Effective rank separates quality levels more robustly than nuclear norm.",
    "3": "Reasoning data has a much higher effective rank than instruction data, s1.1 the highest.",
    "4": "Models of one family share gradient patterns across sizes; families differ.",
    "5": "Cosine similarities between gradients of the same layer (k and v) and of adjacent "
    "layers stay near zero for all data.",
}
RULES = {
    "auroc": "AUROC of a statistic at telling the highest from the lowest split: "
    "A = U / (n_high n_low), U the Mann-Whitney statistic of the highest split (ties count "
    "1/2), i.e. P(X_high > X_low); interval: percentile bootstrap, each split resampled "
    "independently.",
    "1": "Per metric and source, on each sample's mean over layers and projections: the "
    "nuclear norm part holds when the AUROC interval lies below 0.5 and fails when it lies "
    "above; the effective rank part holds when it lies above 0.5 and fails when below. The "
    "cell holds when both parts hold, does not hold when either fails, else is inconclusive. "
    "Per metric and overall, the aggregate rule. The same rule is applied on length-matched "
    "pairs and on the split coefficient of `y = b0 + b_split [highest] + b_len log(tokens)` "
    "(interval below/above 0 instead of 0.5).",
    "2": "Per metric and source, directional separations s_er = A_er - 0.5 and "
    "s_nn = 0.5 - A_nn from the same resamples, d = s_er - s_nn: holds when d's interval lies "
    "above 0, does not hold when below, else inconclusive; then the aggregate rule; also on "
    "length-matched pairs.",
    "3": "Per reasoning source, the AUROC of effective rank at telling its samples from all "
    "instruction samples (both splits of every metric): holds when every interval lies above "
    "0.5 and s1's against gsm8k's lies above 0.5 too (s1.1 the highest); does not hold when any "
    "of these intervals lies below 0.5; else inconclusive.",
    "4": "Per file, projection and statistic, the mean curves of two models are compared on "
    "relative depth (layer / (L - 1), interpolated to the shallower model's layers): r is their "
    "Pearson correlation, and the ceiling is the smaller of the two models' split-half "
    f"correlations (mean over {SPLIT_HALVES} random halves). gap = ceiling - r. Families differ "
    f"when the median gap over cells exceeds {CURVE_MARGIN}; a family shares its pattern across "
    f"sizes when the median gap is at most {CURVE_MARGIN}. Claim: holds when both parts hold; "
    "does not hold when a tested part fails; inconclusive when a part cannot be tested (one "
    "size per family) and the other holds.",
    "5": f"Per file, layer, projection and cosine (next layer; k with v): the mean of |cosine| "
    f"over samples with its bootstrap interval; near zero means the interval lies below "
    f"{NEAR_ZERO}. A cell fails when the interval lies above {NEAR_ZERO}. Claim: holds when "
    "every cell is near zero; does not hold when any cell fails; else inconclusive.",
    "aggregate": "Over cells: holds when more than half hold and none does not hold; does not "
    "hold when more than half do not hold and none holds; otherwise inconclusive.",
}
CAVEATS = (
    "The highest splits have responses many times longer than the lowest ones (rank <= tokens, "
    "and the loss is a mean over tokens), so every comparison is also made on length-matched "
    "pairs (log length within log 1.25) and with log length as a covariate.",
    "Responses are cut at prompt.max_length tokens (see truncation.csv: tokens kept, tokens in "
    "full, share truncated); s1.1's traces are cut almost always.",
    "With one size per family, claim 4 can only be tested in part: that families differ.",
    "Cosines pair each projection with itself in the next layer and k with v; q is never "
    "compared with o: their gradients are transposed to each other (q: query x hidden, o: "
    "hidden x query), so a flattened inner product would pair unrelated coordinates.",
)


# --------------------------------------------------------------------------------------------
# Verdict rules


def interval_side(low: float, high: float, threshold: float, direction: int) -> str:
    """holds when the interval lies beyond ``threshold`` in ``direction``; fails when opposite."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return INCONCLUSIVE
    if (direction > 0 and low > threshold) or (direction < 0 and high < threshold):
        return HOLDS
    if (direction > 0 and high < threshold) or (direction < 0 and low > threshold):
        return FAILS
    return INCONCLUSIVE


def both(first: str, second: str) -> str:
    if FAILS in (first, second):
        return FAILS
    return HOLDS if first == second == HOLDS else INCONCLUSIVE


def all_cells(verdicts: list[str]) -> str:
    """Claim 5's rule: every cell near zero holds; any cell clearly away fails."""
    if not verdicts:
        return INCONCLUSIVE
    if FAILS in verdicts:
        return FAILS
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def near_zero(low: float, high: float, bound: float = NEAR_ZERO) -> str:
    """A mean |cosine| interval: below ``bound`` holds, above fails, straddling inconclusive."""
    return interval_side(low, high, bound, -1)


def curve_verdict(gap: float, relation: str, margin: float = CURVE_MARGIN) -> str:
    """Claim 4 on the median gap: families differ when it exceeds the margin; a family shares
    its pattern when it does not."""
    if not math.isfinite(gap):
        return INCONCLUSIVE
    if relation == "different family":
        return HOLDS if gap > margin else FAILS
    return HOLDS if gap <= margin else FAILS


def tally(verdicts: list[str]) -> dict[str, int]:
    return {v: verdicts.count(v) for v in (HOLDS, FAILS, INCONCLUSIVE)}


# --------------------------------------------------------------------------------------------
# Statistics


def auroc(high: np.ndarray, low: np.ndarray) -> float:
    """P(X_high > X_low) + P(tie) / 2 = U / (n1 n2), U from the rank sum of ``high``."""
    high, low = np.asarray(high, float), np.asarray(low, float)
    if not high.size or not low.size:
        return math.nan
    ranks = sps.rankdata(np.concatenate([high, low]))
    u = ranks[: high.size].sum() - high.size * (high.size + 1) / 2
    return float(u / (high.size * low.size))


def auroc_many(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of (B, n1) against (B, n2)."""
    ranks = sps.rankdata(np.concatenate([high, low], axis=1), axis=1)
    n1, n2 = high.shape[1], low.shape[1]
    return (ranks[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n2)


def resample_indices(rng: np.random.Generator, n: int, n_bootstrap: int) -> np.ndarray:
    return rng.integers(0, n, size=(n_bootstrap, n)) if n else np.zeros((n_bootstrap, 0), int)


def seeded(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32("/".join(parts).encode())])


def partial_spearman(x, y, z) -> float:
    """Spearman correlation of x and y given z: the partial correlation of their ranks,
    (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)) (standard first-order partial)."""
    r_xy = sps.spearmanr(x, y).statistic
    r_xz = sps.spearmanr(x, z).statistic
    r_yz = sps.spearmanr(y, z).statistic
    denominator = math.sqrt(max((1 - r_xz**2) * (1 - r_yz**2), 0.0))
    return float((r_xy - r_xz * r_yz) / denominator) if denominator > 0 else math.nan


def match_lengths(tokens_a, tokens_b, caliper: float = CALIPER) -> list[tuple[int, int]]:
    """Pairs (i, j) of samples of ``a`` and ``b`` with |log t_a - log t_b| <= caliper, each
    sample used once: the closest pairs first (greedy nearest-neighbour matching), ties by
    position. Returned in the order of ``a``."""
    la, lb = np.log(np.asarray(tokens_a, float)), np.log(np.asarray(tokens_b, float))
    distance = np.abs(la[:, None] - lb[None, :])
    order = np.argsort(distance, axis=None, kind="stable")
    used_a, used_b, pairs = set(), set(), []
    for flat in order:
        i, j = divmod(int(flat), lb.size)
        if distance[i, j] > caliper:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def split_half(values: np.ndarray, rng: np.random.Generator, repeats: int = SPLIT_HALVES):
    """Mean correlation between the mean curves of two random halves of the samples (n, L)."""
    n = values.shape[0]
    if n < 4:
        return math.nan
    found = []
    for _ in range(repeats):
        order = rng.permutation(n)
        first = np.nanmean(values[order[: n // 2]], axis=0)
        second = np.nanmean(values[order[n // 2 :]], axis=0)
        found.append(pearson(first, second))
    return float(np.nanmean(found)) if np.isfinite(found).any() else math.nan


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 3 or np.std(a[keep]) == 0 or np.std(b[keep]) == 0:
        return math.nan
    return float(np.corrcoef(a[keep], b[keep])[0, 1])


def on_relative_depth(curve: np.ndarray, points: int) -> np.ndarray:
    """A per-layer curve resampled at ``points`` evenly spaced relative depths in [0, 1]."""
    depth = np.linspace(0, 1, curve.size)
    return np.interp(np.linspace(0, 1, points), depth, curve)


# --------------------------------------------------------------------------------------------
# Inputs


def file_scores(cfg: DictConfig, spec) -> pd.DataFrame:
    """Every record's quality scores as floats (NaN when absent or the bare token NaN), with
    which of the two it was."""
    path = data.resolve_data_path(cfg.data_dir, spec.path)
    rows = []
    for record in data.load_records(path):
        row = {"dataset": spec.dataset, "file": spec.file, "record_index": record.index}
        for name in SCORES:
            value = record.extra.get(name, None)
            number = float(value) if isinstance(value, int | float) else math.nan
            row[name] = number
            row[f"{name}_problem"] = (
                "absent" if name not in record.extra else ("NaN" if math.isnan(number) else "")
            )
        rows.append(row)
    return pd.DataFrame(rows)


def missing_scores(scores: pd.DataFrame, analysed: set) -> pd.DataFrame:
    """One row per record and score whose value is absent or NaN, for the scores the file has
    (a column absent from every record of a file is not listed)."""
    rows = []
    for (dataset, file), part in scores.groupby(["dataset", "file"], sort=False):
        for name in SCORES:
            problems = part[f"{name}_problem"]
            if (problems == "absent").all():
                continue
            for index, problem in zip(part["record_index"], problems, strict=True):
                if problem:
                    rows.append(
                        {
                            "dataset": dataset,
                            "file": file,
                            "record_index": int(index),
                            "score": name,
                            "problem": problem,
                            "analysed": (dataset, file, int(index)) in analysed,
                        }
                    )
    columns = ["dataset", "file", "record_index", "score", "problem", "analysed"]
    return pd.DataFrame(rows, columns=columns)


def sample_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Per sample and projection (and ``all``) the mean over layers of each statistic."""
    keys = [*reduce.LABELS, "record_index"]
    per_module = ok.groupby([*keys, "module"], sort=False)[list(STATISTICS)].mean().reset_index()
    per_all = ok.groupby(keys, sort=False)[list(STATISTICS)].mean().reset_index()
    per_all["module"] = ALL
    table = pd.concat([per_module, per_all], ignore_index=True)
    extra = ["n_response_tokens", "n_response_tokens_full", "truncated", "loss"]
    lengths = ok.groupby(keys, sort=False)[extra].first().reset_index()
    return table.merge(lengths, on=keys, how="left")


def truncation(frame: pd.DataFrame, max_length: int) -> pd.DataFrame:
    samples = frame.drop_duplicates(["dataset", "file", "record_index"])
    grouped = samples.groupby(["dataset", "file", "task", "kind"], sort=False)
    table = grouped.agg(
        samples=("record_index", "size"),
        truncated=("truncated", "sum"),
        mean_response_tokens=("n_response_tokens", "mean"),
        mean_response_tokens_full=("n_response_tokens_full", "mean"),
        max_response_tokens_full=("n_response_tokens_full", "max"),
    ).reset_index()
    table["max_length"] = max_length
    return table


# --------------------------------------------------------------------------------------------
# Analyses


def split_pairs(samples: pd.DataFrame):
    """(dataset, task, high rows, low rows) for every metric and source with both splits."""
    quality = samples[samples["kind"].isin([HIGH, LOW])]
    for (dataset, task), part in quality.groupby(["dataset", "task"], sort=False):
        high, low = part[part["kind"] == HIGH], part[part["kind"] == LOW]
        if len(high) and len(low):
            yield dataset, task, high, low


def auroc_cell(high, low, rng, n_bootstrap: int, confidence: float) -> dict:
    """AUROC of each statistic with intervals, and claim 2's d, from shared resamples."""
    ih = resample_indices(rng, len(high), n_bootstrap)
    il = resample_indices(rng, len(low), n_bootstrap)
    row, replicates = {}, {}
    for statistic in STATISTICS:
        h, lo = high[statistic].to_numpy(float), low[statistic].to_numpy(float)
        replicates[statistic] = auroc_many(h[ih], lo[il])
        low_ci, high_ci = st.percentile_interval(replicates[statistic], confidence)
        row |= {
            f"{statistic}_auroc": auroc(h, lo),
            f"{statistic}_ci_low": float(low_ci),
            f"{statistic}_ci_high": float(high_ci),
        }
    d = (replicates["effective_rank"] - 0.5) - (0.5 - replicates["nuclear_norm"])
    d_low, d_high = st.percentile_interval(d, confidence)
    point = (row["effective_rank_auroc"] - 0.5) - (0.5 - row["nuclear_norm_auroc"])
    return row | {"d_separation": point, "d_ci_low": float(d_low), "d_ci_high": float(d_high)}


def auroc_table(samples: pd.DataFrame, n_bootstrap: int, confidence: float, seed: int):
    """Highest against lowest per metric, source and projection; all samples and length-matched
    pairs (``subset``)."""
    rows = []
    for dataset, task, high, low in split_pairs(samples):
        first = high[high["module"] == ALL]
        second = low[low["module"] == ALL]
        pairs = match_lengths(first["n_response_tokens"], second["n_response_tokens"])
        matched = {
            "high": set(first["record_index"].to_numpy()[[i for i, _ in pairs]]),
            "low": set(second["record_index"].to_numpy()[[j for _, j in pairs]]),
        }
        for module, h_mod in high.groupby("module", sort=False):
            l_mod = low[low["module"] == module]
            for subset in ("all", "length_matched"):
                h, lo = h_mod, l_mod
                if subset == "length_matched":
                    h = h[h["record_index"].isin(matched["high"])]
                    lo = lo[lo["record_index"].isin(matched["low"])]
                base = {"dataset": dataset, "task": task, "module": module, "subset": subset,
                        "n_high": len(h), "n_low": len(lo),
                        "tokens_high": h["n_response_tokens"].mean(),
                        "tokens_low": lo["n_response_tokens"].mean()}  # fmt: skip
                if not len(h) or not len(lo):
                    rows.append(base)
                    continue
                rng = seeded(seed, dataset, task, module, subset)
                rows.append(base | auroc_cell(h, lo, rng, n_bootstrap, confidence))
    return pd.DataFrame(rows)


def regression_table(samples: pd.DataFrame, n_bootstrap: int, confidence: float, seed: int):
    """The split coefficient at equal log length, per metric, source, projection, statistic."""
    rows = []
    for dataset, task, high, low in split_pairs(samples):
        for module, h in high.groupby("module", sort=False):
            lo = low[low["module"] == module]
            rng = seeded(seed, "ols", dataset, task, module)
            w_h = st.bootstrap_weights(rng, len(h), n_bootstrap)
            w_l = st.bootstrap_weights(rng, len(lo), n_bootstrap)
            fit = st.length_regression(
                h[list(STATISTICS)].to_numpy(float),
                h["n_response_tokens"].to_numpy(float),
                lo[list(STATISTICS)].to_numpy(float),
                lo["n_response_tokens"].to_numpy(float),
                w_h,
                w_l,
            )
            low_ci, high_ci = st.percentile_interval(fit["kind_replicates"], confidence)
            for k, statistic in enumerate(STATISTICS):
                rows.append({"dataset": dataset, "task": task, "module": module,
                             "statistic": statistic, "b_split": fit["kind_coefficient"][k],
                             "ci_low": low_ci[k], "ci_high": high_ci[k],
                             "b_log_length": fit["length_coefficient"][k],
                             "raw_difference": fit["raw_difference"][k],
                             "length_overlap": fit["overlap"], "n_high": fit["n_a"],
                             "n_low": fit["n_b"]})  # fmt: skip
    return pd.DataFrame(rows)


def spearman_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Spearman's rho of each statistic with each score, per metric, source and projection,
    over both splits and within each, with the partial rho given log length."""
    rows = []
    quality = samples[samples["kind"].isin([HIGH, LOW])]
    for (dataset, task, module), part in quality.groupby(["dataset", "task", "module"]):
        for scope in ("pooled", HIGH, LOW):
            rows_scope = part if scope == "pooled" else part[part["kind"] == scope]
            for score in SCORES:
                if score not in rows_scope or rows_scope[score].isna().all():
                    continue
                rows += [spearman_row(rows_scope, score, s, dataset, task, module, scope)
                         for s in STATISTICS]  # fmt: skip
    return pd.DataFrame(rows)


def spearman_row(part, score, statistic, dataset, task, module, scope) -> dict:
    keep = part[score].notna() & part[statistic].notna()
    x, y = part.loc[keep, statistic].to_numpy(float), part.loc[keep, score].to_numpy(float)
    z = np.log(part.loc[keep, "n_response_tokens"].to_numpy(float))
    rho = p = partial = math.nan
    if keep.sum() >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        result = sps.spearmanr(x, y)
        rho, p = float(result.statistic), float(result.pvalue)
        partial = partial_spearman(x, y, z) if np.ptp(z) > 0 else math.nan
    return {"dataset": dataset, "task": task, "module": module, "scope": scope, "score": score,
            "statistic": statistic, "n": int(keep.sum()), "n_missing": int((~keep).sum()),
            "rho": rho, "p": p, "partial_rho_log_length": partial}  # fmt: skip


def reasoning_table(samples: pd.DataFrame, n_bootstrap: int, confidence: float, seed: int):
    """Effective rank of each reasoning source against all instruction samples, and s1 against
    gsm8k (AUROC with interval), with the mean tokens of each side."""
    rows = samples[samples["module"] == ALL]
    instruction = rows[rows["kind"].isin([HIGH, LOW])]
    reasoning = rows[rows["kind"] == REASONING]
    comparisons = [(task, part, instruction, "instruction")
                   for task, part in reasoning.groupby("task", sort=False)]  # fmt: skip
    by_task = dict(tuple(reasoning.groupby("task", sort=False)))
    if "s1" in by_task and "gsm8k" in by_task:
        comparisons.append(("s1", by_task["s1"], by_task["gsm8k"], "gsm8k"))
    out = []
    for task, first, second, against in comparisons:
        a = first["effective_rank"].to_numpy(float)
        b = second["effective_rank"].to_numpy(float)
        row = {"task": task, "against": against, "n": a.size, "n_against": b.size,
               "mean": a.mean() if a.size else math.nan,
               "mean_against": b.mean() if b.size else math.nan,
               "tokens": first["n_response_tokens"].mean(),
               "tokens_against": second["n_response_tokens"].mean()}  # fmt: skip
        if a.size and b.size:
            rng = seeded(seed, "reasoning", task, against)
            reps = auroc_many(a[resample_indices(rng, a.size, n_bootstrap)],
                              b[resample_indices(rng, b.size, n_bootstrap)])  # fmt: skip
            low, high = st.percentile_interval(reps, confidence)
            row |= {"auroc": auroc(a, b), "ci_low": float(low), "ci_high": float(high)}
        out.append(row)
    return pd.DataFrame(out)


def cosine_table(ok: pd.DataFrame, n_bootstrap: int, confidence: float, seed: int):
    """Mean cosine and mean |cosine| per file, layer, projection and cosine, with intervals."""
    present = [c for c in COSINES if c in ok.columns and ok[c].notna().any()]
    rows = []
    for column in present:
        part = ok[ok[column].notna()]
        if column == "cosine_kv":
            part = part[part["module"] == "k_proj"]
        for (dataset, file, layer, module), cell in part.groupby(
            ["dataset", "file", "layer", "module"], sort=False
        ):
            values = cell[column].to_numpy(float)
            rng = seeded(seed, column, dataset, file, str(layer), module)
            weights = st.bootstrap_weights(rng, values.size, n_bootstrap)
            signed = st.weighted_means(values[:, None], weights)[:, 0]
            absolute = st.weighted_means(np.abs(values)[:, None], weights)[:, 0]
            s_low, s_high = st.percentile_interval(signed, confidence)
            a_low, a_high = st.percentile_interval(absolute, confidence)
            rows.append({"cosine": column, "dataset": dataset, "file": file,
                         "task": cell["task"].iloc[0], "kind": cell["kind"].iloc[0],
                         "layer": int(layer), "module": module, "n": values.size,
                         "mean": values.mean(), "ci_low": float(s_low), "ci_high": float(s_high),
                         "mean_abs": np.abs(values).mean(), "abs_ci_low": float(a_low),
                         "abs_ci_high": float(a_high)})  # fmt: skip
    return pd.DataFrame(rows)


def curve_table(ok: pd.DataFrame, n_bootstrap: int, confidence: float, seed: int):
    """Per file, layer and projection: mean of each statistic with its bootstrap interval."""
    frames = []
    for key, samples in reduce.sample_arrays(ok).items():
        weights = st.bootstrap_weights(seeded(seed, "curves", *key), samples.n, n_bootstrap)
        frame = reduce.curve_rows(samples, weights, confidence)
        frames.append(frame[frame["metric"].isin(STATISTICS)])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# --------------------------------------------------------------------------------------------
# Claims of one model


def claim_one(aurocs: pd.DataFrame, regression: pd.DataFrame) -> dict:
    if aurocs.empty or "effective_rank_auroc" not in aurocs:
        return {"testable": False, "verdict": INCONCLUSIVE, "reason": "no highest/lowest pairs"}
    cells = aurocs[aurocs["module"] == ALL]
    result = {"testable": True}
    for subset in ("all", "length_matched"):
        part = cells[cells["subset"] == subset]
        rows = []
        for row in part.itertuples():
            parts = {
                s: interval_side(getattr(row, f"{s}_ci_low"), getattr(row, f"{s}_ci_high"), 0.5,
                                 DIRECTION[s])
                for s in STATISTICS
            }  # fmt: skip
            rows.append({"dataset": row.dataset, "task": row.task, "n_high": row.n_high,
                         "n_low": row.n_low, **{f"{s}_auroc": getattr(row, f"{s}_auroc")
                                                for s in STATISTICS},
                         **{f"{s}_verdict": v for s, v in parts.items()},
                         "verdict": both(*parts.values())})  # fmt: skip
        result[subset] = summarise_cells(rows)
    ols = regression[regression["module"] == ALL] if not regression.empty else regression
    rows = []
    for (dataset, task), part in ols.groupby(["dataset", "task"], sort=False):
        parts = {r.statistic: interval_side(r.ci_low, r.ci_high, 0.0, DIRECTION[r.statistic])
                 for r in part.itertuples()}  # fmt: skip
        rows.append({"dataset": dataset, "task": task, **{f"{s}_b_split": b for s, b in
                     zip(part["statistic"], part["b_split"], strict=True)},
                     "verdict": both(*parts.values())})  # fmt: skip
    result["log_length_covariate"] = summarise_cells(rows)
    result["verdict"] = result["all"]["verdict"]
    return result


def summarise_cells(rows: list[dict]) -> dict:
    verdicts = [r["verdict"] for r in rows]
    per_metric = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r["verdict"] for r in rows if r["dataset"] == dataset]
        per_metric[dataset] = {"verdict": aggregate(mine), "counts": tally(mine)}
    return {"verdict": aggregate(verdicts), "counts": tally(verdicts), "per_metric": per_metric,
            "cells": rows}  # fmt: skip


def claim_two(aurocs: pd.DataFrame) -> dict:
    if aurocs.empty or "d_separation" not in aurocs:
        return {"testable": False, "verdict": INCONCLUSIVE, "reason": "no highest/lowest pairs"}
    result = {"testable": True}
    for subset in ("all", "length_matched"):
        part = aurocs[(aurocs["module"] == ALL) & (aurocs["subset"] == subset)]
        rows = [{"dataset": r.dataset, "task": r.task, "d": r.d_separation,
                 "ci_low": r.d_ci_low, "ci_high": r.d_ci_high,
                 "verdict": interval_side(r.d_ci_low, r.d_ci_high, 0.0, 1)}
                for r in part.itertuples()]  # fmt: skip
        result[subset] = summarise_cells(rows)
    result["verdict"] = result["all"]["verdict"]
    return result


def claim_three(table: pd.DataFrame) -> dict:
    if table.empty or "auroc" not in table:
        return {"testable": False, "verdict": INCONCLUSIVE,
                "reason": "needs reasoning and instruction files in one experiment"}  # fmt: skip
    versus = table[table["against"] == "instruction"]
    s1 = table[table["against"] == "gsm8k"]
    if versus.empty:
        return {"testable": False, "verdict": INCONCLUSIVE, "reason": "no instruction files"}
    checks = [interval_side(r.ci_low, r.ci_high, 0.5, 1) for r in versus.itertuples()]
    checks += [interval_side(r.ci_low, r.ci_high, 0.5, 1) for r in s1.itertuples()]
    if FAILS in checks:
        verdict = FAILS
    elif checks and all(c == HOLDS for c in checks) and not s1.empty:
        verdict = HOLDS
    else:
        verdict = INCONCLUSIVE
    rows = [{k: clean(v) for k, v in r.items()} for r in table.to_dict("records")]
    return {"testable": True, "verdict": verdict, "comparisons": rows}


def claim_five(cosines: pd.DataFrame) -> dict:
    if cosines.empty:
        reason = "no cosine columns in the spectra (run with extract.cosine=true)"
        return {"testable": False, "verdict": INCONCLUSIVE, "reason": reason}
    verdicts = [near_zero(r.abs_ci_low, r.abs_ci_high) for r in cosines.itertuples()]
    frame = cosines.assign(verdict=verdicts)
    by_kind = {}
    for (column, module), part in frame.groupby(["cosine", "module"], sort=False):
        by_kind[f"{column}/{module}"] = {
            "mean_abs": clean(part["mean_abs"].mean()),
            "max_abs_ci_high": clean(part["abs_ci_high"].max()),
            "counts": tally(list(part["verdict"])),
        }
    return {"testable": True, "verdict": all_cells(verdicts), "counts": tally(verdicts),
            "by_cosine_and_projection": by_kind}  # fmt: skip


def clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Claim 4: across models


def mean_curves(ok: pd.DataFrame) -> dict:
    """{(file, module, statistic): (n, L) per-sample values} for one model."""
    arrays = {}
    for (file, module), part in ok.groupby(["file", "module"], sort=False):
        for statistic in STATISTICS:
            wide = part.pivot_table(index="record_index", columns="layer", values=statistic)
            arrays[(file, module, statistic)] = wide.sort_index(axis=1).to_numpy(float)
    return arrays


def model_relation(first: DictConfig, second: DictConfig) -> str | None:
    if first.family != second.family:
        return "different family"
    if float(first.params_b) != float(second.params_b):
        return "same family"
    return None


def family_table(curves: dict[str, dict], configs: dict[str, DictConfig], seed: int):
    rows = []
    names = list(curves)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            relation = model_relation(configs[first], configs[second])
            if relation is None:
                continue
            for key in sorted(set(curves[first]) & set(curves[second])):
                a, b = curves[first][key], curves[second][key]
                points = min(a.shape[1], b.shape[1])
                curve_a = on_relative_depth(np.nanmean(a, axis=0), points)
                curve_b = on_relative_depth(np.nanmean(b, axis=0), points)
                rng = seeded(seed, "halves", *map(str, key))
                ceiling = min(split_half(a, rng), split_half(b, rng))
                r = pearson(curve_a, curve_b)
                rows.append({"model_a": first, "model_b": second, "relation": relation,
                             "file": key[0], "module": key[1], "statistic": key[2],
                             "r": r, "ceiling": ceiling, "gap": ceiling - r})  # fmt: skip
    return pd.DataFrame(rows)


def claim_four(family: pd.DataFrame) -> dict:
    parts = {}
    for relation in ("same family", "different family"):
        part = family[family["relation"] == relation] if not family.empty else family
        if part.empty:
            parts[relation] = {"testable": False, "verdict": INCONCLUSIVE}
            continue
        gap = float(part["gap"].median())
        parts[relation] = {"testable": True, "median_gap": clean(gap),
                           "median_r": clean(float(part["r"].median())),
                           "median_ceiling": clean(float(part["ceiling"].median())),
                           "cells": len(part), "verdict": curve_verdict(gap, relation)}  # fmt: skip
    verdicts = [p["verdict"] for p in parts.values()]
    verdict = (
        FAILS if FAILS in verdicts else (HOLDS if verdicts == [HOLDS, HOLDS] else INCONCLUSIVE)
    )
    tested = [relation for relation, p in parts.items() if p["testable"]]
    return {"testable": bool(tested), "partial": len(tested) < 2, "verdict": verdict, **parts}


# --------------------------------------------------------------------------------------------
# The step


def analyse_model(cfg: DictConfig, model: str, frame: pd.DataFrame, scores: pd.DataFrame):
    """Every table of one model, written under its quality folder; returns its findings."""
    started = time.perf_counter()
    boot, confidence, seed = cfg.reduce.n_bootstrap, cfg.reduce.confidence, cfg.reduce.seed
    out = paths.model_results(cfg.results_dir, cfg.experiment.name, model) / "quality"
    out.mkdir(parents=True, exist_ok=True)

    ok = reduce.ok_rows(frame)
    samples = sample_table(ok).merge(scores, on=["dataset", "file", "record_index"], how="left")
    samples.drop(columns=[c for c in samples if c.endswith("_problem")]).to_parquet(
        out / "samples.parquet", index=False
    )
    curve_table(ok, boot, confidence, seed).to_parquet(out / "curves.parquet", index=False)

    aurocs = auroc_table(samples, boot, confidence, seed)
    regression = regression_table(samples, boot, confidence, seed)
    spearman = spearman_table(samples)
    reasoning = reasoning_table(samples, boot, confidence, seed)
    cosines = cosine_table(ok, boot, confidence, seed)
    analysed = set(
        zip(frame["dataset"], frame["file"], frame["record_index"].astype(int), strict=True)
    )
    missing = missing_scores(scores, analysed)
    cut = truncation(frame, cfg.prompt.max_length)
    for name, table in (("auroc", aurocs), ("length_regression", regression),
                        ("spearman", spearman), ("reasoning", reasoning), ("cosine", cosines),
                        ("missing_scores", missing), ("truncation", cut)):  # fmt: skip
        table.to_csv(out / f"{name}.csv", index=False)

    findings = {
        "model": model,
        "experiment": cfg.experiment.name,
        "claims": {
            "1": claim_one(aurocs, regression),
            "2": claim_two(aurocs),
            "3": claim_three(reasoning),
            "5": claim_five(cosines),
        },
        "missing_scores": missing.groupby(["score", "problem"]).size().to_dict()
        if not missing.empty
        else {},
        "truncation": [{k: clean(v) for k, v in r.items()} for r in cut.to_dict("records")],
    }
    findings["missing_scores"] = {
        f"{k[0]}/{k[1]}": int(v) for k, v in findings["missing_scores"].items()
    }
    log.info("quality tables of %s in %s (%.1f s)", model, out, time.perf_counter() - started)
    return findings, mean_curves(ok)


def load_model_frame(cfg: DictConfig, model: str) -> pd.DataFrame | None:
    sources = reduce.spectra_sources(cfg, model)
    present = [s for s in sources if s.path.exists()]
    if len(present) < len(sources):
        log.warning("%s: %d of %d spectra files missing", model, len(sources) - len(present),
                    len(sources))  # fmt: skip
    return reduce.load_spectra(present) if present else None


def quality_command(cfg: DictConfig) -> int:
    """``gradspec quality``: every model of the experiment, then the experiment's findings."""
    started = time.perf_counter()
    specs = experiment_files(cfg)
    scores = pd.concat([file_scores(cfg, spec) for spec in specs], ignore_index=True)
    models = list(cfg.experiment.models) or [cfg.model.name]
    results, curves, configs = {}, {}, {}
    for model in models:
        frame = load_model_frame(cfg, model)
        if frame is None:
            continue
        results[model], curves[model] = analyse_model(cfg, model, frame, scores)
        configs[model] = compose([f"experiment={cfg.experiment.name}", f"model={model}"]).model
    if not results:
        raise FileNotFoundError(f"no spectra of experiment {cfg.experiment.name!r} for any model")

    family = family_table(curves, configs, cfg.reduce.seed)
    experiment = paths.experiment_dir(cfg.results_dir, cfg.experiment.name)
    (experiment / "quality").mkdir(parents=True, exist_ok=True)
    family.to_csv(experiment / "quality" / "family.csv", index=False)
    four = claim_four(family)
    for model, result in results.items():
        result["claims"]["4"] = four
        result["claims"] = dict(sorted(result["claims"].items()))
        result["rules"] = RULES
        target = paths.model_results(cfg.results_dir, cfg.experiment.name, model) / "quality"
        (target / "findings.json").write_text(json.dumps(result, indent=2, default=clean) + "\n")
    (experiment / "findings.md").write_text(findings_markdown(cfg, results, four))
    log.info("quality findings of %d models in %s (%.1f s)", len(results), experiment,
             time.perf_counter() - started)  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------------
# Markdown


def number(value, digits: int = 3) -> str:
    value = clean(value)
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def findings_markdown(cfg: DictConfig, results: dict, four: dict) -> str:
    models = list(results)
    lines = [f"# Findings: {cfg.experiment.name} (paper 2, data quality)", ""]
    lines += ["Verdict per claim and model (rules below; numbers in each model's "
              "`quality/findings.json` and tables).", ""]  # fmt: skip
    rows = []
    for key in ("1", "2", "3", "4", "5"):
        cells = []
        for model in models:
            claim = results[model]["claims"][key]
            text = claim["verdict"] if claim.get("testable") else "not testable"
            if key in ("1", "2") and claim.get("testable"):
                text += f" (length-matched: {claim['length_matched']['verdict']})"
            if key == "4" and claim.get("partial"):
                text += " (partly testable)"
            cells.append(text)
        rows.append([key, STATEMENTS[key], *cells])
    lines += [*table(["claim", "statement", *models], rows), ""]
    for model in models:
        lines += model_section(model, results[model]["claims"])
        lines += truncation_lines(results[model].get("truncation", []))
    lines += ["## Claim 4 (across models)", ""]
    for relation in ("same family", "different family"):
        part = four[relation]
        if part["testable"]:
            lines.append(f"- {relation}: median r {number(part['median_r'])}, median split-half "
                         f"ceiling {number(part['median_ceiling'])}, median gap "
                         f"{number(part['median_gap'])} over {part['cells']} cells: "
                         f"{part['verdict']}")  # fmt: skip
        else:
            lines.append(f"- {relation}: not testable with these models")
    lines += ["", "## Rules", ""]
    lines += [f"- **{name}**: {text}" for name, text in RULES.items()]
    lines += ["", "## Caveats", ""] + [f"- {text}" for text in CAVEATS] + [""]
    return "\n".join(lines)


def truncation_lines(rows: list[dict]) -> list[str]:
    """What the token limit cut, per file with a cut record: kept against full response tokens."""
    cut = [r for r in rows if r.get("truncated")]
    if not cut:
        return []
    lines = [f"Cut at prompt.max_length = {cut[0]['max_length']} tokens (prompt first):", ""]
    body = [[r["dataset"], r["file"], f"{r['truncated']} of {r['samples']}",
             number(r["mean_response_tokens"], 0), number(r["mean_response_tokens_full"], 0),
             r["max_response_tokens_full"]] for r in cut]  # fmt: skip
    header = ["dataset", "file", "records cut", "mean response tokens kept", "mean in full",
              "longest in full"]  # fmt: skip
    return [*lines, *table(header, body), ""]


def model_section(model: str, claims: dict) -> list[str]:
    lines = [f"## {model}", ""]
    one = claims["1"]
    if one.get("testable"):
        rows = [[metric, one["all"]["per_metric"][metric]["verdict"],
                 one["length_matched"]["per_metric"].get(metric, {}).get("verdict", "n/a"),
                 one["log_length_covariate"]["per_metric"].get(metric, {}).get("verdict", "n/a")]
                for metric in one["all"]["per_metric"]]  # fmt: skip
        lines += ["Claim 1 per metric:", "",
                  *table(["metric", "all samples", "length-matched", "log length covariate"],
                         rows), ""]  # fmt: skip
        cells = [[c["dataset"], c["task"], c["n_high"], c["n_low"],
                  number(c["nuclear_norm_auroc"]), number(c["effective_rank_auroc"]),
                  c["verdict"]] for c in one["all"]["cells"]]  # fmt: skip
        lines += [*table(["metric", "source", "n high", "n low", "AUROC nuclear",
                          "AUROC eff. rank", "verdict"], cells), ""]  # fmt: skip
    two = claims["2"]
    if two.get("testable"):
        lines += [f"Claim 2: {two['verdict']} ({counts_text(two['all']['counts'])}); "
                  f"length-matched {two['length_matched']['verdict']}.", ""]  # fmt: skip
    three = claims["3"]
    if three.get("testable"):
        rows = [[c["task"], c["against"], number(c.get("mean")), number(c.get("mean_against")),
                 number(c.get("tokens"), 0), number(c.get("tokens_against"), 0),
                 number(c.get("auroc")), f"[{number(c.get('ci_low'))}, {number(c.get('ci_high'))}]"]
                for c in three["comparisons"]]  # fmt: skip
        lines += ["Claim 3 (effective rank, mean over layers and projections):", "",
                  *table(["source", "against", "mean", "mean against", "tokens",
                          "tokens against", "AUROC", "interval"], rows), ""]  # fmt: skip
    five = claims["5"]
    if five.get("testable"):
        rows = [
            [key, number(v["mean_abs"]), number(v["max_abs_ci_high"]), counts_text(v["counts"])]
            for key, v in five["by_cosine_and_projection"].items()
        ]
        lines += ["Claim 5 (mean absolute cosine over samples):", "",
                  *table(["cosine/projection", "mean abs cosine", "largest upper bound", "cells"],
                         rows), ""]  # fmt: skip
    else:
        lines += [f"Claim 5: not testable ({five.get('reason')}).", ""]
    return lines


def counts_text(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
