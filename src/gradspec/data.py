"""Read, validate and identify the records of a data file: the ``prepare-data`` step.

A data file is an Alpaca-style list of ``{instruction, input, output}`` objects or a list of chat
records ``{messages: [{role, content}, ...]}``, as a JSON array or as JSON Lines, optionally
xz-compressed. Every record of a file becomes exactly one :class:`Record`: a record that cannot be
used is kept with status ``invalid_record`` and a reason, so that counts and indices always match
the source file. Problems with the file as a whole (bad bytes, bad JSON, nothing in it) raise
:class:`DataError` naming the file and the place.

``prepare-data`` writes each file of a dataset to ``resources/data/<dataset>/<file>.jsonl`` with
ids and statuses, plus a ``.meta.json`` beside it; :func:`load_records` reads those files back to
the same records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import math
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gradspec import paths
from gradspec.config import project_root

log = logging.getLogger(__name__)

OK = "ok"
INVALID = "invalid_record"
FORMATS = ("auto", "alpaca", "chat")
CHECKSUMS = "SHA256SUMS"
ALPACA_FIELDS = ("instruction", "input", "output")
PREPARED_FIELDS = (
    "record_index",
    "sample_id",
    "status",
    "reason",
    "instruction",
    "input",
    "output",
    "messages",
    "extra",
)


class DataError(ValueError):
    """A data file that cannot be read, with the file and, where known, the line, record, field."""


@dataclass(frozen=True)
class Record:
    """One record of a data file, kept verbatim, with a content id and a validity status."""

    index: int
    sample_id: str
    instruction: str
    input: str
    output: str
    messages: tuple | None = None
    status: str = OK
    reason: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK


# --------------------------------------------------------------------------------------------
# Paths and checksums


def resolve_data_path(data_dir: str | Path, relpath: str | Path) -> Path:
    """The file a dataset entry or a user names: the plain file or its ``.xz`` twin.

    A relative path is looked up under ``data_dir`` (as given, then under the project root, so a
    run from another folder still finds the embedded data), then relative to the working folder.
    """
    given = Path(relpath)
    if given.is_absolute():
        bases = [given]
    else:
        data_dir = Path(data_dir)
        bases = [data_dir / given]
        if not data_dir.is_absolute():
            bases.append(project_root() / data_dir / given)
        bases.append(given)

    tried: list[Path] = []
    for base in bases:
        for candidate in _twins(base):
            tried.append(candidate)
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"data file {str(relpath)!r} not found; looked for: {', '.join(map(str, tried))}"
    )


def _twins(path: Path) -> list[Path]:
    if path.suffix == ".xz":
        return [path, path.with_suffix("")]
    return [path, path.with_name(path.name + ".xz")]


def read_bytes(path: str | Path) -> bytes:
    """The content of a file, decompressed when its name ends in ``.xz``."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix != ".xz":
        return raw
    try:
        return lzma.decompress(raw)
    except lzma.LZMAError as error:
        raise DataError(f"{path}: not a valid xz file ({error})") from error


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checksums(sums_file: str | Path) -> dict[str, str]:
    """``SHA256SUMS`` as {path relative to its folder, without ``./``: hex digest}."""
    sums: dict[str, str] = {}
    for line in Path(sums_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*").removeprefix("./")] = digest
    return sums


def _checksum_entry(path: Path) -> tuple[str, str] | None:
    """The SHA256SUMS key and digest of a file, from the nearest SHA256SUMS above it."""
    plain = path.resolve().with_suffix("") if path.suffix == ".xz" else path.resolve()
    for folder in plain.parents:
        sums_file = folder / CHECKSUMS
        if sums_file.is_file():
            key = plain.relative_to(folder).as_posix()
            digest = read_checksums(sums_file).get(key)
            return (key, digest) if digest else None
    return None


def verify_checksum(path: str | Path) -> str | None:
    """Check a file's decompressed bytes against the SHA256SUMS listing above it.

    Returns the verified digest, or None when no SHA256SUMS lists the file (a user's own data).
    A mismatch raises :class:`DataError`: the numbers of a run must come from the papers' bytes.
    """
    path = Path(path)
    entry = _checksum_entry(path)
    if entry is None:
        log.warning("%s is not listed in any %s; checksum not verified", path, CHECKSUMS)
        return None

    key, expected = entry
    actual = sha256_bytes(read_bytes(path))
    if actual != expected:
        raise DataError(
            f"{path}: checksum mismatch for {key}: {CHECKSUMS} lists {expected}, "
            f"the decompressed file has {actual}"
        )
    return actual


# --------------------------------------------------------------------------------------------
# Parsing: bytes -> raw JSON values, with file-level errors


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start : error.start + 1].hex()
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {error.start} (byte 0x{bad}: {error.reason})"
        ) from error


