"""The Python client: async twin, round-robin over replicas, retries on UNAVAILABLE (gRPC's
retry policy, seen from a bare gRPC server that fails on purpose)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from helpers_serving import RunningServer, local_config, make_repository, metric_value

from camserve.client import (
    MAX_ATTEMPTS,
    SERVICE,
    AsyncClient,
    Client,
    explain_request,
    explain_result,
    predict_result,
    service_config,
)
from camserve.errors import InvalidArgument
from camserve.imaging import encode_png
from camserve.proto import pb
from camserve.serving.config import ServerConfig


def _config(root: Path) -> ServerConfig:
    return local_config(root, max_batch_size=4, batch_timeout_ms=2)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("models"), corrupt=False)
    a, b = RunningServer(_config(root)), RunningServer(_config(root))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def pics() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (32 + i, 40, 3), dtype=np.uint8) for i in range(3)]


def test_async_client_matches_sync(replicas, pics, tmp_path: Path) -> None:
    a, _ = replicas
    path = tmp_path / "p.png"
    path.write_bytes(encode_png(pics[0]))
    with Client(a.target) as c:
        sync_scores = c.predict([path, pics[1], encode_png(pics[2])], model="gap").scores
        sync_ex = c.explain(pics, model="gap", methods=["gradcam", "cam"], targets=[0, "star", [1, 2]])
        sync_dense = c.dense(pics[0], model="fc", stride=1)
        assert c.model("gap")["name"] == "gap"

    async def main():
        async with AsyncClient(a.target) as ac:
            scores = (await ac.predict([path, pics[1], encode_png(pics[2])], model="gap")).scores
            ex = await ac.explain(pics, model="gap", methods=["gradcam", "cam"], targets=[0, "star", [1, 2]])
            dense = await ac.dense(pics[0], model="fc", stride=1)
            models = await ac.models()
            health = await ac.health("gap")
            overlays = await ac.explain_with_overlays(pics[0], model="gap")
            return scores, ex, dense, models, health, overlays

    scores, ex, dense, models, health, overlays = asyncio.run(main())
    np.testing.assert_array_equal(scores, sync_scores)
    assert [[(e.method, e.class_index) for e in img] for img in ex] == [
        [(e.method, e.class_index) for e in img] for img in sync_ex
    ]
    assert [e.class_index for e in ex[2]] == [1, 1, 2, 2]
    for g, e in zip(ex[2], sync_ex[2]):
        np.testing.assert_array_equal(g.heatmap, e.heatmap)
    np.testing.assert_array_equal(dense[0].scores, sync_dense[0].scores)
    assert {m["name"] for m in models} == {"gap", "fc"} and health == "SERVING"
    assert overlays[0][0][1].startswith(b"\x89PNG")


def test_round_robin_reaches_every_replica_and_survives_one_down(tmp_path_factory, pics) -> None:
    root = make_repository(tmp_path_factory.mktemp("rr"), corrupt=False)
    a, b = RunningServer(_config(root)), RunningServer(_config(root))
    try:
        with Client(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", timeout=30) as c:
            first = [c.predict(pics[0], model="gap").scores for _ in range(12)]
            served = [
                metric_value(s.metrics_text(), "camserve_requests_total", method="Predict", code="OK") for s in (a, b)
            ]
            assert min(served) >= 3 and sum(served) == 12, served
            b.stop(grace=1.0)
            after = [c.predict(pics[0], model="gap").scores for _ in range(12)]
        for s in first + after:
            np.testing.assert_allclose(s, first[0], rtol=1e-6)
    finally:
        a.stop()
        b.stop()


# ---------------------------------------------------------------------------- retries through gRPC's policy


class _FlakyReplica:
    """A bare gRPC server speaking camserve.v1.CamService that answers ``code`` to the first
    ``fail`` attempts of every call and then OK; it records each attempt it sees, with the
    ``grpc-previous-rpc-attempts`` header gRPC's retry machinery adds to attempts 2, 3, ..."""

    def __init__(self, fail: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        from concurrent import futures

        self.fail, self.code = fail, code
        self.attempts: list[tuple[str, str | None]] = []  # (method, grpc-previous-rpc-attempts)
        self._lock = threading.Lock()

        def unary(method, response):
            def handler(request, context):
                self._attempt(method, context)
                return response(request)

            return handler

        def stream(request_iterator, context):
            self._attempt("ExplainStream", context)
            for req in request_iterator:
                yield pb.ExplainResponse(request_id=req.request_id, images=[pb.ImageExplanations() for _ in req.images])

        methods = {
            "ListModels": grpc.unary_unary_rpc_method_handler(
                unary("ListModels", lambda r: pb.ListModelsResponse(models=[pb.ModelInfo(name="fake")])),
                request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
            "Predict": grpc.unary_unary_rpc_method_handler(
                unary(
                    "Predict", lambda r: pb.PredictResponse(predictions=[pb.Prediction(scores=[float(len(r.images))])])
                ),
                request_deserializer=pb.PredictRequest.FromString,
                response_serializer=pb.PredictResponse.SerializeToString,
            ),
            "ExplainStream": grpc.stream_stream_rpc_method_handler(
                stream,
                request_deserializer=pb.ExplainRequest.FromString,
                response_serializer=pb.ExplainResponse.SerializeToString,
            ),
        }
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, methods)],
            options=[("grpc.max_receive_message_length", 64 << 20)],
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def _attempt(self, method: str, context) -> None:
        previous = dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts")
        with self._lock:
            self.attempts.append((method, previous))
            failing = sum(1 for m, _ in self.attempts if m == method) <= self.fail
        if failing:
            context.abort(self.code, f"fake {self.code.name}")

    def stop(self) -> None:
        self.server.stop(None)


