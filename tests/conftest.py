"""Session fixtures shared by the test modules: the checkout and the two small real models."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from workspace import LIMIT, make_workspace, snakemake

from gradspec.config import compose, project_root
from gradspec.models import prepare_model


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return project_root()


def _prepared(name: str, repo_root: Path) -> Path:
    """The model's prepared folder; made on first use, returned at once when already there."""
    return prepare_model(compose([f"model={name}"]).model, repo_root / "resources" / "models")


@pytest.fixture(scope="session")
def smollm2_dir(repo_root: Path) -> Path:
    return _prepared("smollm2_135m_instruct", repo_root)


@pytest.fixture(scope="session")
def gemma3_dir(repo_root: Path) -> Path:
    return _prepared("gemma3_270m", repo_root)


@pytest.fixture(scope="session")
def finished_workspace(tmp_path_factory) -> Path:
    """The quickstart workflow run for real on two samples per file; shared by every test that
    needs its results (one run per session).

    GRADSPEC_TEST_WORKSPACE names a workspace finished by an earlier session, to reuse it.
    """
    earlier = os.environ.get("GRADSPEC_TEST_WORKSPACE")
    if earlier and (Path(earlier) / "results" / "quickstart" / "findings.md").exists():
        return Path(earlier)
    root = make_workspace(tmp_path_factory.mktemp("workflow"))
    started = time.perf_counter()
    snakemake(root, "--cores", "2", "--config", LIMIT)
    print(f"workflow on data.limit=2: {time.perf_counter() - started:.0f} s")
    return root
