"""The Python client: async twin, round-robin over replicas, retries on UNAVAILABLE."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers_serving import RunningServer, make_repository, metric_value

from camserve.client import AsyncClient, Client
from camserve.imaging import encode_png
from camserve.serving.config import ServerConfig


def _config(root: Path) -> ServerConfig:
    return ServerConfig.load(
        env={},
        overrides=dict(
            models=str(root),
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            max_batch_size=4,
            batch_timeout_ms=2,
            log_format="text",
        ),
    )


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


class _Unavailable(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "fake"


def test_retries_only_unavailable(replicas) -> None:
    a, _ = replicas
    with Client(a.target, retries=3, backoff=0.001) as c:
        real = c.stub.ListModels
        calls = []

        def flaky(request, **kw):
            calls.append(1)
            if len(calls) <= 2:
                raise _Unavailable()
            return real(request, **kw)

        c.stub.ListModels = flaky
        assert {m["name"] for m in c.models()} == {"gap", "fc"}
        assert len(calls) == 3

        def invalid(request, **kw):
            calls.append(1)
            raise _Unavailable(grpc.StatusCode.INVALID_ARGUMENT)

        calls.clear()
        c.stub.ListModels = invalid
        with pytest.raises(grpc.RpcError):
            c.models()
        assert len(calls) == 1

        def down(request, **kw):
            calls.append(1)
            raise _Unavailable()

        calls.clear()
        c.stub.ListModels = down
        with pytest.raises(grpc.RpcError):
            c.models()
        assert len(calls) == 4  # 1 + 3 retries
