"""Protobuf parsing under camserve's control (camserve.serving.parsing): bytes that are not the
RPC's request message are INVALID_ARGUMENT naming the RPC and the message type (gRPC's own
parsing answered UNKNOWN, and INTERNAL inside ExplainStream), counted like any failed call;
the bearer-token check comes before parsing; the server serves on. Raw bytes go through a
generic channel (no serializer), as an attacker would send them."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from helpers_serving import RunningServer, local_config, metric_value, save_model, tiny_gap

from camserve import wire
from camserve.errors import InvalidArgument
from camserve.proto import pb, pb_grpc
from camserve.serving.parsing import DETACH_MIN_BYTES, WithTensorData, request_parser

TOKEN = "s3cret-t0ken"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVICE = "/camserve.v1.CamService/"
IMAGE = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)

VALID = pb.PredictRequest(model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(IMAGE)]).SerializeToString()

#: Bytes that are no message of any type, each a different way of being malformed.
MALFORMED = {
    "ff_bytes": b"\xff\xff\xff",
    "truncated_valid_message": VALID[: len(VALID) // 2],
    "end_group_wire_type_for_field_1": b"\x0c",
    "invalid_wire_type_6": b"\x0e\x01",
    "length_past_the_end": b"\x0a\x7f\x00",
    "field_number_0": b"\x00\x01",
    "bad_utf8_in_model_name": b"\x0a\x03\x0a\x01\xff",
}

REQUEST_TYPES = {
    "Predict": "camserve.v1.PredictRequest",
    "Explain": "camserve.v1.ExplainRequest",
    "DenseScores": "camserve.v1.DenseScoresRequest",
    "GetModel": "camserve.v1.GetModelRequest",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_model(root, "gap", 1, tiny_gap(1))
    cfg = local_config(root, token=TOKEN)
    with RunningServer(cfg) as rs:
        yield rs


@pytest.fixture(scope="module")
def channel(served: RunningServer):
    ch = grpc.insecure_channel(served.target)
    yield ch
    ch.close()


def _raw_call(channel: grpc.Channel, method: str, data: bytes, metadata=AUTH) -> bytes:
    """One unary call with ``data`` as the request's bytes, as they are."""
    return channel.unary_unary(SERVICE + method)(data, timeout=30, metadata=metadata)


