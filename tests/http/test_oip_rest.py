"""Open Inference Protocol v2 REST on camserve's HTTP port: health, metadata, JSON and binary
tensors, classification, explanations, errors (status and the protocol's ``{"error": ...}``
body). Scores are compared with Keras on the same inputs, explanations with the in-process
Explainer, binary answers are decoded by hand. Tiny models in a temporary repository."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers_oip import SIZE, gap_reference, model_inputs
from helpers_serving import CLASSES, RunningServer, local_config, make_repository

from camserve.imaging import encode_png


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def served(repo_root: Path):
    config = local_config(
        repo_root,
        metrics_port=-1,
        max_batch_size=4,
        batch_timeout_ms=5,
        max_images=8,
        max_pixels=512 * 512,
        max_message_mb=1.0,
    )
    with RunningServer(config) as rs:
        yield rs


@pytest.fixture(scope="module")
def base(served: RunningServer) -> str:
    return f"http://127.0.0.1:{served.server.http.port}"


@pytest.fixture(scope="module")
def reference(repo_root: Path):
    return gap_reference(repo_root)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (2, 40, 36, 3), dtype=np.uint8)


def _call(url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET (no body) or POST."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _json(url: str, body=None, headers=None) -> tuple[int, dict]:
    status, _, data = _call(url, body, headers)
    return status, json.loads(data)


def _tensor(array: np.ndarray, datatype: str = "UINT8") -> dict:
    return {"name": "images", "datatype": datatype, "shape": list(array.shape), "data": array.reshape(-1).tolist()}


def _outputs(doc: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}


# ---------------------------------------------------------------------------- health and metadata


def test_health_and_readiness(base: str) -> None:
    assert _json(f"{base}/v2/health/live") == (200, {"live": True})
    assert _json(f"{base}/v2/health/ready") == (200, {"ready": True})
    assert _json(f"{base}/v2/models/gap/ready") == (200, {"name": "gap", "ready": True})
    assert _json(f"{base}/v2/models/gap/versions/1/ready")[0] == 200
    assert _json(f"{base}/v2/models/broken/ready")[0] == 503
    status, body = _json(f"{base}/v2/models/nope/ready")
    assert status == 404 and "unknown model 'nope'" in body["error"] and "gap" in body["error"]


def test_metadata(base: str) -> None:
    status, server = _json(f"{base}/v2")
    assert status == 200 and server["name"] == "camserve" and "binary_tensor_data" in server["extensions"]
    status, meta = _json(f"{base}/v2/models/gap")
    assert status == 200 and meta["name"] == "gap" and meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert {"name": "scores", "datatype": "FP32", "shape": [-1, len(CLASSES)]} in meta["outputs"]
    assert _json(f"{base}/v2/models/gap/versions/1")[1]["versions"] == ["1"]
    status, body = _json(f"{base}/v2/models/gap/versions/9")
    assert status == 404 and "no version 9" in body["error"]


# ---------------------------------------------------------------------------- inference


def test_json_scores_equal_keras(base: str, reference, pixels) -> None:
    model, _ = reference
    expected = model.predict(model_inputs(pixels), verbose=0)
    status, doc = _json(f"{base}/v2/models/gap/infer", {"id": "r1", "inputs": [_tensor(pixels)]})
    assert status == 200 and (doc["model_name"], doc["model_version"], doc["id"]) == ("gap", "2", "r1")
    np.testing.assert_allclose(_outputs(doc)["scores"], expected, rtol=1e-5, atol=1e-6)
    # FP32 preprocessed inputs and base64 PNG files give the same scores.
    fp32 = _json(f"{base}/v2/models/gap/infer", {"inputs": [_tensor(model_inputs(pixels), "FP32")]})[1]
    np.testing.assert_allclose(_outputs(fp32)["scores"], expected, rtol=1e-5, atol=1e-6)
    pngs = [base64.b64encode(encode_png(p)).decode() for p in pixels]
    by_png = _json(
        f"{base}/v2/models/gap/infer", {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": pngs}]}
    )[1]
    np.testing.assert_allclose(_outputs(by_png)["scores"], expected, rtol=1e-5, atol=1e-6)


def test_binary_tensor_data_extension(base: str, reference, pixels) -> None:
    """Inputs as binary data after a JSON header; outputs asked in binary come back the same way."""
    model, _ = reference
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(pixels.shape),
                    "parameters": {"binary_data_size": pixels.nbytes},
                }
            ],
            "outputs": [{"name": "scores", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = _call(
        f"{base}/v2/models/gap/versions/2/infer",
        header + pixels.tobytes(),
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200
    n = int(headers["Inference-Header-Content-Length"])
    doc = json.loads(body[:n])
    (out,) = doc["outputs"]
    assert out["parameters"]["binary_data_size"] == len(body) - n == 2 * len(CLASSES) * 4
    scores = np.frombuffer(body[n:], "<f4").reshape(out["shape"])
    np.testing.assert_allclose(scores, model.predict(model_inputs(pixels), verbose=0), rtol=1e-5, atol=1e-6)


def test_classification_strings(base: str, reference, pixels) -> None:
    model, _ = reference
    expected = model.predict(model_inputs(pixels), verbose=0)
    body = {"inputs": [_tensor(pixels)], "outputs": [{"name": "scores", "parameters": {"classification": 2}}]}
    doc = _json(f"{base}/v2/models/gap/infer", body)[1]
    (out,) = doc["outputs"]
    assert (out["datatype"], out["shape"]) == ("BYTES", [2, 2])
    for row, strings in zip(expected, np.array(out["data"]).reshape(2, 2)):
        best = np.argsort(-row)[:2]
        parsed = [s.split(":") for s in strings]
        assert [(int(p[1]), p[2]) for p in parsed] == [(i, CLASSES[i]) for i in best]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[best], atol=1e-6)


def test_explanation_outputs_equal_in_process(base: str, reference, pixels) -> None:
    _, ex = reference
    expected = ex.explain(model_inputs(pixels), methods=("gradcam",), targets=[[1]])
    body = {
        "inputs": [_tensor(pixels)],
        "parameters": {"method": "gradcam", "target": 1},
        "outputs": [{"name": "heatmap"}, {"name": "raw"}, {"name": "boxes"}],
    }
    status, doc = _json(f"{base}/v2/models/gap/infer", body)
    assert status == 200
    got = _outputs(doc)
    assert got["heatmap"].shape == (2, 1, 1, SIZE, SIZE)
    for i, (e,) in enumerate(expected):
        np.testing.assert_allclose(got["heatmap"][i, 0, 0], e.heatmap, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["raw"][i, 0, 0], e.raw, rtol=1e-4, atol=1e-6)
        assert tuple(got["boxes"][i, 0, 0]) == (e.box if e.box is not None else (-1, -1, -1, -1))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"inputs": [_tensor(np.zeros((1, 4, 4, 3), np.int32), "INT32")]}, 400, "datatype INT32"),
        ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 4, 4, 3], "data": [1, 2]}]}, 400, "48"),
        ({"inputs": [_tensor(np.zeros((1, 4, 4, 3), np.uint8))], "parameters": {"method": "nope"}}, 400, "method"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400, "base64"),
        ({"inputs": "images"}, 400, "JSON list"),
        ({"outputs": [{"name": "scores"}]}, 400, "exactly one input"),
    ],
)
def test_bad_requests(base: str, body: dict, status: int, words: str) -> None:
    got, doc = _json(f"{base}/v2/models/gap/infer", body)
    assert got == status and words in doc["error"], doc


def test_bad_bodies_and_unknown_model(base: str, pixels) -> None:
    status, doc = _json(f"{base}/v2/models/nope/infer", {"inputs": [_tensor(pixels)]})
    assert status == 404 and "unknown model" in doc["error"]
    status, _, body = _call(f"{base}/v2/models/gap/infer", b"{not json")
    assert status == 400 and "not valid" in json.loads(body)["error"]
    status, _, body = _call(f"{base}/v2/models/gap/infer", b"{}", {"Inference-Header-Content-Length": "99"})
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(body)["error"]
    status, _, body = _call(f"{base}/v2/models/gap/infer", b"x" * (2 << 20))
    assert status == 413 and "max_message_mb" in json.loads(body)["error"]
    assert _json(f"{base}/v2/models/gap/infer", {"inputs": [_tensor(pixels)]})[0] == 200  # still serving


def test_triton_timeout_parameter(base: str, pixels) -> None:
    """``timeout`` (microseconds): 1 µs is over before the batcher sees the request (504 with
    the protocol's error body); a long one answers; bad values are 400 naming the parameter."""
    body = {"inputs": [_tensor(pixels)]}
    status, doc = _json(f"{base}/v2/models/gap/infer", {**body, "parameters": {"timeout": 1}})
    assert status == 504 and set(doc) == {"error"} and "deadline" in doc["error"]
    status, doc = _json(f"{base}/v2/models/gap/infer", {**body, "parameters": {"timeout": 60_000_000}})
    assert status == 200 and [o["name"] for o in doc["outputs"]] == ["scores"]
    for bad in (-1, 1.5, "soon", True):
        status, doc = _json(f"{base}/v2/models/gap/infer", {**body, "parameters": {"timeout": bad}})
        assert status == 400 and "parameter 'timeout'" in doc["error"] and "microseconds >= 0" in doc["error"], bad


def test_unsupported_triton_routes_answer_501(base: str) -> None:
    for path, body in [("/v2/models/gap/config", None), ("/v2/models/stats", None), ("/v2/repository/index", b"{}")]:
        status, _, data = _call(f"{base}{path}", body)
        assert status == 501 and "not implemented" in json.loads(data)["error"], path
    assert _json(f"{base}/v2/models/gap")[0] == 200


def test_json_answer_over_the_size_limit_asks_for_binary(base: str) -> None:
    """98304 heatmap values: 384 KiB as binary float32 (the data plane's estimate lets it through),
    about 1.5 MB as JSON numbers, over the server's max_message_mb of 1 MiB."""
    pixels = np.random.default_rng(1).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)
    body = {
        "inputs": [_tensor(pixels)],
        "parameters": {"method": "gradcam,layercam,gradcam++", "top_k": 4},
        "outputs": [{"name": "heatmap"}],
    }
    status, doc = _json(f"{base}/v2/models/gap/infer", body)
    assert status == 429 and "binary_data" in doc["error"] and "max_message_mb=1" in doc["error"]
    body["parameters"]["binary_data_output"] = True
    status, headers, data = _call(f"{base}/v2/models/gap/infer", body)
    n = int(headers["Inference-Header-Content-Length"])
    assert status == 200 and len(data) - n == 8 * 4 * 3 * SIZE * SIZE * 4