def _parse(text: str, path: Path) -> list[Any]:
    """A JSON array or JSON Lines, as a list of raw values; which one is decided by content."""
    if not text.strip():
        raise DataError(f"{path}: file is empty")

    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):
            raise DataError(
                f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
            ) from error
        return _parse_jsonl(text, path)

    if isinstance(document, list):
        values = document
    elif isinstance(document, dict) and path.name.removesuffix(".xz").endswith(".jsonl"):
        values = [document]
    else:
        raise DataError(
            f"{path}: top level is a JSON {type(document).__name__}, not a list of records"
        )
    if not values:
        raise DataError(f"{path}: holds no records")
    return values


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: malformed JSON Lines at line {number}, column {error.colno}: {error.msg}"
            ) from error
    return values


# --------------------------------------------------------------------------------------------
# Validation: raw value -> Record


def sample_id(fields: dict[str, Any]) -> str:
    """A content id: the same text gives the same id wherever and in whichever file it appears.

    Valid records are identified by their text fields alone, so scores or other extra fields do
    not split one text into two ids. Invalid records have no well-defined text, so the whole raw
    record is hashed instead; otherwise every record lacking the same fields would share an id.
    """
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return type(value).__name__


def _text_problem(name: str, value: Any, present: bool = True) -> str | None:
    """Why a field cannot serve as text, or None when it can."""
    if not present:
        return f"field '{name}' is missing"
    if not isinstance(value, str):
        return f"field '{name}' is not a string (got {_kind(value)})"
    if value.strip().lower() == "nan":
        return f"field '{name}' is the string {value!r}, not text"
    return None


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _not_an_object(index: int, value: Any) -> Record:
    return Record(
        index=index,
        sample_id=sample_id({"record": value}),
        instruction="",
        input="",
        output="",
        status=INVALID,
        reason=f"record is not an object (got {_kind(value)})",
    )


def _alpaca_record(index: int, value: dict) -> Record:
    problems = [
        _text_problem("instruction", value.get("instruction"), "instruction" in value),
        _text_problem("input", value["input"]) if "input" in value else None,
        _text_problem("output", value.get("output"), "output" in value),
    ]
    problems = [p for p in problems if p]

    texts = {name: value.get(name, "" if name == "input" else None) for name in ALPACA_FIELDS}
    return Record(
        index=index,
        sample_id=sample_id({"record": value} if problems else texts),
        instruction=_as_text(texts["instruction"]),
        input=_as_text(texts["input"]),
        output=_as_text(texts["output"]),
        status=INVALID if problems else OK,
        reason="; ".join(problems),
        extra={k: v for k, v in value.items() if k not in ALPACA_FIELDS},
    )


def _message_problems(messages: Any) -> list[str]:
    if not isinstance(messages, list):
        return [f"field 'messages' is not a list (got {_kind(messages)})"]
    problems = []
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        if not isinstance(message, dict):
            problems.append(f"field '{where}' is not an object (got {_kind(message)})")
            continue
        for key in ("role", "content"):
            problem = _text_problem(f"{where}.{key}", message.get(key), key in message)
            if problem:
                problems.append(problem)
    if not problems and not any(m["role"] == "assistant" for m in messages):
        problems.append("field 'messages' has no assistant turn")
    return problems


