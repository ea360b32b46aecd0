"""Score a user's data: the same file back, each record with its gradient spectra added.

``gradspec score data.path=IN output=OUT [select.by=effective_rank select.fraction=0.1]`` reads
an Alpaca-style (``{instruction, input, output}``) or chat (``{messages: [...]}``) file, as a
JSON array or JSON Lines, runs the extraction on it (:func:`gradspec.extract.extract_spectra`,
into ``<OUT stem>.spectra.parquet``) and, unless ``score.ifd=false``, the IFD
(:mod:`gradspec.ifd`, into ``<OUT stem>.ifd.parquet``), and writes ``OUT`` in the input's format.

Every byte of the input is kept: the added fields are inserted just before each record's closing
brace, in the record's own layout (indentation, separators), so the original text, bare ``NaN``
tokens, number spellings and escapes included, is a subsequence of the output. Added values that
are missing are written as ``null`` (strict JSON); the input's own ``NaN`` tokens stay as they
are. With ``select.by`` the chosen share of scored records also goes to
``<OUT stem>.selected.<ext>``, in file order, in the same format.

Added fields (prefix ``score.prefix``, default ``gradspec_``):

- ``effective_rank``, ``nuclear_norm``: the sample's mean over layers and projections;
- ``effective_rank_{early,middle,late}``, ``nuclear_norm_{early,middle,late}``: the mean over the
  layers of each group (:func:`gradspec.stats.layer_groups`) and the projections;
- ``ifd``, ``ppl_conditioned``, ``ppl_unconditioned``: see :mod:`gradspec.ifd`;
- ``loss``, ``n_prompt_tokens``, ``n_response_tokens`` (kept), ``n_response_tokens_full`` (before
  ``prompt.max_length``), ``truncated``, ``status``, ``reason``: as in the spectra file; a record
  outside ``score.limit`` has status ``not_scored``.
"""

from __future__ import annotations

import copy
import json
import logging
import lzma
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from gradspec import data, extract, models
from gradspec import stats as st
from gradspec.ifd import ifd_scores

log = logging.getLogger(__name__)

STATISTICS = ("effective_rank", "nuclear_norm")
GROUPS = ("early", "middle", "late")
SPECTRA_FIELDS = (
    "loss",
    "n_prompt_tokens",
    "n_response_tokens",
    "n_response_tokens_full",
    "truncated",
    "status",
    "reason",
)
IFD_FIELDS = ("ifd", "ppl_conditioned", "ppl_unconditioned")
NOT_SCORED = "not_scored"
ORDERS = ("desc", "asc")
_WHITESPACE = re.compile(r"\s*")
_KEY_SEPARATOR = re.compile(r"\s*:\s*")


def score_fields(ifd: bool = True) -> list[str]:
    """The added fields, without prefix, in the order they are written."""
    spectral = [
        f"{statistic}{suffix}"
        for statistic in STATISTICS
        for suffix in ("", *(f"_{group}" for group in GROUPS))
    ]
    return [*spectral, *(IFD_FIELDS if ifd else ()), *SPECTRA_FIELDS]


# --------------------------------------------------------------------------------------------
# The document: where each record's text lies


@dataclass
class Document:
    """A data file's text and the character span of each record, in file order."""

    text: str
    shape: str  # "array" (a JSON array) or "lines" (JSON Lines)
    spans: list[tuple[int, int]]
    values: list


def _skip(text: str, position: int) -> int:
    return _WHITESPACE.match(text, position).end()


def _array_spans(text: str, path: Path) -> tuple[list[tuple[int, int]], list]:
    decoder = json.JSONDecoder()
    spans, values = [], []
    position = _skip(text, text.index("[") + 1)
    while text[position] != "]":
        value, end = decoder.raw_decode(text, position)
        spans.append((position, end))
        values.append(value)
        position = _skip(text, end)
        if text[position] == ",":
            position = _skip(text, position + 1)
        elif text[position] != "]":
            raise data.DataError(f"{path}: expected ',' or ']' at character {position}")
    return spans, values


def _line_spans(text: str) -> tuple[list[tuple[int, int]], list]:
    decoder = json.JSONDecoder()
    spans, values = [], []
    offset = 0
    for line in text.splitlines(keepends=True):
        start = _skip(line, 0)
        if line[start:].strip():
            value, end = decoder.raw_decode(line, start)
            spans.append((offset + start, offset + end))
            values.append(value)
        offset += len(line)
    return spans, values


def read_document(path: str | Path) -> Document:
    """The records' spans in the file's text; the records are those :func:`data.load_records`
    reads, in the same order (a JSON array, else one record per non-blank line)."""
    path = Path(path)
    text = data.read_bytes(path).decode("utf-8")
    try:
        if text.lstrip().startswith("["):
            return Document(text, "array", *_array_spans(text, path))
        return Document(text, "lines", *_line_spans(text))
    except (json.JSONDecodeError, IndexError) as error:
        raise data.DataError(f"{path}: cannot locate the records in the text ({error})") from error


