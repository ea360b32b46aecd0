"""Weights & Biases tracking for the pipeline's steps, offline unless the config says otherwise.

Tracking is a record of a run, never a reason for it to fail: with no network, a slow service
or ``wandb.mode=disabled``, :func:`start_run` yields ``None`` and every ``log_*`` function
accepts ``None`` and does nothing. Offline runs land in ``<wandb.dir>/offline-run-*`` and are
uploaded later with ``wandb sync``.

Usage, from a step::

    with tracking.start_run(cfg, job_type="reduce", name=f"reduce-{model}") as run:
        tracking.log_curves(run, curves)
        tracking.log_figures(run, sorted(figures.glob("*.png")))
        tracking.log_artifact_reference(run, f"spectra-{model}", spectra_dir)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Config keys whose values are never sent: anything that looks like a credential.
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|passw(or)?d|credential|auth)", re.IGNORECASE)
MODES = ("online", "offline", "disabled")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def scrub(value: Any) -> Any:
    """A copy of a nested mapping with every credential-looking key dropped."""
    if isinstance(value, dict):
        return {key: scrub(item) for key, item in value.items() if not SECRET_KEY.search(str(key))}
    if isinstance(value, list):
        return [scrub(item) for item in value]
    return value


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, minus credentials: what a run records."""
    return scrub(OmegaConf.to_container(cfg, resolve=True))


def _root_dir(directory: str | Path) -> Path:
    """wandb writes into ``<root>/wandb``; choose the root so runs land in the configured dir."""
    path = Path(directory).resolve()
    root = path.parent if path.name == "wandb" else path
    root.mkdir(parents=True, exist_ok=True)
    return root


def _quiet_environment() -> None:
    # Before wandb is imported: no crash reports and no console capture, which need no network
    # offline but would otherwise try to reach one.
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_CONSOLE", "off")


@contextmanager
def start_run(
    cfg: DictConfig, job_type: str, name: str | None = None, group: str | None = None
) -> Iterator[Any]:
    """A W&B run for one step, finished on exit; ``None`` where tracking is off or failed.

    The group defaults to the experiment so that a model's extract, reduce and report runs sit
    together; the run's config is the resolved config with credentials removed.
    """
    mode = str(cfg.wandb.mode)
    if mode not in MODES:
        raise ValueError(f"wandb.mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "disabled":
        yield None
        return
    _quiet_environment()
    import wandb

    timeout = float(cfg.wandb.init_timeout)
    try:
        run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            dir=str(_root_dir(cfg.wandb.dir)),
            mode=mode,
            job_type=job_type,
            name=name,
            group=group or cfg.experiment.name,
            config=run_config(cfg),
            reinit="create_new",
            settings=wandb.Settings(
                silent=True,
                console="off",
                init_timeout=timeout,
                x_service_wait=min(timeout, 30.0),
                disable_git=True,
                save_code=False,
                x_disable_stats=True,
                x_disable_machine_info=True,
                x_save_requirements=False,
            ),
        )
    except Exception as error:  # tracking must not stop the step
        log.warning(
            "W&B run not started (%s: %s); going on without tracking", type(error).__name__, error
        )
        yield None
        return
    log.info("W&B %s run %s in %s", mode, run.id, run.dir)
    try:
        yield run
    finally:
        try:
            run.finish()
            # Offline, finish() can return before the service has written the run's log;
            # stopping the service waits for it, so the run is complete once this returns.
            wandb.teardown()
        except Exception as error:
            log.warning("W&B run %s did not finish cleanly: %s", run.id, error)


def log_curves(
    run: Any,
    curves: Any,
    value: str = "mean",
    x: str = "layer",
    series: str = "module",
    key: str = "curves",
) -> None:
    """One line per ``series`` (module) of ``value`` against ``x`` (layer), and the table behind it.

    ``curves`` is a DataFrame in long form; any further columns (condition, kind, ...) are
    averaged over, so the plot is the per-layer mean of each module.
    """
    if run is None:
        return
    import wandb

    missing = [column for column in (value, x, series) if column not in curves.columns]
    if missing:
        log.warning("curves lack column(s) %s; not logged", ", ".join(missing))
        return
    means = curves.groupby([series, x], as_index=False)[value].mean().sort_values([series, x])
    names = [str(name) for name in means[series].unique()]
    xs = sorted(means[x].unique().tolist())
    ys = [
        means[means[series] == name].set_index(x)[value].reindex(xs).tolist()
        for name in means[series].unique()
    ]
    run.log(
        {
            f"{key}/table": wandb.Table(dataframe=means),
            f"{key}/{value}": wandb.plot.line_series(
                xs=xs, ys=ys, keys=names, title=f"{value} per {x}", xname=x
            ),
        }
    )


def log_figures(run: Any, paths: Iterable[str | Path], prefix: str = "figures") -> None:
    """Raster figures as W&B images under ``prefix/<file stem>``; other formats are skipped."""
    if run is None:
        return
    import wandb

    images = {}
    for path in map(Path, paths):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images[f"{prefix}/{path.stem}"] = wandb.Image(str(path))
        else:
            log.debug("not logging %s: W&B shows only raster images", path)
    if images:
        run.log(images)


def log_artifact_reference(
    run: Any, name: str, path: str | Path, artifact_type: str = "spectra"
) -> None:
    """Record a file or folder as a ``file://`` reference artifact: checksums, not a copy."""
    if run is None:
        return
    import wandb

    target = Path(path).resolve()
    if not target.exists():
        log.warning("no artifact for %s: it does not exist", target)
        return
    artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=artifact_type)
    artifact.add_reference(target.as_uri())
    run.log_artifact(artifact)
