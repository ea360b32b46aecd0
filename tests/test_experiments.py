"""Paper 1's experiments: their configs, their data's pairing of instructions, their DAGs, and one
run end to end on two samples per file."""

from __future__ import annotations

import os
import re
import time

import pytest
from workspace import MODEL, ROOT, make_workspace, snakemake  # noqa: F401

from gradspec import data
from gradspec.config import compose, experiment_files

EXPERIMENTS = {
    # name: (files, models)
    "fast_slow": (36, 3),
    "math": (12, 3),
    "wiki": (8, 3),
}


def job_counts(output: str) -> dict[str, int]:
    """Snakemake's "Job stats" table as {rule: count}."""
    counts = {}
    for line in output.split("Job stats:")[-1].splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match:
            counts[match.group(1)] = int(match.group(2))
    return counts


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_config(name):
    files, models = EXPERIMENTS[name]
    cfg = compose([f"experiment={name}"])
    assert cfg.experiment.name == name and len(cfg.experiment.models) == models
    assert len(experiment_files(cfg)) == files
    assert cfg.data.limit < 500
    # A command-line limit wins over the experiment's.
    assert compose([f"experiment={name}", "data.limit=2"]).data.limit == 2


def test_quickstart_keeps_the_default_limit():
    assert compose(["experiment=quickstart"]).data.limit == 32


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_dry_run(name):
    files, models = EXPERIMENTS[name]
    started = time.perf_counter()
    done = snakemake(ROOT, "-n", "--forceall", "--config", f"experiment={name}")
    counts = job_counts(done.stdout)
    assert counts["extract"] == files * models
    assert counts["reduce"] == counts["tables"] == counts["plot"] == models
    assert counts["findings"] == 1
    assert time.perf_counter() - started < 120


def texts(path: str) -> list[tuple[str, str]]:
    records = data.load_records(data.resolve_data_path("resources/datasets", path))
    return [(record.instruction, record.input) for record in records]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_files_of_a_task_share_their_instructions(name):
    """Kind-vs-kind and correct-vs-irrelevant tests pair samples by record index: every file of a
    task must hold the same instructions in the same order."""
    cfg = compose([f"experiment={name}"])
    by_task: dict[str, list] = {}
    for spec in experiment_files(cfg):
        by_task.setdefault(spec.task, []).append(spec)
    for task, specs in by_task.items():
        reference = texts(specs[0].path)
        assert all(instruction for instruction, _ in reference), task
        for spec in specs[1:]:
            assert texts(spec.path) == reference, (task, spec.dataset, spec.file)


@pytest.mark.slow
def test_new_outputs_of_the_quickstart_run(finished_workspace):
    """The quickstart workflow run (two samples per file, shared with test_workflow) writes the
    kind tests, the length regression, their tables and the overall findings."""
    model = finished_workspace / "results" / "quickstart" / MODEL
    for name in ("kind_tests", "length_regression", "replicates", "contrasts"):
        assert (model / "summary" / f"{name}.parquet").exists(), name
    for stem in ("kind_tests", "length_regression", "mad_ci"):
        assert (model / "tables" / f"{stem}_nuclear_norm.csv").exists(), stem
    findings = (finished_workspace / "results" / "quickstart" / "findings.md").read_text()
    assert "At equal response length" in findings and "## Claim 5" in findings
    assert (finished_workspace / "results" / "findings.md").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("GRADSPEC_TEST_PAPER_EXPERIMENT"),
    reason="about 15 minutes on a busy 2-core CPU; set GRADSPEC_TEST_PAPER_EXPERIMENT=1",
)
def test_math_end_to_end(tmp_path):
    """math on algebra only, one model, two samples per file: every step and the findings."""
    root = make_workspace(tmp_path)
    started = time.perf_counter()
    snakemake(
        root,
        "--cores",
        "2",
        "--config",
        "experiment=math",
        "data={limit: 2}",
        "overrides=experiment.tasks=[algebra] experiment.models=[smollm2_135m_instruct]",
    )
    print(f"math on algebra, data.limit=2: {time.perf_counter() - started:.0f} s")
    experiment = root / "results" / "math"
    model = experiment / "smollm2_135m_instruct"
    assert len(list((model / "spectra").rglob("*.parquet"))) == 4
    for name in ("kind_tests", "length_regression", "replicates", "contrasts"):
        assert (model / "summary" / f"{name}.parquet").exists(), name
    assert (model / "tables" / "kind_tests_nuclear_norm.csv").exists()
    assert (model / "figures" / "algebra_overlay_spectral_ratio.png").exists()
    findings = (experiment / "findings.md").read_text()
    assert "## Claim 1" in findings and "At equal response length" in findings
    assert (root / "results" / "findings.md").exists()
