"""``gradspec score``: every input field kept (NaN tokens too) in JSON, JSONL and chat files,
scores added, selection by a score; on the real SmolLM2 with two or three short records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from workspace import MODEL, make_workspace, snakemake

from gradspec.config import compose
from gradspec.score import read_document, render, score_file, select, with_fields

ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "reward": float("nan")},
    {"instruction": "Add 2 and 3.", "output": "5, since 2 + 3 = 5.", "diff": 2, "tag": "é"},
    {"instruction": "Say nothing.", "output": "", "ppl": 1.2345678901234567},
]
CHAT = [
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
     "score": float("nan")},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}],
     "id": 7},
]  # fmt: skip


def overrides(model_dir: Path, tmp_path: Path, source: Path, **extra) -> list[str]:
    return [
        "model=smollm2_135m_instruct_base",
        f"model.path={model_dir}",
        "extract.device=cpu",
        "extract.modules=[q_proj,v_proj]",
        "wandb.mode=disabled",
        f"results_dir={tmp_path}/results",
        f"data.path={source}",
        *[f"{key}={value}" for key, value in extra.items()],
    ]


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def check_kept(original: list[dict], written: list[dict]) -> None:
    """Every input field, in its order and with its value and type, then only added fields."""
    assert len(written) == len(original)
    for before, after in zip(original, written, strict=True):
        keys = list(after)
        assert keys[: len(before)] == list(before)
        assert all(same(before[k], after[k]) for k in before)
        assert all(k.startswith("gradspec_") for k in keys[len(before) :])


@pytest.mark.parametrize(
    ("name", "records", "dump"),
    [
        ("alpaca.json", ALPACA, lambda rs: json.dumps(rs, indent=2, ensure_ascii=False)),
        ("alpaca.jsonl", ALPACA, lambda rs: "".join(json.dumps(r) + "\n" for r in rs)),
        ("chat.json", CHAT, lambda rs: json.dumps(rs, indent=4)),
    ],
)
def test_round_trip_keeps_every_field(smollm2_dir, tmp_path, name, records, dump):
    source = tmp_path / name
    text = dump(records)
    source.write_text(text, encoding="utf-8")
    output = tmp_path / "out" / name
    cfg = compose(
        overrides(smollm2_dir, tmp_path, source, output=output, **{"select.by": "effective_rank"})
    )

    written = score_file(cfg, source, output)

    out_text = output.read_text(encoding="utf-8")
    parse = json.loads if not name.endswith(".jsonl") else None
    parsed = parse(out_text) if parse else [json.loads(line) for line in out_text.splitlines()]
    check_kept(records, parsed)
    assert out_text.count("NaN") == text.count("NaN")
    # The input's text is kept byte for byte: removing what was inserted gives it back.
    assert strip_added(out_text) == text

    first = parsed[0]
    assert first["gradspec_status"] == "ok"
    assert first["gradspec_effective_rank"] > 1
    assert first["gradspec_nuclear_norm"] > 0
    assert first["gradspec_ifd"] > 0
    assert first["gradspec_n_response_tokens"] > 0
    assert {"gradspec_effective_rank_early", "gradspec_nuclear_norm_late"} <= set(first)
    if name.startswith("alpaca"):
        assert parsed[2]["gradspec_status"] == "empty_response"
        assert parsed[2]["gradspec_effective_rank"] is None
    assert written["spectra"].exists()

    chosen = written["selected"].read_text(encoding="utf-8")
    chosen = json.loads(chosen) if parse else [json.loads(x) for x in chosen.splitlines()]
    assert len(chosen) == 1
    best = max(r["gradspec_effective_rank"] for r in parsed if r["gradspec_status"] == "ok")
    assert chosen[0]["gradspec_effective_rank"] == best


def strip_added(text: str) -> str:
    """The text without each inserted ``, "gradspec_...": value`` (values are flat)."""
    import re

    return re.sub(r',?\s*"gradspec_[a-z_]+": (?:null|true|false|-?[0-9.eE+-]+|"[^"]*")', "", text)


def test_layout_of_inserted_fields():
    """Pretty records get one field per line at their indent; one-line records stay one line."""
    pretty = '[\n  {\n    "a": NaN\n  }\n]'
    document = read_document_text(pretty)
    piece = with_fields(pretty, document.spans[0], {"x": 1.5, "y": None})
    assert piece == '{\n    "a": NaN,\n    "x": 1.5,\n    "y": null\n  }'
    compact = '{"a":1}'
    assert with_fields(compact, (0, len(compact)), {"x": "ok"}) == '{"a":1,"x":"ok"}'
    assert with_fields("{}", (0, 2), {"x": 1}) == '{ "x": 1}'


def read_document_text(text: str, tmp: Path | None = None):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        handle.write(text)
    return read_document(handle.name)


def test_selection_of_a_subset(tmp_path):
    """Top 50% of 3 finite values is ceil(1.5) = 2, returned in file order; None is skipped."""
    assert select([3.0, None, 1.0, 2.0], 0.5, "desc") == [0, 3]
    assert select([3.0, None, 1.0, 2.0], 0.5, "asc") == [2, 3]
    text = '[\n  {"a": 1},\n  {"a": 2},\n  {"a": 3}\n]'
    source = tmp_path / "x.json"
    source.write_text(text)
    document = read_document(source)
    pieces = {i: text[s:e] for i, (s, e) in enumerate(document.spans)}
    assert render(document, pieces) == text
    assert json.loads(render(document, pieces, [0, 2])) == [{"a": 1}, {"a": 3}]


def test_score_target_of_the_workflow(tmp_path):
    """`results/score/MODEL/NAME.json` from `data/NAME.json` through the real Snakemake rule."""
    root = make_workspace(tmp_path / "workspace")
    text = json.dumps(ALPACA[:2], indent=2, ensure_ascii=False)
    (root / "data").mkdir()
    (root / "data" / "tiny.json").write_text(text, encoding="utf-8")
    target = f"results/score/{MODEL}/tiny.json"
    choose = "select.by=effective_rank select.fraction=0.5 extract.modules=[q_proj,v_proj]"

    snakemake(root, "--cores", "2", target, "--config", f"overrides={choose}")

    out_text = (root / target).read_text(encoding="utf-8")
    check_kept(ALPACA[:2], json.loads(out_text))
    assert strip_added(out_text) == text
    scored = json.loads(out_text)
    assert [r["gradspec_status"] for r in scored] == ["ok", "ok"]
    chosen = json.loads((root / f"results/score/{MODEL}/tiny.selected.json").read_text())
    assert len(chosen) == 1
    assert chosen[0]["gradspec_effective_rank"] == max(r["gradspec_effective_rank"] for r in scored)
    assert (root / f"results/score/{MODEL}/tiny.spectra.parquet").exists()
