"""Bearer-token auth (camserve.serving.auth) behind the status interceptor: denied calls are
UNAUTHENTICATED (the errors.Unauthenticated kind), counted and logged like any failed call;
health is exempt; the right token passes. (TLS + token together: test_server_ops.)"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from helpers_serving import (
    LogLines,
    RunningServer,
    local_config,
    metric_value,
    payload_only_the_gc_frees,
    save_model,
    tiny_gap,
)

from camserve import errors, wire
from camserve.proto import pb, pb_grpc

TOKEN = "t0ken"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_model(root, "gap", 1, tiny_gap(1))
    cfg = local_config(root, token=TOKEN)
    with RunningServer(cfg) as rs:
        yield rs


@pytest.fixture(scope="module")
def stub(served: RunningServer):
    channel = grpc.insecure_channel(served.target)
    yield pb_grpc.CamServiceStub(channel)
    channel.close()


def _request() -> pb.PredictRequest:
    return pb.PredictRequest(
        model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(np.zeros((32, 32, 3), np.uint8))]
    )


@pytest.mark.parametrize(
    "metadata,details",
    [
        ((), "missing bearer token: send metadata 'authorization: Bearer <token>'"),
        ((("authorization", "Bearer nope"),), "invalid bearer token"),
        ((("authorization", TOKEN),), "invalid bearer token"),  # the scheme is required
    ],
)
def test_denied_calls_are_unauthenticated_counted_and_logged(served, stub, metadata, details) -> None:
    before = metric_value(served.metrics_text(), "camserve_errors_total", method="Predict", code="UNAUTHENTICATED")
    with LogLines("camserve.serving.status") as log, pytest.raises(grpc.RpcError) as e:
        stub.Predict(_request(), timeout=30, metadata=metadata)
    assert e.value.code() == grpc.StatusCode[errors.Unauthenticated.code] == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == details
    after = metric_value(served.metrics_text(), "camserve_errors_total", method="Predict", code="UNAUTHENTICATED")
    assert after == before + 1
    failed = [r for r in log.records if r.getMessage() == "request failed"]
    assert [(r.method, r.code, r.error) for r in failed] == [("Predict", "UNAUTHENTICATED", details)]
    assert served.server.inflight == 0


def test_streams_are_guarded_too(stub) -> None:
    request = pb.ExplainRequest(model=pb.ModelSpec(name="gap"), images=_request().images)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ExplainStream(iter([request]), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_passes_and_health_needs_none(served, stub) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = stub.Predict(_request(), timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert len(reply.predictions) == 1
    with grpc.insecure_channel(served.target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("value", [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"bEaReR {TOKEN}", f"Bearer   {TOKEN}"])
def test_the_scheme_is_case_insensitive(stub, value) -> None:
    """RFC 7235: the auth-scheme is a case-insensitive token, followed by one or more spaces."""
    reply = stub.Predict(_request(), timeout=30, metadata=(("authorization", value),))
    assert len(reply.predictions) == 1


@pytest.mark.parametrize(
    "value", [f"Bearer{TOKEN}", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", "Bearer"]
)
def test_near_misses_stay_invalid(stub, value) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_request(), timeout=30, metadata=(("authorization", value),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == "invalid bearer token"


@pytest.mark.parametrize(
    "values",
    [(f"Bearer {TOKEN}", f"Bearer {TOKEN}"), ("Bearer nope", f"Bearer {TOKEN}"), (f"Bearer {TOKEN}", "Bearer nope")],
    ids=["same_twice", "right_one_last", "right_one_first"],
)
def test_two_authorization_headers_are_refused(served, stub, values) -> None:
    """Which of two would count? Neither: the call is refused, whatever their order."""
    metadata = tuple(("authorization", v) for v in values)
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(_request(), timeout=30, metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == "2 'authorization' headers: send exactly one, 'authorization: Bearer <token>'"
    assert served.server.inflight == 0


def test_check_bearer_compares_the_whole_token() -> None:
    from camserve.serving.auth import INVALID, MISSING, check_bearer

    assert check_bearer([], TOKEN) == MISSING
    assert check_bearer([f"Bearer {TOKEN}"], TOKEN) is None
    assert check_bearer([f"Bearer {TOKEN}"], TOKEN + "x") == INVALID
    assert check_bearer([f"Bearer {TOKEN}"], "") == INVALID
    assert check_bearer([f"Token {TOKEN}"], TOKEN) == INVALID


#: A 4 MB request (module level: only the server's copies may be let go).
BIG_REQUEST = pb.PredictRequest(
    model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(np.full((1000, 1000, 4), 9, np.uint8))]
)


def test_denied_requests_are_let_go_at_once(stub) -> None:
    """A denied call keeps nothing of its request for the garbage collector to find."""
    codes: list[str] = []

    def calls() -> None:
        for metadata in [(), (("authorization", "Bearer nope"),)] * 3:
            with pytest.raises(grpc.RpcError) as e:
                stub.Predict(BIG_REQUEST, timeout=30, metadata=metadata)
            codes.append(e.value.code().name)

    kept = payload_only_the_gc_frees(calls)
    assert codes == ["UNAUTHENTICATED"] * 6
    assert kept < BIG_REQUEST.ByteSize(), f"{kept / BIG_REQUEST.ByteSize():.1f} requests kept by reference cycles"


def test_models_command_reads_the_token_from_a_file_or_the_environment(served, tmp_path, monkeypatch, capsys) -> None:
    """``camserve models --token-file`` (and CAMSERVE_TOKEN_FILE) so the token never shows in the
    process list; without a token the same call is refused."""
    from camserve.cli import main

    target = served.target
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.delenv("CAMSERVE_TOKEN", raising=False)
    monkeypatch.delenv("CAMSERVE_TOKEN_FILE", raising=False)
    assert main(["models", "--server", target, "--json", "--timeout", "10"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["models", "--server", target, "--json", "--token-file", str(token_file), "--timeout", "10"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    monkeypatch.setenv("CAMSERVE_TOKEN_FILE", str(token_file))
    assert main(["models", "--server", target, "--json", "--timeout", "10"]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} == names and names


def test_reflection_needs_the_token_and_is_refused_as_unauthenticated(served) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(served.target) as ch:
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
        with pytest.raises(grpc.RpcError) as e:
            list(reflect(iter([ask]), timeout=30))
        assert (
            e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            and e.value.details() == "missing bearer token: send metadata 'authorization: Bearer <token>'"
        )
        (answer,) = reflect(iter([ask]), timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert "camserve.v1.CamService" in {s.name for s in answer.list_services_response.service}
