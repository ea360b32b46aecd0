"""The Snakemake workflow: dry run, lint, overrides reaching every job, GPU claims, and a real
end-to-end run on two samples per file in a copy of the repository."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from workspace import BIN, LIMIT, MODEL, ROOT, make_workspace, snakemake, workflow_env  # noqa: F401


def test_dry_run_is_clean():
    started = time.perf_counter()
    done = snakemake(ROOT, "-n", "--forceall")
    seconds = time.perf_counter() - started
    assert "extract" in done.stdout and "findings" in done.stdout
    assert "rror" not in done.stderr
    assert seconds < 60


def test_lint_is_clean():
    done = snakemake(ROOT, "--lint")
    assert "Congratulations" in done.stdout + done.stderr, done.stdout


def test_overrides_reach_every_job():
    done = snakemake(
        ROOT, "-n", "--forceall", "-p", "--config", LIMIT, "overrides=prompt.template=base"
    )
    commands = [line for line in done.stdout.splitlines() if line.lstrip().startswith("gradspec")]
    commands += [line for line in done.stdout.splitlines() if "with-gpus" in line]
    assert commands
    for line in commands:
        assert "data.limit=2" in line and "prompt.template=base" in line, line


def test_unknown_override_fails_with_valid_keys():
    done = snakemake(ROOT, "-n", "--config", "data={limmit: 2}", check=False)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "unknown key 'data.limmit'" in output and "offset" in output


def test_other_experiment_picked():
    done = snakemake(ROOT, "-n", "--forceall", "--config", "experiment=nonexistent", check=False)
    assert done.returncode != 0
    assert "nonexistent" in done.stdout + done.stderr


def test_gpu_claims_are_distinct(tmp_path):
    """Two jobs at once with a fake two-GPU nvidia-smi get different devices; 0 hides them."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    script = str(ROOT / "workflow" / "scripts" / "with-gpus")
    locks = str(tmp_path / "locks")
    show = ["sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"; sleep 2']
    jobs = [
        subprocess.Popen([script, "1", locks, *show], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    seen = sorted(job.communicate(timeout=30)[0].strip() for job in jobs)
    assert seen == ["[0]", "[1]"]
    hidden = subprocess.run(
        [script, "0", locks, *show[:2], 'echo "[$CUDA_VISIBLE_DEVICES]"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert hidden.stdout.strip() == "[]"


@pytest.mark.slow
def test_end_to_end(finished_workspace):
    experiment = finished_workspace / "results" / "quickstart"
    assert (experiment / "findings.md").stat().st_size > 0
    model = experiment / MODEL
    assert len(list((model / "spectra").rglob("*.parquet"))) == 6
    for name in ("curves.parquet", "mad.parquet", "status_counts.csv", "config.yaml"):
        assert (model / "summary" / name).exists(), name
    assert any((model / "tables").iterdir()) and any((model / "figures").iterdir())
    assert list((model / "benchmarks").rglob("*.tsv"))
    again = snakemake(finished_workspace, "-n", "--config", LIMIT)
    assert "Nothing to be done" in again.stdout + again.stderr
