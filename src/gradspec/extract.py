"""Extraction: records in, one Parquet file of per-sample gradient spectra out.

The selected records are cut into shards of ``extract.shard_size``; each shard is written to a
temporary file and renamed when complete, into ``<output>.parts/``. A rerun of the same command
skips finished shards, so a killed run resumes where it stopped; the parts are merged into the
output at the end. Every record ends in exactly one status, ``ok`` or a named reason, and every
status is a row of the output: nothing is dropped.

Everything that can be judged without the model (config values, names, the model folder, the
data file, the statuses known after tokenizing) is checked before the model is loaded, so a bad
input fails in seconds and leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gradspec import data, models, paths, prompts, tracking
from gradspec.capture import SpectralCapture, run_batch
from gradspec.config import MODULES, ConfigError, config_hash
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
# Paper 2's cosines, with extract.cosine=true: with the same projection in the next layer, and
# between k_proj and v_proj of one layer (on both rows). NaN where not computed.
COSINES = ("cosine_next_layer", "cosine_kv")
_COSINE_KEYS = {"cosine_next_layer": "next_layer", "cosine_kv": "kv"}

# Statuses known once a record is tokenized, before any gradient.
ENCODE_STATUSES = ("empty_response", "response_truncated", "invalid_record")

SCHEMA = pa.schema(
    [
        ("record_index", pa.int64()),
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("file", pa.string()),
        ("layer", pa.int64()),
        ("module", pa.string()),
        *[(name, pa.float64()) for name in METRICS],
        *[(name, pa.float64()) for name in COSINES],
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

# Config keys that change neither which rows a shard holds nor their values: a rerun that differs
# only in these still reuses finished shards.
_NOT_IN_SHARD_KEY = {
    "wandb": None,
    "output": None,
    "results_dir": None,
    "reduce": None,
    "bench": None,
    "experiment": None,
    "extract": ("threads", "gpus_per_job", "runtime_min", "fatal_statuses"),
}
# At most this many non-ok records are listed one per line in the log; the rest are counted.
_LISTED_PROBLEMS = 20


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
    cosines: dict[tuple[int, str], dict[str, float]] | None = None


# --------------------------------------------------------------------------------------------
# Checks that need no model


def resolve_input(cfg: DictConfig) -> tuple[Path, str, str]:
    """The file to read and the (dataset, file) labels of its rows."""
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not path.is_file():
            raise data.DataError(f"data.path {str(path)!r}: no such file")
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
    try:
        found = data.resolve_data_path(cfg.data_dir, entry.path)
    except FileNotFoundError as error:
        raise data.DataError(str(error)) from error
    return found, cfg.dataset.name, cfg.data.file


def default_output(cfg: DictConfig, dataset: str, file: str) -> Path:
    return paths.spectra(cfg.results_dir, cfg.experiment.name, cfg.model.name, dataset, file)


def template_of(cfg: DictConfig) -> str:
    """The template to use (see :func:`prompts.resolve_template`), a config error if unknown."""
    try:
        return prompts.resolve_template(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_config(cfg: DictConfig) -> None:
    """Every value extraction depends on, judged before any file is read or written."""
    extract, prompt = cfg.extract, cfg.prompt
    _require(extract.batch_size >= 1, f"extract.batch_size must be >= 1, not {extract.batch_size}")
    _require(extract.shard_size >= 1, f"extract.shard_size must be >= 1, not {extract.shard_size}")
    _require(
        extract.token_budget is None or extract.token_budget >= 1,
        f"extract.token_budget must be >= 1 or null, not {extract.token_budget}",
    )
    _require(prompt.max_length >= 1, f"prompt.max_length must be >= 1, not {prompt.max_length}")
    _require(cfg.data.offset >= 0, f"data.offset must be >= 0, not {cfg.data.offset}")
    _require(
        cfg.data.limit is None or cfg.data.limit >= 0,
        f"data.limit must be >= 0 or null, not {cfg.data.limit}",
    )
    _require(
        cfg.data.format in data.FORMATS,
        f"data.format must be one of {', '.join(data.FORMATS)}, not {cfg.data.format!r}",
    )
    _require(
        prompt.loss_reduction in ("mean", "sum"),
        f"prompt.loss_reduction must be 'mean' or 'sum', not {prompt.loss_reduction!r}",
    )
    unknown = set(extract.fatal_statuses) - set(STATUSES)
    _require(
        not unknown,
        f"extract.fatal_statuses: unknown {sorted(unknown)}; valid: {', '.join(STATUSES)}",
    )
    bad_modules = set(extract.modules) - set(MODULES)
    _require(
        bool(extract.modules) and not bad_modules,
        f"extract.modules: unknown {sorted(bad_modules)}; valid: {', '.join(MODULES)}",
    )
    _require(
        extract.dtype in models.DTYPES,
        f"extract.dtype must be one of {', '.join(models.DTYPES)}, not {extract.dtype!r}",
    )
    _check_device(extract.device)
    _require(
        cfg.wandb.mode in tracking.MODES,
        f"wandb.mode must be one of {', '.join(tracking.MODES)}, not {cfg.wandb.mode!r}",
    )
    template_of(cfg)


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"extract.device {name!r} is not a device ({error})") from error
    _require(
        device.type != "cuda" or torch.cuda.is_available(),
        f"extract.device={name} but no CUDA device is visible; use extract.device=cpu or auto",
    )


def check_names(cfg: DictConfig, dataset: str, file: str) -> None:
    """Names become folders under results/: one with '/' or '..' could write anywhere."""
    for value, key in (
        (cfg.experiment.name, "experiment.name"),
        (cfg.model.name, "model.name"),
        (dataset, "dataset.name"),
        (file, "data.file"),
    ):
        try:
            paths.check_slug(str(value), key)
        except ValueError as error:
            raise ConfigError(f"{error} (set {key}=NAME)") from error


def _check_tokenizer(tokenizer, model_dir: Path, template: str) -> None:
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ExtractionError(
            f"prompt.template=chat, but the tokenizer in {str(model_dir)!r} has no chat template; "
            "use prompt.template=base"
        )


# --------------------------------------------------------------------------------------------
# Reading and encoding


def _read(cfg: DictConfig, path: Path) -> tuple[list[data.Record], dict[str, list[int]]]:
    """The selected records and the repeated ids of the whole file (kept unless data.dedupe)."""
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
    return data.select_records(records, cfg.data.offset, cfg.data.limit), duplicates


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


def _raise_if_fatal(cfg: DictConfig, samples: list[Sample], path: Path) -> None:
    for sample in samples:
        if sample.status in cfg.extract.fatal_statuses:
            raise ExtractionError(
                f"{path}: record {sample.record.index}: status {sample.status} ({sample.reason}) "
                "is fatal by extract.fatal_statuses"
            )


# --------------------------------------------------------------------------------------------
# Gradients


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
                sample.cosines = {
                    (layer, module): values
                    for (b, layer, module), values in result.cosines.items()
                    if b == row
                }
                _flag_nonfinite_spectrum(sample)


def _flag_nonfinite_spectrum(sample: Sample) -> None:
    """A finite gradient can still overflow in its spectrum; such a sample is not ``ok``."""
    for (layer, module), values in sorted(sample.metrics.items()):
        if not all(math.isfinite(v) for v in values):
            sample.status = "nonfinite_gradient"
            sample.reason = f"non-finite spectrum at layer {layer} {module}"
            sample.metrics = None
            return


class _Engine:
    """The model, its hooks and a batch runner, loaded on first use and released on exit.

    A run whose every sample already has a status (or whose shards are all done) never loads
    the model.
    """

    def __init__(self, cfg: DictConfig, model_dir: Path, tokenizer, modules: list[str]):
        self.cfg, self.model_dir, self.tokenizer, self.modules = cfg, model_dir, tokenizer, modules
        self.stack = ExitStack()
        self.capture: SpectralCapture | None = None
        self.runner: BatchRunner | None = None

    def __enter__(self) -> _Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    @property
    def layers(self) -> int:
        return self.capture.layers if self.capture else 0

    def run(self, samples: list[Sample], progress: tqdm) -> None:
        if not samples:
            return
        if self.runner is None:
            self._load()
        self.runner.run(samples, progress)

    def _load(self) -> None:
        started = time.perf_counter()
        cfg = self.cfg
        model, _ = models.load_model(
            self.model_dir, cfg.extract.device, cfg.extract.dtype, cfg.model.trust_remote_code
        )
        capture = SpectralCapture(model, self.modules, cosine=cfg.extract.cosine)
        self.capture = self.stack.enter_context(capture)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.runner = BatchRunner(self.capture, model.device, cfg, pad or 0)
        log.info(
            "step load: %s on %s, %d layers, %d projections, %.1f s",
            self.model_dir,
            model.device,
            self.capture.layers,
            len(self.capture.targets),
            time.perf_counter() - started,
        )


# --------------------------------------------------------------------------------------------
# Shards and files


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
            pair = (sample.cosines or {}).get((layer, module), {})
            for name in COSINES:
                columns[name].append(pair.get(_COSINE_KEYS[name], float("nan")))
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _replace_durably(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk, then rename it over ``path``: readers see all of it or nothing."""
    try:
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = _tmp_name(path)
    try:
        pq.write_table(table, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace_durably(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(text, encoding="utf-8")
    _replace_durably(tmp, path)


def _remove_stale_tmp(folder: Path, stem: str) -> None:
    """Temporary files of a run that was killed before it could rename or remove them."""
    for stale in folder.glob(f".{stem}*.tmp-*"):
        log.info("removing %s, left by an interrupted run", stale)
        stale.unlink(missing_ok=True)


def shard_key(cfg: DictConfig, source: Path, model_dir: Path) -> str:
    """What finished shards depend on: the config's relevant part, the input's and the weights'
    bytes. A changed input file or re-prepared model therefore never reuses old shards."""
    relevant = OmegaConf.to_container(cfg, resolve=True)
    for key, keys in _NOT_IN_SHARD_KEY.items():
        if keys is None:
            relevant.pop(key, None)
        else:
            for name in keys:
                relevant[key].pop(name, None)
    weights = sorted(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors")
    )
    return config_hash(
        {
            "config": relevant,
            "input": models.sha256_file(source),
            "weights": weights,
        }
    )


def _parts_dir(output: Path, digest: str) -> Path:
    """Finished shards of a run with this config; shards of another config are discarded."""
    parts = output.with_name(output.name + ".parts")
    stamp = parts / "config_hash"
    if parts.exists() and (not stamp.exists() or stamp.read_text().strip() != digest):
        log.info("discarding shards of another config in %s", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(parts, "shard-")
    stamp.write_text(digest + "\n")
    return parts


def _shard_path(parts: Path, index: int) -> Path:
    return parts / f"shard-{index:05d}.parquet"


def _shard_done(path: Path, shard: list[Sample]) -> bool:
    """A finished shard holds exactly its samples' records; anything else is recomputed."""
    if not path.exists():
        return False
    try:
        indices = pq.read_table(path, columns=["record_index"]).column(0).to_pylist()
    except (OSError, pa.ArrowException) as error:
        log.warning("%s is unreadable (%s); recomputing it", path, error)
        return False
    if sorted(set(indices)) != sorted(s.record.index for s in shard):
        log.warning("%s holds other records than expected; recomputing it", path)
        return False
    return True


# --------------------------------------------------------------------------------------------
# The step


def extract_spectra(cfg: DictConfig, output: Path | None = None) -> Path:
    """Write the spectra Parquet for the selected input (see :func:`resolve_input`)."""
    started = time.perf_counter()

    # Check what needs no model: config, names, the model folder
    check_config(cfg)
    path, dataset, file = resolve_input(cfg)
    check_names(cfg, dataset, file)
    output = Path(output or cfg.output or default_output(cfg, dataset, file))
    template = template_of(cfg)
    model_dir = models.resolve_model_dir(cfg)
    if cfg.extract.threads:
        torch.set_num_threads(cfg.extract.threads)

    # Read and select
    step = time.perf_counter()
    records, duplicates = _read(cfg, path)
    invalid = sum(not r.ok for r in records)
    log.info(
        "step read: %s, %d records selected, %d invalid, %d repeated ids, %.2f s",
        path,
        len(records),
        invalid,
        len(duplicates),
        time.perf_counter() - step,
    )

    # Tokenize; statuses known now are final, and fatal ones stop the run here
    step = time.perf_counter()
    tokenizer = models.load_tokenizer(model_dir, cfg.model.trust_remote_code)
    _check_tokenizer(tokenizer, model_dir, template)
    samples = _encode(cfg, records, tokenizer, template)
    _raise_if_fatal(cfg, samples, path)
    log.info(
        "step encode: template %s, %d records, statuses %s, %d truncated, %.2f s",
        template,
        len(samples),
        dict(Counter(s.status for s in samples)),
        sum(bool(s.encoded and s.encoded.truncated) for s in samples),
        time.perf_counter() - step,
    )

    # Extract, one shard at a time
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(output.parent, output.name)
    parts = _parts_dir(output, shard_key(cfg, path, model_dir))
    size = cfg.extract.shard_size
    shards = [samples[i : i + size] for i in range(0, len(samples), size)] or [[]]
    modules = [m for m in MODULES if m in cfg.extract.modules]
    engine = _Engine(cfg, model_dir, tokenizer, modules)
    skipped = _compute_shards(cfg, shards, parts, engine, path, (dataset, file))

    # Merge, account, record provenance
    table = pa.concat_tables([pq.read_table(_shard_path(parts, i)) for i in range(len(shards))])
    _check_complete(table, samples, output)
    _write_atomic(table, output)
    counts = _status_counts(table)
    seconds = time.perf_counter() - started
    shard_info = {"total": len(shards), "skipped": skipped, "size": size}
    extra = {"duplicates": _bounded(duplicates), "shards": shard_info}
    _write_meta(cfg, output, path, model_dir, counts, seconds, template, extra)
    shutil.rmtree(parts)
    _log_problems(table)
    log.info(
        "step merge: wrote %s: %d rows, %d records, statuses %s, %d of %d shards reused; %.1f s",
        output,
        table.num_rows,
        len(samples),
        counts,
        skipped,
        len(shards),
        seconds,
    )

    _track(cfg, output, table, counts, dataset, file)
    return output


def _compute_shards(cfg, shards, parts, engine, source: Path, labels) -> int:
    """Compute and write every shard not yet on disk; returns how many were already done."""
    todo = [i for i, shard in enumerate(shards) if not _shard_done(_shard_path(parts, i), shard)]
    skipped = len(shards) - len(todo)
    log.info(
        "%d shards of up to %d records: %d already done (skipped), %d to compute",
        len(shards),
        cfg.extract.shard_size,
        skipped,
        len(todo),
    )
    progress = tqdm(
        total=sum(len(shards[i]) for i in todo),
        unit="sample",
        desc="/".join(labels),
        mininterval=1 if sys.stderr.isatty() else 30,
        file=sys.stderr,
    )
    with engine, progress:
        for done, index in enumerate(todo, start=1):
            step = time.perf_counter()
            shard = shards[index]
            runnable = [s for s in shard if s.status == "ok"]
            progress.update(len(shard) - len(runnable))

            engine.run(runnable, progress)

            _raise_if_fatal(cfg, shard, source)
            table = _rows(shard, *labels, engine.modules, engine.layers)
            _write_atomic(table, _shard_path(parts, index))
            log.info(
                "step shard %d (%d/%d): %d records, statuses %s, %.2f s",
                index,
                done,
                len(todo),
                len(shard),
                dict(Counter(s.status for s in shard)),
                time.perf_counter() - step,
            )
    return skipped


def _check_complete(table: pa.Table, samples: list[Sample], output: Path) -> None:
    """Every selected record exactly once: a guard against a shard of another selection."""
    found = Counter(table.select(["record_index"]).to_pandas().drop_duplicates()["record_index"])
    expected = Counter(s.record.index for s in samples)
    if found != expected:
        missing = sorted(set(expected) - set(found))[:10]
        unexpected = sorted(set(found) - set(expected))[:10]
        raise ExtractionError(
            f"{output}: shards do not hold the selected records (missing {missing}, "
            f"unexpected {unexpected}); delete {output.name}.parts and rerun"
        )


def _status_counts(table: pa.Table) -> dict[str, int]:
    frame = table.select(["record_index", "status"]).to_pandas().drop_duplicates("record_index")
    return dict(sorted(Counter(frame["status"]).items()))


def _log_problems(table: pa.Table) -> None:
    """One warning line per record that did not end ``ok``, so none goes unnoticed."""
    frame = table.select(["record_index", "status", "reason"]).to_pandas()
    problems = frame[frame["status"] != "ok"].drop_duplicates("record_index")
    for row in problems.head(_LISTED_PROBLEMS).itertuples():
        log.warning("record %d: %s (%s)", row.record_index, row.status, row.reason)
    if len(problems) > _LISTED_PROBLEMS:
        log.warning("... and %d more records not ok", len(problems) - _LISTED_PROBLEMS)


def _bounded(duplicates: dict[str, list[int]], shown: int = 100) -> dict[str, object]:
    listed = dict(list(duplicates.items())[:shown])
    return {"n_ids": len(duplicates), "ids": listed, "listed": len(listed)}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("gradspec", "torch", "transformers", "numpy", "pandas", "pyarrow")
    return {"python": sys.version.split()[0], "platform": platform.platform()} | {
        n: version(n) for n in names
    }


def _write_meta(
    cfg, output: Path, source: Path, model_dir: Path, counts, seconds, template, extra
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
        **extra,
        "seconds": round(seconds, 3),
        "versions": _versions(),
        "config_hash": config_hash(cfg),
        "config": tracking.run_config(cfg),
    }
    _write_text_atomic(json.dumps(meta, indent=2, default=str) + "\n", meta_path(output))


def meta_path(output: Path) -> Path:
    return output.with_suffix(".meta.json")


# --------------------------------------------------------------------------------------------
# Tracking


def layer_means(table: pa.Table) -> pd.DataFrame:
    """Per module and layer, the mean of each metric over the ok samples: what W&B gets."""
    frame = table.to_pandas()
    frame = frame[frame["status"] == "ok"]
    return frame.groupby(["module", "layer"], as_index=False)[list(METRICS)].mean()


def _track(cfg, output: Path, table: pa.Table, counts, dataset: str, file: str) -> None:
    """Config, status counts, per-layer curves and a reference to the output, in one W&B run.

    Tracking records a finished extraction; a failure here is logged, never raised.
    """
    if cfg.wandb.mode == "disabled":
        return
    name = f"{cfg.model.name}/{dataset}/{file}"
    try:
        with tracking.start_run(cfg, "extract", name=name, group=cfg.experiment.name) as run:
            if run is None:
                return
            run.summary.update({f"status/{k}": v for k, v in counts.items()})
            curves = layer_means(table)
            for metric in METRICS:
                tracking.log_curves(run, curves, value=metric, key=f"curves/{metric}")
            artifact = f"spectra-{cfg.model.name}-{dataset}-{file}"
            tracking.log_artifact_reference(run, artifact, output)
    except Exception as error:  # the spectra are written; tracking must not undo that
        log.warning("W&B logging of %s failed (%s: %s)", output, type(error).__name__, error)


def extract_command(cfg: DictConfig) -> int:
    extract_spectra(cfg)
    return 0


def read_spectra(path: str | Path) -> pd.DataFrame:
    """A spectra file as a DataFrame with nullable integer layers."""
    return pq.read_table(path).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