# --------------------------------------------------------------------------------------------
# Writing fields into a record's text


def _layout(text: str, start: int, end: int) -> tuple[str, str]:
    """(item separator, key separator) of the object ``text[start:end]``, from its first key.

    A record laid out over several lines (``{\\n    "a": 1,\\n    ...``) gives ``",\\n    "`` and
    ``": "``; a one-line record gives ``", "`` or ``","``, as its own first key/value suggests.
    """
    first = _skip(text, start + 1)
    opening = text[start + 1 : first]
    if text[first] != '"':
        return ", ", ": "
    _, key_end = json.decoder.scanstring(text, first + 1)
    key_separator = _KEY_SEPARATOR.match(text, key_end).group(0)
    if "\n" in opening:
        return "," + opening, key_separator
    return ("," if key_separator == ":" else ", "), key_separator


def json_value(value) -> str:
    """A value as strict JSON: NaN and infinities become null, numpy scalars plain numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "null"
    if value is pd.NA:
        return "null"
    return json.dumps(value, ensure_ascii=True)


def with_fields(text: str, span: tuple[int, int], fields: dict) -> str:
    """The record's text with ``fields`` inserted before its closing brace, in its layout."""
    start, end = span
    body = text[start:end]
    close = len(body) - 1
    last = len(body[:close].rstrip()) - 1
    item_separator, key_separator = _layout(text, start, end)
    pieces = [
        f"{json.dumps(key)}{key_separator}{json_value(value)}" for key, value in fields.items()
    ]
    joined = item_separator.join(pieces)
    lead = item_separator.lstrip(",") if body[last] == "{" else item_separator
    return body[: last + 1] + lead + joined + body[last + 1 :]


def render(document: Document, pieces: dict[int, str], keep: list[int] | None = None) -> str:
    """The document with each record's text replaced by ``pieces[i]``; with ``keep``, only those
    records, joined the way the file joins its first two (or by a newline for JSON Lines)."""
    text, spans = document.text, document.spans
    if keep is None:
        out, position = [], 0
        for index, (start, end) in enumerate(spans):
            out += [text[position:start], pieces.get(index, text[start:end])]
            position = end
        return "".join(out) + text[position:]
    if document.shape == "lines":
        return "".join(pieces[i] + "\n" for i in keep)
    head = text[: spans[0][0]] if spans else "["
    tail = text[spans[-1][1] :] if spans else "]"
    between = text[spans[0][1] : spans[1][0]] if len(spans) > 1 else ","
    return head + between.join(pieces[i] for i in keep) + tail


# --------------------------------------------------------------------------------------------
# Scores


def spectral_scores(spectra: pd.DataFrame) -> pd.DataFrame:
    """Per record: mean over layers and projections of each statistic, overall and per group."""
    per_sample = spectra.drop_duplicates("record_index").set_index("record_index")
    table = per_sample[list(SPECTRA_FIELDS)].copy()
    ok = spectra[spectra["status"] == "ok"]
    if ok.empty:
        for name in score_fields(False)[: 2 * (1 + len(GROUPS))]:
            table[name] = np.nan
        return table
    layers = int(ok["layer"].max()) + 1
    bounds = st.layer_groups(layers)
    for statistic in STATISTICS:
        table[statistic] = ok.groupby("record_index")[statistic].mean()
        for group in GROUPS:
            low, high = bounds[group]
            rows = ok[(ok["layer"] >= low) & (ok["layer"] < high)]
            table[f"{statistic}_{group}"] = rows.groupby("record_index")[statistic].mean()
    return table


def _output_paths(output: Path) -> dict[str, Path]:
    name = output.name.removesuffix(".xz")
    stem, dot, ext = name.rpartition(".")
    stem, ext = (stem, ext) if dot else (name, "json")
    suffix = ".xz" if output.name.endswith(".xz") else ""
    folder = output.parent
    return {
        "output": output,
        "selected": folder / f"{stem}.selected.{ext}{suffix}",
        "spectra": folder / f"{stem}.spectra.parquet",
        "ifd": folder / f"{stem}.ifd.parquet",
    }


def _scoring_config(cfg: DictConfig, path: Path) -> DictConfig:
    """The extraction's config: the user's file from its first record, limit score.limit."""
    run = copy.deepcopy(cfg)
    OmegaConf.set_readonly(run, False)
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.name.split(".")[0]) or "data"
    run.data.path = str(path)
    run.data.file = stem if stem[0].isalnum() else f"f{stem}"
    run.data.offset = 0
    run.data.limit = cfg.score.limit
    run.output = None
    OmegaConf.set_readonly(run, True)
    return run