def _chat_record(index: int, value: dict) -> Record:
    """The response is the last assistant turn; the prompt is every turn before it."""
    messages = value.get("messages")
    problems = (
        _message_problems(messages) if "messages" in value else ["field 'messages' is missing"]
    )
    extra = {k: v for k, v in value.items() if k != "messages"}
    ident = sample_id({"record": value} if problems else {"messages": messages})
    if problems:
        kept = tuple(messages) if isinstance(messages, list) else None
        return Record(
            index=index,
            sample_id=ident,
            instruction="",
            input="",
            output="",
            messages=kept,
            status=INVALID,
            reason="; ".join(problems),
            extra=extra,
        )

    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return Record(
        index=index,
        sample_id=ident,
        instruction=users[-1] if users else "",
        input="",
        output=messages[last]["content"],
        messages=tuple(dict(m) for m in messages),
        extra=extra,
    )


def _prepared_record(value: dict, path: Path, number: int) -> Record:
    missing = [key for key in PREPARED_FIELDS if key not in value]
    if missing:
        raise DataError(f"{path}: prepared record {number} lacks {', '.join(missing)}")
    messages = value["messages"]
    return Record(
        index=value["record_index"],
        sample_id=value["sample_id"],
        instruction=value["instruction"],
        input=value["input"],
        output=value["output"],
        messages=tuple(messages) if messages is not None else None,
        status=value["status"],
        reason=value["reason"],
        extra=value["extra"],
    )


def _detect_format(values: list[Any]) -> str:
    """prepared, chat or alpaca, from the keys of the first record that is an object."""
    first = next((v for v in values if isinstance(v, dict)), {})
    if {"record_index", "sample_id", "status"} <= first.keys():
        return "prepared"
    if "messages" in first and "instruction" not in first:
        return "chat"
    return "alpaca"


def _reason_field(reason: str) -> str:
    match = re.search(r"field '([^']+)'", reason)
    return match.group(1) if match else "record"


# --------------------------------------------------------------------------------------------
# Public loading API


