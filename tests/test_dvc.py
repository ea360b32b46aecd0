"""DVC round trip on real artifacts: run the workflow in one clone, push, pull into a fresh
clone and find that Snakemake has nothing to recompute."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from workspace import BIN, LIMIT, link_models, snakemake  # noqa: F401

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def run(cwd: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, str(BIN / "dvc"), *args)


def test_default_remote_is_outside_the_work_tree():
    root = Path(__file__).resolve().parents[1]
    url = dvc(root, "remote", "list").split()
    assert url[0] == "local"
    assert (root / ".dvc" / url[1]).resolve() == (root.parent / "gradspec-dvc-remote").resolve()


@pytest.mark.slow
def test_push_then_pull_recomputes_nothing(finished_workspace, tmp_path):
    # A copy: the commit made here must not change the shared workspace other tests read.
    first, remote = tmp_path / "first", tmp_path / "remote"
    shutil.copytree(finished_workspace, first, symlinks=True)
    dvc(first, "remote", "modify", "--local", "local", "url", str(remote))
    started = time.perf_counter()
    dvc(first, "commit", "--force")
    run(first, *GIT, "add", "dvc.lock")
    run(first, *GIT, "commit", "--allow-empty", "-qm", "results")
    dvc(first, "push")
    pushed = time.perf_counter() - started

    second = tmp_path / "second"
    run(tmp_path, "git", "clone", "-q", str(first), str(second))
    link_models(second)
    dvc(second, "remote", "modify", "--local", "local", "url", str(remote))
    started = time.perf_counter()
    dvc(second, "pull")
    spectra = list((second / "results" / "quickstart").rglob("*.parquet"))
    assert len(spectra) >= 7  # six files' spectra and the summary's curves
    before = {path: path.stat().st_mtime_ns for path in spectra}

    # What `make pull` does after dvc pull: rebuild the cheap inputs, then order the times.
    untouched = snakemake(second, "-n", "--config", LIMIT, check=False)
    snakemake(second, "inputs", "--cores", "2", "--config", LIMIT)
    snakemake(second, "--cores", "1", "--touch", "--config", LIMIT)
    after = snakemake(second, "-n", "--config", LIMIT)
    pulled = time.perf_counter() - started
    print(
        f"dvc commit+push {pushed:.1f} s, pull+inputs+touch+dry run {pulled:.1f} s; "
        f"before the touch: {untouched.stdout.splitlines()[-1] if untouched.stdout else ''}",
        file=sys.stderr,
    )
    assert "Nothing to be done" in after.stdout + after.stderr, after.stdout
    for path, mtime in before.items():
        assert path.read_bytes(), path
        assert path.stat().st_mtime_ns >= mtime
    # --touch creates empty logs; an extract that ran would have written to its log.
    logs = (second / "results" / "logs" / "quickstart").glob("extract/**/*.log")
    assert all(path.stat().st_size == 0 for path in logs)
