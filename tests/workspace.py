"""A copy of the repository to run the real workflow in, and the commands that run it there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "smollm2_135m_instruct"
LIMIT = "data={limit: 2}"


def workflow_env(root: Path) -> dict[str, str]:
    """Run the copy's code and config, not the checkout's the venv was installed from."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root / "src"),
        "GRADSPEC_ROOT": str(root),
        "WANDB_MODE": "offline",
    }


def snakemake(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(BIN / "snakemake"), *args],
        cwd=root,
        env=workflow_env(root),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def ensure_model(name: str = MODEL) -> Path:
    """The checkout's prepared model, prepared once if missing, so copies can link to it."""
    folder = ROOT / "resources" / "models" / name
    if not (folder / "provenance.json").exists():
        subprocess.run(
            [str(BIN / "gradspec"), "prepare-model", f"model={name}"], cwd=ROOT, check=True
        )
    return folder


def make_workspace(path: Path, git: bool = True) -> Path:
    """A copy of the tracked files (as a git repository with one commit) and linked models."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, path / name)
    link_models(path)
    if git:
        run = dict(cwd=path, check=True, capture_output=True)
        subprocess.run(["git", "init", "-q", "-b", "main"], **run)
        subprocess.run(["git", "add", "-A"], **run)
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], **run
        )
    return path


def link_models(path: Path) -> None:
    models = path / "resources" / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / MODEL).exists():
        (models / MODEL).symlink_to(ensure_model())
