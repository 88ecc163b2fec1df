"""The `camserve bulk` command without Ray: the install hint when the extra is missing, an
interrupted job's message, and the options reaching the job."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from camserve.bulk import job
from camserve.cli import main


def test_without_ray_the_command_says_how_to_install_it(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    code = main(["bulk", str(tmp_path / "a.png"), "--model", str(model_dir), "--out", str(tmp_path / "o")])
    assert code == 2
    assert 'pip install "camserve[bulk]"' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_options_reach_the_job_and_ctrl_c_says_how_to_resume(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    seen = {}

    def interrupted(inputs, settings, **kwargs):
        seen.update(inputs=inputs, settings=settings, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run_bulk", interrupted)
    argv = ["bulk", "a/", "b.parquet", "--model", str(model_dir), "--out", "o", "--method", "cam", "--method", "cam"]
    argv += ["--target", "star", "--target", "2", "--layer", "conv3b_relu,last_conv", "--eigen-smooth"]
    argv += ["--dense", "--overlays", "--path-column", "file", "--address", "auto", "--batch-size", "8"]
    argv += ["--cpus-per-actor", "1", "--min-actors", "2", "--max-actors", "3", "--gpus-per-actor", "0.5"]
    argv += ["--retry-failed", "--no-progress"]
    assert main(argv) == 130
    assert "run it again with --out o to resume" in capsys.readouterr().err
    s = seen["settings"]
    assert seen["inputs"] == ["a/", "b.parquet"]
    assert (s.methods, s.targets, s.layer, s.eigen_smooth, s.aug_smooth) == (
        ("cam",),
        ("star", 2),
        ("conv3b_relu", "last_conv"),
        True,
        False,
    )
    assert (s.dense, s.overlays, s.batch_size, s.model_dir, s.out) == (True, True, 8, str(model_dir), "o")
    options = ("path_column", "address", "cpus_per_actor", "min_actors", "max_actors", "gpus_per_actor")
    assert {k: seen[k] for k in options} == {
        "path_column": "file",
        "address": "auto",
        "cpus_per_actor": 1,
        "min_actors": 2,
        "max_actors": 3,
        "gpus_per_actor": 0.5,
    }
    assert seen["retry_failed"] and not seen["progress"]
