"""Formatting and lint: ruff on the Python code, Snakemake's own linter on the workflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = [name for name in ("src", "tests", "benchmarks") if (ROOT / name).exists()]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ruff"), *args, *TARGETS], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_format():
    done = ruff("format", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_check():
    done = ruff("check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_snakefiles_lint():
    # snakefmt is not installed; Snakemake's linter covers the Snakefile and workflow/rules.
    done = subprocess.run(
        [str(BIN / "snakemake"), "--lint"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "Congratulations" in done.stdout + done.stderr, done.stdout