def compute_ifd(cfg: DictConfig, path: Path) -> pd.DataFrame:
    """IFD of the records the extraction saw, with the extraction's template and lengths."""
    records = data.load_records(path, fmt=cfg.data.format)
    records = data.select_records(records, 0, cfg.score.limit)
    model_dir = models.resolve_model_dir(cfg)
    model, tokenizer = models.load_model(
        model_dir, cfg.extract.device, cfg.extract.dtype, cfg.model.trust_remote_code
    )
    return ifd_scores(
        model,
        tokenizer,
        records,
        extract.template_of(cfg),
        cfg.prompt.system_prompt,
        cfg.prompt.max_length,
        cfg.extract.batch_size,
    )


def record_fields(table: pd.DataFrame, n_records: int, names: list[str]) -> list[dict]:
    """The added fields of each record, in file order; unscored records get NOT_SCORED."""
    rows = []
    for index in range(n_records):
        if index in table.index:
            row = table.loc[index]
            rows.append({name: row.get(name, None) for name in names})
        else:
            blank = dict.fromkeys(names)
            blank["status"], blank["reason"] = NOT_SCORED, "outside score.limit or dropped"
            rows.append(blank)
    return rows


# --------------------------------------------------------------------------------------------
# Selection


def select(values: list, fraction: float, order: str) -> list[int]:
    """Positions of the top (``desc``) or bottom (``asc``) ``ceil(fraction * m)`` of the ``m``
    finite values, returned in file order; ties keep file order."""
    if not 0 < fraction <= 1:
        raise data.DataError(f"select.fraction must be in (0, 1], not {fraction}")
    if order not in ORDERS:
        raise data.DataError(f"select.order must be one of {', '.join(ORDERS)}, not {order!r}")
    finite = [
        (float(v), i)
        for i, v in enumerate(values)
        if v is not None and isinstance(v, int | float | np.number) and math.isfinite(v)
    ]
    count = math.ceil(fraction * len(finite)) if finite else 0
    ranked = sorted(finite, key=lambda item: (-item[0] if order == "desc" else item[0], item[1]))
    return sorted(i for _, i in ranked[:count])


def _check_prefix(document: Document, names: list[str], path: Path) -> None:
    for index, value in enumerate(document.values):
        if isinstance(value, dict):
            taken = sorted(set(value) & set(names))
            if taken:
                raise data.DataError(
                    f"{path}: record {index} already has field(s) {', '.join(taken)}; "
                    "choose another score.prefix"
                )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = text.encode("utf-8")
    path.write_bytes(lzma.compress(raw) if path.name.endswith(".xz") else raw)


def score_file(cfg: DictConfig, source: Path, output: Path) -> dict[str, Path]:
    """Extract, score and write ``output`` (and the selection); returns the paths written."""
    started = time.perf_counter()
    targets = _output_paths(output)
    prefix = cfg.score.prefix
    names = score_fields(bool(cfg.score.ifd))
    document = read_document(source)
    _check_prefix(document, [prefix + name for name in names], source)

    run = _scoring_config(cfg, source)
    extract.extract_spectra(run, targets["spectra"])
    table = spectral_scores(extract.read_spectra(targets["spectra"]))
    if cfg.score.ifd:
        scores = compute_ifd(run, source)
        scores.to_parquet(targets["ifd"], index=False)
        table = table.join(scores.set_index("record_index")[list(IFD_FIELDS)], how="left")

    fields = record_fields(table, len(document.values), names)
    pieces = {
        i: with_fields(document.text, span, {prefix + k: v for k, v in fields[i].items()})
        for i, span in enumerate(document.spans)
        if isinstance(document.values[i], dict)
    }
    _write(targets["output"], render(document, pieces))
    written = {"output": targets["output"], "spectra": targets["spectra"]}

    if cfg.select.by:
        if cfg.select.by not in names:
            raise data.DataError(
                f"select.by must be one of {', '.join(names)}, not {cfg.select.by!r}"
            )
        values = [row[cfg.select.by] if i in pieces else None for i, row in enumerate(fields)]
        keep = select(values, cfg.select.fraction, cfg.select.order)
        _write(targets["selected"], render(document, pieces, keep))
        written["selected"] = targets["selected"]
        log.info("selected %d records by %s (%s)", len(keep), cfg.select.by, cfg.select.order)
    log.info(
        "scored %s -> %s: %d records, %.1f s",
        source,
        output,
        len(document.values),
        time.perf_counter() - started,
    )
    return written


def score_command(cfg: DictConfig) -> int:
    """``gradspec score data.path=FILE output=FILE``."""
    if not cfg.data.path or not cfg.output:
        raise data.DataError("gradspec score needs data.path=FILE and output=FILE")
    source = Path(cfg.data.path)
    if not source.is_file():
        raise data.DataError(f"data.path {str(source)!r}: no such file")
    score_file(cfg, source, Path(cfg.output))
    return 0
