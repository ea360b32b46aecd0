"""Extraction end to end on SmolLM2: resuming after SIGKILL, statuses, out of memory, determinism.

The records are the four shortest of the papers' GSM8K file (no chain of thought), with the base
template and two projections per layer, so each sample takes well under a second on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradspec.config import compose
from gradspec.extract import extract_spectra, meta_path, read_spectra
from gradspec.spectra import METRICS

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "resources/datasets/layer_gradient/cot_500/gsm8k_train_no_cot.json.xz"
GRADSPEC = Path(sys.executable).with_name("gradspec")
MODULES = ["q_proj", "down_proj"]
FAST = [
    "prompt.template=base",
    f"extract.modules=[{','.join(MODULES)}]",
    "extract.threads=1",
    "wandb.mode=disabled",
]
LAYERS = 30  # num_hidden_layers in SmolLM2-135M's config.json


def shortest_records(n: int) -> list[dict]:
    records = json.loads(lzma.decompress(GSM8K.read_bytes()))
    return sorted(records, key=lambda r: len(r["instruction"]) + len(r["output"]))[:n]


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def run_inprocess(*overrides: str) -> Path:
    """extract_spectra in this process; torch's thread count is put back afterwards."""
    threads = torch.get_num_threads()
    try:
        return extract_spectra(compose([*FAST, *overrides]))
    finally:
        torch.set_num_threads(threads)


def sorted_frame(path: Path) -> pd.DataFrame:
    frame = read_spectra(path)
    return frame.sort_values(["record_index", "layer", "module"]).reset_index(drop=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def four(tmp_path_factory, smollm2_dir) -> Path:
    return write_json(tmp_path_factory.mktemp("four") / "four.json", shortest_records(4))


@pytest.fixture(scope="module")
def reference(four, tmp_path_factory) -> Path:
    """An uninterrupted run, one record per shard."""
    out = tmp_path_factory.mktemp("reference") / "four.parquet"
    return run_inprocess(f"data.path={four}", f"output={out}", "extract.shard_size=1")


def test_reference_has_every_record_layer_and_module(reference):
    frame = read_spectra(reference)
    assert sorted(frame["record_index"].unique()) == [0, 1, 2, 3]
    assert (frame["status"] == "ok").all()
    assert len(frame) == 4 * LAYERS * len(MODULES)
    assert np.isfinite(frame[list(METRICS)].to_numpy()).all()
    meta = json.loads(meta_path(reference).read_text())
    assert meta["status_counts"] == {"ok": 4}
    assert meta["shards"] == {"total": 4, "skipped": 0, "size": 1}


def _wait_for_shard(process: subprocess.Popen, parts: Path, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        shards = sorted(parts.glob("shard-*.parquet"))
        if shards:
            return shards
        time.sleep(0.02)
    return []


def test_sigkill_then_rerun_resumes_without_recomputing(four, reference, tmp_path):
    out = tmp_path / "out" / "four.parquet"
    command = [
        str(GRADSPEC),
        "extract",
        *FAST,
        f"data.path={four}",
        f"output={out}",
        "extract.shard_size=1",
    ]
    parts = out.with_name(out.name + ".parts")

    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    shards = _wait_for_shard(process, parts, timeout=180)
    still_running = process.poll() is None
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert still_running, "the run ended before it could be killed"
    assert shards, "no shard was written before the timeout"
    assert not out.exists()

    finished = sorted(parts.glob("shard-*.parquet"))
    stats = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in finished}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    assert f"{len(finished)} already done (skipped), {4 - len(finished)} to compute" in done.stderr
    for name in stats:
        index = int(name.removeprefix("shard-").removesuffix(".parquet"))
        assert f"step shard {index} (" not in done.stderr, f"{name} was recomputed"
    pd.testing.assert_frame_equal(sorted_frame(out), sorted_frame(reference), check_exact=True)
    assert not parts.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["four.meta.json", "four.parquet"]


def test_shards_of_another_config_are_discarded(four, reference, tmp_path):
    out = tmp_path / "four.parquet"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "config_hash").write_text("0000000000000000\n")
    stale = parts / "shard-00000.parquet"
    stale.write_bytes(b"not parquet")

    run_inprocess(f"data.path={four}", f"output={out}", "extract.shard_size=1")

    pd.testing.assert_frame_equal(sorted_frame(out), sorted_frame(reference), check_exact=True)
    assert not parts.exists()


