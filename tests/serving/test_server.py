"""A real server on localhost: results equal in-process results, status codes, health,
reflection, batching, metrics. Tiny models in a temporary repository."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers_serving import CLASSES, RunningServer, make_repository, metric_value

from camserve import wire
from camserve.client import Client
from camserve.imaging import decode_image, encode_png, preprocess, resize
from camserve.proto import pb, pb_grpc
from camserve.serving.config import ServerConfig

MAX_BATCH = 4


def _config(root: Path, **kw) -> ServerConfig:
    base = dict(
        models=str(root),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        http_port=0,
        max_batch_size=MAX_BATCH,
        batch_timeout_ms=20,
        max_images=8,
        max_pixels=512 * 512,
        max_message_mb=1.0,
        log_format="text",
    )
    base.update(kw)
    return ServerConfig.load(env={}, overrides=base)


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def served(repo_root: Path):
    with RunningServer(_config(repo_root)) as rs:
        yield rs


@pytest.fixture(scope="module")
def client(served: RunningServer):
    with Client(served.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(served: RunningServer):
    channel = grpc.insecure_channel(served.target)
    yield pb_grpc.CamServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def reference(repo_root: Path):
    """The same model files loaded independently of the server, and an in-process Explainer."""
    import keras

    from camserve.explain import Explainer

    model = keras.models.load_model(repo_root / "gap" / "2" / "model.keras", safe_mode=True)
    return model, Explainer(model, class_names=CLASSES)


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(32, 32), (45, 61), (20, 28)]]


def _inputs(pictures: list[np.ndarray]) -> np.ndarray:
    return np.stack([preprocess(resize(p, (32, 32)), "scale_0_1") for p in pictures])


def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


# ------------------------------------------------------------------ results equal in-process results


def test_predict_equals_keras(client: Client, reference, pictures) -> None:
    model, _ = reference
    expected = model.predict(_inputs(pictures), verbose=0)
    got = client.predict(pictures, model="gap", top_k=2)
    assert got.model == ("gap", 2)
    np.testing.assert_allclose(got.scores, expected, rtol=1e-5, atol=1e-6)
    for row, top in zip(expected, got.top):
        best = np.argsort(-row)[:2]
        assert [t[0] for t in top] == list(best) and [t[1] for t in top] == [CLASSES[i] for i in best]


def test_predict_input_forms_agree(client: Client, pictures) -> None:
    pic = pictures[1]
    by_pixels = client.predict(pic, model="gap").scores
    by_png = client.predict(encode_png(pic), model="gap").scores
    by_float = client.predict(_inputs([pic]), model="gap").scores
    np.testing.assert_allclose(by_png, by_pixels, rtol=1e-6)
    np.testing.assert_allclose(by_float, by_pixels, rtol=1e-6)


def test_named_version(client: Client, repo_root: Path, pictures) -> None:
    import keras

    v1 = keras.models.load_model(repo_root / "gap" / "1" / "model.keras")
    got = client.predict(pictures, model="gap", version=1)
    assert got.model == ("gap", 1)
    np.testing.assert_allclose(got.scores, v1.predict(_inputs(pictures), verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method", ["cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam", "ablationcam"]
)
def test_explain_equals_in_process(client: Client, reference, pictures, method: str) -> None:
    _, ex = reference
    expected = ex.explain(_inputs(pictures), methods=(method,), top_k=2)
    got = client.explain(pictures, model="gap", methods=[method], top_k=2)
    assert len(got) == len(expected)
    for g_img, e_img in zip(got, expected):
        assert [(g.method, g.class_index, g.label) for g in g_img] == [
            (e.method, e.class_index, e.label) for e in e_img
        ]
        for g, e in zip(g_img, e_img):
            assert g.score == pytest.approx(e.score, rel=1e-5, abs=1e-6)
            np.testing.assert_allclose(g.raw, e.raw, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(g.heatmap, e.heatmap, rtol=1e-4, atol=1e-5)
            assert g.box == e.box


def test_explain_targets_methods_and_layer(client: Client, reference, pictures) -> None:
    _, ex = reference
    from camserve.explain import Explainer

    targets = [["star", 0], 2, "square"]
    expected = ex.explain(_inputs(pictures), methods=("gradcam", "layercam"), targets=targets)
    got = client.explain(pictures, model="gap", methods=["gradcam", "layercam"], targets=targets)
    assert [[(e.method, e.class_index) for e in img] for img in got] == [
        [(e.method, e.class_index) for e in img] for img in expected
    ]
    assert [e.class_index for e in got[0]] == [3, 3, 0, 0]
    for g_img, e_img in zip(got, expected):
        for g, e in zip(g_img, e_img):
            np.testing.assert_allclose(g.heatmap, e.heatmap, rtol=1e-4, atol=1e-5)
    # An explicitly named earlier layer.
    early = Explainer(reference[0], layer="conv2d_1" if "conv2d_1" in [l.name for l in reference[0].layers] else None)
    name = early.layer_name
    got = client.explain(pictures[:1], model="gap", layer=name)
    np.testing.assert_allclose(got[0][0].raw, early.explain(_inputs(pictures[:1]))[0][0].raw, rtol=1e-4, atol=1e-6)


def test_explain_overlays_and_optional_maps(client: Client, pictures) -> None:
    got = client.explain_with_overlays(pictures[1], model="gap", raw=False, heatmap=False)
    e, png = got[0][0]
    assert e.raw is None and e.heatmap is None and e.label in CLASSES
    assert decode_image(png).shape == pictures[1].shape  # drawn on the image as sent


def test_explain_stream_matches_unary(client: Client, pictures) -> None:
    many = [pictures[i % 3] for i in range(7)]
    streamed = list(client.explain_many(many, model="gap", methods=["gradcam"], chunk=2))
    unary = client.explain(many, model="gap", methods=["gradcam"])
    assert len(streamed) == 7
    for s_img, u_img in zip(streamed, unary):
        np.testing.assert_allclose(s_img[0].heatmap, u_img[0].heatmap, rtol=1e-5, atol=1e-6)


def test_warm_up_compiled_every_bucket(served: RunningServer, client: Client, pictures) -> None:
    ex = served.server.runtimes.get("gap", 2).explainers[""]
    before = ex.trace_count
    for n in range(1, MAX_BATCH + 1):
        client.predict([pictures[0]] * n, model="gap")
        client.explain([pictures[0]] * n, model="gap", methods=["gradcam"])
    assert ex.trace_count == before, "a request traced a new graph after warm-up"


# ------------------------------------------------------------------ models, health, reflection


def test_list_and_get_models(client: Client) -> None:
    models = {m["name"]: m for m in client.models()}
    assert set(models) == {"gap", "fc", "broken"}
    gap = models["gap"]
    assert gap["available"] and gap["version"] == "2" and gap["versions"] == ["1", "2"]
    assert gap["class_names"] == list(CLASSES) and (gap["input_height"], gap["input_width"]) == (32, 32)
    assert "cam" in gap["methods"] and "cam" not in models["fc"]["methods"]
    assert gap["default_layer"] == "last_conv" and "last_conv" in gap["target_layers"]
    broken = client.model("broken")
    assert not broken["available"] and "failed to load" in broken["reason"]


def test_health(client: Client) -> None:
    assert client.health("") == "SERVING"
    assert client.health("camserve.v1.CamService") == "SERVING"
    assert client.health("gap") == "SERVING"
    assert client.health("broken") == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as e:
        client.health("no-such-model")
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_services(served: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="camserve.v1.CamService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"camserve.v1.CamService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_every_service_behind_the_gate_answers_on_the_event_loop(served: RunningServer) -> None:
    """Reflection, CamService and OIP handlers are coroutines or async generators: none holds
    an executor thread for the length of a stream (grpcurl keeps its reflection stream open)."""
    import inspect
    from types import SimpleNamespace

    from camserve.serving.status import behavior_of

    gate = served.server._gate
    for method in (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/camserve.v1.CamService/Predict",
        "/camserve.v1.CamService/ExplainStream",
        "/inference.GRPCInferenceService/ModelInfer",
    ):
        behavior = behavior_of(gate.service(SimpleNamespace(method=method, invocation_metadata=())))
        assert inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior), method


# ------------------------------------------------------------------ status codes (SPEC §6)


def _png(h: int = 32, w: int = 32) -> bytes:
    return encode_png(np.zeros((h, w, 3), np.uint8))


def _predict(**kw) -> pb.PredictRequest:
    kw.setdefault("model", pb.ModelSpec(name="gap"))
    kw.setdefault("images", [pb.Image(encoded=_png())])
    return pb.PredictRequest(**kw)


def _explain(**kw) -> pb.ExplainRequest:
    kw.setdefault("model", pb.ModelSpec(name="gap"))
    kw.setdefault("images", [pb.Image(encoded=_png())])
    return pb.ExplainRequest(**kw)


BAD_REQUESTS = {
    "unknown model": (
        "Predict",
        _predict(model=pb.ModelSpec(name="nope")),
        "NOT_FOUND",
        "unknown model 'nope'; available",
    ),
    "escaping name": ("Predict", _predict(model=pb.ModelSpec(name="../gap")), "NOT_FOUND", "invalid model name"),
    "no model name": ("Predict", _predict(model=pb.ModelSpec()), "INVALID_ARGUMENT", "model.name is required"),
    "unknown version": (
        "Predict",
        _predict(model=pb.ModelSpec(name="gap", version=9)),
        "NOT_FOUND",
        r"no version 9; available: \[1, 2\]",
    ),
    "corrupt model": ("Predict", _predict(model=pb.ModelSpec(name="broken")), "UNAVAILABLE", "failed to load"),
    "no images": ("Predict", _predict(images=[]), "INVALID_ARGUMENT", "no images in the request; send 1 to 8"),
    "too many images": (
        "Predict",
        _predict(images=[pb.Image(encoded=_png())] * 9),
        "INVALID_ARGUMENT",
        "9 images in one request; at most 8",
    ),
    "not an image": ("Predict", _predict(images=[pb.Image(encoded=b"GIF89a....")]), "INVALID_ARGUMENT", "not an image"),
    "truncated png": (
        "Predict",
        _predict(images=[pb.Image(encoded=_png()[:40])]),
        "INVALID_ARGUMENT",
        "corrupt or truncated PNG",
    ),
    "empty image": ("Predict", _predict(images=[pb.Image(encoded=b"")]), "INVALID_ARGUMENT", "image: empty image"),
    "image without source": ("Predict", _predict(images=[pb.Image()]), "INVALID_ARGUMENT", "set `encoded`"),
    "second image bad": (
        "Predict",
        _predict(images=[pb.Image(encoded=_png()), pb.Image(encoded=b"xx")]),
        "INVALID_ARGUMENT",
        "image 1: not an image",
    ),
    "giant header": (
        "Predict",
        _predict(images=[pb.Image(encoded=_png(1, 1)[:16] + (100000).to_bytes(4, "big") * 2 + _png(1, 1)[24:])]),
        "INVALID_ARGUMENT",
        "100000x100000 = 10000000000 pixels exceeds the limit of 262144",
    ),
    "nan tensor": (
        "Predict",
        _predict(images=[wire.image_to_proto(np.full((32, 32, 3), np.nan, np.float32))]),
        "INVALID_ARGUMENT",
        "NaN or Inf",
    ),
    "wrong dtype": (
        "Predict",
        _predict(images=[pb.Image(tensor=pb.Tensor(dtype="int16", shape=[32, 32, 3], data=b"\0" * 6144))]),
        "INVALID_ARGUMENT",
        "dtype 'int16' not allowed",
    ),
    "wrong float shape": (
        "Predict",
        _predict(images=[wire.image_to_proto(np.zeros((30, 32, 3), np.float32))]),
        "INVALID_ARGUMENT",
        r"shape \[30, 32, 3\]; model 'gap' takes preprocessed inputs of shape \[32, 32, 3\]",
    ),
    "predict top_k": ("Predict", _predict(top_k=5), "INVALID_ARGUMENT", "top_k must be between 0 and 4"),
    "unknown method": ("Explain", _explain(methods=["magic"]), "INVALID_ARGUMENT", "unknown method 'magic'; allowed"),
    "cam on flatten head": (
        "Explain",
        _explain(model=pb.ModelSpec(name="fc"), methods=["cam"]),
        "INVALID_ARGUMENT",
        "needs a GlobalAveragePooling2D",
    ),
    "unknown layer": ("Explain", _explain(layer="conv99"), "NOT_FOUND", "unknown layer 'conv99'"),
    "unknown class": (
        "Explain",
        _explain(targets=[pb.TargetList(targets=[pb.Target(name="dog")])]),
        "NOT_FOUND",
        "unknown class 'dog'",
    ),
    "class index": (
        "Explain",
        _explain(targets=[pb.TargetList(targets=[pb.Target(index=4)])]),
        "NOT_FOUND",
        "out of range",
    ),
    "explain top_k": ("Explain", _explain(top_k=9), "INVALID_ARGUMENT", "top_k must be between 1 and 4"),
    "negative top_k": ("Explain", _explain(top_k=-1), "INVALID_ARGUMENT", "top_k must be between 1 and 4"),
    "target lists": (
        "Explain",
        _explain(images=[pb.Image(encoded=_png())] * 3, targets=[pb.TargetList(targets=[pb.Target(index=1)])] * 2),
        "INVALID_ARGUMENT",
        "2 target lists for 3 images",
    ),
    "empty target": ("Explain", _explain(targets=[pb.TargetList()]), "INVALID_ARGUMENT", "empty target list"),
    "dense mode": (
        "DenseScores",
        pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=pb.Image(encoded=_png()), mode="magic"),
        "INVALID_ARGUMENT",
        "mode must be 'fcn' or 'crops'",
    ),
    "dense small image": (
        "DenseScores",
        pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=pb.Image(encoded=_png(16, 40))),
        "INVALID_ARGUMENT",
        "smaller than the model's window",
    ),
    "dense no image": (
        "DenseScores",
        pb.DenseScoresRequest(model=pb.ModelSpec(name="fc")),
        "INVALID_ARGUMENT",
        "image is required",
    ),
    "dense scales": (
        "DenseScores",
        pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=pb.Image(encoded=_png()), scales=[0.0]),
        "INVALID_ARGUMENT",
        "scales must be",
    ),
    "get unknown": ("GetModel", pb.GetModelRequest(model=pb.ModelSpec(name="zzz")), "NOT_FOUND", "unknown model 'zzz'"),
    "oversize message": (
        "Predict",
        _predict(images=[pb.Image(encoded=b"\0" * (1024 * 1024 + 10))]),
        "RESOURCE_EXHAUSTED",
        "",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_status_codes(stub, case: str) -> None:
    method, request, code, match = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, method)(request, timeout=30)
    assert _code(e).name == code, e.value.details()
    if match:
        import re

        assert re.search(match, e.value.details()), e.value.details()


def test_server_still_answers_after_bad_requests(client: Client, pictures) -> None:
    assert client.predict(pictures[0], model="gap").scores.shape == (1, 4)


def test_errors_counted_by_code(served: RunningServer, stub) -> None:
    with pytest.raises(grpc.RpcError):
        stub.Predict(_predict(model=pb.ModelSpec(name="nope")), timeout=10)
    text = served.metrics_text()
    assert metric_value(text, "camserve_errors_total", method="Predict", code="NOT_FOUND") >= 1
    assert metric_value(text, "camserve_requests_total", method="Predict", code="OK") >= 1
    assert metric_value(text, "camserve_request_latency_seconds_count", method="Predict") >= 2
    assert "camserve_queue_time_seconds_bucket" in text and "camserve_queue_depth" in text


def test_bad_request_does_not_fail_its_batch(served: RunningServer, pictures) -> None:
    """Requests batched together: one that fails inside compute only fails itself."""
    good = _predict(images=[wire.image_to_proto(pictures[0])])
    with concurrent.futures.ThreadPoolExecutor(4) as pool, grpc.insecure_channel(served.target) as ch:
        s = pb_grpc.CamServiceStub(ch)
        futures = [pool.submit(s.Predict, good, timeout=30) for _ in range(4)]
        assert all(len(f.result().predictions) == 1 for f in futures)


# ------------------------------------------------------------------ batching under concurrency


def test_concurrent_single_image_clients_are_batched(repo_root: Path, pictures) -> None:
    with RunningServer(_config(repo_root, batch_timeout_ms=200, max_batch_size=16)) as rs:
        barrier = threading.Barrier(16)

        def one(i: int) -> np.ndarray:
            with Client(rs.target) as c:
                barrier.wait(30)
                return c.predict(pictures[i % 3], model="gap").scores[0]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            rows = list(pool.map(one, range(16)))
        text = rs.metrics_text()
    count = metric_value(text, "camserve_batch_size_count", operation="predict")
    total = metric_value(text, "camserve_batch_size_sum", operation="predict")
    singles = metric_value(text, "camserve_batch_size_bucket", operation="predict", le="1.0")
    assert total == 16 and count < 16, f"16 requests in {count} batches"
    assert singles < count or count == 1
    # Batched answers are each image's own answer.
    solo = Client  # noqa: F841 - readability
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row, rows[i % 3], rtol=1e-5)


# ------------------------------------------------------------------ DenseScores


@pytest.fixture(scope="module")
def fc_reference(repo_root: Path):
    import keras

    return keras.models.load_model(repo_root / "fc" / "1" / "model.keras", safe_mode=True)


@pytest.mark.parametrize(
    "stride,scales,mode", [(None, (1.0,), "fcn"), (1, (1.0,), "fcn"), (None, (1.0, 0.8), "fcn"), (4, (1.0,), "crops")]
)
def test_dense_scores_equal_in_process(client: Client, fc_reference, stride, scales, mode) -> None:
    from camserve.dense import dense_scores

    pic = np.random.default_rng(11).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    expected = dense_scores(fc_reference, preprocess(pic, "scale_0_1"), stride=stride, scales=scales, mode=mode)
    got = client.dense(pic, model="fc", stride=stride, scales=scales, mode=mode)
    assert (got.stride, got.exact, got.mode, got.window) == (expected.stride, expected.exact, mode, expected.window)
    assert got.class_names == list(CLASSES) and len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.scale == pytest.approx(e.scale)
        np.testing.assert_allclose(g.scores, e.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(g.boxes, e.boxes)


def test_dense_bad_stride_and_scale(stub) -> None:
    req = pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=pb.Image(encoded=_png(40, 40)), stride=3)
    with pytest.raises(grpc.RpcError) as e:
        stub.DenseScores(req, timeout=30)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "stride" in e.value.details()
    req = pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=pb.Image(encoded=_png(40, 40)), scales=[0.5])
    with pytest.raises(grpc.RpcError) as e:
        stub.DenseScores(req, timeout=30)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "smaller than" in e.value.details()
    req = pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=pb.Image(encoded=_png(40, 40)), scales=[100.0])
    with pytest.raises(grpc.RpcError) as e:
        stub.DenseScores(req, timeout=30)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in e.value.details()


def test_explain_stream_error_ends_stream_with_its_status(stub) -> None:
    reqs = [_explain(request_id="ok"), _explain(request_id="bad", layer="nope")]
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for resp in stub.ExplainStream(iter(reqs), timeout=60):
            got.append(resp.request_id)
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    assert "request 'bad': unknown layer 'nope'" in e.value.details()
    assert set(got) <= {"ok"}