def load_records(path: str | Path, fmt: str = "auto", strict: bool = False) -> list[Record]:
    """Every record of a data file, in file order, one :class:`Record` per source record.

    ``fmt`` is ``auto`` (decided by the keys of the records), ``alpaca`` or ``chat``; a file
    written by ``prepare-data`` is recognised by its keys whatever ``fmt`` says. With ``strict``,
    the first unusable record raises :class:`DataError` instead of being kept as invalid.
    """
    if fmt not in FORMATS:
        raise DataError(f"data format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    path = Path(path)

    values = _parse(_decode(read_bytes(path), path), path)

    detected = _detect_format(values)
    if detected == "prepared":
        records = [_prepared_record(v, path, n) for n, v in enumerate(values)]
    else:
        shape = detected if fmt == "auto" else fmt
        build = _chat_record if shape == "chat" else _alpaca_record
        records = [
            build(n, v) if isinstance(v, dict) else _not_an_object(n, v)
            for n, v in enumerate(values)
        ]

    if strict:
        for record in records:
            if not record.ok:
                raise DataError(
                    f"{path}: record {record.index}, field '{_reason_field(record.reason)}': "
                    f"{record.reason}"
                )

    _log_duplicates(path, find_duplicates(records))
    return records


def _log_duplicates(path: Path, duplicates: dict[str, list[int]], shown: int = 10) -> None:
    if not duplicates:
        return
    listed = dict(list(duplicates.items())[:shown])
    more = f" and {len(duplicates) - shown} more ids" if len(duplicates) > shown else ""
    log.warning(
        "%s holds %d repeated records (sample_id: indices): %s%s",
        path,
        sum(len(v) - 1 for v in duplicates.values()),
        listed,
        more,
    )


def find_duplicates(records: list[Record]) -> dict[str, list[int]]:
    """{sample_id: indices} for every id that occurs more than once."""
    seen: dict[str, list[int]] = {}
    for record in records:
        seen.setdefault(record.sample_id, []).append(record.index)
    return {ident: indices for ident, indices in seen.items() if len(indices) > 1}


def dedupe(records: list[Record]) -> list[Record]:
    """The first occurrence of each sample_id, in order."""
    seen: set[str] = set()
    kept = []
    for record in records:
        if record.sample_id not in seen:
            seen.add(record.sample_id)
            kept.append(record)
    return kept


def select_records(
    records: list[Record], offset: int = 0, limit: int | None = None
) -> list[Record]:
    """``limit`` records from position ``offset`` on (all of the rest when ``limit`` is None)."""
    if offset < 0:
        raise ValueError(f"data.offset must be >= 0, not {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"data.limit must be >= 0 or null, not {limit}")
    end = None if limit is None else offset + limit
    return records[offset:end]


def status_counts(records: list[Record]) -> dict[str, int]:
    return dict(sorted(Counter(r.status for r in records).items()))


# --------------------------------------------------------------------------------------------
# The prepare-data step


def record_row(record: Record) -> dict[str, Any]:
    """A record as one line of a prepared file."""
    return {
        "record_index": record.index,
        "sample_id": record.sample_id,
        "status": record.status,
        "reason": record.reason,
        "instruction": record.instruction,
        "input": record.input,
        "output": record.output,
        "messages": list(record.messages) if record.messages is not None else None,
        "extra": record.extra,
    }


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def meta_path(prepared: str | Path) -> Path:
    prepared = Path(prepared)
    return prepared.with_name(prepared.name.removesuffix(".jsonl") + ".meta.json")


def prepare_file(
    source: str | Path,
    out: str | Path,
    fmt: str = "auto",
    strict: bool = False,
    deduplicate: bool = False,
) -> dict[str, Any]:
    """Verify, load and write one data file as prepared JSON Lines; returns its metadata."""
    started = time.perf_counter()
    source, out = Path(source), Path(out)

    verified = verify_checksum(source)
    records = load_records(source, fmt=fmt, strict=strict)
    duplicates = find_duplicates(records)
    kept = dedupe(records) if deduplicate else records

    lines = (json.dumps(record_row(r), ensure_ascii=False) + "\n" for r in kept)
    _write_atomic(out, "".join(lines))

    meta = {
        "source": str(source),
        "source_sha256": verified or sha256_bytes(read_bytes(source)),
        "checksum_verified": verified is not None,
        "n_records": len(records),
        "n_written": len(kept),
        "counts": status_counts(kept),
        "duplicates": duplicates,
        "deduplicated": deduplicate,
        "prepared_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_atomic(meta_path(out), json.dumps(meta, indent=2) + "\n")

    log.info(
        "prepared %s -> %s: %d records, %d written, %s, %d repeated ids (%.2f s)",
        source,
        out,
        len(records),
        len(kept),
        meta["counts"],
        len(duplicates),
        time.perf_counter() - started,
    )
    return meta


def _selected_files(cfg: DictConfig) -> dict[str, str]:
    """{file slug: path} of what this run prepares: one file, or the whole dataset."""
    if cfg.data.path:
        stem = Path(cfg.data.path).name.split(".")[0]
        return {re.sub(r"[^A-Za-z0-9_-]", "_", stem): cfg.data.path}
    files = {key: entry.path for key, entry in cfg.dataset.files.items()}
    if cfg.data.file:
        if cfg.data.file not in files:
            raise DataError(
                f"data.file={cfg.data.file!r} is not a file of dataset {cfg.dataset.name!r}; "
                f"valid files: {', '.join(files)}"
            )
        return {cfg.data.file: files[cfg.data.file]}
    return files


def prepare_data_command(cfg: DictConfig, root: str | Path = "resources/data") -> int:
    """``gradspec prepare-data``: each selected file to ``<root>/<dataset>/<file>.jsonl``."""
    fmt = cfg.data.format if cfg.data.format != "auto" else cfg.dataset.format
    for key, relpath in _selected_files(cfg).items():
        source = resolve_data_path(cfg.data_dir, relpath)
        out = paths.prepared_data(cfg.dataset.name, key, root)
        prepare_file(source, out, fmt=fmt, strict=cfg.data.strict, deduplicate=cfg.data.dedupe)
    return 0
