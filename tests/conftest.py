"""Session fixtures shared by the test modules: the checkout and the two small real models."""

from __future__ import annotations

from pathlib import Path

import pytest

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
