"""data.py on the embedded papers' files and on broken files written for each failure."""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import pytest

from gradspec import data
from gradspec.config import compose
from gradspec.data import DataError, Record

COT = "layer_gradient/cot_500"
KINDS = ("no_cot", "with_cot", "with_cot_gpt4o")
TASKS = ("aqua", "creak", "ecqa", "gsm8k", "sensemaking", "strategyqa")


@pytest.fixture(scope="module")
def datasets_dir(repo_root: Path) -> Path:
    return repo_root / "resources" / "datasets"


def load(datasets_dir: Path, relpath: str, **kwargs) -> list[Record]:
    return data.load_records(data.resolve_data_path(datasets_dir, relpath), **kwargs)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def write_json(tmp_path: Path, records, name: str = "data.json") -> Path:
    return write(tmp_path, name, json.dumps(records, indent=2))


# --------------------------------------------------------------------------------------------
# Embedded files and paths


def test_every_embedded_file_matches_its_checksum(datasets_dir: Path):
    sums = data.read_checksums(datasets_dir / "SHA256SUMS")
    embedded = {p.relative_to(datasets_dir).as_posix() for p in datasets_dir.rglob("*.xz")}
    assert embedded == {name + ".xz" for name in sums}
    assert len(sums) == 89

    for relpath, expected in sums.items():
        path = data.resolve_data_path(datasets_dir, relpath)
        assert path.name.endswith(".xz")
        assert data.sha256_bytes(lzma.decompress(path.read_bytes())) == expected, relpath
        assert data.verify_checksum(path) == expected


def test_checksum_mismatch_fails_loudly(tmp_path: Path):
    (tmp_path / "SHA256SUMS").write_text("0" * 64 + "  ./sub/x.json\n")
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "x.json", "[]")

    with pytest.raises(DataError, match=r"checksum mismatch for sub/x.json"):
        data.verify_checksum(path)


def test_unlisted_file_is_not_verified(tmp_path: Path):
    assert data.verify_checksum(write_json(tmp_path, [{"instruction": "a", "output": "b"}])) is None


def test_resolve_finds_the_xz_twin_and_user_paths(datasets_dir: Path, tmp_path: Path, monkeypatch):
    relpath = f"{COT}/gsm8k_train_no_cot.json"
    assert data.resolve_data_path(datasets_dir, relpath) == datasets_dir / (relpath + ".xz")

    own = write_json(tmp_path, [{"instruction": "a", "output": "b"}], "own.json")
    assert data.resolve_data_path(datasets_dir, own) == own

    monkeypatch.chdir(tmp_path)
    assert data.resolve_data_path(datasets_dir, "own.json").resolve() == own

    with pytest.raises(FileNotFoundError, match="nowhere/missing.json"):
        data.resolve_data_path(datasets_dir, "nowhere/missing.json")


# --------------------------------------------------------------------------------------------
# The papers' data


@pytest.mark.parametrize("task", TASKS)
def test_cot_500_files_hold_500_valid_records(datasets_dir: Path, task: str):
    for kind in KINDS:
        records = load(datasets_dir, f"{COT}/{task}_train_{kind}.json")
        assert len(records) == 500
        assert [r.index for r in records] == list(range(500))
        assert all(r.ok and r.messages is None for r in records)


def test_nan_scores_are_read_into_extra(datasets_dir: Path):
    records = load(datasets_dir, "gradient_unified/diff/her_10k_highest_200.json")

    assert len(records) == 200
    assert all(r.ok for r in records)
    assert {"diff", "reward", "ppl_gpt2", "ifd_gpt2", "raw_diff"} <= records[0].extra.keys()
    nans = [r for r in records if math.isnan(r.extra["ifd_gpt2"])]
    assert len(nans) == 4


def test_literal_backslash_n_is_kept_verbatim(datasets_dir: Path):
    first = load(datasets_dir, f"{COT}/aqua_train_no_cot.json")[0]
    raw = json.loads(
        lzma.decompress((datasets_dir / f"{COT}/aqua_train_no_cot.json.xz").read_bytes())
    )

    assert "\\nOptions:\\n(A)" in first.instruction
    assert "\n" not in first.instruction
    assert first.instruction == raw[0]["instruction"]
    assert first.output == raw[0]["output"] == "(D)"


def test_strategyqa_duplicates_are_found_and_kept(datasets_dir: Path):
    for kind in ("no_cot", "with_cot"):
        records = load(datasets_dir, f"{COT}/strategyqa_train_{kind}.json")
        duplicates = data.find_duplicates(records)

        assert list(duplicates.values()) == [[332, 437]]
        assert len(records) == 500
        assert len(data.dedupe(records)) == 499
        assert records[332].instruction == records[437].instruction


def test_select_records(datasets_dir: Path):
    records = load(datasets_dir, f"{COT}/gsm8k_train_no_cot.json")

    assert [r.index for r in data.select_records(records, 10, 3)] == [10, 11, 12]
    assert len(data.select_records(records, 0, None)) == 500
    assert data.select_records(records, 499, 10)[0].index == 499
    with pytest.raises(ValueError):
        data.select_records(records, -1, 3)


