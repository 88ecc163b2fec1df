"""Metrics and logs (camserve.serving.observability)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from typing import Any

import pytest

from camserve.serving.jobs import DenseKey, ExplainKey, PredictKey
from camserve.serving.observability import JsonFormatter, ServerMetrics, configure_logging


def _sample(m: ServerMetrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_batcher_hooks_label_batches_by_operation() -> None:
    m = ServerMetrics()
    hooks = m.batcher_hooks()
    hooks.batch(PredictKey("gap", 1, (32, 32, 3)), 3, 3)
    hooks.batch(DenseKey("fc", 1, (40, 48, 3), None, (1.0,), "fcn"), 1, 1)
    hooks.queue_time(ExplainKey("gap", 1, "last_conv", ("gradcam",), (32, 32, 3), 1), 0.002)
    hooks.dropped(PredictKey("gap", 1, (32, 32, 3)), "deadline")
    hooks.queue_depth(5)
    assert _sample(m, "camserve_batch_size_sum", operation="predict") == 3
    assert _sample(m, "camserve_batch_size_count", operation="dense") == 1
    assert _sample(m, "camserve_queue_time_seconds_count", operation="explain") == 1
    assert _sample(m, "camserve_dropped_total", reason="deadline") == 1
    assert _sample(m, "camserve_queue_depth") == 5


def test_batch_padding_counts_images_computed_for_nobody() -> None:
    """Batches go to graphs compiled for (1, 2, 4, 8) images (the batcher says what each batch
    is padded to): 3 are computed as 4, 5 and 7 as 8; DenseScores batches are not padded. The
    batch-size histogram showed requests per batch only, so padding (a quarter of the work, at
    one point of issue 9) was invisible."""
    m = ServerMetrics()
    hooks = m.batcher_hooks()
    for n, padded in ((3, 4), (5, 8), (8, 8), (7, 8)):
        hooks.batch(PredictKey("gap", 1, (32, 32, 3)), n, padded)
    hooks.batch(ExplainKey("gap", 1, "last_conv", ("gradcam",), (32, 32, 3), 1), 6, 8)
    hooks.batch(DenseKey("fc", 1, (40, 48, 3), None, (1.0,), "fcn"), 3, 4)
    assert _sample(m, "camserve_batch_padding_images_total", operation="predict") == 1 + 3 + 0 + 1
    assert _sample(m, "camserve_batch_padding_images_total", operation="explain") == 2
    assert _sample(m, "camserve_batch_padding_images_total", operation="dense") == 0
    assert _sample(m, "camserve_batch_size_sum", operation="predict") == 3 + 5 + 8 + 7


def test_record_counts_requests_errors_and_latency() -> None:
    m = ServerMetrics()
    m.record("Predict", "OK", 0.01)
    m.record("Predict", "INVALID_ARGUMENT", 0.002)
    assert _sample(m, "camserve_requests_total", method="Predict", code="OK") == 1
    assert _sample(m, "camserve_requests_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert _sample(m, "camserve_errors_total", method="Predict", code="OK") == 0
    assert _sample(m, "camserve_errors_total", method="Predict", code="INVALID_ARGUMENT") == 1
    assert _sample(m, "camserve_request_latency_seconds_count", method="Predict") == 2
    m.model_is_ready("gap", 2)
    assert _sample(m, "camserve_model_ready", model="gap", version="2") == 1


def test_metrics_served_over_http() -> None:
    import urllib.request

    async def main() -> str:
        m = ServerMetrics()
        port = await m.serve_http("127.0.0.1", 0)
        try:
            m.record("GetModel", "NOT_FOUND", 0.001)
            url = f"http://127.0.0.1:{port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
        finally:
            await m.close()

    text = asyncio.run(main())
    assert 'camserve_errors_total{code="NOT_FOUND",method="GetModel"} 1.0' in text


def test_openmetrics_when_the_scraper_asks_and_404_elsewhere() -> None:
    async def main() -> tuple[int, str, bytes, int]:
        m = ServerMetrics()
        port = await m.serve_http("127.0.0.1", 0)
        try:
            accept = "application/openmetrics-text; version=1.0.0"
            status, headers, body = await asyncio.to_thread(_get, port, "/metrics", {"Accept": accept})
            missing, _, _ = await asyncio.to_thread(_get, port, "/other", {})
            return status, headers["Content-Type"], body, missing
        finally:
            await m.close()

    status, content_type, body, missing = asyncio.run(main())
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF") and missing == 404


def test_idle_connections_are_closed_after_the_idle_timeout() -> None:
    """A connection that never sends a request is closed by the server (no thread waits on it)."""

    async def main() -> tuple[bytes, float]:
        m = ServerMetrics()
        port = await m.serve_http("127.0.0.1", 0, idle_timeout_s=0.5)
        try:
            return await asyncio.to_thread(_wait_closed, port)
        finally:
            await m.close()

    data, waited = asyncio.run(main())
    assert data == b"" and 0.3 < waited < 5


def _get(port: int, path: str, headers: dict[str, str], host: str = "127.0.0.1") -> tuple[int, Any, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _wait_closed(port: int) -> tuple[bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = sock.recv(1)  # b"" once the server closes
    return data, time.monotonic() - t0


def test_json_lines_carry_extra_fields_and_the_traceback() -> None:
    try:
        raise KeyError("boom")
    except KeyError:
        rec = logging.LogRecord("camserve.x", logging.ERROR, __file__, 1, "internal error", (), sys.exc_info())
    rec.request_id = "abc"
    out = json.loads(JsonFormatter().format(rec))
    assert (out["level"], out["logger"], out["msg"], out["request_id"]) == (
        "ERROR",
        "camserve.x",
        "internal error",
        "abc",
    )
    assert out["exc"].startswith("Traceback") and "KeyError: 'boom'" in out["exc"]


def test_configure_logging_writes_json_lines_to_stderr(capsys) -> None:
    root = logging.getLogger("camserve")
    handlers, level, propagate = root.handlers[:], root.level, root.propagate
    try:
        configure_logging("info", "json")
        logging.getLogger("camserve.serving.test").info("listening", extra={"port": 1234})
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert json.loads(line)["port"] == 1234 and root.propagate is False
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        root.propagate = propagate


# ------------------------------------------------------------------ /metrics of a running server

TOKEN = "metrics-t0ken"


def _serve(tmp_path, **overrides):
    """A server without models (enough for /metrics), listening as ``overrides`` say."""
    from helpers_serving import RunningServer

    from camserve.serving.config import ServerConfig

    (tmp_path / "models").mkdir(exist_ok=True)
    settings = dict(
        models=str(tmp_path / "models"), port=0, metrics_port=0, http_port=0, log_format="text", log_level="ERROR"
    )
    return RunningServer(ServerConfig.load(env={}, overrides={**settings, **overrides}), ready_timeout=60)


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback (None: it has none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_metrics_listen_on_the_configured_host_only(tmp_path) -> None:
    with _serve(tmp_path, host="127.0.0.1") as rs:
        port = rs.server.metrics.port
        assert _connects("127.0.0.1", port)
        other = _non_loopback_address()
        if other is not None:
            assert not _connects(other, port), f"/metrics answers on {other}, the server's host is 127.0.0.1"
        if _ipv6_loopback():
            assert not _connects("::1", port)
        status, _, body = _get(port, "/metrics", {})
        assert status == 200 and b"camserve_queue_depth" in body  # open by default: Prometheus scrapes it


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_metrics_follow_the_host_setting_on_both_address_families(tmp_path) -> None:
    """``[::]`` means every interface, IPv6 and IPv4, for gRPC; /metrics listens likewise."""
    with _serve(tmp_path, host="[::]") as rs:
        grpc_port, port = rs.port, rs.server.metrics.port
        assert _connects("127.0.0.1", grpc_port) and _connects("::1", grpc_port)
        assert _connects("127.0.0.1", port) and _connects("::1", port)
        status, _, body = _get(port, "/metrics", {}, host="[::1]")
        assert status == 200 and b"camserve_requests_total" in body


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server whose /metrics needs the token."""
    with _serve(tmp_path_factory.mktemp("guarded"), host="127.0.0.1", token=TOKEN, metrics_auth=True) as rs:
        yield rs