@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_bytes_are_invalid_argument_naming_rpc_and_type(served, channel, method, name) -> None:
    data = MALFORMED[name]
    before = metric_value(served.metrics_text(), "camserve_errors_total", method=method, code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as e:
        _raw_call(channel, method, data)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    details = e.value.details()
    expected = REQUEST_TYPES[method]
    assert details.startswith(f"{method}: the request ({len(data)} bytes) is not a valid {expected} message")
    assert details.endswith(f"; send one serialized {expected}")
    after = metric_value(served.metrics_text(), "camserve_errors_total", method=method, code="INVALID_ARGUMENT")
    assert after == before + 1
    assert served.server.inflight == 0


def test_the_same_bytes_parse_when_well_formed(channel) -> None:
    """The raw path itself works: the valid message's bytes get an answer (the test above is
    not refusing everything)."""
    reply = pb.PredictResponse.FromString(_raw_call(channel, "Predict", VALID))
    stub = pb_grpc.CamServiceStub(channel)
    assert reply == stub.Predict(pb.PredictRequest.FromString(VALID), timeout=30, metadata=AUTH)
    assert len(reply.predictions) == 1 and reply.model.name == "gap"


@pytest.mark.parametrize("name", ["ff_bytes", "truncated_valid_message", "bad_utf8_in_model_name"])
def test_malformed_message_inside_explain_stream_is_invalid_argument(served, channel, name) -> None:
    good = pb.ExplainRequest(
        model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(IMAGE)], request_id="ok-1"
    ).SerializeToString()
    bad = MALFORMED[name]
    call = channel.stream_stream(SERVICE + "ExplainStream")(iter([good, bad]), timeout=30, metadata=AUTH)
    answers = []
    with pytest.raises(grpc.RpcError) as e:
        for raw in call:
            answers.append(pb.ExplainResponse.FromString(raw).request_id)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert e.value.details().startswith(
        f"ExplainStream: request message 2 of the stream ({len(bad)} bytes) is not a valid camserve.v1.ExplainRequest"
    )
    assert set(answers) <= {"ok-1"}  # the good one may have been answered first
    assert served.server.inflight == 0


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),)], ids=["no_token", "wrong_token"])
@pytest.mark.parametrize("method", sorted(REQUEST_TYPES))
def test_token_is_checked_before_parsing(channel, method, metadata) -> None:
    """Garbage without the token is UNAUTHENTICATED: the bytes were never parsed."""
    with pytest.raises(grpc.RpcError) as e:
        _raw_call(channel, method, MALFORMED["ff_bytes"], metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (e.value.code(), e.value.details())


def test_token_is_checked_before_parsing_a_stream(channel) -> None:
    call = channel.stream_stream(SERVICE + "ExplainStream")(iter([MALFORMED["ff_bytes"]]), timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (e.value.code(), e.value.details())


def test_server_serves_on_after_malformed_requests(served, channel) -> None:
    for data in MALFORMED.values():
        with pytest.raises(grpc.RpcError):
            _raw_call(channel, "Predict", data)
    stub = pb_grpc.CamServiceStub(channel)
    reply = stub.Predict(pb.PredictRequest.FromString(VALID), timeout=30, metadata=AUTH)
    assert len(reply.predictions) == 1
    explained = list(
        stub.ExplainStream(
            iter([pb.ExplainRequest(model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(IMAGE)])]),
            timeout=30,
            metadata=AUTH,
        )
    )
    assert len(explained) == 1 and len(explained[0].images) == 1
    assert served.server.inflight == 0


def test_health_keeps_grpc_parsing(served) -> None:
    """Only CamService parses its own requests: health answers as before (a valid check
    SERVING, no token needed) and is not counted among camserve's calls."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(served.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert metric_value(served.metrics_text(), "camserve_requests_total", method="Check") == 0


# ---------------------------------------------------------------- large raw tensors, read in place

BIG = np.random.default_rng(5).integers(0, 256, (120, 100, 3), dtype=np.uint8)  # 36 KB of pixels
assert BIG.nbytes >= DETACH_MIN_BYTES > IMAGE.nbytes


def test_large_raw_tensors_reach_the_handler_as_views_of_the_request_bytes() -> None:
    data = pb.PredictRequest(
        model=pb.ModelSpec(name="gap"), images=[wire.image_to_proto(BIG), pb.Image(encoded=b"png")], top_k=2
    ).SerializeToString()
    request = request_parser("Predict", pb.PredictRequest.FromString)(data)
    assert isinstance(request, WithTensorData)
    assert (request.model.name, request.top_k, len(request.images)) == ("gap", 2, 2)
    viewed, encoded = request.images
    assert isinstance(viewed, wire.TensorImage) and viewed.data.obj is data  # not copied
    assert encoded == pb.Image(encoded=b"png")
    np.testing.assert_array_equal(wire.decode_image_proto(viewed).array, BIG)
    assert not isinstance(request_parser("Predict", pb.PredictRequest.FromString)(VALID), WithTensorData)


def test_a_large_tensor_with_a_wrong_size_is_still_refused_by_name() -> None:
    tensor = wire.array_to_tensor(BIG)
    tensor.data = tensor.data[:-1]
    data = pb.DenseScoresRequest(image=pb.Image(tensor=tensor)).SerializeToString()
    request = request_parser("DenseScores", pb.DenseScoresRequest.FromString)(data)
    assert isinstance(request.image, wire.TensorImage)
    with pytest.raises(InvalidArgument, match=r"35999 data bytes do not match shape \[120, 100, 3\]"):
        wire.decode_image_proto(request.image)


def test_large_raw_tensors_get_the_answers_of_the_same_image_sent_encoded(channel) -> None:
    """The server reads large tensors in place: every RPC taking images answers exactly as it
    does for the same pixels sent as a (lossless) PNG, which goes through the parser whole."""
    stub = pb_grpc.CamServiceStub(channel)
    png = pb.Image(encoded=_png(BIG))
    tensor = wire.image_to_proto(BIG)
    model = pb.ModelSpec(name="gap")

    def predict(image):
        return stub.Predict(pb.PredictRequest(model=model, images=[image, image], top_k=1), timeout=30, metadata=AUTH)

    def explain(image):
        request = pb.ExplainRequest(model=model, images=[image], return_heatmap=True, return_raw=True)
        return stub.Explain(request, timeout=30, metadata=AUTH)

    def dense(image):
        return stub.DenseScores(pb.DenseScoresRequest(model=model, image=image), timeout=30, metadata=AUTH)

    def stream(image):
        requests = [
            pb.ExplainRequest(model=model, images=[image], return_heatmap=True, request_id=f"r{i}") for i in range(3)
        ]
        answers = stub.ExplainStream(iter(requests), timeout=30, metadata=AUTH)
        return sorted((a.request_id, a.SerializeToString()) for a in answers)

    for rpc in (predict, explain, dense, stream):
        assert rpc(tensor) == rpc(png), rpc.__name__
    assert explain(tensor).images[0].image_width == 100


def _png(pixels: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def test_answers_sent_as_bytes_read_back_as_the_messages_would(channel, monkeypatch) -> None:
    """Large Explain and DenseScores answers leave the server as bytes it wrote itself
    (convert.BYTES_ANSWER_FROM), smaller ones as messages gRPC serializes: a client reads the
    same answer either way."""
    from camserve.serving import convert

    stub = pb_grpc.CamServiceStub(channel)
    request = pb.ExplainRequest(
        model=pb.ModelSpec(name="gap"),
        images=[wire.image_to_proto(BIG), wire.image_to_proto(IMAGE)],
        methods=["gradcam", "cam"],
        top_k=2,
        return_raw=True,
        return_heatmap=True,
        request_id="r1",
    )
    built = []
    for name in ("serialized_explain_response", "serialized_dense_response"):
        real = getattr(convert, name)
        monkeypatch.setattr(convert, name, lambda *a, real=real, name=name, **k: built.append(name) or real(*a, **k))
    answers, streamed, dense = [], [], []
    dense_request = pb.DenseScoresRequest(model=pb.ModelSpec(name="gap"), image=wire.image_to_proto(BIG))
    for threshold in (0, 1 << 40):  # every answer as bytes, then none
        monkeypatch.setattr(convert, "BYTES_ANSWER_FROM", threshold)
        answers.append(stub.Explain(request, timeout=30, metadata=AUTH))
        streamed.append(list(stub.ExplainStream(iter([request, request]), timeout=30, metadata=AUTH)))
        dense.append(stub.DenseScores(dense_request, timeout=30, metadata=AUTH))
    assert dense[0] == dense[1] and dense[0].scales[0].scores.data
    # Explain's answer, the stream's two and DenseScores', when the threshold was 0
    assert sorted(built) == ["serialized_dense_response"] + ["serialized_explain_response"] * 3
    assert answers[0] == answers[1] == streamed[0][0] == streamed[0][1] == streamed[1][0] == streamed[1][1]
    assert len(answers[0].images) == 2 and len(answers[0].images[0].explanations) == 4
    assert answers[0].request_id == "r1" and answers[0].images[0].explanations[0].heatmap.data