# --------------------------------------------------------------------------------------------
# Formats


def test_jsonl_and_missing_input(tmp_path: Path):
    lines = ['{"instruction": "a", "output": "b"}', "", '{"instruction": "c", "output": "d"}']
    records = data.load_records(write(tmp_path, "d.jsonl", "\n".join(lines) + "\n"))

    assert [(r.index, r.instruction, r.input, r.output) for r in records] == [
        (0, "a", "", "b"),
        (1, "c", "", "d"),
    ]
    assert all(r.ok for r in records)


def test_empty_output_is_not_invalid(tmp_path: Path):
    (record,) = data.load_records(write_json(tmp_path, [{"instruction": "a", "output": ""}]))
    assert record.ok and record.output == ""


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "two"},
    ],
    "source": "x",
}


@pytest.mark.parametrize("name", ["chat.json", "chat.jsonl"])
def test_chat_records_take_the_last_assistant_turn(tmp_path: Path, name: str):
    text = json.dumps([CHAT]) if name.endswith(".json") else json.dumps(CHAT) + "\n"
    (record,) = data.load_records(write(tmp_path, name, text))

    assert record.ok
    assert record.instruction == "second"
    assert record.output == "two"
    assert record.input == ""
    assert record.messages == tuple(CHAT["messages"])
    assert record.extra == {"source": "x"}
    assert data.load_records(tmp_path / name, fmt="chat") == [record]


def test_chat_without_assistant_turn_is_invalid(tmp_path: Path):
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    (record,) = data.load_records(write_json(tmp_path, [chat]))

    assert record.status == "invalid_record"
    assert "assistant" in record.reason and "'messages'" in record.reason


def test_unknown_format_is_refused(tmp_path: Path):
    with pytest.raises(DataError, match="format"):
        data.load_records(write_json(tmp_path, [CHAT]), fmt="sharegpt")


# --------------------------------------------------------------------------------------------
# File-level problems raise, naming file and place


def test_malformed_json_names_line_and_column(tmp_path: Path):
    path = write(
        tmp_path, "bad.json", '[\n  {"instruction": "a",\n   "output": "b"\n  },\n  {oops}\n]'
    )

    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 5, column 4"):
        data.load_records(path)


def test_malformed_jsonl_names_the_line(tmp_path: Path):
    path = write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')

    with pytest.raises(DataError, match=r"bad\.jsonl: malformed JSON Lines at line 2"):
        data.load_records(path)


def test_non_utf8_byte_names_the_offset(tmp_path: Path):
    content = b'[{"instruction": "caf\xe9", "output": "b"}]'
    offset = content.index(b"\xe9")
    path = write(tmp_path, "latin.json", content)

    with pytest.raises(DataError, match=rf"latin\.json: not valid UTF-8 at byte offset {offset} "):
        data.load_records(path)


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_empty_file(tmp_path: Path, content: str):
    with pytest.raises(DataError, match=r"empty\.json: file is empty"):
        data.load_records(write(tmp_path, "empty.json", content))


def test_top_level_object_is_refused(tmp_path: Path):
    path = write(tmp_path, "obj.json", json.dumps({"instruction": "a", "output": "b"}, indent=1))

    with pytest.raises(DataError, match=r"obj\.json: top level is a JSON dict, not a list"):
        data.load_records(path)


def test_xz_file_is_read_and_corrupt_xz_refused(tmp_path: Path):
    good = write(tmp_path, "d.json.xz", lzma.compress(b'[{"instruction": "a", "output": "b"}]'))
    assert data.load_records(good)[0].output == "b"

    with pytest.raises(DataError, match=r"bad\.json\.xz: not a valid xz file"):
        data.load_records(write(tmp_path, "bad.json.xz", b"not xz"))


# --------------------------------------------------------------------------------------------
# Record-level problems are kept with a reason, or raise under strict


