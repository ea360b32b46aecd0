"""Benchmark: the papers' method against the engine, on the same samples, in one run.

Four methods per sample, each timed after a warm-up:

- ``papers_svd``: batch of one, projection weights requiring grad, Hugging Face's loss, then
  ``torch.linalg.svd`` (with U and V, its defaults) of every projection's gradient;
- ``papers_svdvals``: the same with ``torch.linalg.svdvals``;
- ``bare``: the same forward and backward without any spectra (the training-step floor);
- ``engine``: gradspec's capture (frozen weights, spectra from factors inside backward).

Then the scaling of ``bare`` and ``engine`` with the token count and with the hidden size, on
models built from the analysis model's config with random weights. Speed is reported as ratios
measured in this one run; nothing here is a pass/fail test.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import platform
import resource
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from gradspec import data, models, prompts
from gradspec.capture import SpectralCapture, find_projections, run_batch

log = logging.getLogger(__name__)


@dataclass
class Timing:
    method: str
    kind: str
    samples: int
    tokens: float
    seconds: float
    peak_mb: float

    @property
    def per_sample(self) -> float:
        return self.seconds / self.samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def papers_method(model, ids: list[int], n_prompt: int, spectra: str | None) -> None:
    """One sample as the papers' code runs it; ``spectra`` is 'svd', 'svdvals' or None (bare)."""
    targets = find_projections(model)
    for _, module in targets:
        module.weight.requires_grad_(True)
    device = model.device
    input_ids = torch.tensor([ids], device=device)
    labels = input_ids.clone()
    labels[0, :n_prompt] = -100
    with torch.enable_grad():
        model(input_ids=input_ids, labels=labels).loss.backward()

    for _, module in targets:
        grad = module.weight.grad
        if spectra == "svd":
            torch.linalg.svd(grad)
        elif spectra == "svdvals":
            torch.linalg.svdvals(grad)
        module.weight.grad = None
        module.weight.requires_grad_(False)
    _sync(device)


def engine_method(capture: SpectralCapture, batch: list[tuple[list[int], int]]) -> None:
    device = capture.model.device
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
    for row, (ids, _) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, device=device)
    run_batch(capture, input_ids, [p for _, p in batch], [len(ids) for ids, _ in batch])
    _sync(device)


def _time(method: str, kind: str, samples, run, device) -> Timing:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids, _ in samples) / len(samples)
    log.info(
        "%s, %d %s samples: %.2f s per sample", method, len(samples), kind, seconds / len(samples)
    )
    return Timing(method, kind, len(samples), tokens, seconds, float("nan"))


def _peak_mb(device: torch.device) -> float:
    """This process's peak memory: CUDA's allocator counter, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _gsm8k_samples(cfg: DictConfig, tokenizer, kind: str) -> list[tuple[list[int], int]]:
    entry = cfg.dataset.files[f"gsm8k_{kind}"]
    records = data.load_records(data.resolve_data_path(cfg.data_dir, entry.path))
    template = prompts.resolve_template(cfg)
    samples = []
    for record in records[: cfg.bench.samples]:
        encoded = prompts.encode_record(
            record, tokenizer, template, cfg.prompt.system_prompt, cfg.prompt.max_length
        )
        samples.append((encoded.input_ids, encoded.n_prompt_tokens))
    return samples


def _method_runner(method: str, model, capture: SpectralCapture, batch_size: int):
    if method == "engine":

        def run(samples):
            for i in range(0, len(samples), batch_size):
                engine_method(capture, samples[i : i + batch_size])

        return run
    spectra = {"papers_svd": "svd", "papers_svdvals": "svdvals", "bare": None}[method]

    def run(samples):
        for ids, n_prompt in samples:
            papers_method(model, ids, n_prompt, spectra)

    return run


def _measure_method(cfg_yaml: str, method: str, samples_by_kind: dict) -> list[Timing]:
    """One method in a process of its own, so that its peak memory is its own."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg_yaml)
    if cfg.extract.threads:
        torch.set_num_threads(cfg.extract.threads)
    model = load_bench_model(cfg)
    device = model.device
    timings = []
    with SpectralCapture(model) as capture:
        run = _method_runner(method, model, capture, cfg.extract.batch_size)
        run(next(iter(samples_by_kind.values()))[:1])  # warm-up
        for kind, samples in samples_by_kind.items():
            timings.append(
                _time(method, kind, samples, lambda s=samples: (run(s), _sync(device)), device)
            )
    for timing in timings:
        timing.peak_mb = _peak_mb(device)
    return timings


def compare_methods(cfg: DictConfig, samples_by_kind: dict) -> list[Timing]:
    """Every method on the same samples, each in a fresh process; the engine in batches."""
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    context = multiprocessing.get_context("spawn")
    timings = []
    for method in cfg.bench.methods:
        with context.Pool(1) as pool:
            timings += pool.apply(_measure_method, (cfg_yaml, method, samples_by_kind))
    order = {kind: i for i, kind in enumerate(samples_by_kind)}
    return sorted(timings, key=lambda t: order[t.kind])


def _random_samples(length: int, vocab: int, count: int = 1, prompt: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (length,), generator=generator).tolist(), prompt)
        for _ in range(count)
    ]


