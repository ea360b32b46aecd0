"""Bad input, bad configuration and unsafe models through the real ``gradspec extract`` command.

Each case checks what a user sees (exit code 2, one line on stderr naming the file and the place,
no traceback) and that nothing was left behind: no output, no shards, no temporary files.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gradspec import models
from gradspec.config import compose
from gradspec.extract import extract_spectra, read_spectra

ROOT = Path(__file__).resolve().parents[1]
GRADSPEC = Path(sys.executable).with_name("gradspec")
FAST = [
    "prompt.template=base",
    "extract.modules=[q_proj]",
    "extract.threads=1",
    "wandb.mode=disabled",
]
GOOD = [
    {"instruction": "Add 2 and 3.", "output": "5"},
    {"instruction": "Add 4 and 4.", "output": "8"},
]


def extract(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(GRADSPEC), "extract", *FAST, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def error_line(done: subprocess.CompletedProcess) -> str:
    """The user-facing line: exit code 2, no traceback, the last line of stderr."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("gradspec extract: error: "), line
    return line


def assert_nothing_written(folder: Path, *kept: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)


def write(folder: Path, name: str, content: bytes | str | list) -> Path:
    path = folder / name
    if isinstance(content, list):
        content = json.dumps(content)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# --------------------------------------------------------------------------------------------
# Bad input files