BAD_RECORDS = [
    ({"instruction": "a"}, "field 'output' is missing"),
    ({"output": "b"}, "field 'instruction' is missing"),
    ({"instruction": "a", "output": 4}, "field 'output' is not a string (got int)"),
    ({"instruction": None, "output": "b"}, "field 'instruction' is not a string (got null)"),
    ({"instruction": "a", "input": 1.5, "output": "b"}, "field 'input' is not a string"),
    ({"instruction": "a", "output": "nan"}, "field 'output' is the string 'nan'"),
    ({"instruction": "NaN", "output": "b"}, "field 'instruction' is the string 'NaN'"),
    ({"instruction": "a", "output": float("nan")}, "field 'output' is not a string (got NaN)"),
    (["a", "b"], "record is not an object (got list)"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_RECORDS)
def test_bad_record_is_kept_with_its_reason(tmp_path: Path, bad, reason: str):
    good = {"instruction": "q", "output": "r"}
    records = data.load_records(write_json(tmp_path, [good, bad, good]))

    assert [r.status for r in records] == ["ok", "invalid_record", "ok"]
    assert reason in records[1].reason
    assert records[1].index == 1


def test_strict_names_file_index_and_field(tmp_path: Path):
    good = {"instruction": "q", "output": "r"}
    path = write_json(tmp_path, [good, good, {"instruction": "q", "output": None}], "s.json")

    with pytest.raises(DataError, match=r"s\.json: record 2, field 'output'"):
        data.load_records(path, strict=True)


# --------------------------------------------------------------------------------------------
# Ids


def test_ids_depend_on_content_only(tmp_path: Path):
    a = {"instruction": "same", "input": "", "output": "text"}
    b = {"instruction": "same", "input": "", "output": "other"}
    first = data.load_records(write_json(tmp_path, [a, b], "one.json"))
    second = data.load_records(write_json(tmp_path, [b, {"x": 1}, a], "two.json"))

    assert first[0].sample_id == second[2].sample_id
    assert first[1].sample_id == second[0].sample_id
    assert first[0].sample_id != first[1].sample_id
    assert len(first[0].sample_id) == 16 and int(first[0].sample_id, 16) >= 0


def test_invalid_records_are_told_apart_by_their_whole_content(tmp_path: Path):
    records = data.load_records(write_json(tmp_path, [{"ppl": 1.0}, {"ppl": 2.0}, {"ppl": 1.0}]))

    assert {r.status for r in records} == {"invalid_record"}
    assert data.find_duplicates(records) == {records[0].sample_id: [0, 2]}
    assert records[0].sample_id != records[1].sample_id


def test_extra_fields_do_not_change_the_id(tmp_path: Path):
    plain = {"instruction": "a", "output": "b"}
    scored = {"instruction": "a", "input": "", "output": "b", "reward": float("nan")}
    records = data.load_records(write_json(tmp_path, [plain, scored]))

    assert records[0].sample_id == records[1].sample_id
    assert data.find_duplicates(records) == {records[0].sample_id: [0, 1]}


# --------------------------------------------------------------------------------------------
# prepare-data


def test_prepared_file_reads_back_to_the_same_records(datasets_dir: Path, tmp_path: Path):
    source = data.resolve_data_path(datasets_dir, f"{COT}/strategyqa_train_no_cot.json")
    out = tmp_path / "cot_500" / "strategyqa_none.jsonl"
    meta = data.prepare_file(source, out)

    assert data.load_records(out) == data.load_records(source)
    assert meta["checksum_verified"] is True
    assert meta["counts"] == {"ok": 500}
    assert list(meta["duplicates"].values()) == [[332, 437]]
    assert json.loads(data.meta_path(out).read_text())["n_records"] == 500
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_prepared_round_trip_keeps_invalid_chat_and_nan(tmp_path: Path):
    records = [
        {"instruction": "a", "output": "b", "score": float("nan")},
        {"instruction": "a", "output": 3},
    ]
    source = write_json(tmp_path, records)
    chat = write(tmp_path, "chat.jsonl", json.dumps(CHAT) + "\n")

    for path in (source, chat):
        out = tmp_path / "out" / f"{path.stem}.jsonl"
        data.prepare_file(path, out)
        # NaN != NaN, so the records are compared through their JSON text.
        back = [json.dumps(data.record_row(r)) for r in data.load_records(out)]
        assert back == [json.dumps(data.record_row(r)) for r in data.load_records(path)]


def test_prepared_dedupe_drops_later_copies(tmp_path: Path):
    row = {"instruction": "a", "output": "b"}
    out = tmp_path / "p.jsonl"
    meta = data.prepare_file(
        write_json(tmp_path, [row, {"instruction": "c", "output": "d"}, row]), out, deduplicate=True
    )

    assert [r.index for r in data.load_records(out)] == [0, 1]
    assert meta["n_records"] == 3 and meta["n_written"] == 2


def test_prepare_data_command_writes_one_file(tmp_path: Path):
    cfg = compose(["dataset=cot_500", "data.file=gsm8k_none"])
    assert data.prepare_data_command(cfg, root=tmp_path) == 0

    out = tmp_path / "cot_500" / "gsm8k_none.jsonl"
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "gsm8k_none.jsonl",
        "gsm8k_none.meta.json",
    ]
    assert len(data.load_records(out)) == 500


def test_prepare_data_command_takes_a_user_file(tmp_path: Path):
    source = write(tmp_path, "my data.jsonl", '{"instruction": "a", "output": "b"}\n')
    cfg = compose(["dataset=cot_500", f"data.path={source}"])
    assert data.prepare_data_command(cfg, root=tmp_path / "prepared") == 0

    (record,) = data.load_records(tmp_path / "prepared" / "cot_500" / "my_data.jsonl")
    assert (record.instruction, record.output) == ("a", "b")


def test_prepare_data_command_refuses_unknown_file(tmp_path: Path):
    cfg = compose(["dataset=cot_500", "data.file=gsm8k_nonsense"])
    with pytest.raises(DataError, match="valid files: aqua_none"):
        data.prepare_data_command(cfg, root=tmp_path)
