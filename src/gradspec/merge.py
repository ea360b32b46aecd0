"""Merge the spectra of one file's record ranges (shards) into the file's spectra.

The workflow can cut a large file into record ranges so that several cluster jobs extract it at
once; each job writes ``<file>.shards/START-STOP.parquet`` with the record indices of the whole
file. This step chains the ranges from ``data.offset`` to ``data.offset + data.limit``, refuses
gaps and overlaps (which would silently drop or double samples), concatenates them in order and
writes the file's Parquet and a ``.meta.json`` that sums the shards' counts and seconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf

from gradspec.config import config_hash
from gradspec.extract import default_output, resolve_input

log = logging.getLogger(__name__)

RANGE = re.compile(r"^(\d+)-(\d+)\.parquet$")


def shards_dir(output: Path) -> Path:
    return output.with_suffix(".shards")


def shard_ranges(folder: Path) -> dict[tuple[int, int], Path]:
    """Every ``START-STOP.parquet`` in a shards folder, keyed by its record range."""
    found = {}
    for path in sorted(folder.glob("*.parquet")):
        match = RANGE.match(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    return found


def chain(ranges: dict[tuple[int, int], Path], start: int, stop: int | None) -> list[Path]:
    """The shards that tile [start, stop) end to end; an error on a gap or an ambiguous range.

    With ``stop`` None (no limit) the chain runs to the last range that continues it.
    """
    chosen, position = [], start
    while stop is None or position < stop:
        following = [key for key in ranges if key[0] == position]
        if not following:
            if stop is None and chosen:
                break
            raise FileNotFoundError(f"no shard starts at record {position} (have {sorted(ranges)})")
        if len(following) > 1:
            raise ValueError(f"several shards start at record {position}: {sorted(following)}")
        chosen.append(ranges[following[0]])
        position = following[0][1]
    if stop is not None and position != stop:
        raise ValueError(f"shards end at record {position}, not {stop}")
    return chosen


def merged_meta(metas: list[dict], output: Path, cfg: DictConfig) -> dict:
    """The first shard's meta with this file's output, config and the shards' summed counts."""
    counts: Counter = Counter()
    for meta in metas:
        counts.update(meta.get("status_counts") or {})
    merged = dict(metas[0]) if metas else {}
    merged.update(
        output=str(output),
        status_counts=dict(sorted(counts.items())),
        seconds=round(sum(float(meta.get("seconds") or 0) for meta in metas), 3),
        config_hash=config_hash(cfg),
        config=OmegaConf.to_container(cfg, resolve=True),
        shards=[
            {
                "output": meta.get("output"),
                "config_hash": meta.get("config_hash"),
                "status_counts": meta.get("status_counts"),
                "seconds": meta.get("seconds"),
            }
            for meta in metas
        ],
    )
    return merged


def _write_atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def merge_spectra(cfg: DictConfig, output: Path | None = None) -> Path:
    """Concatenate one file's shards, in record order, into its spectra and meta files."""
    started = time.perf_counter()
    _, dataset, file = resolve_input(cfg)
    output = Path(output or cfg.output or default_output(cfg, dataset, file))
    offset, limit = int(cfg.data.offset), cfg.data.limit
    stop = None if limit is None else offset + int(limit)
    parts = chain(shard_ranges(shards_dir(output)), offset, stop)
    tables = [pq.read_table(path) for path in parts]
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        raise FileNotFoundError(f"no shards for {output}")
    tmp = output.with_name(f".{output.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, output)
    metas = [json.loads(path.with_suffix(".meta.json").read_text()) for path in parts]
    meta = merged_meta(metas, output, cfg)
    _write_atomic_text(
        json.dumps(meta, indent=2, default=str) + "\n", output.with_suffix(".meta.json")
    )
    log.info(
        "merged %d shards -> %s: %d rows; statuses %s; %.2f s",
        len(parts),
        output,
        table.num_rows,
        meta["status_counts"],
        time.perf_counter() - started,
    )
    return output


def merge_command(cfg: DictConfig) -> int:
    merge_spectra(cfg)
    return 0
