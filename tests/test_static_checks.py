"""Static checks run by the same command as the tests: ruff (lint and format) and mypy, with the
settings in pyproject.toml. The package ships ``py.typed``, so its types must hold."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ["camserve", "tests", "bench"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_ruff_lint():
    done = _run("ruff", "check", "--no-cache", *PATHS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format():
    done = _run("ruff", "format", "--check", "--no-cache", *PATHS)
    assert done.returncode == 0, "run `ruff format camserve tests bench`:\n" + done.stdout + done.stderr


def test_mypy():
    done = _run("mypy", "--no-incremental")
    assert done.returncode == 0, done.stdout + done.stderr


def test_py_typed_is_shipped():
    assert (REPO / "camserve" / "py.typed").exists()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["camserve"]
