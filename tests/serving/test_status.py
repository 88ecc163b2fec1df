"""Status mapping (camserve.serving.status): every error kind to its code; anything else
(a server bug) to INTERNAL with a request id that the server log carries too, with the
traceback; the server serves on afterwards."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from helpers_serving import (
    LogLines,
    RunningServer,
    local_config,
    make_repository,
    metric_value,
    payload_only_the_gc_frees,
)

from camserve import errors, wire
from camserve.proto import pb, pb_grpc
from camserve.serving.batching import BatcherClosed, DeadlineExpired, QueueFull
from camserve.serving.repository import ModelNotFound, ModelUnavailable
from camserve.serving.status import MAX_STATUS_MESSAGE_BYTES, clip_message, request_id_from, status_for

INTERNAL_RE = re.compile(
    r"^internal error \((\w+)\); the server log has the details \(request id ([A-Za-z0-9._:-]+)\)$"
)


# ------------------------------------------------------------------ status_for


@pytest.mark.parametrize("kind", errors.KINDS, ids=lambda k: k.__name__)
def test_each_kind_maps_to_its_code(kind: type[errors.CamserveError]) -> None:
    code, message = status_for(kind("what was wrong; allowed: this"))
    assert code == grpc.StatusCode[kind.code] and code.name == kind.code
    assert message == "what was wrong; allowed: this"


@pytest.mark.parametrize(
    "exc,code",
    [
        (QueueFull("full"), "RESOURCE_EXHAUSTED"),
        (DeadlineExpired("late"), "DEADLINE_EXCEEDED"),
        (BatcherClosed("closed"), "UNAVAILABLE"),
        (ModelUnavailable("loading"), "UNAVAILABLE"),
        (ModelNotFound("no model"), "NOT_FOUND"),
        (wire.ImageError("not an image"), "INVALID_ARGUMENT"),
    ],
)
def test_subclasses_map_by_their_kind(exc: Exception, code: str) -> None:
    assert status_for(exc)[0].name == code


@pytest.mark.parametrize(
    "exc",
    [ValueError("bad"), KeyError("k"), LookupError("l"), RuntimeError("r"), errors.CamserveError("no kind")],
    ids=lambda e: type(e).__name__,
)
def test_anything_without_a_kind_is_internal_and_names_the_request(exc: Exception) -> None:
    code, message = status_for(exc, request_id="abc123")
    assert code == grpc.StatusCode.INTERNAL
    m = INTERNAL_RE.match(message)
    assert m and m.groups() == (type(exc).__name__, "abc123"), message


def test_long_messages_are_clipped_keeping_head_and_tail() -> None:
    msg = "unknown layer '" + "L" * 50_000 + "'; allowed: a, b"
    _, sent = status_for(errors.NotFound(msg))
    assert len(sent.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert sent.startswith("unknown layer 'LLL") and sent.endswith("'; allowed: a, b") and "characters cut" in sent
    assert clip_message("short") == "short"


def test_request_id_from_metadata_only_when_sane() -> None:
    assert request_id_from((("x-request-id", "trace-7.a:b"),)) == "trace-7.a:b"
    assert request_id_from((("x-request-id", "has space"),)) is None
    assert request_id_from((("x-request-id", "x" * 65),)) is None
    assert request_id_from((("other", "abc"),)) is None


# ------------------------------------------------------------------ through a real server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("models"), corrupt=False)
    cfg = local_config(root, max_batch_size=4)
    with RunningServer(cfg) as rs:
        yield rs


@pytest.fixture(scope="module")
def stub(served: RunningServer):
    channel = grpc.insecure_channel(served.target)
    yield pb_grpc.CamServiceStub(channel)
    channel.close()


@pytest.fixture
def server_log():
    """The status module's log lines (JSON) while the test runs."""
    with LogLines("camserve.serving.status") as log:
        yield log


IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _predict() -> pb.PredictRequest:
    return pb.PredictRequest(model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(IMAGE)])


def _explain(**kw) -> pb.ExplainRequest:
    return pb.ExplainRequest(model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(IMAGE)], **kw)


def _raise(exc: Exception):
    def boom(*args, **kwargs):
        raise exc

    return boom


