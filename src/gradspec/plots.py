"""Paper 1's layer-wise figures from a model's ``curves.parquet``.

For each task and metric (nuclear norm and spectral ratio, the two the papers plot):

- ``<task>_<condition>_<metric>``: one column per response kind, the attention projections
  (q, k, v, o) in the first row and the MLP projections (gate, up, down) in the second, the mean
  over samples across layers with its shaded 95% bootstrap interval;
- ``<task>_overlay_<metric>``: the same grid with correct (solid) and irrelevant (dashed)
  responses on one axis each.

Each is written as PNG (150 dpi) and SVG under ``results/<experiment>/<model>/figures/``; the
PNG files are logged to W&B (job type "plot", grouped by experiment) unless
``wandb.mode=disabled``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib as mpl
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig

from gradspec import paths, tracking
from gradspec.config import ATTENTION_MODULES, MLP_MODULES
from gradspec.reduce import ordered_kinds

log = logging.getLogger(__name__)

PLOTTED_METRICS = ("nuclear_norm", "spectral_ratio")
METRIC_LABELS = {
    "nuclear_norm": "nuclear norm",
    "spectral_norm": "spectral norm",
    "spectral_ratio": "spectral ratio (largest / sum)",
    "frobenius_norm": "Frobenius norm",
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
}
KIND_LABELS = {"none": "None", "simplified": "Simplified CoT", "detailed": "Detailed CoT"}
CONDITION_STYLES = {"correct": "-", "irrelevant": "--"}
DPI = 150


def module_rows(modules) -> list[list[str]]:
    """The attention row and the MLP row, each only with the modules that were measured."""
    present = set(modules)
    rows = [[m for m in group if m in present] for group in (ATTENTION_MODULES, MLP_MODULES)]
    return [row for row in rows if row]


def module_colors(modules) -> dict[str, str]:
    cycle = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    return {module: cycle[i % len(cycle)] for i, module in enumerate(modules)}


def panel_grid(n_rows: int, n_cols: int, title: str) -> tuple[Figure, list[list[Axes]]]:
    """A figure on the Agg canvas, built without pyplot so no global figure state is kept."""
    figure = Figure(figsize=(4 * n_cols, 3.2 * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    figure.suptitle(title)
    return figure, axes


def draw_curve(axis, rows: pd.DataFrame, label: str, color: str, style: str = "-") -> None:
    rows = rows.sort_values("layer")
    layers = rows["layer"].astype(float)
    axis.plot(layers, rows["mean"], style, color=color, label=label, linewidth=1.4)
    axis.fill_between(layers, rows["ci_low"], rows["ci_high"], color=color, alpha=0.2, linewidth=0)


def panel_title(curves: pd.DataFrame, kind: str) -> str:
    n = int(curves["n"].max()) if len(curves) else 0
    tokens = curves["mean_response_tokens"].iloc[0] if len(curves) else float("nan")
    return f"{KIND_LABELS.get(kind, kind)} (n={n}, {tokens:.0f} response tokens)"


def sample_count_text(rows: pd.DataFrame) -> str:
    """ "n=32" when every file has the same number of samples, else "n=30-32"."""
    counts = rows.groupby(["dataset", "file"])["n"].max() if len(rows) else pd.Series([0])
    low, high = int(counts.min()), int(counts.max())
    return f"n={low}" if low == high else f"n={low}-{high}"


def label_axis(axis, metric: str) -> None:
    axis.set_xlabel("layer")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel(METRIC_LABELS.get(metric, metric))
    axis.legend(fontsize="small")


def selection(curves: pd.DataFrame, **labels) -> pd.DataFrame:
    mask = pd.Series(True, index=curves.index)
    for column, value in labels.items():
        mask &= curves[column] == value
    return curves[mask]


def curve_figure(
    curves: pd.DataFrame, task: str, condition: str, metric: str, model: str
) -> Figure:
    """One panel per response kind and module row: each module's mean curve and interval."""
    rows = selection(curves, task=task, condition=condition, metric=metric)
    kinds = ordered_kinds(rows["kind"])
    grid = module_rows(rows["module"].unique())
    colors = module_colors([m for row in grid for m in row])
    figure, axes = panel_grid(
        len(grid),
        len(kinds),
        f"{task}, {model}: {METRIC_LABELS.get(metric, metric)}, {condition} responses "
        f"({sample_count_text(rows)})",
    )
    for column, kind in enumerate(kinds):
        for row, modules in enumerate(grid):
            axis = axes[row][column]
            for module in modules:
                draw_curve(axis, selection(rows, kind=kind, module=module), module, colors[module])
            axis.set_title(panel_title(selection(rows, kind=kind), kind), fontsize="medium")
            label_axis(axis, metric)
    return figure


