"""Unmodified ``tritonclient`` (grpc and http) against a camserve server: readiness, metadata,
inference (pixels and PNG files), classification, an explanation, errors, bearer-token auth.

tritonclient pins protobuf < 7 and camserve's generated code needs 7, so tritonclient lives in
a virtual environment of its own, built here once (pip, from PyPI) and kept in a cache folder
(``$CAMSERVE_TRITONCLIENT_VENV``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` /
``camserve-tritonclient-venv``). The test is skipped, saying why, only when that environment
cannot be built (e.g. no network). tests/tritonclient_script.py runs there against a server
started on free ports and prints what tritonclient got; this test compares it with Keras and
the in-process Explainer.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers_oip import gap_reference, model_inputs
from helpers_serving import CLASSES, RunningServer, local_config, make_repository

from camserve.imaging import encode_png

REQUIREMENT = "tritonclient[grpc,http]==2.73.0"
SCRIPT = Path(__file__).resolve().parents[1] / "tritonclient_script.py"
TOKEN = "triton-s3cret"


def _venv_dir() -> Path:
    """Where the venv lives: the variable, else the user's cache folder, else the temp folder
    (a home that cannot be written)."""
    if os.environ.get("CAMSERVE_TRITONCLIENT_VENV"):
        return Path(os.environ["CAMSERVE_TRITONCLIENT_VENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache / "camserve-tritonclient-venv"
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "camserve-tritonclient-venv"


def _build(venv: Path) -> Path:
    """The venv's python, built once (under a lock) with :data:`REQUIREMENT`; skips when it
    cannot be built."""
    python = venv / "bin" / "python"
    marker = venv / ".camserve-requirement"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == REQUIREMENT and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", REQUIREMENT],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as e:
                shutil.rmtree(venv, ignore_errors=True)
                pytest.skip(f"cannot build the tritonclient environment ({' '.join(step[:3])}): {e}")
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
                pytest.skip(f"cannot build the tritonclient environment ({' '.join(step[-2:])}): {tail}")
        marker.write_text(REQUIREMENT)
    return python


@pytest.fixture(scope="module")
def tritonclient_python() -> Path:
    return _build(_venv_dir())


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"), corrupt=False)


@pytest.fixture(scope="module")
def served(repo_root: Path):
    config = local_config(repo_root, metrics_port=-1, token=TOKEN, max_batch_size=4, batch_timeout_ms=5)
    with RunningServer(config) as rs:
        yield rs


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def report(tritonclient_python: Path, served: RunningServer, pixels: np.ndarray, tmp_path_factory) -> dict:
    """What tritonclient got, over gRPC and HTTP."""
    work = tmp_path_factory.mktemp("tritonclient")
    np.save(work / "pixels.npy", pixels)
    pngs = []
    for i, p in enumerate(pixels):
        pngs += ["--png", str(work / f"{i}.png")]
        (work / f"{i}.png").write_bytes(encode_png(p))
    args = [str(tritonclient_python), str(SCRIPT), "--model", "gap", "--pixels", str(work / "pixels.npy"), *pngs]
    args += ["--grpc", served.target, "--http", f"127.0.0.1:{served.server.http.port}", "--token", TOKEN]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def reference(repo_root: Path):
    return gap_reference(repo_root)


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_readiness_and_metadata(report: dict, transport: str) -> None:
    got = report[transport]
    assert got["live"] and got["ready"] and got["model_ready"] and got["live_after_errors"]
    assert got["server"]["name"] == "camserve" and "classification" in got["server"]["extensions"]
    assert got["metadata"] == {"name": "gap", "versions": ["1", "2"], "inputs": [["images", "UINT8", [-1, -1, -1, 3]]]}


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_scores_classification_and_heatmap(report: dict, transport: str, reference, pixels) -> None:
    got = report[transport]
    model, ex = reference
    expected = model.predict(model_inputs(pixels), verbose=0)
    assert got["id"] == "triton-1"
    np.testing.assert_allclose(got["scores"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["scores_png"], expected, rtol=1e-5, atol=1e-6)
    for row, strings in zip(expected, got["classification"]):
        best = np.argsort(-row)[:2]
        parsed = [s.split(":") for s in strings]
        assert [(int(p[1]), p[2]) for p in parsed] == [(i, CLASSES[i]) for i in best]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[best], atol=1e-6)
    heatmaps = [e.heatmap for (e,) in ex.explain(model_inputs(pixels), methods=("gradcam",), targets=[[1]])]
    np.testing.assert_allclose(np.array(got["heatmap"])[:, 0, 0], heatmaps, rtol=1e-4, atol=1e-5)


def test_errors(report: dict) -> None:
    grpc_errors, http_errors = report["grpc"]["errors"], report["http"]["errors"]
    assert grpc_errors["unknown_model"][0] == "StatusCode.NOT_FOUND" and http_errors["unknown_model"][0] == "404"
    assert "no_such_model" in grpc_errors["unknown_model"][1] and "no_such_model" in http_errors["unknown_model"][1]
    assert grpc_errors["bad_datatype"][0] == "StatusCode.INVALID_ARGUMENT" and http_errors["bad_datatype"][0] == "400"
    assert "INT32" in grpc_errors["bad_datatype"][1] and "INT32" in http_errors["bad_datatype"][1]
    assert grpc_errors["no_token"][0] == "StatusCode.UNAUTHENTICATED" and http_errors["no_token"][0] == "401"
    assert grpc_errors["model_config"][0] == "StatusCode.UNIMPLEMENTED" and http_errors["model_config"][0] == "501"


def test_health_is_public_and_the_rest_needs_the_token(served: RunningServer) -> None:
    """Probes reach /v2/health/* without the token; metadata and inference do not (401, with
    the protocol's error body)."""
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{served.server.http.port}"
    for path in ("/v2/health/live", "/v2/health/ready"):
        with urllib.request.urlopen(base + path, timeout=30) as r:
            assert r.status == 200
    for path in ("/v2", "/v2/models/gap", "/v2/models/gap/ready"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=30)
        assert e.value.code == 401 and "bearer token" in json.loads(e.value.read())["error"]
    authorized = urllib.request.Request(base + "/v2/models/gap", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(authorized, timeout=30) as r:
        assert json.loads(r.read())["name"] == "gap"


def test_proto_matches_tritonclients_own(tritonclient_python: Path) -> None:
    """Wire compatibility: every message camserve's inference/grpc_service.proto declares exists
    in tritonclient's generated code with the same fields (names, numbers, types, repetition),
    and every RPC with the same request and response types and streaming."""
    import importlib.util

    from camserve.proto.inference import grpc_service_pb2

    spec = importlib.util.spec_from_file_location("tritonclient_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # imports tritonclient only when run as a script
    ours = script.descriptors(grpc_service_pb2.DESCRIPTOR)
    done = subprocess.run(
        [str(tritonclient_python), str(SCRIPT), "--descriptors"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout)
    assert len(ours["messages"]) >= 25
    for name, fields in ours["messages"].items():
        assert theirs["messages"].get(name) == fields, name
    for name, method in ours["methods"].items():
        assert theirs["methods"].get(name) == method, name
