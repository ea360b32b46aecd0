"""Import the papers' own per-sample statistics into the spectra schema.

The papers' public gradient code writes one JSON object per sample (JSONL): the sample's
``loss`` and, for every weight matrix, an object keyed by the parameter name (e.g.
``model.layers.0.self_attn.q_proj.weight``) holding the singular-value sum ``S_sum``, largest
``S_max`` and smallest ``S_min``, the Frobenius norm ``frobenius_norm`` and the entry mean, max
and min ``M_mean``, ``M_max``, ``M_min``. Here each (sample, layer, projection) becomes one row
of the extraction schema (:data:`gradspec.extract.SCHEMA`), so that ``gradspec reduce``, the
tables and the figures read them like gradspec's own spectra:

- ``nuclear_norm = S_sum`` (the nuclear norm is the sum of the singular values);
- ``spectral_norm = S_max``;
- ``spectral_ratio = S_max / S_sum`` (paper 1's largest-over-sum ratio);
- ``frobenius_norm`` as given;
- ``stable_rank = frobenius_norm² / S_max²`` (the stable rank ‖G‖_F² / ‖G‖_2²);
- ``effective_rank`` NaN: it needs every singular value, and only their sum and extremes are
  stored.

Token counts are not in the format and are left missing; a sample's status is ``ok``.

    gradspec import-reference data.path=stats.jsonl dataset=cot_500 data.file=gsm8k_detailed \
        model=smollm2_135m_instruct experiment=quickstart [output=...]

writes ``results/<experiment>/<model>/spectra/<dataset>/<file>.parquet`` unless ``output`` is
given.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from gradspec import data, paths
from gradspec.config import MODULES
from gradspec.extract import SCHEMA

log = logging.getLogger(__name__)

PARAMETER = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.weight$")
STATISTICS = ("S_sum", "S_max", "S_min", "frobenius_norm", "M_mean", "M_max", "M_min")


class ReferenceError(ValueError):
    """A reference file that cannot be read as the papers' per-sample statistics."""


def parse_parameter(name: str) -> tuple[int, str] | None:
    """``(layer, module)`` of a projection's weight name; None for any other parameter."""
    match = PARAMETER.search(name)
    if match is None or match.group(2) not in MODULES:
        return None
    return int(match.group(1)), match.group(2)


def metrics_from_reference(stats: dict[str, float]) -> dict[str, float]:
    """The spectra metrics derivable from one matrix's stored statistics (see module docstring)."""
    total, largest = float(stats["S_sum"]), float(stats["S_max"])
    frobenius = float(stats["frobenius_norm"])
    ratio = largest / total if total > 0 else math.nan
    stable = frobenius**2 / largest**2 if largest > 0 else math.nan
    return {
        "nuclear_norm": total,
        "spectral_norm": largest,
        "spectral_ratio": ratio,
        "frobenius_norm": frobenius,
        "effective_rank": math.nan,
        "stable_rank": stable,
    }


def sample_identity(record: dict) -> str:
    """gradspec's content id of the record's text, so imported rows match extracted ones."""
    fields = {
        key: record[key]
        for key in ("instruction", "input", "output")
        if isinstance(record.get(key), str)
    }
    fields.setdefault("input", "")
    return data.sample_id(fields)


def record_rows(index: int, record: dict, dataset: str, file: str) -> list[dict]:
    """One row per projection weight of one sample, in layer then module order."""
    matrices = []
    for name, value in record.items():
        parsed = parse_parameter(name)
        if parsed is None or not isinstance(value, dict):
            continue
        missing = [key for key in ("S_sum", "S_max", "frobenius_norm") if key not in value]
        if missing:
            raise ReferenceError(f"record {index}: {name} lacks {', '.join(missing)}")
        matrices.append((parsed, value))
    if not matrices:
        raise ReferenceError(f"record {index}: no projection weight statistics")
    matrices.sort(key=lambda item: (item[0][0], MODULES.index(item[0][1])))

    base = {
        "record_index": index,
        "sample_id": sample_identity(record),
        "dataset": dataset,
        "file": file,
        "loss": float(record.get("loss", math.nan)),
        "n_prompt_tokens": None,
        "n_response_tokens": None,
        "n_response_tokens_full": None,
        "n_tokens": None,
        "truncated": False,
        "status": "ok",
        "reason": "",
    }
    return [
        {**base, "layer": layer, "module": module, **metrics_from_reference(value)}
        for (layer, module), value in matrices
    ]


def read_reference(path: str | Path, dataset: str = "reference", file: str | None = None):
    """A reference JSONL file as a spectra-schema :class:`pandas.DataFrame`."""
    path = Path(path)
    file = file or path.name.split(".")[0]
    rows: list[dict] = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(line for line in handle if line.strip()):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ReferenceError(f"{path}: line {index + 1} is not JSON: {error}") from error
            rows += record_rows(index, record, dataset, file)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    log.info("%s: %d samples, %d rows", path, len({r["record_index"] for r in rows}), len(rows))
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def write_spectra(frame: pd.DataFrame, output: Path) -> Path:
    """Write ``frame`` as a spectra Parquet file (atomically, as extraction does)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)
    tmp = output.with_name(f".{output.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, output)
    return output


def import_command(cfg: DictConfig) -> int:
    """Convert ``data.path`` (the papers' JSONL) to the experiment's spectra file for the model."""
    started = time.perf_counter()
    if not cfg.data.path:
        raise ReferenceError("set data.path=FILE.jsonl, the papers' per-sample statistics")
    file = cfg.data.file or Path(cfg.data.path).name.split(".")[0]
    dataset = cfg.dataset.name if cfg.data.file else "reference"
    frame = read_reference(cfg.data.path, paths.check_slug(dataset, "dataset"), file)
    output = Path(
        cfg.output
        or paths.spectra(cfg.results_dir, cfg.experiment.name, cfg.model.name, dataset, file)
    )
    write_spectra(frame, output)
    log.info("wrote %s (%.2fs)", output, time.perf_counter() - started)
    return 0
