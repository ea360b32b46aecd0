# The config, composed once with Hydra, and the helpers the rules share.
#
# Every job runs `gradspec <step> <its own keys> <the user's overrides>`: the user's overrides are
# the --config entries other than `experiment`, turned into Hydra `key=value` strings, so a job
# composes exactly the config that was used here to build the DAG.

import logging
import math
import shlex
import shutil
from pathlib import Path

from gradspec import paths
from gradspec.config import compose, experiment_files, overrides_from_mapping

_log = logging.getLogger("gradspec.workflow")

# Keys of Snakemake's config that are not Hydra overrides: how the DAG is cut, not what a job
# computes (job_shard_size: records per extract job; 0 or absent: one job per file).
_RESERVED = ("experiment", "overrides", "job_shard_size")

EXPERIMENT = str(config.get("experiment") or "quickstart")
USER_OVERRIDES = overrides_from_mapping(
    {key: value for key, value in config.items() if key not in _RESERVED}
) + shlex.split(str(config.get("overrides") or ""))
BASE_OVERRIDES = [f"experiment={EXPERIMENT}", *USER_OVERRIDES]
CFG = compose(BASE_OVERRIDES)

RESULTS = CFG.results_dir
MODELS_DIR = CFG.models_dir
DATA_ROOT = "resources/data"
EXP_DIR = str(paths.experiment_dir(RESULTS, EXPERIMENT))
LOGS = f"{RESULTS}/logs/{EXPERIMENT}"
MODELS = list(CFG.experiment.models)
MODEL_CFG = {name: compose([*BASE_OVERRIDES, f"model={name}"]).model for name in MODELS}
FILES = experiment_files(CFG, BASE_OVERRIDES)
FILE_SPEC = {(spec.dataset, spec.file): spec for spec in FILES}
FINDINGS = f"{EXP_DIR}/findings.md"
# Relative to the rule files; used only with --software-deployment-method conda.
CONDA_ENV = "../envs/gradspec.yaml"

# Overrides as one shell-quoted string, appended to every command.
OVERRIDES = " ".join(shlex.quote(item) for item in USER_OVERRIDES)
# Runs a step with its output in the log and appends one line of counts and seconds.
LOGGED = "workflow/scripts/logged"
JOB_SHARD_SIZE = int(config.get("job_shard_size") or 0)

_SLUG = paths.SLUG.pattern.strip("^$")


wildcard_constraints:
    model=_SLUG,
    dataset=_SLUG,
    file=_SLUG,
    shard=r"\d+-\d+",


def shard_ranges(offset, limit, size):
    """The (start, stop) record ranges of the extract jobs of one file; [] for a single job.

    Ranges need a known record count, so a file is cut only when data.limit is set and exceeds
    the shard size; each range is one job's data.offset and data.limit.
    """
    if not size or limit is None or limit <= size:
        return []
    end = offset + limit
    return [(start, min(start + size, end)) for start in range(offset, end, size)]


SHARDS = [
    f"{start:06d}-{stop:06d}"
    for start, stop in shard_ranges(int(CFG.data.offset), CFG.data.limit, JOB_SHARD_SIZE)
]


def shard_bounds(wildcards):
    """data.offset and data.limit of one shard job, from its wildcard ``START-STOP``."""
    start, stop = (int(part) for part in wildcards.shard.split("-"))
    return f"data.offset={start} data.limit={stop - start}"


def gpus_per_job():
    """GPUs one extract job holds: the config's value, else 1 where nvidia-smi is on PATH."""
    if CFG.extract.gpus_per_job is not None:
        return int(CFG.extract.gpus_per_job)
    return 1 if shutil.which("nvidia-smi") else 0


def model_mem_mb(model):
    """Host memory for one job on a model: float32 weights, gradients and working room."""
    params_b = float(MODEL_CFG[model].params_b) if model in MODEL_CFG else 1.0
    return int(2048 + 12_000 * params_b)


def model_runtime(model):
    """Minutes a scheduler grants an extract job; the config's value wins over the estimate.

    The estimate grows with the model and with the records one job holds (a shard, else
    data.limit, else a whole file of the papers' size).
    """
    if CFG.extract.runtime_min is not None:
        return int(CFG.extract.runtime_min)
    params_b = float(MODEL_CFG[model].params_b) if model in MODEL_CFG else 1.0
    records = JOB_SHARD_SIZE if SHARDS else (CFG.data.limit or 500)
    return int(30 + math.ceil(60 * params_b * max(1.0, records / 100)))


def model_sentinel(name):
    """The prepared model's sentinel, or a ready folder given as model.path (nothing to run)."""
    model = MODEL_CFG.get(name)
    if model is not None and model.path:
        return str(Path(model.path) / "config.json")
    return str(paths.model_dir(MODELS_DIR, name) / "provenance.json")


def model_input(wildcards):
    return model_sentinel(wildcards.model)


def raw_data(wildcards):
    """A dataset file as shipped: the configured path, or the same path compressed with xz."""
    spec = FILE_SPEC.get((wildcards.dataset, wildcards.file))
    if spec is None:
        raise ValueError(
            f"{wildcards.dataset}/{wildcards.file} is not a file of experiment {EXPERIMENT}"
        )
    plain = Path(CFG.data_dir) / spec.path
    if not plain.exists() and Path(f"{plain}.xz").exists():
        return f"{plain}.xz"
    return str(plain)


def prepared(spec):
    return str(paths.prepared_data(spec.dataset, spec.file, DATA_ROOT))


def spectra_of(model):
    return [
        str(paths.spectra(RESULTS, EXPERIMENT, model, spec.dataset, spec.file)) for spec in FILES
    ]


SUMMARY_FILES = paths.SUMMARY_FILES


def summary_of(model):
    folder = paths.summary_dir(RESULTS, EXPERIMENT, model)
    return [str(folder / name) for name in SUMMARY_FILES]


def spectra_meta_of(model):
    return [str(Path(path).with_suffix(".meta.json")) for path in spectra_of(model)]


def tables_out(model):
    return str(paths.tables_dir(RESULTS, EXPERIMENT, model))


def figures_out(model):
    return str(paths.figures_dir(RESULTS, EXPERIMENT, model))



REPORT = f"{EXP_DIR}/report.html"
