"""The issue-12 methods are reachable by name everywhere: over gRPC (the server validates method
names against the registry, GetModel lists them, raw maps of pixel methods come back at the
input's resolution) with the same maps as the in-process Explainer, and on `camserve explain
--method`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_serving import RunningServer, local_config, make_repository

from camserve import Explainer, imaging
from camserve.cli import main
from camserve.client import Client
from camserve.serving.repository import load_model_dir

NEW = ("kpcacam", "fem", "gradcamelementwise", "eigengradcam", "finercam", "shapleycam")
PIXEL = ("guidedbackprop", "guided_gradcam", "smoothgrad", "integrated_gradients")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("models"), corrupt=False)
    with RunningServer(local_config(root, max_batch_size=4)) as rs:
        yield rs, root


def test_grpc_explains_with_every_new_method(server):
    rs, root = server
    pics = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    entry = load_model_dir(root / "fc")
    ex = Explainer(entry.model, class_names=entry.config.class_names)
    x = np.stack([imaging.model_input(p, entry.config) for p in pics])
    with Client(rs.target, timeout=120) as c:
        listed = c.model("fc")["methods"]
        assert set(NEW + PIXEL) <= set(listed)
        got = c.explain(list(pics), model="fc", methods=list(NEW + PIXEL), targets=[1, 1])
    want = ex.explain(x, methods=NEW + PIXEL, targets=[1])
    for g_img, w_img in zip(got, want):
        assert [e.method for e in g_img] == list(NEW + PIXEL)
        for g, w in zip(g_img, w_img):
            assert g.raw.shape == w.raw.shape == ((32, 32) if g.method in PIXEL else w.raw.shape)
            np.testing.assert_allclose(g.raw, w.raw, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(w.raw).max())))


def test_cli_explain_accepts_the_new_methods(tmp_path):
    out = tmp_path / "out"
    args = ["explain", "samples/star.png", "--model", "models/shapes_gap", "--out", str(out)]
    assert main([*args, "--method", "smoothgrad", "--method", "shapleycam"]) == 0
    report = json.loads((out / "explanations.json").read_text())
    assert [e["method"] for e in report[0]["explanations"]] == ["smoothgrad", "shapleycam"]
    for e in report[0]["explanations"]:
        assert (out / e["overlay"]).exists()


def test_http_v1_explain_with_new_methods(server):
    """The HTTP API (TF Serving-style :explain) reaches the same registry."""
    import urllib.request

    rs, root = server
    pic = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    body = {"instances": [pic.tolist()], "methods": ["integrated_gradients", "fem"], "targets": [1], "raw": True}
    request = urllib.request.Request(
        f"http://127.0.0.1:{rs.server.http.port}/v1/models/fc:explain",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        (got,) = json.loads(answer.read())["explanations"]
    entry = load_model_dir(root / "fc")
    want = Explainer(entry.model).explain(
        imaging.model_input(pic, entry.config)[None], methods=("integrated_gradients", "fem"), targets=[1]
    )[0]
    assert [e["method"] for e in got] == ["integrated_gradients", "fem"]
    for e, w in zip(got, want):
        raw = np.asarray(e["raw"])
        assert raw.shape == w.raw.shape
        np.testing.assert_allclose(raw, w.raw, rtol=1e-3, atol=1e-5 * max(1.0, float(np.abs(w.raw).max())))
