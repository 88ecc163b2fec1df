"""The protocol-independent data plane (camserve.serving.dataplane) and its typed batch keys
and jobs (camserve.serving.jobs): called directly, without gRPC, it answers like the gRPC
service; requests are checked by the library before queueing; batches carry typed keys."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import grpc
import numpy as np
import pytest
from helpers_serving import CLASSES, RunningServer, local_config, make_repository, metric_value

from camserve import errors, wire
from camserve.imaging import encode_png, model_input
from camserve.proto import pb, pb_grpc
from camserve.serving.dataplane import DataPlane, decode_image, display_pixels
from camserve.serving.jobs import DenseJob, DenseKey, ExplainJob, ExplainKey, PredictJob, PredictKey

RNG = np.random.default_rng(5)
PICTURES = [RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(32, 32), (45, 61)]]


# ------------------------------------------------------------------ keys


def test_keys_are_frozen_hashable_and_name_their_operation() -> None:
    p = PredictKey("gap", 2, (32, 32, 3))
    e = ExplainKey("gap", 2, "last_conv", ("gradcam",), (32, 32, 3), top_k=1)
    d = DenseKey("fc", 1, (40, 48, 3), None, (1.0,), "fcn")
    assert (p.operation, e.operation, d.operation) == ("predict", "explain", "dense")
    assert len({p, PredictKey("gap", 2, (32, 32, 3)), PredictKey("gap", 1, (32, 32, 3))}) == 2
    assert e != dataclasses.replace(e, top_k=None)  # explicit targets never share a batch with top-k
    assert e != dataclasses.replace(e, methods=("gradcam", "cam"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.version = 3
    assert "operation" not in [f.name for f in dataclasses.fields(p)]  # a class constant, not a field


# ------------------------------------------------------------------ a served repository


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("models"), corrupt=False)
    cfg = local_config(root, max_batch_size=4, max_images=4, batch_timeout_ms=2)
    with RunningServer(cfg) as rs:
        yield rs


@pytest.fixture(scope="module")
def stub(served: RunningServer):
    channel = grpc.insecure_channel(served.target)
    yield pb_grpc.CamServiceStub(channel)
    channel.close()


@pytest.fixture
def batches(served: RunningServer):
    """Records (key, jobs) of every batch computed while the test runs."""
    batcher = served.server.batcher
    inner = batcher.compute
    seen: list = []

    def record(key, jobs):
        seen.append((key, list(jobs)))
        return inner(key, jobs)

    batcher.compute = record
    yield seen
    batcher.compute = inner


def _pixels(a: np.ndarray) -> wire.WireImage:
    return wire.WireImage(a, preprocessed=False)


def test_predict_without_grpc_equals_the_grpc_answer(served, stub) -> None:
    plane = served.server.dataplane
    got = served.run(plane.predict("gap", 0, [_pixels(p) for p in PICTURES]))
    assert (got.model, got.version, got.class_names) == ("gap", 2, CLASSES)
    over_grpc = stub.Predict(
        pb.PredictRequest(model=pb.ModelSpec(name="gap"), images=[pb.Image(encoded=encode_png(p)) for p in PICTURES]),
        timeout=30,
    )
    np.testing.assert_allclose(got.scores, wire.predictions_from_proto(over_grpc), rtol=1e-6)
    # An already preprocessed input gives the same scores as its pixels.
    cfg = served.server.runtimes.get("gap").entry.config
    pre = wire.WireImage(model_input(PICTURES[1], cfg), preprocessed=True)
    again = served.run(plane.predict("gap", 2, [pre]))
    np.testing.assert_allclose(again.scores[0], got.scores[1], rtol=1e-6)


def test_explain_without_grpc_and_its_typed_batch(served, batches) -> None:
    plane = served.server.dataplane
    got = served.run(
        plane.explain(
            "gap", 1, [_pixels(p) for p in PICTURES], methods=["gradcam", "gradcam"], targets=[["star", 0], [2]]
        )
    )
    assert (got.model, got.version, got.layer) == ("gap", 1, "last_conv")
    assert [[(e.method, e.class_index) for e in img] for img in got.explanations] == [
        [("gradcam", 3), ("gradcam", 0)],
        [("gradcam", 2)],
    ]
    pngs = got.overlays(1)
    assert len(pngs) == 1 and pngs[0].startswith(b"\x89PNG")
    [(key, jobs)] = batches
    assert key == ExplainKey("gap", 1, "last_conv", ("gradcam",), (32, 32, 3), top_k=None)
    assert [type(j) for j in jobs] == [ExplainJob] and jobs[0].targets == [[3, 0], [2]]
    batches.clear()
    served.run(plane.explain("gap", 0, [_pixels(PICTURES[0])], top_k=0))
    [(key, _)] = batches
    assert key.top_k == 1 and key.version == 2 and key.methods == ("gradcam",)


def test_dense_without_grpc_and_its_typed_batch(served, stub, batches) -> None:
    plane = served.server.dataplane
    pic = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    got = served.run(plane.dense_scores("fc", 0, _pixels(pic)))
    [(key, jobs)] = batches
    assert key == DenseKey("fc", 1, (40, 48, 3), None, (1.0,), "fcn") and isinstance(jobs[0], DenseJob)
    over_grpc = stub.DenseScores(
        pb.DenseScoresRequest(model=pb.ModelSpec(name="fc"), image=wire.image_to_proto(pic)), timeout=30
    )
    np.testing.assert_allclose(got.result[0].scores, wire.floatmap_to_array(over_grpc.scales[0].scores), rtol=1e-6)
    assert metric_value(served.metrics_text(), "camserve_batch_size_count", operation="dense") >= 2


def test_predict_batch_is_typed_and_labelled(served, batches) -> None:
    before = metric_value(served.metrics_text(), "camserve_batch_size_count", operation="predict")
    served.run(served.server.dataplane.predict("gap", 0, [_pixels(PICTURES[0])] * 3, top_k=2))
    [(key, jobs)] = batches
    assert key == PredictKey("gap", 2, (32, 32, 3))
    assert isinstance(jobs[0], PredictJob) and jobs[0].images.shape == (3, 32, 32, 3)
    assert metric_value(served.metrics_text(), "camserve_batch_size_count", operation="predict") == before + 1


def test_a_padded_batch_shows_its_padding_in_the_metrics(served) -> None:
    """3 images go to the graph compiled for 4 (max_batch_size 4: sizes 1, 2, 4): one padded."""
    padding = "camserve_batch_padding_images_total"
    before = metric_value(served.metrics_text(), padding, operation="predict")
    served.run(served.server.dataplane.predict("gap", 0, [_pixels(PICTURES[0])] * 3))
    assert metric_value(served.metrics_text(), padding, operation="predict") == before + 1
    served.run(served.server.dataplane.predict("gap", 0, [_pixels(PICTURES[0])] * 4))
    assert metric_value(served.metrics_text(), padding, operation="predict") == before + 1


@pytest.mark.parametrize(
    "kw,kind,message",
    [
        (dict(targets=[[]]), errors.InvalidArgument, "image 0 has an empty target list"),
        (dict(targets=[[0]] * 3), errors.InvalidArgument, "3 target lists for 2 images"),
        (dict(targets=[["dog"]]), errors.NotFound, "unknown class 'dog'"),
        (dict(targets=[[0, 1, 2, 3, 0]]), errors.InvalidArgument, "image 0 has 5 targets; at most 4"),
        (dict(top_k=5), errors.InvalidArgument, "top_k must be between 1 and 4"),
        (dict(methods=["magic"]), errors.InvalidArgument, "unknown method 'magic'"),
        (dict(layer="nope"), errors.NotFound, "unknown layer 'nope'"),
    ],
)
def test_explain_parameters_are_checked_before_queueing(served, batches, kw, kind, message) -> None:
    plane = served.server.dataplane
    with pytest.raises(kind, match=message):
        served.run(plane.explain("gap", 0, [_pixels(p) for p in PICTURES], **kw))
    assert batches == []


@pytest.mark.parametrize(
    "call,kind,message",
    [
        (lambda p: p.predict("", 0, [_pixels(PICTURES[0])]), errors.InvalidArgument, "model.name is required"),
        (lambda p: p.predict("gap", -1, [_pixels(PICTURES[0])]), errors.InvalidArgument, "model.version must be"),
        (lambda p: p.predict("gap", 7, [_pixels(PICTURES[0])]), errors.NotFound, "no version 7"),
        (lambda p: p.predict("gap", 0, []), errors.InvalidArgument, "no images in the request; send 1 to 4"),
        (lambda p: p.predict("gap", 0, [_pixels(PICTURES[0])], top_k=5), errors.InvalidArgument, "between 0 and 4"),
        (lambda p: p.dense_scores("fc", 0, None), errors.InvalidArgument, "image is required"),
        (lambda p: p.dense_scores("fc", 0, _pixels(PICTURES[0]), mode="x"), errors.InvalidArgument, "mode must be"),
        (
            lambda p: p.dense_scores("fc", 0, _pixels(PICTURES[0][:20])),
            errors.InvalidArgument,
            "image of 32x20 is smaller than the model's window 32x32",
        ),
    ],
)
def test_request_errors_are_kinds(served, call, kind, message) -> None:
    with pytest.raises(kind, match=message):
        served.run(call(served.server.dataplane))


def test_decoded_images_obey_the_pixel_limit() -> None:
    big = wire.WireImage(np.zeros((100, 100, 3), np.uint8), preprocessed=False)
    with pytest.raises(errors.InvalidArgument, match="exceeds the limit of 5000"):
        decode_image(big, max_pixels=5000)
    assert decode_image(big, max_pixels=10_000) is big
    msg = wire.image_to_proto(np.zeros((4, 5, 3), np.uint8))
    assert decode_image(msg, max_pixels=20).array.shape == (4, 5, 3)


def test_display_pixels_rescale_a_preprocessed_input() -> None:
    x = np.linspace(-1, 1, 2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    rgb = display_pixels(x)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() >= 254


def test_one_bad_job_does_not_fail_its_batch(served) -> None:
    plane = served.server.dataplane
    rt = served.server.runtimes.get("gap")
    ex = rt.explainer("")
    good = np.stack([model_input(p, rt.entry.config) for p in PICTURES])
    bad = good[:1].copy()
    bad[0, 0, 0, 0] = np.nan  # the explainer refuses NaN inputs (InvalidArgument)
    key = PredictKey("gap", 2, (32, 32, 3))
    out = plane.compute(key, [PredictJob(rt, ex, good), PredictJob(rt, ex, bad), PredictJob(rt, ex, good[1:])])
    assert len(out) == 3
    assert isinstance(out[1], errors.InvalidArgument) and "NaN" in str(out[1])
    np.testing.assert_allclose(out[0][1], out[2][0], rtol=1e-6)


def test_a_draining_plane_refuses_new_requests(served) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        plane = DataPlane(served.server.config, served.server.runtimes, pool)
        assert not plane.draining
        plane.drain()
        with pytest.raises(errors.Unavailable, match="draining"):
            plane.runtime("gap")


def test_a_bug_in_a_batch_is_not_retried_job_by_job(served, monkeypatch) -> None:
    """Issue 9: after a failed batch, compute retried job by job on bare ValueError /
    LookupError, so a bug (not a client error) ran the model again per request; only client
    error kinds (InvalidArgument, NotFound) are retried now."""
    plane = served.server.dataplane
    rt = served.server.runtimes.get("gap")
    ex = rt.explainer("")
    calls: list[int] = []

    def predict(images, **kw):
        calls.append(len(images))
        raise ValueError("shapes do not line up")

    monkeypatch.setattr(ex, "predict", predict)
    good = np.stack([model_input(p, rt.entry.config) for p in PICTURES])
    key = PredictKey("gap", 2, (32, 32, 3))
    with pytest.raises(ValueError, match="shapes do not line up"):
        plane.compute(key, [PredictJob(rt, ex, good), PredictJob(rt, ex, good[1:])])
    assert calls == [3], "the batch was retried job by job"


def test_pixels_travel_as_pixels_and_become_model_input_in_the_graph(served, batches) -> None:
    """uint8 pixels travel as sent (viewed, resized when needed), are batched as uint8, and
    become model input inside the explainer's compiled graph: the same input as model_input
    per image, and the same scores as the float path."""
    import tensorflow as tf

    from camserve.serving.compute import model_inputs

    plane = served.server.dataplane
    rt = served.server.runtimes.get("gap")
    msg = wire.image_to_proto(PICTURES[0])
    prepared = plane.prepare(rt, [msg, _pixels(PICTURES[1])])
    assert prepared.inputs.dtype == np.uint8 and prepared.inputs.shape == (2, 32, 32, 3)
    x = model_inputs([prepared.inputs[:1], prepared.inputs[1:]], rt.entry.config)
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, prepared.inputs)
    want = np.stack([model_input(p, rt.entry.config) for p in PICTURES])
    ex = rt.default_explainer
    np.testing.assert_allclose(ex._graph(("input",))(tf.constant(x)).numpy(), want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(ex.predict(x), ex.predict(want), rtol=1e-5, atol=1e-7)


def test_requests_naming_methods_in_another_order_share_a_batch(served) -> None:
    """The batch key holds the methods sorted (one compiled graph, one batch); each request
    gets its explanations in its own order, equal to the library's answer in that order."""
    plane = served.server.dataplane
    rt = served.server.runtimes.get("gap")
    ex = rt.explainer("")
    pixels = np.stack([PICTURES[0], PICTURES[0]])
    key = ExplainKey("gap", 2, "last_conv", ("cam", "gradcam"), (32, 32, 3), top_k=2)
    jobs = [ExplainJob(rt, ex, pixels[:1], None, methods=m) for m in (("gradcam", "cam"), ("cam", "gradcam"))]
    first, second = plane.compute(key, jobs)
    x = np.stack([model_input(PICTURES[0], rt.entry.config)])
    for got, order in ((first, ("gradcam", "cam")), (second, ("cam", "gradcam"))):
        want = ex.explain(x, methods=order, top_k=2)
        assert [(e.method, e.class_index) for e in got[0]] == [(e.method, e.class_index) for e in want[0]]
        for g, w in zip(got[0], want[0]):
            np.testing.assert_allclose(g.heatmap, w.heatmap, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ resolved parameters, kept


def test_explain_parameters_resolve_once_for_requests_alike(served, batches, monkeypatch) -> None:
    """Requests with the same parameters (no targets, no overlays) reuse the first one's plan:
    the library checks the methods once, and the batch key and answers are those of a fresh
    resolution; requests with targets resolve every time."""
    plane = served.server.dataplane
    rt = served.server.runtimes.get("gap", 2)
    rt.plans.clear()
    ex = rt.default_explainer
    checked: list = []
    check = ex.check_methods
    monkeypatch.setattr(ex, "check_methods", lambda methods: checked.append(methods) or check(methods))

    def explain(picture, **kw):
        return served.run(plane.explain("gap", 2, [_pixels(picture)], methods=["gradcam", "cam"], **kw))

    explain(PICTURES[0], top_k=2)
    kept = explain(PICTURES[1], top_k=2)
    assert len(checked) == 1 and len(rt.plans) == 1
    rt.plans.clear()
    fresh = explain(PICTURES[1], top_k=2)
    assert len(checked) == 2
    keys = [key for key, _ in batches]
    assert keys == [ExplainKey("gap", 2, "last_conv", ("cam", "gradcam"), (32, 32, 3), top_k=2)] * 3
    assert [(e.method, e.class_index) for e in kept.explanations[0]] == [
        (e.method, e.class_index) for e in fresh.explanations[0]
    ]
    for k, f in zip(kept.explanations[0], fresh.explanations[0]):
        np.testing.assert_array_equal(k.heatmap, f.heatmap)
    assert kept.answer_bytes == fresh.answer_bytes > 0
    explain(PICTURES[0], targets=[[1]])
    explain(PICTURES[0], targets=[[1]])
    assert len(checked) == 4 and len(rt.plans) == 1  # targets: resolved each time, not kept


def test_a_kept_plan_still_waits_for_the_work_budget(served) -> None:
    plane = served.server.dataplane
    served.run(plane.explain("gap", 2, [_pixels(PICTURES[0])]))  # the plan is kept now
    with plane.budget.reserve(plane.budget.limit):
        with pytest.raises(errors.ResourceExhausted, match="held by requests in progress"):
            served.run(plane.explain("gap", 2, [_pixels(PICTURES[0])]))


def test_kept_plans_are_bounded_and_dropped_with_their_explainer(served, monkeypatch) -> None:
    from camserve.serving import runtime

    plane = served.server.dataplane
    rt = served.server.runtimes.get("gap", 2)
    rt.plans.clear()
    monkeypatch.setattr(runtime, "MAX_PLANS", 2)
    for top_k in (1, 2, 3):
        served.run(plane.explain("gap", 2, [_pixels(PICTURES[0])], top_k=top_k))
    assert [memo[3] for memo in rt.plans] == [2, 3]  # the oldest went first
    # An explainer evicted from the layer cache takes the plans (which hold it) with it.
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, max_layers_cached=1))
    first, second = [name for name in rt.layers if name != rt.default_explainer.layer_name][:2]
    served.run(plane.explain("gap", 2, [_pixels(PICTURES[0])], layer=first))
    assert any(p.explainer is rt.explainers[first] for p in rt.plans.values())
    served.run(plane.explain("gap", 2, [_pixels(PICTURES[0])], layer=second))
    assert first not in rt.explainers
    assert [p.layer for p in rt.plans.values()] == [second]
