"""Extraction: records in, one Parquet file of per-sample gradient spectra out.

The selected records are cut into shards of ``extract.shard_size``; each shard is written to a
temporary file and renamed when complete, into ``<output>.parts/``. A rerun of the same command
skips finished shards, so a killed run resumes where it stopped; the parts are merged into the
output at the end. Every record ends in exactly one status, ``ok`` or a named reason, and every
status is a row of the output: nothing is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gradspec import data, models, paths, prompts
from gradspec.capture import SpectralCapture, run_batch
from gradspec.config import MODULES, config_hash
from gradspec.spectra import METRICS

log = logging.getLogger(__name__)

STATUSES = (
    "ok",
    "empty_response",
    "response_truncated",
    "nonfinite_loss",
    "nonfinite_gradient",
    "out_of_memory",
    "invalid_record",
)

SCHEMA = pa.schema(
    [
        ("record_index", pa.int64()),
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("file", pa.string()),
        ("layer", pa.int64()),
        ("module", pa.string()),
        *[(name, pa.float64()) for name in METRICS],
        ("loss", pa.float64()),
        ("n_prompt_tokens", pa.int64()),
        ("n_response_tokens", pa.int64()),
        ("n_response_tokens_full", pa.int64()),
        ("n_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)


class ExtractionError(RuntimeError):
    """A status that the config makes fatal, or an input that cannot be used at all."""


class OutOfTokenBudget(RuntimeError):
    """A batch above ``extract.token_budget``: treated as out of memory."""


@dataclass
class Sample:
    """One record on its way through extraction."""

    record: data.Record
    encoded: prompts.Encoded | None
    status: str
    reason: str
    loss: float = float("nan")
    metrics: dict[tuple[int, str], tuple[float, ...]] | None = None


def resolve_input(cfg: DictConfig) -> tuple[Path, str, str]:
    """The file to read and the (dataset, file) labels of its rows."""
    if cfg.data.path:
        path = Path(cfg.data.path)
        file = cfg.data.file or path.name.split(".")[0]
        dataset = cfg.dataset.name if cfg.data.file else "custom"
        return path, dataset, file
    if not cfg.data.file:
        raise ExtractionError("set data.path=FILE, or data.file=KEY of the selected dataset")
    if cfg.data.file not in cfg.dataset.files:
        valid = ", ".join(cfg.dataset.files)
        raise ExtractionError(
            f"dataset {cfg.dataset.name!r} has no file {cfg.data.file!r}; valid: {valid}"
        )
    entry = cfg.dataset.files[cfg.data.file]
    return data.resolve_data_path(cfg.data_dir, entry.path), cfg.dataset.name, cfg.data.file


def default_output(cfg: DictConfig, dataset: str, file: str) -> Path:
    return paths.spectra(cfg.results_dir, cfg.experiment.name, cfg.model.name, dataset, file)


def template_of(cfg: DictConfig) -> str:
    template = cfg.prompt.template or cfg.model.template
    if template not in ("base", "chat"):
        raise ExtractionError(f"prompt.template must be 'base' or 'chat', not {template!r}")
    return template


def _check_before_work(cfg: DictConfig, tokenizer, model_dir: Path, template: str) -> None:
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ExtractionError(
            f"prompt.template=chat, but the tokenizer in {str(model_dir)!r} has no chat template; "
            "use prompt.template=base"
        )
    if cfg.prompt.loss_reduction not in ("mean", "sum"):
        raise ExtractionError(
            f"prompt.loss_reduction must be 'mean' or 'sum', not {cfg.prompt.loss_reduction!r}"
        )
    unknown = set(cfg.extract.fatal_statuses) - set(STATUSES)
    if unknown:
        raise ExtractionError(
            f"extract.fatal_statuses: unknown {sorted(unknown)}; valid: {', '.join(STATUSES)}"
        )


def _encode(cfg: DictConfig, records: list[data.Record], tokenizer, template: str) -> list[Sample]:
    samples = []
    for record in records:
        if record.status != "ok":
            samples.append(Sample(record, None, record.status, record.reason))
            continue
        encoded = prompts.encode_record(
            record,
            tokenizer,
            template=template,
            system_prompt=cfg.prompt.system_prompt,
            max_length=cfg.prompt.max_length,
            append_eos=cfg.prompt.append_eos,
        )
        samples.append(Sample(record, encoded, encoded.status, encoded.reason))
    return samples


def _is_out_of_memory(error: RuntimeError) -> bool:
    if isinstance(error, OutOfTokenBudget | torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return "out of memory" in text or "can't allocate memory" in text


class BatchRunner:
    """Runs samples in batches; halves a batch that runs out of memory, down to one sample."""

    def __init__(
        self, capture: SpectralCapture, device: torch.device, cfg: DictConfig, pad_id: int
    ):
        self.capture = capture
        self.device = device
        self.batch_size = cfg.extract.batch_size
        self.token_budget = cfg.extract.token_budget
        self.reduction = cfg.prompt.loss_reduction
        self.pad_id = pad_id

    def run(self, samples: list[Sample], progress: tqdm) -> None:
        # Similar lengths together waste less on padding; results do not depend on the batch.
        order = sorted(samples, key=lambda s: len(s.encoded.input_ids))
        for start in range(0, len(order), self.batch_size):
            self._attempt(order[start : start + self.batch_size], progress)

    def _attempt(self, batch: list[Sample], progress: tqdm) -> None:
        try:
            self._run(batch)
        except RuntimeError as error:
            if not _is_out_of_memory(error):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                batch[0].status, batch[0].reason = "out_of_memory", str(error).splitlines()[0][:200]
                log.warning("record %d: out of memory at batch size 1", batch[0].record.index)
                progress.update(1)
                return
            log.info("out of memory with %d samples: retrying as two halves", len(batch))
            half = len(batch) // 2
            self._attempt(batch[:half], progress)
            self._attempt(batch[half:], progress)
            return
        progress.update(len(batch))

    def _run(self, batch: list[Sample]) -> None:
        lengths = [len(s.encoded.input_ids) for s in batch]
        if self.token_budget and len(batch) * max(lengths) > self.token_budget:
            raise OutOfTokenBudget(
                f"{len(batch)} × {max(lengths)} tokens > token_budget {self.token_budget}"
            )
        ids = torch.full((len(batch), max(lengths)), self.pad_id, dtype=torch.long)
        for row, sample in enumerate(batch):
            ids[row, : lengths[row]] = torch.tensor(sample.encoded.input_ids)
        prompt_lengths = [s.encoded.n_prompt_tokens for s in batch]

        result = run_batch(
            self.capture, ids.to(self.device), prompt_lengths, lengths, self.reduction
        )

        for row, sample in enumerate(batch):
            sample.loss = result.losses[row]
            if row in result.nonfinite_loss:
                sample.status, sample.reason = "nonfinite_loss", result.nonfinite_loss[row]
            elif row in result.nonfinite_gradient:
                sample.status, sample.reason = "nonfinite_gradient", result.nonfinite_gradient[row]
            else:
                sample.metrics = {
                    (layer, module): values
                    for (b, layer, module), values in result.metrics.items()
                    if b == row
                }


def _rows(
    samples: list[Sample], dataset: str, file: str, modules: list[str], layers: int
) -> pa.Table:
    columns: dict[str, list] = {field.name: [] for field in SCHEMA}
    for sample in samples:
        encoded = sample.encoded
        per_sample = {
            "record_index": sample.record.index,
            "sample_id": sample.record.sample_id,
            "dataset": dataset,
            "file": file,
            "loss": sample.loss,
            "n_prompt_tokens": encoded.n_prompt_tokens if encoded else 0,
            "n_response_tokens": encoded.n_response_tokens if encoded else 0,
            "n_response_tokens_full": encoded.n_response_tokens_full if encoded else 0,
            "n_tokens": len(encoded.input_ids) if encoded else 0,
            "truncated": bool(encoded.truncated) if encoded else False,
            "status": sample.status,
            "reason": sample.reason,
        }
        cells = (
            [
                ((layer, module), sample.metrics[(layer, module)])
                for layer in range(layers)
                for module in modules
            ]
            if sample.status == "ok"
            else [((None, None), (float("nan"),) * len(METRICS))]
        )
        for (layer, module), values in cells:
            for key, value in per_sample.items():
                columns[key].append(value)
            columns["layer"].append(layer)
            columns["module"].append(module)
            for name, value in zip(METRICS, values, strict=True):
                columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _parts_dir(output: Path, digest: str) -> Path:
    """Finished shards of a run with this config; shards of another config are discarded."""
    parts = output.with_name(output.name + ".parts")
    stamp = parts / "config_hash"
    if parts.exists() and (not stamp.exists() or stamp.read_text().strip() != digest):
        log.info("discarding shards of another config in %s", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")
    return parts


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("gradspec", "torch", "transformers", "numpy", "pandas", "pyarrow")
    return {"python": sys.version.split()[0], "platform": platform.platform()} | {
        n: version(n) for n in names
    }


def extract_spectra(cfg: DictConfig, output: Path | None = None) -> Path:
    """Write the spectra Parquet for the selected input (see :func:`resolve_input`)."""
    started = time.perf_counter()
    path, dataset, file = resolve_input(cfg)
    paths.check_slug(dataset, "dataset")
    paths.check_slug(file, "file")
    output = Path(output or cfg.output or default_output(cfg, dataset, file))
    template = template_of(cfg)
    model_dir = models.resolve_model_dir(cfg)
    tokenizer = models.load_tokenizer(model_dir, cfg.model.trust_remote_code)
    _check_before_work(cfg, tokenizer, model_dir, template)
    if cfg.extract.threads:
        torch.set_num_threads(cfg.extract.threads)

    # Read and select
    records = data.load_records(path, fmt=cfg.data.format, strict=cfg.data.strict)
    duplicates = data.find_duplicates(records)
    if duplicates:
        extra = sum(len(v) - 1 for v in duplicates.values())
        action = "dropping" if cfg.data.dedupe else "keeping (data.dedupe=false)"
        log.info(
            "%s: %d duplicate records of %d ids, %s them", path, extra, len(duplicates), action
        )
        if cfg.data.dedupe:
            records = data.dedupe(records)
    records = data.select_records(records, cfg.data.offset, cfg.data.limit)
    samples = _encode(cfg, records, tokenizer, template)
    log.info("%s: %d records selected, template %s", path, len(samples), template)

    # Extract, one shard at a time
    digest = config_hash(cfg)
    parts = _parts_dir(output, digest)
    output.parent.mkdir(parents=True, exist_ok=True)
    modules = [m for m in MODULES if m in cfg.extract.modules]
    model = None
    size = cfg.extract.shard_size
    shards = [samples[i : i + size] for i in range(0, len(samples), size)] or [[]]
    todo = [i for i in range(len(shards)) if not (parts / f"shard-{i:05d}.parquet").exists()]
    log.info("%d shards of up to %d records, %d to compute", len(shards), size, len(todo))
    progress = tqdm(
        total=sum(len(shards[i]) for i in todo),
        unit="sample",
        desc=f"{dataset}/{file}",
        mininterval=1 if sys.stderr.isatty() else 30,
        file=sys.stderr,
    )
    capture = None
    for index in todo:
        shard = shards[index]
        runnable = [s for s in shard if s.status == "ok"]
        progress.update(len(shard) - len(runnable))
        if runnable and model is None:
            model, _ = models.load_model(
                model_dir, cfg.extract.device, cfg.extract.dtype, cfg.model.trust_remote_code
            )
            capture = SpectralCapture(model, modules).__enter__()
            pad = (
                tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id
            )
            runner = BatchRunner(capture, model.device, cfg, pad or 0)
        if runnable:
            runner.run(runnable, progress)
        _raise_if_fatal(cfg, shard, path)
        layers = capture.layers if capture else 0
        _write_atomic(
            _rows(shard, dataset, file, modules, layers), parts / f"shard-{index:05d}.parquet"
        )
    progress.close()
    if capture:
        capture.__exit__(None, None, None)

    # Merge, account, record provenance
    table = pa.concat_tables(
        [pq.read_table(parts / f"shard-{i:05d}.parquet") for i in range(len(shards))]
    )
    _write_atomic(table, output)
    counts = _status_counts(table)
    seconds = time.perf_counter() - started
    _write_meta(cfg, output, path, model_dir, counts, seconds, template)
    shutil.rmtree(parts)
    log.info("wrote %s: %d rows; statuses %s; %.1f s", output, table.num_rows, counts, seconds)
    return output


def _status_counts(table: pa.Table) -> dict[str, int]:
    frame = table.select(["record_index", "status"]).to_pandas().drop_duplicates("record_index")
    return dict(Counter(frame["status"]))


def _raise_if_fatal(cfg: DictConfig, shard: list[Sample], path: Path) -> None:
    for sample in shard:
        if sample.status in cfg.extract.fatal_statuses:
            raise ExtractionError(
                f"{path}: record {sample.record.index}: status {sample.status} ({sample.reason}) "
                "is fatal by extract.fatal_statuses"
            )


def _write_meta(
    cfg, output: Path, source: Path, model_dir: Path, counts, seconds, template
) -> None:
    provenance_file = model_dir / models.PROVENANCE
    meta = {
        "output": str(output),
        "input": str(source),
        "input_sha256": models.sha256_file(source),
        "model_dir": str(model_dir),
        "model_provenance": json.loads(provenance_file.read_text())
        if provenance_file.exists()
        else None,
        "template": template,
        "status_counts": counts,
        "seconds": round(seconds, 3),
        "versions": _versions(),
        "config_hash": config_hash(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = output.with_suffix(".meta.json")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def extract_command(cfg: DictConfig) -> int:
    extract_spectra(cfg)
    return 0


def read_spectra(path: str | Path) -> pd.DataFrame:
    """A spectra file as a DataFrame with nullable integer layers."""
    return pq.read_table(path).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