def overlay_figure(curves: pd.DataFrame, task: str, metric: str, model: str) -> Figure:
    """Correct (solid) against irrelevant (dashed) responses, one panel per kind and module row."""
    rows = selection(curves, task=task, metric=metric)
    kinds = ordered_kinds(rows["kind"])
    grid = module_rows(rows["module"].unique())
    colors = module_colors([m for row in grid for m in row])
    figure, axes = panel_grid(
        len(grid),
        len(kinds),
        f"{task}, {model}: {METRIC_LABELS.get(metric, metric)}, "
        f"correct (solid) vs irrelevant (dashed) responses ({sample_count_text(rows)})",
    )
    for column, kind in enumerate(kinds):
        for row, modules in enumerate(grid):
            axis = axes[row][column]
            for module in modules:
                for condition, style in CONDITION_STYLES.items():
                    part = selection(rows, kind=kind, module=module, condition=condition)
                    if len(part):
                        label = f"{module} {condition}"
                        draw_curve(axis, part, label, colors[module], style)
            correct = selection(rows, kind=kind, condition="correct")
            axis.set_title(panel_title(correct, kind), fontsize="medium")
            label_axis(axis, metric)
    return figure


def save_figure(figure: Figure, stem: Path) -> list[Path]:
    """``stem``.png at 150 dpi and ``stem``.svg."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    targets = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    figure.savefig(targets[0], dpi=DPI)
    figure.savefig(targets[1])
    return targets


def plot_curves(curves: pd.DataFrame, model: str, directory: Path) -> list[Path]:
    """Every figure of one model's curves."""
    written: list[Path] = []
    metrics = [m for m in PLOTTED_METRICS if m in set(curves["metric"])]
    for task in dict.fromkeys(curves["task"]):
        conditions = list(dict.fromkeys(selection(curves, task=task)["condition"]))
        for metric in metrics:
            for condition in conditions:
                figure = curve_figure(curves, task, condition, metric, model)
                written += save_figure(figure, directory / f"{task}_{condition}_{metric}")
            if set(CONDITION_STYLES) <= set(conditions):
                figure = overlay_figure(curves, task, metric, model)
                written += save_figure(figure, directory / f"{task}_overlay_{metric}")
    return written


def plot_command(cfg: DictConfig) -> int:
    """Draw the figures of ``cfg.model.name``'s summary (see the module docstring)."""
    started = time.perf_counter()
    model = cfg.model.name
    summary = paths.summary_dir(cfg.results_dir, cfg.experiment.name, model)
    curves = pd.read_parquet(summary / "curves.parquet")
    directory = paths.figures_dir(cfg.results_dir, cfg.experiment.name, model)
    written = plot_curves(curves, model, directory) if len(curves) else []
    with tracking.start_run(
        cfg, job_type="plot", name=f"plot-{model}", group=cfg.experiment.name
    ) as run:
        tracking.log_figures(run, written)
    log.info(
        "wrote %d figure files to %s (%.2fs)",
        len(written),
        directory,
        time.perf_counter() - started,
    )
    return 0