def test_same_config_twice_is_byte_identical(four, reference, tmp_path):
    again = run_inprocess(f"data.path={four}", f"output={tmp_path / 'again.parquet'}",
                          "extract.shard_size=1")  # fmt: skip
    assert sha256(again) == sha256(reference)


def test_batch_size_does_not_change_statistics(four, reference, tmp_path):
    batched = run_inprocess(
        f"data.path={four}",
        f"output={tmp_path / 'batched.parquet'}",
        "extract.batch_size=4",
        "extract.shard_size=4",
    )
    one, four_at_once = sorted_frame(reference), sorted_frame(batched)
    columns = [*METRICS, "loss"]
    np.testing.assert_allclose(
        four_at_once[columns].to_numpy(), one[columns].to_numpy(), rtol=1e-5, atol=0
    )
    pd.testing.assert_frame_equal(four_at_once.drop(columns=columns), one.drop(columns=columns))


def test_every_record_ends_in_one_status(smollm2_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)

    def tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    short, longer = shortest_records(2)
    fits = {"instruction": "Add 2 and 3.", "output": "5"}
    # The base prompt is the instruction and a newline; SmolLM2's tokenizer adds no BOS.
    max_length = tokens(fits["instruction"] + "\n") + tokens(fits["output"])
    cut = {"instruction": "Add 2 and 3.", "output": "The sum of two and three is five."}
    prompt_too_long = {"instruction": longer["instruction"], "output": longer["output"]}
    assert tokens(longer["instruction"] + "\n") > max_length
    records = [
        fits,
        cut,
        prompt_too_long,
        {"instruction": fits["instruction"], "output": ""},
        {"instruction": short["instruction"], "output": 7},
        {"instruction": "nan", "output": "5"},
    ]
    source = write_json(tmp_path / "mixed.json", records)

    caplog.set_level("INFO", logger="gradspec")
    out = run_inprocess(
        f"data.path={source}",
        f"output={tmp_path / 'mixed.parquet'}",
        f"prompt.max_length={max_length}",
    )

    frame = read_spectra(out)
    per_record = frame.drop_duplicates("record_index").set_index("record_index")
    assert per_record["status"].to_dict() == {
        0: "ok",
        1: "ok",
        2: "response_truncated",
        3: "empty_response",
        4: "invalid_record",
        5: "invalid_record",
    }
    assert per_record["truncated"].to_dict() == {
        0: False, 1: True, 2: True, 3: False, 4: False, 5: False
    }  # fmt: skip
    assert per_record.loc[1, "n_response_tokens"] == max_length - tokens("Add 2 and 3.\n")
    assert per_record.loc[1, "n_response_tokens_full"] == tokens(cut["output"])
    assert per_record.loc[2, "n_response_tokens"] == 0
    assert "field 'output' is not a string" in per_record.loc[4, "reason"]
    assert "field 'instruction' is the string 'nan'" in per_record.loc[5, "reason"]

    counts = frame.groupby("record_index").size().to_dict()
    assert counts == {0: LAYERS * 2, 1: LAYERS * 2, 2: 1, 3: 1, 4: 1, 5: 1}
    not_ok = frame[frame["status"] != "ok"]
    assert not_ok["layer"].isna().all() and not_ok["module"].isna().all()

    expected = {"ok": 2, "response_truncated": 1, "empty_response": 1, "invalid_record": 2}
    assert json.loads(meta_path(out).read_text())["status_counts"] == dict(sorted(expected.items()))
    assert str(dict(sorted(expected.items()))) in caplog.text
    for index in (2, 3, 4, 5):
        assert f"record {index}: {per_record.loc[index, 'status']}" in caplog.text


