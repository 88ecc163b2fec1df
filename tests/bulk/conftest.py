"""Fixtures of the camserve bulk tests: the bundled shapes_gap model and sample images; Ray
is started by the tests that need it (one local session per module, 2 CPUs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "shapes_gap"
SAMPLES = sorted((REPO / "samples").glob("*.png"))


@pytest.fixture(scope="session")
def samples() -> list[Path]:
    """The sample PNGs of the repository, sorted."""
    return SAMPLES


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The bundled shapes_gap model folder."""
    return MODEL


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """A folder with the six sample PNGs."""
    folder = tmp_path / "images"
    folder.mkdir()
    for p in SAMPLES:
        shutil.copy(p, folder / p.name)
    return folder