def _scaled_model(base_config, hidden: int, layers: int, dtype, device):
    """A random-weight model of the analysis model's family with another hidden size."""
    from transformers import AutoModelForCausalLM

    config = base_config.__class__.from_dict(base_config.to_dict())
    ratio = base_config.intermediate_size / base_config.hidden_size
    head_dim = getattr(base_config, "head_dim", None) or 64
    heads = max(1, hidden // head_dim)
    group = base_config.num_attention_heads // base_config.num_key_value_heads
    config.hidden_size = hidden
    config.intermediate_size = int(round(ratio * hidden / 64)) * 64
    config.num_hidden_layers = layers
    config.num_attention_heads = heads
    # Keep about the base model's grouping of query heads per key-value head, as a divisor.
    kv_heads = max(1, heads // group)
    while heads % kv_heads:
        kv_heads -= 1
    config.num_key_value_heads = kv_heads
    config.head_dim = head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def _bare_and_engine(model, samples, label: str) -> tuple[Timing, Timing]:
    """One sample's bare pass (no hooks installed) and the engine, each after a warm-up."""
    device = model.device

    def bare_run():
        papers_method(model, *samples[0], None)

    bare_run()
    bare = _time("bare", label, samples, bare_run, device)
    with SpectralCapture(model) as capture:
        engine_method(capture, samples)
        engine = _time("engine", label, samples, lambda: engine_method(capture, samples), device)
    return bare, engine


def scaling(cfg: DictConfig, model) -> list[dict]:
    """Bare pass and engine per sample against the token count, then against the hidden size."""
    rows = []
    vocab = model.config.vocab_size
    for length in cfg.bench.lengths:
        bare, engine = _bare_and_engine(model, _random_samples(length, vocab), f"T={length}")
        rows.append({"axis": "tokens", "value": length, "bare": bare, "engine": engine})

    for hidden in cfg.bench.hidden_sizes:
        layers = cfg.bench.scaling_layers
        scaled = _scaled_model(model.config, hidden, layers, model.dtype, model.device)
        bare, engine = _bare_and_engine(scaled, _random_samples(512, vocab), f"d={hidden}")
        rows.append({"axis": "hidden", "value": hidden, "bare": bare, "engine": engine})
    return rows


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def render(timings: list[Timing], scaled: list[dict], model_name: str, batch_size: int) -> str:
    lines = [
        f"# Benchmark: {model_name}",
        "",
        f"Measured on {date.today().isoformat()}: {_machine()}. Engine batch size {batch_size}.",
        "",
        "| kind | method | samples | mean tokens | s / sample | samples / s | peak RSS MB "
        "| × papers_svd | × bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in dict.fromkeys(t.kind for t in timings):
        rows = {t.method: t for t in timings if t.kind == kind}
        papers, bare = rows.get("papers_svd"), rows.get("bare")
        for t in rows.values():
            speedup = f"{papers.per_sample / t.per_sample:.1f}" if papers else "–"
            over_bare = f"{t.per_sample / bare.per_sample:.2f}" if bare else "–"
            lines.append(
                f"| {kind} | {t.method} | {t.samples} | {t.tokens:.0f} | {t.per_sample:.2f} "
                f"| {1 / t.per_sample:.3f} | {t.peak_mb:.0f} | {speedup} | {over_bare} |"
            )
    if scaled:
        lines += [
            "",
            "Scaling, one sample each (random tokens; the hidden-size models have random weights):",
            "",
            "| axis | value | bare s | engine s | engine / bare |",
            "|---|---|---|---|---|",
        ]
        for row in scaled:
            bare, engine = row["bare"], row["engine"]
            lines.append(
                f"| {row['axis']} | {row['value']} | {bare.seconds:.2f} | {engine.seconds:.2f} "
                f"| {engine.seconds / bare.seconds:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _config_model(cfg: DictConfig, device: torch.device):
    """A random-weight model from a config file (no download), e.g. an 8B shape on a GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(Path(cfg.bench.model_config).read_text()))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=models.DTYPES[cfg.extract.dtype])
    return model.eval().requires_grad_(False)


def load_bench_model(cfg: DictConfig):
    """The analysis model, or a random-weight model from ``bench.model_config``."""
    device = models.resolve_device(cfg.extract.device)
    if cfg.bench.model_config:
        return _config_model(cfg, device)
    model, _ = models.load_model(models.resolve_model_dir(cfg), str(device), cfg.extract.dtype)
    return model


def bench_command(cfg: DictConfig) -> int:
    if cfg.extract.threads:
        torch.set_num_threads(cfg.extract.threads)

    if cfg.bench.model_config:
        name = Path(cfg.bench.model_config).stem
        vocab = json.loads(Path(cfg.bench.model_config).read_text())["vocab_size"]
        samples = {
            f"T={cfg.bench.tokens}": _random_samples(cfg.bench.tokens, vocab, cfg.bench.samples)
        }
    else:
        name = cfg.model.name
        tokenizer = models.load_tokenizer(models.resolve_model_dir(cfg))
        samples = {kind: _gsm8k_samples(cfg, tokenizer, kind) for kind in cfg.bench.kinds}
    timings = compare_methods(cfg, samples)
    scaled = [] if cfg.bench.model_config else scaling(cfg, load_bench_model(cfg))

    text = render(timings, scaled, name, cfg.extract.batch_size)
    sys.stdout.write(text)
    output = Path(cfg.bench.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    log.info("wrote %s", output)
    return 0