MALFORMED = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
BAD_FILES = {
    # name: (file name, content, expected text of the message)
    "malformed_json": ("bad.json", MALFORMED, "malformed JSON at line 3, column 23"),
    "malformed_jsonl": (
        "bad.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
        "malformed JSON Lines at line 2",
    ),
    "non_utf8": (
        "bad.json",
        b'[{"instruction": "caf\xe9", "output": "b"}]',
        "not valid UTF-8 at byte offset 21 (byte 0xe9",
    ),
    "empty_file": ("empty.json", "", "file is empty"),
    "empty_list": ("empty.json", "[]", "holds no records"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_named_precisely(case, tmp_path, smollm2_dir):
    name, content, expected = BAD_FILES[case]
    source = write(tmp_path, name, content)
    done = extract(f"data.path={source}", f"output={tmp_path / 'out' / 'x.parquet'}")
    line = error_line(done)
    assert str(source) in line and expected in line, line
    assert_nothing_written(tmp_path, name)


BAD_RECORDS = {
    # name: (records, expected text of the strict message)
    "missing_field": (
        [GOOD[0], {"instruction": "a"}],
        "record 1, field 'output': field 'output' is missing",
    ),
    "non_string_field": (
        [GOOD[0], GOOD[1], {"instruction": ["a"], "output": "b"}],
        "record 2, field 'instruction': field 'instruction' is not a string (got list)",
    ),
    "nan_string": (
        [{"instruction": "a", "output": "NaN"}],
        "record 0, field 'output': field 'output' is the string 'NaN', not text",
    ),
    "chat_without_assistant": (
        [{"messages": [{"role": "user", "content": "hi"}]}],
        "record 0, field 'messages': field 'messages' has no assistant turn",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_strict_makes_an_invalid_record_fatal(case, tmp_path, smollm2_dir):
    records, expected = BAD_RECORDS[case]
    source = write(tmp_path, "records.json", records)
    done = extract(
        f"data.path={source}", f"output={tmp_path / 'out' / 'x.parquet'}", "data.strict=true"
    )
    line = error_line(done)
    assert f"{source}: {expected}" in line, line
    assert_nothing_written(tmp_path, "records.json")


def test_fatal_status_stops_before_the_model_is_loaded(tmp_path, smollm2_dir):
    source = write(tmp_path, "records.json", [GOOD[0], {"instruction": "a", "output": ""}])
    done = extract(
        f"data.path={source}",
        f"output={tmp_path / 'out' / 'x.parquet'}",
        "extract.fatal_statuses=[empty_response]",
    )
    line = error_line(done)
    assert (
        f"{source}: record 1: status empty_response (output is empty) is fatal by "
        "extract.fatal_statuses" in line
    ), line
    assert "step load" not in done.stderr
    assert_nothing_written(tmp_path, "records.json")


def test_missing_data_file(tmp_path, smollm2_dir):
    done = extract(f"data.path={tmp_path / 'nope.json'}", f"output={tmp_path / 'x.parquet'}")
    assert f"data.path '{tmp_path / 'nope.json'}': no such file" in error_line(done)
    assert_nothing_written(tmp_path)


# --------------------------------------------------------------------------------------------
# Bad configuration: an error before any work


def _pickle_bomb(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is loaded."""

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Bomb())


def _remote_code_folder(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = {
        "model_type": "evil",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    return folder


def test_bad_configuration_fails_before_work(tmp_path, smollm2_dir, gemma3_dir):
    source = write(tmp_path, "good.json", GOOD)
    out = f"output={tmp_path / 'out' / 'x.parquet'}"
    marker = tmp_path / "marker"
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (only_bin / "pytorch_model.bin").write_bytes(_pickle_bomb(marker))
    remote = _remote_code_folder(tmp_path / "remote", marker)
    cases = {
        "unknown key": (
            ["data.pth=x"],
            "unknown key 'data.pth'; valid keys under 'data': path, file, format",
        ),
        "unknown option": (["model=no_such_model"], "Available options in 'model': gemma2_2b, "),
        "missing model": ([f"model.path={tmp_path / 'none'}"], "does not exist"),
        "pickled weights": (
            [f"model.path={only_bin}"],
            "found only pickled weights (pytorch_model.bin): weights are read from safetensors "
            "only, never unpickled",
        ),
        "remote code": (
            [f"model.path={remote}"],
            "asks to run its own code (config.json: AutoConfig; config.json: "
            "AutoModelForCausalLM); refused: set model.trust_remote_code=true",
        ),
        "no chat template": (
            ["model=gemma3_270m", "prompt.template=chat"],
            "prompt.template=chat, but the tokenizer in",
        ),
        "file escapes": (["data.file=../x"], "data.file name '../x' cannot be a folder name"),
        "dataset escapes": (
            ["dataset.name=../../etc", "data.file=gsm8k"],
            "dataset.name name '../../etc' cannot be a folder name",
        ),
        "zero shard size": (["extract.shard_size=0"], "extract.shard_size must be >= 1, not 0"),
        "unknown module": (["extract.modules=[q_proj,qq]"], "extract.modules: unknown ['qq']"),
    }
    for name, (overrides, expected) in cases.items():
        done = extract(f"data.path={source}", out, *overrides)
        line = error_line(done)
        assert expected in line, f"{name}: {line}"
        assert "step load" not in done.stderr, name
        assert_nothing_written(tmp_path, "good.json", "only_bin", "remote")


# --------------------------------------------------------------------------------------------
# Safety


def test_remote_code_is_never_imported_by_default(tmp_path):
    marker = tmp_path / "imported"
    folder = _remote_code_folder(tmp_path / "remote", marker)
    assert compose([]).model.trust_remote_code is False
    with pytest.raises(models.ModelError, match="asks to run its own code"):
        models.load_model(folder)
    with pytest.raises(models.ModelError, match="asks to run its own code"):
        models.resolve_model_dir(compose([f"model.path={folder}"]))
    assert not marker.exists()


def test_pickled_weights_are_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(_pickle_bomb(marker))
    with pytest.raises(models.ModelError, match="never unpickled"):
        models.load_model(folder)
    assert not marker.exists()


def _files_holding(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in content]
    return found


def test_offline_wandb_run_records_config_and_no_credentials(tmp_path, smollm2_dir):
    """With the network cut off where possible (``unshare -n`` as root), as in test_tracking."""
    secrets = ["secret-value-123", "hf_secret-token-456"]
    source = write(tmp_path, "good.json", GOOD)
    out = tmp_path / "out" / "good.parquet"
    env = {**os.environ, "WANDB_API_KEY": secrets[0], "HF_TOKEN": secrets[1]}
    command = [
        str(GRADSPEC),
        "extract",
        *FAST[:-1],
        "wandb.mode=offline",
        f"wandb.dir={tmp_path / 'wandb'}",
        f"data.path={source}",
        f"output={out}",
    ]
    if os.geteuid() == 0 and shutil.which("unshare"):
        command = ["unshare", "-n", *command]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    log = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for text in (str(source), "extract", "smollm2_135m_instruct/custom/good", "quickstart"):
        assert text.encode() in log, text
    assert b"curves/nuclear_norm" in log and b"spectra-smollm2_135m_instruct-custom-good" in log
    assert read_spectra(out)["status"].eq("ok").all()
    assert _files_holding(tmp_path, secrets) == []
    assert not any(s in done.stderr + done.stdout for s in secrets)


# --------------------------------------------------------------------------------------------
# Duplicates


def test_duplicates_are_reported_and_kept_unless_dedupe(tmp_path, smollm2_dir, caplog):
    source = write(tmp_path, "dup.json", [GOOD[0], GOOD[1], dict(GOOD[0])])
    caplog.set_level("INFO", logger="gradspec")
    threads = torch.get_num_threads()
    try:
        kept = extract_spectra(
            compose([*FAST, f"data.path={source}", f"output={tmp_path / 'kept.parquet'}"])
        )
        dropped = extract_spectra(
            compose(
                [
                    *FAST,
                    f"data.path={source}",
                    f"output={tmp_path / 'dropped.parquet'}",
                    "data.dedupe=true",
                ]
            )
        )
    finally:
        torch.set_num_threads(threads)

    frame = read_spectra(kept).drop_duplicates("record_index")
    assert frame["record_index"].tolist() == [0, 1, 2]
    ident = frame.set_index("record_index").loc[0, "sample_id"]
    assert frame.set_index("record_index").loc[2, "sample_id"] == ident
    assert f"holds 1 repeated records (sample_id: indices): {{'{ident}': [0, 2]}}" in caplog.text
    assert "keeping (data.dedupe=false)" in caplog.text
    assert read_spectra(dropped).drop_duplicates("record_index")["record_index"].tolist() == [0, 1]
