"""Scale-out: the workflow on a real SLURM cluster (started here) gives the local run's spectra;
record-range shards merge back into the same file; the paper-scale DAG builds quickly."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from slurm_cluster import PACKAGES, PROGRAMS, SlurmCluster, Unavailable, install_packages
from workspace import (  # noqa: F401
    BIN,
    LIMIT,
    ROOT,
    make_workspace,
    snakemake,
    workflow_env,
)

from gradspec.config import compose, experiment_files
from gradspec.merge import chain

PAPER_MODELS = "[smollm2_135m_instruct,gemma3_270m]"
PAPER_LIMIT = 500
PAPER_SHARD = 100
KEYS = ["record_index", "layer", "module"]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node cluster for the session; every daemon it started is stopped at the end."""
    try:
        install_packages(PACKAGES, PROGRAMS)
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except Unavailable as reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    print(f"SLURM cluster up in {cluster.start_seconds:.1f} s")
    try:
        yield cluster
    finally:
        started = time.perf_counter()
        cluster.stop()
        print(f"SLURM cluster stopped in {time.perf_counter() - started:.1f} s")


def test_cluster_runs_a_batch_job(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    done = slurm_cluster.run(
        "sbatch", "--wait", f"--output={out}", "--wrap", "echo ran on $SLURMD_NODENAME", timeout=60
    )
    assert done.returncode == 0, done.stderr + slurm_cluster.logs()
    assert out.read_text().strip() == f"ran on {slurm_cluster.node}"


def spectra_files(root: Path) -> dict[str, Path]:
    base = root / "results" / "quickstart"
    return {str(path.relative_to(base)): path for path in sorted(base.rglob("spectra/*/*.parquet"))}


def assert_same_spectra(local: Path, remote: Path) -> float:
    """Same rows and labels; every metric within 5e-5 (relative to its size above 1).

    The two runs batch the samples differently (one-record shards against a batch of two), and
    float32 rounding in the forward pass then differs: measured up to 8e-6 on the spectral norm
    of two-token None CoT answers, and twice that on the stable rank, a ratio of squares."""
    a = pd.read_parquet(local).sort_values(KEYS, na_position="first").reset_index(drop=True)
    b = pd.read_parquet(remote).sort_values(KEYS, na_position="first").reset_index(drop=True)
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b) > 0
    numeric = [name for name in a.columns if a[name].dtype.kind == "f"]
    labels = [name for name in a.columns if name not in numeric]
    pd.testing.assert_frame_equal(a[labels], b[labels])
    x, y = a[numeric].to_numpy(float), b[numeric].to_numpy(float)
    assert np.array_equal(np.isnan(x), np.isnan(y))
    scale = np.maximum(1.0, np.abs(x))
    worst = float(np.nanmax(np.abs(x - y) / scale))
    assert worst <= 5e-5, f"{remote}: largest difference {worst:.3g}"
    return worst


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 12 extract jobs one after another on 2 cores; slower under load
def test_workflow_on_slurm_equals_local_run(slurm_cluster, finished_workspace, tmp_path):
    """The whole quickstart DAG as SLURM jobs, each file cut into one-record shards."""
    root = make_workspace(tmp_path / "slurm-workspace")
    command = [
        "timeout", "-k", "10", "1500", str(BIN / "snakemake"),
        "--workflow-profile", "profiles/slurm",
        "--cores", "2", "--jobs", "4",
        "--slurm-init-seconds-before-status-checks", "1",
        "--config", LIMIT, "extract={gpus_per_job: 0}", "job_shard_size=1",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=root,
        env={**workflow_env(root), "SLURM_CONF": str(slurm_cluster.conf)},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    print(f"SLURM workflow run: {seconds:.0f} s")

    jobs = slurm_cluster.run("squeue", "-h", "--states=all", "-o", "%T %k").stdout.splitlines()
    extract_jobs = [line for line in jobs if "rule_extract" in line]
    assert len(extract_jobs) == 12 and all(line.startswith("COMPLETED") for line in extract_jobs)

    local, remote = spectra_files(finished_workspace), spectra_files(root)
    assert sorted(local) == sorted(remote) and len(local) == 6
    worst = max(assert_same_spectra(local[name], remote[name]) for name in local)
    print(f"SLURM spectra equal the local run's: 6 files, largest relative difference {worst:.2g}")
    for path in remote.values():
        meta = json.loads(path.with_suffix(".meta.json").read_text())
        assert len(meta["shards"]) == 2 and meta["status_counts"] == {"ok": 2}
        assert not path.with_suffix(".shards").exists() or not any(
            path.with_suffix(".shards").glob("*.parquet")
        )
    assert (root / "results" / "quickstart" / "report.html").stat().st_size > 0
    assert_step_lines(root / "results" / "logs", expected=6 + 12 + 6 + 5)


STEP_LINE = re.compile(r"INFO workflow: .+: exit 0, \d+ files, \d+ bytes, [\d.]+ s$")


def assert_step_lines(logs: Path, expected: int) -> None:
    """Each job's log ends with the step's line of counts and seconds."""
    found = sorted(logs.rglob("*.log"))
    assert len(found) == expected, [str(path) for path in found]
    for path in found:
        last = path.read_text().rstrip().splitlines()[-1]
        assert STEP_LINE.search(last), f"{path}: {last}"


def test_merge_chain_refuses_gaps_and_overlaps(tmp_path):
    ranges = {(0, 2): tmp_path / "a", (2, 4): tmp_path / "b", (4, 5): tmp_path / "c"}
    assert chain(ranges, 0, 5) == [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    assert chain(ranges, 2, None) == [tmp_path / "b", tmp_path / "c"]
    with pytest.raises(FileNotFoundError):
        chain({(0, 2): tmp_path / "a", (3, 4): tmp_path / "b"}, 0, 4)
    with pytest.raises(ValueError):
        chain({**ranges, (2, 3): tmp_path / "d"}, 0, 5)
    with pytest.raises(ValueError):
        chain(ranges, 0, 3)


def experiments() -> list[str]:
    return sorted(path.stem for path in (ROOT / "config" / "experiment").glob("*.yaml"))


def job_counts(stdout: str) -> dict[str, int]:
    table = stdout.split("Job stats:", 1)[1]
    return {name: int(count) for name, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.parametrize("experiment", experiments())
def test_paper_scale_dry_run(experiment):
    """Two models, 500 records per file in shards of 100: the DAG a cluster would run."""
    overrides = [f"experiment={experiment}", f"experiment.models={PAPER_MODELS}"]
    n_files = len(experiment_files(compose(overrides), overrides))
    started = time.perf_counter()
    done = snakemake(
        ROOT, "-n", "--forceall", "--config", f"experiment={experiment}",
        f"data={{limit: {PAPER_LIMIT}}}", f"job_shard_size={PAPER_SHARD}",
        f"overrides=experiment.models={PAPER_MODELS}",
    )  # fmt: skip
    seconds = time.perf_counter() - started
    counts = job_counts(done.stdout)
    shards = PAPER_LIMIT // PAPER_SHARD
    print(
        f"paper-scale dry run of {experiment}: {seconds:.1f} s, {counts['extract']} extract jobs "
        f"({n_files} files x 2 models x {shards} shards), {counts['total']} jobs in all"
    )
    assert counts["extract"] == 2 * n_files * shards
    assert counts["merge_spectra"] == 2 * n_files
    assert counts["report"] == 1 and counts["reduce"] == 2
