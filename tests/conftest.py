"""Shared fixtures: real ImageNette archives from ``../shared/datasets`` (never mocks).

Set ``IMAGENETTE_DATASETS`` to point elsewhere. A missing archive is a hard failure, not a skip:
CI must never pass by testing nothing.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("IMAGENETTE_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


def _archive(name: str) -> Path:
    path = DATASETS / name
    if not path.is_file():
        pytest.fail(
            f"real dataset archive {path} not found; put the shared datasets beside the repo "
            f"(../shared/datasets) or set IMAGENETTE_DATASETS=/path/to/folder"
        )
    return path


@pytest.fixture(scope="session")
def mini_archive() -> Path:
    """The real 300-image ImageNette archive (20 train + 10 val per class, 224 px)."""
    return _archive("imagenette2-224-mini.tgz")


@pytest.fixture(scope="session")
def full_archive() -> Path:
    """The real 13,394-image ImageNette archive (224 px)."""
    return _archive("imagenette2-224.tgz")


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory: pytest.TempPathFactory, mini_archive: Path) -> Path:
    """The mini archive extracted once per session (read-only use; copy it before breaking it)."""
    dest = tmp_path_factory.mktemp("mini")
    with tarfile.open(mini_archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "imagenette2-224-mini"


@pytest.fixture
def mini_copy(tmp_path: Path, mini_root: Path) -> Path:
    """A private, writable copy of the extracted mini dataset, for tests that damage it."""
    dest = tmp_path / mini_root.name
    shutil.copytree(mini_root, dest)
    return dest