@pytest.mark.parametrize(
    "headers,problem",
    [
        ([], "missing bearer token"),
        ([("Authorization", "Bearer nope")], "invalid bearer token"),
        ([("Authorization", TOKEN)], "invalid bearer token"),
        ([("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")], "2 'authorization' headers"),
    ],
    ids=["none", "wrong", "no_scheme", "twice"],
)
def test_metrics_behind_the_token_refuse_with_401(guarded, headers, problem) -> None:
    status, answer_headers, body = _raw_get(guarded.server.metrics.port, headers)
    assert status == 401, body
    assert answer_headers.get("www-authenticate", "").startswith("Bearer")
    assert problem in body.decode() and b"camserve_" not in body


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_metrics_behind_the_token_answer_with_it(guarded, scheme) -> None:
    status, _, body = _raw_get(guarded.server.metrics.port, [("Authorization", f"{scheme} {TOKEN}")])
    assert status == 200 and b"camserve_queue_depth" in body


def test_metrics_auth_needs_a_token() -> None:
    from camserve.errors import InvalidArgument
    from camserve.serving.config import ServerConfig

    with pytest.raises(InvalidArgument, match="metrics_auth needs a token"):
        ServerConfig.load(env={}, overrides=dict(metrics_auth=True))
    assert ServerConfig.load(env={"CAMSERVE_METRICS_AUTH": "true", "CAMSERVE_TOKEN": "t"}).metrics_auth is True