def test_out_of_memory_halves_the_batch_then_records_the_sample(four, reference, tmp_path, caplog):
    ref = read_spectra(reference).drop_duplicates("record_index").set_index("record_index")
    lengths = ref["n_tokens"].to_dict()
    short = min(lengths, key=lengths.get)
    long = max(lengths, key=lengths.get)
    assert lengths[long] > lengths[short]
    source = write_json(tmp_path / "two.json", [shortest_records(4)[i] for i in (short, long)])

    # A batch of both needs 2 × the longer length, more than the budget; the shorter alone fits.
    caplog.set_level("INFO", logger="gradspec")
    out = run_inprocess(
        f"data.path={source}",
        f"output={tmp_path / 'two.parquet'}",
        "extract.batch_size=2",
        f"extract.token_budget={lengths[short]}",
    )

    frame = read_spectra(out)
    statuses = frame.drop_duplicates("record_index").set_index("record_index")["status"]
    assert statuses.to_dict() == {0: "ok", 1: "out_of_memory"}
    assert "out of memory with 2 samples: retrying as two halves" in caplog.text
    assert "record 1: out of memory at batch size 1" in caplog.text
    assert json.loads(meta_path(out).read_text())["status_counts"] == {
        "ok": 1,
        "out_of_memory": 1,
    }
    fitted = frame[frame["status"] == "ok"].sort_values(["layer", "module"])
    expected = read_spectra(reference)
    expected = expected[expected["record_index"] == short].sort_values(["layer", "module"])
    np.testing.assert_allclose(
        fitted[list(METRICS)].to_numpy(), expected[list(METRICS)].to_numpy(), rtol=1e-5
    )


def _broken_model(folder: Path, smollm2_dir: Path, fault: str) -> Path:
    """A two-layer Llama with SmolLM2's tokenizer and one deliberately broken weight.

    ``loss``: a NaN in the final norm makes every logit, hence every loss, NaN.
    ``gradient``: layer 1's MLP computes tiny × huge, finite forward; backward multiplies the
    output gradient by the huge down_proj weights (3e38, near float32's maximum 3.4e38), which
    overflows to infinity in up_proj's output gradient while the loss stays finite.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        if fault == "loss":
            model.model.norm.weight[0] = float("nan")
        else:
            mlp = model.model.layers[1].mlp
            mlp.up_proj.weight.fill_(1e-38)
            mlp.gate_proj.weight.fill_(10.0)
            mlp.down_proj.weight.fill_(3e38)
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_dir / name).read_bytes())
    return folder


def test_nonfinite_loss_and_gradient_end_to_end(four, smollm2_dir, tmp_path):
    nan_model = _broken_model(tmp_path / "nan", smollm2_dir, "loss")
    out = run_inprocess(
        f"data.path={four}", f"model.path={nan_model}", f"output={tmp_path / 'loss.parquet'}"
    )
    frame = read_spectra(out)
    assert len(frame) == 4 and (frame["status"] == "nonfinite_loss").all()
    assert frame["loss"].isna().all() and frame["layer"].isna().all()

    huge_model = _broken_model(tmp_path / "huge", smollm2_dir, "gradient")
    out = run_inprocess(
        f"data.path={four}",
        f"model.path={huge_model}",
        f"output={tmp_path / 'gradient.parquet'}",
        "extract.modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    )
    frame = read_spectra(out)
    per_record = frame.drop_duplicates("record_index")
    assert set(per_record["status"]) <= {"ok", "nonfinite_gradient"}
    bad = per_record[per_record["status"] == "nonfinite_gradient"]
    assert len(bad) >= 1
    assert bad["reason"].str.contains("model.layers.1.mlp.up_proj").all()
    assert np.isfinite(bad["loss"]).all()
    ok = frame[frame["status"] == "ok"]
    assert np.isfinite(ok[list(METRICS)].to_numpy()).all()
    assert json.loads(meta_path(out).read_text())["status_counts"]["nonfinite_gradient"] == len(bad)