@pytest.fixture()
def flaky():
    made: list[_FlakyReplica] = []

    def make(fail: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> _FlakyReplica:
        made.append(_FlakyReplica(fail, code))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def test_unavailable_is_retried_by_grpc_until_ok(flaky) -> None:
    replica = flaky(fail=2)
    with Client(replica.target, retries=3, backoff=0.01, timeout=10) as c:
        assert [m["name"] for m in c.models()] == ["fake"]
    # Three attempts reached the server; the 2nd and 3rd carry gRPC's retry header, so the
    # retries were made by gRPC's retry policy, not by a loop in the client.
    assert replica.attempts == [("ListModels", None), ("ListModels", "1"), ("ListModels", "2")]


def test_async_client_retries_unavailable_through_the_policy(flaky) -> None:
    replica = flaky(fail=3)

    async def main():
        async with AsyncClient(replica.target, retries=4, backoff=0.01, timeout=10) as c:
            return await c.models()

    assert [m["name"] for m in asyncio.run(main())] == ["fake"]
    assert [previous for _, previous in replica.attempts] == [None, "1", "2", "3"]


def test_other_codes_are_never_retried(flaky) -> None:
    replica = flaky(fail=10, code=grpc.StatusCode.INVALID_ARGUMENT)
    with Client(replica.target, retries=4, backoff=0.01, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.models()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(replica.attempts) == 1


@pytest.mark.parametrize(("retries", "attempts"), [(0, 1), (2, 3), (9, MAX_ATTEMPTS)])
def test_attempts_are_retries_plus_one_capped_by_grpc(flaky, retries: int, attempts: int) -> None:
    replica = flaky(fail=100)
    with Client(replica.target, retries=retries, backoff=0.01, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(replica.attempts) == attempts


def test_retries_stay_inside_the_deadline(flaky) -> None:
    replica = flaky(fail=100)
    with Client(replica.target, retries=4, backoff=2.0, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            c.models()
        elapsed = time.monotonic() - t0
    # The first retry would wait about 2 s: the 0.5 s deadline ends the call before it.
    assert info.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
    assert elapsed < 1.5 and len(replica.attempts) == 1


def test_large_requests_stay_retryable(flaky) -> None:
    # gRPC keeps at most grpc.per_rpc_retry_buffer_size bytes of a call for retrying (256 KiB
    # by default); the client raises it to the message size limit.
    replica = flaky(fail=1)
    big = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # 3 MiB
    with Client(replica.target, retries=2, backoff=0.01, timeout=30) as c:
        assert c.predict([big, big], model="x").scores.tolist() == [[2.0]]
    assert [previous for _, previous in replica.attempts] == [None, "1"]


def test_unavailable_goes_to_the_other_replica(flaky) -> None:
    draining, healthy = flaky(fail=10**6), flaky(fail=0)
    with Client(f"ipv4:{draining.target},{healthy.target}", retries=2, backoff=0.01, timeout=10) as c:
        for _ in range(4):  # until round-robin has connected to both
            c.models()
        draining.attempts.clear()
        healthy.attempts.clear()
        for _ in range(10):
            assert [m["name"] for m in c.models()] == ["fake"]
    # Every call ended OK on the healthy replica. Round-robin sent some first attempts to the
    # draining one; each of those was retried once, on the healthy replica (never again on the
    # draining one).
    assert len(healthy.attempts) == 10
    assert draining.attempts, "round-robin never picked the draining replica"
    assert all(previous is None for _, previous in draining.attempts), draining.attempts
    retried = [previous for _, previous in healthy.attempts if previous is not None]
    assert retried == ["1"] * len(draining.attempts)


def test_stream_is_retried_before_its_first_response(flaky) -> None:
    replica = flaky(fail=1)
    pics = [np.zeros((8, 8, 3), np.uint8)] * 5
    with Client(replica.target, retries=2, backoff=0.01, timeout=10) as c:
        got = list(c.explain_many(pics, model="x", chunk=2))
    assert got == [[]] * 5  # one (empty) explanation list per image, in order
    assert replica.attempts == [("ExplainStream", None), ("ExplainStream", "1")]


def test_service_config_is_what_grpc_accepts() -> None:
    config = service_config(retries=4, backoff=0.05)
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "camserve.v1.CamService"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.4s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    with pytest.raises(InvalidArgument, match="retries must be >= 0"):
        service_config(retries=-1)
    # Shorter first delays hit a gRPC race (grpc/grpc#41036): they are raised to 10 ms.
    tiny = service_config(retries=1, backoff=0.0001)["methodConfig"][0]["retryPolicy"]
    assert (tiny["initialBackoff"], tiny["maxBackoff"]) == ("0.01s", "0.01s")


def test_dense_result_is_renamed_dense_reply() -> None:
    import camserve.client as client
    from camserve.dense import DenseResult as LibraryDenseResult

    assert client.DenseReply is not LibraryDenseResult
    with pytest.warns(DeprecationWarning, match="DenseReply"):
        assert client.DenseResult is client.DenseReply
    reply = client.DenseReply(
        scales=[client.ScaleScores(1.0, np.zeros((2, 2, 3), np.float32), np.zeros((2, 2, 4), np.float32))],
        stride=8,
        exact=True,
        class_names=["a", "b", "c"],
        model=("m", 1),
    )
    assert len(reply) == 1 and reply[0].scale == 1.0 and [s.scale for s in reply] == [1.0]


def test_client_does_not_import_tensorflow() -> None:
    code = (
        "import sys, camserve.client, camserve.wire\n"
        "from camserve.proto import pb\n"
        "camserve.client.explain_result(pb.ExplainResponse(images=[pb.ImageExplanations("
        "explanations=[pb.Explanation(method='cam')])]))\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- heatmaps at the image's size, PNG heatmaps


def _covering_box(box, size_from, size_to):
    """By hand: edges scale by W / w (H / h); floor at the start, ceil at the end."""
    (h, w), (big_h, big_w) = size_from, size_to
    x0, y0, x1, y1 = box
    return (
        math.floor(x0 * big_w / w),
        math.floor(y0 * big_h / h),
        math.ceil(x1 * big_w / w),
        math.ceil(y1 * big_h / h),
    )


def test_heatmap_size_image_gives_each_image_its_own_size(replicas, tmp_path: Path) -> None:
    a, _ = replicas
    rng = np.random.default_rng(11)
    tall = rng.integers(0, 256, (90, 50, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    path = tmp_path / "wide.png"
    path.write_bytes(encode_png(wide))
    small = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)  # smaller than the model's 32 x 32
    images = [tall, path, encode_png(small)]
    sizes = [(90, 50), (45, 70), (20, 24)]
    with Client(a.target) as c:
        at_input = c.explain(images, model="gap", methods=["gradcam", "cam"], top_k=2)
        at_image = c.explain(images, model="gap", methods=["gradcam", "cam"], top_k=2, heatmap_size="image")
        streamed = list(c.explain_many(images, model="gap", chunk=2, heatmap_size="image"))
    for per_input, per_image, size in zip(at_input, at_image, sizes):
        assert len(per_image) == 4
        for e, got in zip(per_input, per_image):
            assert e.heatmap.shape == (32, 32) and got.heatmap.shape == size
            want = cv2.resize(e.heatmap, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
            np.testing.assert_allclose(got.heatmap, want, rtol=0, atol=1e-6)
            np.testing.assert_array_equal(got.raw, e.raw)  # the layer's map is not resized
            assert e.box is not None and got.box == _covering_box(e.box, (32, 32), size)
    for got, e in zip(streamed, [per[0] for per in at_image]):
        assert got[0].heatmap.shape == e.heatmap.shape and got[0].box == e.box

    async def main():
        async with AsyncClient(a.target) as ac:
            return await ac.explain_with_overlays(tall, model="gap", heatmap_size="image")

    ((e, png),) = asyncio.run(main())[0]
    assert e.heatmap.shape == (90, 50) and png.startswith(b"\x89PNG")


def test_heatmap_png_decodes_within_one_step_of_the_float_heatmap(replicas, pics) -> None:
    a, _ = replicas
    with Client(a.target) as c:
        floats = c.explain(pics, model="gap", methods=["gradcam", "layercam"], raw=False)
        eight_bit = c.explain(pics, model="gap", methods=["gradcam", "layercam"], raw=False, heatmap="png")
        request = explain_request(pics, "gap", heatmap="png")
        response = c.call("Explain", request)
    assert request.return_heatmap_png and not request.return_heatmap
    e = response.images[0].explanations[0]
    assert not e.HasField("heatmap") and e.heatmap_png.startswith(b"\x89PNG")
    for per_f, per_png in zip(floats, eight_bit):
        for f, q in zip(per_f, per_png):
            assert q.heatmap.dtype == np.float32 and q.heatmap.shape == f.heatmap.shape == (32, 32)
            assert float(np.abs(q.heatmap - f.heatmap).max()) <= 1 / 255
            np.testing.assert_array_equal(np.rint(q.heatmap * 255), np.rint(f.heatmap * 255))
            assert (q.raw, q.box) == (None, f.box)


def test_answers_of_an_older_server_are_read() -> None:
    # An older server: maps in `values`, no image size, no image_box (the client scales the
    # box itself from the size it sent).
    heat = np.random.default_rng(2).random((32, 32), dtype=np.float32)
    old = pb.Explanation(method="cam", heatmap=pb.FloatMap(shape=[32, 32], values=heat.ravel().tolist()))
    old.box.CopyFrom(pb.Box(x0=1, y0=2, x1=9, y1=31))
    response = pb.ExplainResponse(images=[pb.ImageExplanations(explanations=[old])])
    request = explain_request(np.zeros((50, 120, 3), np.uint8), "gap")
    (got,) = explain_result(response, heatmap_size="image", request=request)[0]
    assert got.heatmap.shape == (50, 120) and got.box == _covering_box((1, 2, 9, 31), (32, 32), (50, 120))
    np.testing.assert_allclose(got.heatmap, cv2.resize(heat, (120, 50), interpolation=cv2.INTER_LINEAR), atol=1e-6)
    (same,) = explain_result(response)[0]
    np.testing.assert_array_equal(same.heatmap, heat)
    predicted = pb.PredictResponse(predictions=[pb.Prediction(scores=[0.25, 0.75])])
    np.testing.assert_array_equal(predict_result(predicted).scores, [[0.25, 0.75]])


def test_options_are_checked_like_keyword_arguments() -> None:
    c = Client("127.0.0.1:1", timeout=1)
    try:
        with pytest.raises(TypeError, match=r"\['method'\]; ExplainOptions allows"):
            c.explain(np.zeros((8, 8, 3), np.uint8), model="gap", method="cam")  # type: ignore[call-arg]
        with pytest.raises(TypeError, match=r"\['method'\]; ExplainOptions allows"):  # before the stream starts
            list(c.explain_many([np.zeros((8, 8, 3), np.uint8)] * 3, model="gap", chunk=2, method="cam"))  # type: ignore[call-arg]
        with pytest.raises(TypeError, match=r"\['strides'\]; DenseOptions allows"):
            c.dense(np.zeros((8, 8, 3), np.uint8), model="fc", strides=2)  # type: ignore[call-arg]
        with pytest.raises(InvalidArgument, match="heatmap_size must be 'input' or 'image'"):
            c.explain(np.zeros((8, 8, 3), np.uint8), model="gap", heatmap_size="big")  # type: ignore[typeddict-item]
        with pytest.raises(InvalidArgument, match="heatmap must be True, False or 'png'"):
            c.explain(np.zeros((8, 8, 3), np.uint8), model="gap", heatmap="jpeg")  # type: ignore[typeddict-item]
    finally:
        c.close()


def test_client_exports_the_message_helpers() -> None:
    import camserve.client as client
    import camserve.client.messages as messages

    assert set(messages.__all__) <= set(client.__all__)
    assert all(getattr(client, name) is getattr(messages, name) for name in messages.__all__)
    assert {"Client", "AsyncClient", "service_config"} <= set(client.__all__)