def test_idle_connections_take_no_thread(tmp_path) -> None:
    """50 connections that send nothing: no thread each (the old server started one per
    connection), and /metrics still answers meanwhile."""
    import threading

    with _serve(tmp_path, host="127.0.0.1") as rs:
        port = rs.server.metrics.port
        assert _raw_get(port, [])[0] == 200  # warm: any thread made once exists now
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
        try:
            time.sleep(0.5)  # let the server accept them all
            during = threading.active_count()
            status, _, body = _raw_get(port, [])
            assert status == 200 and b"camserve_queue_depth" in body
        finally:
            for sock in idle:
                sock.close()
    assert during - before <= 2, f"{during - before} more threads with 50 idle connections open"


def _raw_get(port: int, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], bytes]:
    """GET /metrics with ``headers`` as given (repeated names too), over a plain socket."""
    lines = ["GET /metrics HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if answer.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(status_line.split()[1]), answer, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + rest[:n], rest[n + 2 :]
    return out


def test_labelled_children_are_reused_and_their_cache_is_bounded(monkeypatch) -> None:
    import camserve.serving.observability as obs

    monkeypatch.setattr(obs, "MAX_CACHED_CHILDREN", 4)
    m = obs.ServerMetrics()
    for _ in range(3):
        m.record("Predict", "OK", 0.001)
    for i in range(10):  # more label values than the cache keeps: all still counted
        m.record(f"M{i}", "NOT_FOUND", 0.001)
        m.record(f"M{i}", "NOT_FOUND", 0.001)
    sample = m.registry.get_sample_value
    assert sample("camserve_requests_total", {"method": "Predict", "code": "OK"}) == 3
    assert sample("camserve_request_latency_seconds_count", {"method": "Predict"}) == 3
    assert [sample("camserve_errors_total", {"method": f"M{i}", "code": "NOT_FOUND"}) for i in range(10)] == [2] * 10
    assert len(m._children) == 4
