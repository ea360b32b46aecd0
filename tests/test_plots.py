"""The figures: panels per kind and module row, labels, and valid PNG and SVG files."""

from __future__ import annotations

import pandas as pd
import pytest
from test_reduce import CORRECT_Q, irrelevant_values, spectra_rows

from gradspec import paths
from gradspec.config import compose
from gradspec.plots import curve_figure, overlay_figure, plot_command
from gradspec.reduce import reduce_command, spectra_sources

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    cfg = compose(
        [
            f"results_dir={results}",
            "experiment=quickstart",
            "reduce.n_bootstrap=20",
            "wandb.mode=disabled",
        ]
    )
    for source in spectra_sources(cfg, cfg.model.name):
        kind = source.spec.kind
        values = CORRECT_Q[kind] if source.spec.condition == "correct" else irrelevant_values(kind)
        source.path.parent.mkdir(parents=True, exist_ok=True)
        spectra_rows(source.spec.file, source.spec.dataset, values).to_parquet(source.path)
    reduce_command(cfg)
    summary = paths.summary_dir(results, cfg.experiment.name, cfg.model.name)
    return cfg, pd.read_parquet(summary / "curves.parquet")


def test_curve_figure_has_a_panel_per_kind_and_module_row(reduced):
    cfg, curves = reduced
    figure = curve_figure(curves, "gsm8k", "correct", "nuclear_norm", cfg.model.name)
    axes = figure.get_axes()
    # Two module rows (q_proj; gate_proj) x three kinds.
    assert len(axes) == 6
    assert "gsm8k" in figure.get_suptitle() and cfg.model.name in figure.get_suptitle()
    assert "n=3" in figure.get_suptitle()
    assert all(axis.get_xlabel() == "layer" for axis in axes)
    assert all(axis.get_ylabel() == "nuclear norm" for axis in axes)
    titles = [axis.get_title() for axis in axes]
    assert titles[0].startswith("None") and titles[2].startswith("Detailed CoT")
    # One line per module in its row, each with a shaded interval.
    assert len(axes[0].get_lines()) == 1 and len(axes[0].collections) == 1


def test_overlay_has_solid_and_dashed_lines(reduced):
    cfg, curves = reduced
    figure = overlay_figure(curves, "gsm8k", "spectral_ratio", cfg.model.name)
    axes = figure.get_axes()
    assert len(axes) == 6
    styles = sorted(line.get_linestyle() for line in axes[0].get_lines())
    assert styles == ["-", "--"]
    assert axes[0].get_ylabel().startswith("spectral ratio")


def test_plot_command_writes_png_and_svg(reduced):
    cfg, _ = reduced
    plot_command(cfg)
    directory = paths.figures_dir(cfg.results_dir, cfg.experiment.name, cfg.model.name)
    stems = [
        "gsm8k_correct_nuclear_norm",
        "gsm8k_irrelevant_nuclear_norm",
        "gsm8k_overlay_nuclear_norm",
        "gsm8k_correct_spectral_ratio",
        "gsm8k_overlay_spectral_ratio",
    ]
    for stem in stems:
        png = directory / f"{stem}.png"
        svg = directory / f"{stem}.svg"
        assert png.stat().st_size > 0 and png.read_bytes()[:8] == PNG_SIGNATURE
        assert svg.stat().st_size > 0 and b"<svg" in svg.read_bytes()[:1000]
    assert len(list(directory.glob("*.png"))) == 6