def _internal(e: pytest.ExceptionInfo, type_name: str) -> str:
    """The request id of an INTERNAL answer (asserting its form)."""
    assert e.value.code() == grpc.StatusCode.INTERNAL, e.value.details()
    m = INTERNAL_RE.match(e.value.details())
    assert m, e.value.details()
    assert m.group(1) == type_name
    return m.group(2)


def _logged(log: LogLines, request_id: str, type_name: str, text: str) -> None:
    """One 'internal error' line with the id and the traceback, and one 'request failed'."""
    lines = log.json
    internal = [r for r in lines if r["msg"] == "internal error" and r.get("request_id") == request_id]
    assert len(internal) == 1, lines
    exc = internal[0]["exc"]
    assert exc.startswith("Traceback (most recent call last):") and f"{type_name}: {text}" in exc, exc
    failed = [r for r in lines if r["msg"] == "request failed" and r.get("request_id") == request_id]
    assert len(failed) == 1 and failed[0]["code"] == "INTERNAL", lines


def test_bug_in_predict_compute_is_internal_logged_and_the_server_serves_on(served, stub, monkeypatch, server_log):
    before = stub.Predict(_predict(), timeout=30)
    text = served.metrics_text()
    internal_before = metric_value(text, "camserve_errors_total", method="Predict", code="INTERNAL")
    explainer = served.server.runtimes.get("gap").explainers[""]
    # A KeyError is a LookupError: it used to be answered NOT_FOUND, as if the client had erred.
    monkeypatch.setattr(explainer, "predict", _raise(KeyError("scores")))
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_predict(), timeout=30)
    request_id = _internal(e, "KeyError")
    _logged(server_log, request_id, "KeyError", "'scores'")
    assert "scores" not in e.value.details()  # the bug's details stay in the log
    monkeypatch.undo()
    after = stub.Predict(_predict(), timeout=30)
    assert wire.predictions_from_proto(after).tolist() == wire.predictions_from_proto(before).tolist()
    text = served.metrics_text()
    assert metric_value(text, "camserve_errors_total", method="Predict", code="INTERNAL") == internal_before + 1


def test_bare_value_error_in_explain_is_internal_not_invalid_argument(served, stub, monkeypatch, server_log):
    explainer = served.server.runtimes.get("gap").explainers[""]
    monkeypatch.setattr(explainer, "explain", _raise(ValueError("shapes do not line up")))
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(_explain(), timeout=30)
    _logged(server_log, _internal(e, "ValueError"), "ValueError", "shapes do not line up")
    monkeypatch.undo()
    assert len(stub.Explain(_explain(), timeout=30).images) == 1


def test_caller_request_id_is_used(served, stub, monkeypatch, server_log):
    explainer = served.server.runtimes.get("gap").explainers[""]
    monkeypatch.setattr(explainer, "predict", _raise(RuntimeError("device lost")))
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_predict(), timeout=30, metadata=(("x-request-id", "trace-42"),))
    assert _internal(e, "RuntimeError") == "trace-42"
    _logged(server_log, "trace-42", "RuntimeError", "device lost")


def test_bug_in_a_stream_is_internal_with_its_request_id(served, stub, monkeypatch, server_log):
    explainer = served.server.runtimes.get("gap").explainers[""]
    monkeypatch.setattr(explainer, "explain", _raise(IndexError("list index out of range")))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ExplainStream(iter([_explain(request_id="s1")]), timeout=30))
    _logged(server_log, _internal(e, "IndexError"), "IndexError", "list index out of range")
    monkeypatch.undo()
    got = list(stub.ExplainStream(iter([_explain(request_id="s2")]), timeout=30))
    assert [r.request_id for r in got] == ["s2"]


@pytest.mark.parametrize("kind", errors.KINDS, ids=lambda k: k.__name__)
def test_each_kind_reaches_the_client_with_its_code(served, stub, monkeypatch, kind) -> None:
    plane = served.server.dataplane
    monkeypatch.setattr(plane, "list_models", _raise(kind(f"{kind.__name__} happened; allowed: nothing")))
    with pytest.raises(grpc.RpcError) as e:
        stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode[kind.code]
    assert e.value.details() == f"{kind.__name__} happened; allowed: nothing"


@pytest.mark.parametrize("kind", errors.KINDS, ids=lambda k: k.__name__)
def test_each_kind_inside_a_stream_keeps_its_code_and_names_the_request(served, stub, monkeypatch, kind) -> None:
    plane = served.server.dataplane
    monkeypatch.setattr(plane, "explain", _raise(kind("it went wrong")))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ExplainStream(iter([_explain(request_id="r9")]), timeout=30))
    assert e.value.code() == grpc.StatusCode[kind.code]
    assert e.value.details() == "request 'r9': it went wrong"


