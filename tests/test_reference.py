"""The papers' per-sample statistics read into the spectra schema, checked against the fixture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradspec import paths
from gradspec.config import compose
from gradspec.extract import SCHEMA
from gradspec.reduce import reduce_command
from gradspec.reference import (
    ReferenceError,
    import_command,
    metrics_from_reference,
    parse_parameter,
    read_reference,
)

FIXTURE = Path(__file__).parent / "fixtures" / "reference_stats"
JSONL = FIXTURE / "gsm8k_train_with_cot_gpt4o.first4.jsonl"


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]


def test_parameter_names():
    assert parse_parameter("model.layers.0.self_attn.q_proj.weight") == (0, "q_proj")
    assert parse_parameter("model.layers.17.mlp.down_proj.weight") == (17, "down_proj")
    assert parse_parameter("model.embed_tokens.weight") is None
    assert parse_parameter("model.layers.3.input_layernorm.weight") is None


def test_metrics_by_hand():
    stats = {"S_sum": 4.0, "S_max": 2.0, "frobenius_norm": 3.0, "S_min": 0.0}
    metrics = metrics_from_reference(stats)
    assert metrics["nuclear_norm"] == 4.0 and metrics["spectral_norm"] == 2.0
    assert metrics["spectral_ratio"] == 0.5
    assert metrics["stable_rank"] == pytest.approx(9.0 / 4.0)
    assert math.isnan(metrics["effective_rank"])


def test_fixture_rows_match_the_file():
    records = fixture_records()
    frame = read_reference(JSONL, dataset="cot_500", file="gsm8k_detailed")
    assert list(frame.columns) == SCHEMA.names
    # 4 samples x 30 layers x the 4 attention projections.
    assert len(frame) == 4 * 30 * 4
    assert set(frame["module"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert (frame["status"] == "ok").all() and frame["n_response_tokens"].isna().all()
    for sample in (0, 3):
        for name in (
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.self_attn.o_proj.weight",
        ):
            stats = records[sample][name]
            layer, module = parse_parameter(name)
            row = frame[
                (frame.record_index == sample) & (frame.layer == layer) & (frame.module == module)
            ].iloc[0]
            assert row.nuclear_norm == stats["S_sum"]
            assert row.spectral_norm == stats["S_max"]
            assert row.spectral_ratio == pytest.approx(stats["S_max"] / stats["S_sum"])
            assert row.frobenius_norm == stats["frobenius_norm"]
            assert row.stable_rank == pytest.approx(
                stats["frobenius_norm"] ** 2 / stats["S_max"] ** 2
            )
            assert row.loss == pytest.approx(records[sample]["loss"])


def test_sample_ids_match_the_dataset():
    # gradspec's id of the first GSM8K Detailed CoT record (content hash of its text fields).
    frame = read_reference(JSONL)
    assert frame.loc[frame.record_index == 0, "sample_id"].iloc[0] == "2449714f03cdb74e"


def test_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"loss": 1.0}\n')
    with pytest.raises(ReferenceError, match="no projection"):
        read_reference(bad)
    bad.write_text("not json\n")
    with pytest.raises(ReferenceError, match="not JSON"):
        read_reference(bad)


def test_import_then_reduce(tmp_path):
    """An imported file is read by reduce like an extracted one: the curves are the file's means."""
    cfg = compose(
        [
            f"results_dir={tmp_path}",
            "experiment=quickstart",
            "experiment.datasets=[cot_500]",
            "experiment.kinds=[detailed]",
            "dataset=cot_500",
            "data.file=gsm8k_detailed",
            f"data.path={JSONL}",
            "reduce.n_bootstrap=20",
            "wandb.mode=disabled",
        ]
    )
    import_command(cfg)
    reduce_command(cfg)
    summary = paths.summary_dir(tmp_path, "quickstart", cfg.model.name)
    curves = pd.read_parquet(summary / "curves.parquet")
    row = curves[
        (curves.layer == 5) & (curves.module == "v_proj") & (curves.metric == "nuclear_norm")
    ].iloc[0]
    expected = np.mean(
        [r["model.layers.5.self_attn.v_proj.weight"]["S_sum"] for r in fixture_records()]
    )
    assert row["mean"] == pytest.approx(expected)
    assert row["n"] == 4