def test_failed_calls_are_counted_and_in_flight_returns_to_zero(served, stub) -> None:
    text = served.metrics_text()
    before = metric_value(text, "camserve_errors_total", method="GetModel", code="NOT_FOUND")
    with pytest.raises(grpc.RpcError):
        stub.GetModel(pb.GetModelRequest(model=pb.ModelSpec(name="nope")), timeout=30)
    text = served.metrics_text()
    assert metric_value(text, "camserve_errors_total", method="GetModel", code="NOT_FOUND") == before + 1
    assert served.server.inflight == 0


def test_health_and_reflection_are_not_counted(served) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(served.target) as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert metric_value(served.metrics_text(), "camserve_requests_total", method="Check") == 0


# ------------------------------------------------------------------ refused requests are let go

#: A valid 4 MB image (RGBA, 1000 x 1000): what a refused request carries. The requests live
#: here, so that what the test itself keeps (its exceptions' tracebacks) never holds the only
#: reference to one of them.
BIG = wire.image_to_proto(np.full((1000, 1000, 4), 7, np.uint8))
BIG_BYTES = BIG.ByteSize()
BIG_PREDICT = pb.PredictRequest(model=pb.ModelSpec(name="nope"), images=[BIG])
BIG_EXPLAIN = pb.ExplainRequest(model=pb.ModelSpec(name="gap"), images=[BIG], methods=["no-such-method"])
BIG_DENSE = pb.DenseScoresRequest(model=pb.ModelSpec(name="gap"), image=BIG, mode="z")
BIG_GAP_PREDICT = pb.PredictRequest(model=pb.ModelSpec(name="gap"), images=[BIG])


def _big_refusals(stub, n: int = 6) -> list[str]:
    """``n`` refused calls of each kind, each with a 4 MB image; their status codes."""
    calls = [
        lambda: stub.Predict(BIG_PREDICT, timeout=30),
        lambda: stub.Explain(BIG_EXPLAIN, timeout=30),
        lambda: stub.DenseScores(BIG_DENSE, timeout=30),
        lambda: list(stub.ExplainStream(iter([BIG_EXPLAIN]), timeout=30)),
    ]
    codes = []
    for _ in range(n):
        for one in calls:
            with pytest.raises(grpc.RpcError) as e:
                one()
            codes.append(e.value.code().name)
    return codes


def test_refused_requests_are_not_kept_until_the_garbage_collector_runs(served, stub) -> None:
    """The abort of a failed call ends in a reference cycle (gRPC's AbortError and its frames):
    with the collector off, nothing of 24 refused 4 MB requests may stay in memory (it used to
    keep every one of them, parsed, until a collection)."""
    assert BIG_BYTES > 4_000_000
    codes: list[str] = []
    kept = payload_only_the_gc_frees(lambda: codes.extend(_big_refusals(stub)))
    assert codes == ["NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT"] * 6
    assert kept < BIG_BYTES, f"{kept / BIG_BYTES:.1f} requests' worth of payload kept alive by reference cycles"
    assert served.server.inflight == 0


def test_internal_errors_let_their_request_go_too(served, stub, monkeypatch) -> None:
    """A bug's traceback is logged, then dropped with the request it held. (The log records
    stay out of pytest's capture here, which would keep their tracebacks, and so the requests.)"""
    import logging

    monkeypatch.setattr(logging.getLogger("camserve"), "propagate", False)
    explainer = served.server.runtimes.get("gap").explainers[""]

    def boom(*args, **kwargs):
        raise RuntimeError("boom")  # a new exception each time (one shared would keep its last traceback)

    monkeypatch.setattr(explainer, "predict", boom)
    codes: list[str] = []

    def calls() -> None:
        for _ in range(4):
            with pytest.raises(grpc.RpcError) as e:
                stub.Predict(BIG_GAP_PREDICT, timeout=30)
            codes.append(e.value.code().name)

    kept = payload_only_the_gc_frees(calls)
    assert codes == ["INTERNAL"] * 4
    assert kept < BIG_BYTES, f"{kept / BIG_BYTES:.1f} requests' worth of payload kept alive by reference cycles"
