"""``inference.GRPCInferenceService`` (Open Inference Protocol v2) on camserve's gRPC port:
scores equal Keras on the same inputs, classification strings equal the scores they name,
explanation outputs equal the in-process Explainer, and errors get the right codes while the
server keeps serving. Tiny models in a temporary repository."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers_oip import SIZE, gap_reference, model_inputs
from helpers_serving import CLASSES, RunningServer, local_config, make_repository

from camserve.imaging import encode_png
from camserve.oip.grpc_service import SERVICE_NAME, oip_pb
from camserve.oip.tensors import serialize_bytes
from camserve.proto.inference import grpc_service_pb2_grpc as oip_grpc


@pytest.fixture(scope="module")
def repo_root(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def served(repo_root: Path):
    config = local_config(
        repo_root,
        metrics_port=-1,
        http_port=-1,
        max_batch_size=4,
        batch_timeout_ms=5,
        max_images=8,
        max_pixels=512 * 512,
    )
    with RunningServer(config) as rs:
        yield rs


@pytest.fixture(scope="module")
def channel(served: RunningServer):
    ch = grpc.insecure_channel(served.target)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(repo_root: Path):
    """The served model file loaded on its own, and an in-process Explainer over it."""
    return gap_reference(repo_root)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """Two RGB images of one size that is not the model's (the server resizes)."""
    return np.random.default_rng(3).integers(0, 256, (2, 45, 61, 3), dtype=np.uint8)


def _request(
    array: np.ndarray | None = None,
    datatype: str = "UINT8",
    *,
    raw: bytes | None = None,
    shape: list[int] | None = None,
    model: str = "gap",
    outputs: list[tuple[str, dict]] = (),
    **parameters,
):
    """A ModelInferRequest with one input 'images' in raw_input_contents."""
    shape = list(array.shape) if shape is None else shape
    data = raw if raw is not None else array.tobytes()
    req = oip_pb.ModelInferRequest(model_name=model, id="req-1")
    req.inputs.add(name="images", datatype=datatype, shape=shape)
    req.raw_input_contents.append(data)
    for key, value in parameters.items():
        _set(req.parameters[key], value)
    for name, params in outputs:
        out = req.outputs.add(name=name)
        for key, value in params.items():
            _set(out.parameters[key], value)
    return req


def _set(param, value) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    else:
        param.string_param = value


def _outputs(response) -> dict[str, np.ndarray]:
    """The response's outputs decoded from raw_output_contents, by hand (independent of camserve)."""
    out = {}
    for t, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if t.datatype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                n = int.from_bytes(raw[pos : pos + 4], "little")
                items.append(raw[pos + 4 : pos + 4 + n])
                pos += 4 + n
            out[t.name] = np.array(items, dtype=object).reshape(list(t.shape))
        else:
            dtype = {"FP32": "<f4", "INT32": "<i4"}[t.datatype]
            out[t.name] = np.frombuffer(raw, dtype=dtype).reshape(list(t.shape))
    return out


def _code(excinfo: pytest.ExceptionInfo) -> grpc.StatusCode:
    return excinfo.value.code()


# ---------------------------------------------------------------------------- health and metadata


def test_health_and_readiness(stub) -> None:
    assert stub.ServerLive(oip_pb.ServerLiveRequest()).live
    assert stub.ServerReady(oip_pb.ServerReadyRequest()).ready
    assert stub.ModelReady(oip_pb.ModelReadyRequest(name="gap")).ready
    assert stub.ModelReady(oip_pb.ModelReadyRequest(name="gap", version="1")).ready
    assert not stub.ModelReady(oip_pb.ModelReadyRequest(name="broken")).ready  # on disk, failed to load
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelReady(oip_pb.ModelReadyRequest(name="nope"))
    assert _code(e) == grpc.StatusCode.NOT_FOUND and "gap" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelReady(oip_pb.ModelReadyRequest(name="gap", version="7"))
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_server_ready_also_needs_the_servers_own_readiness(served: RunningServer) -> None:
    import asyncio

    from camserve.oip.grpc_service import InferenceServicer

    assert served.server.oip_servicer.ready == served.server.serving  # every model loaded or failed, warmed up
    request = oip_pb.ServerReadyRequest()
    answers = [
        asyncio.run(
            InferenceServicer(served.server.dataplane, ready=lambda flag=flag: flag).ServerReady(request, None)
        ).ready
        for flag in (False, True)
    ]
    assert answers == [False, True]  # a model is ready in both: the server's readiness decides


def test_metadata(stub) -> None:
    import camserve

    server = stub.ServerMetadata(oip_pb.ServerMetadataRequest())
    assert (server.name, server.version) == ("camserve", camserve.__version__)
    assert "classification" in server.extensions
    meta = stub.ModelMetadata(oip_pb.ModelMetadataRequest(name="gap"))
    assert meta.name == "gap" and list(meta.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("images", "UINT8", [-1, -1, -1, 3])]
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    assert outputs["scores"] == ("FP32", [-1, len(CLASSES)])
    assert outputs["heatmap"] == ("FP32", [-1, -1, -1, SIZE, SIZE])
    assert list(stub.ModelMetadata(oip_pb.ModelMetadataRequest(name="gap", version="1")).versions) == ["1"]
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(oip_pb.ModelMetadataRequest(name="nope"))
    assert _code(e) == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------------------- inference


def test_uint8_scores_equal_keras(stub, reference, pixels) -> None:
    model, _ = reference
    response = stub.ModelInfer(_request(pixels))
    assert (response.model_name, response.model_version, response.id) == ("gap", "2", "req-1")
    got = _outputs(response)
    assert list(got) == ["scores"]
    np.testing.assert_allclose(got["scores"], model.predict(model_inputs(pixels), verbose=0), rtol=1e-5, atol=1e-6)


def test_input_forms_agree(stub, reference, pixels) -> None:
    """FP32 preprocessed inputs, BYTES PNG files (raw and as typed contents) and typed UINT8
    contents give the scores of the same images sent as UINT8 pixels."""
    model, _ = reference
    expected = model.predict(model_inputs(pixels), verbose=0)
    fp32 = _outputs(stub.ModelInfer(_request(model_inputs(pixels), "FP32")))["scores"]
    pngs = [encode_png(p) for p in pixels]
    by_png = _outputs(stub.ModelInfer(_request(raw=serialize_bytes(pngs), datatype="BYTES", shape=[2])))["scores"]
    typed = oip_pb.ModelInferRequest(model_name="gap")
    typed.inputs.add(name="images", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend(pngs)
    by_contents = _outputs(stub.ModelInfer(typed))["scores"]
    typed_u8 = oip_pb.ModelInferRequest(model_name="gap")
    typed_u8.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape)).contents.uint_contents.extend(
        pixels.reshape(-1).tolist()
    )
    by_u8_contents = _outputs(stub.ModelInfer(typed_u8))["scores"]
    for got in (fp32, by_png, by_contents, by_u8_contents):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_named_version(stub, repo_root: Path, pixels) -> None:
    import keras

    v1 = keras.models.load_model(repo_root / "gap" / "1" / "model.keras")
    req = _request(pixels)
    req.model_version = "1"
    response = stub.ModelInfer(req)
    assert response.model_version == "1"
    np.testing.assert_allclose(_outputs(response)["scores"], v1.predict(model_inputs(pixels), verbose=0), rtol=1e-5)


def test_classification_strings(stub, reference, pixels) -> None:
    model, _ = reference
    expected = model.predict(model_inputs(pixels), verbose=0)
    got = _outputs(stub.ModelInfer(_request(pixels, outputs=[("scores", {"classification": 3})])))["scores"]
    assert got.shape == (2, 3)
    for row, strings in zip(expected, got):
        best = np.argsort(-row)[:3]
        parsed = [s.decode().split(":") for s in strings]
        assert [int(p[1]) for p in parsed] == list(best)
        assert [p[2] for p in parsed] == [CLASSES[i] for i in best]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[best], atol=1e-6)


def test_explanation_outputs_equal_in_process(stub, reference, pixels) -> None:
    _, ex = reference
    expected = ex.explain(model_inputs(pixels), methods=("gradcam", "layercam"), targets=[["star", 0]])
    response = stub.ModelInfer(_request(pixels, method="gradcam,layercam", target="star,0"))
    got = _outputs(response)
    assert [t.name for t in response.outputs] == ["scores", "heatmap", "raw", "targets", "boxes"]
    assert got["heatmap"].shape == (2, 2, 2, SIZE, SIZE)
    assert got["targets"].tolist() == [[3, 0], [3, 0]]
    for i, exps in enumerate(expected):  # targets outer, methods inner
        for j, e in enumerate(exps):
            t, m = divmod(j, 2)
            assert (e.class_index, e.method) == ([3, 0][t], ["gradcam", "layercam"][m])
            np.testing.assert_allclose(got["heatmap"][i, t, m], e.heatmap, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(got["raw"][i, t, m], e.raw, rtol=1e-4, atol=1e-6)
            assert tuple(got["boxes"][i, t, m]) == (e.box if e.box is not None else (-1, -1, -1, -1))


def test_explanation_top_k_and_chosen_outputs(stub, reference, pixels) -> None:
    _, ex = reference
    expected = ex.explain(model_inputs(pixels), methods=("cam",), top_k=2)
    req = _request(pixels, method="cam", top_k=2, outputs=[("heatmap", {}), ("targets", {})])
    got = _outputs(stub.ModelInfer(req))
    assert list(got) == ["heatmap", "targets"]
    assert got["targets"].tolist() == [[e.class_index for e in exps] for exps in expected]
    for i, exps in enumerate(expected):
        for t, e in enumerate(exps):
            np.testing.assert_allclose(got["heatmap"][i, t, 0], e.heatmap, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("request_args", "code", "words"),
    [
        (dict(array=np.zeros((1, 8, 8, 3), np.int32), datatype="INT32"), "INVALID_ARGUMENT", "datatype INT32"),
        (dict(array=np.zeros((1, 8, 8, 4), np.uint8)), "INVALID_ARGUMENT", "[N, H, W, 3]"),
        (dict(array=np.zeros((8, 8, 3), np.uint8)), "INVALID_ARGUMENT", "shape must be"),
        (dict(raw=b"\0" * 10, shape=[1, 8, 8, 3]), "INVALID_ARGUMENT", "192 bytes expected"),
        (dict(array=np.full((1, SIZE, SIZE, 3), np.nan, np.float32), datatype="FP32"), "INVALID_ARGUMENT", "NaN"),
        (dict(array=np.zeros((1, 8, 8, 3), np.float32), datatype="FP32"), "INVALID_ARGUMENT", "shape [32, 32, 3]"),
        (dict(raw=serialize_bytes([b"not an image"]), datatype="BYTES", shape=[1]), "INVALID_ARGUMENT", "image"),
        (dict(array=np.zeros((1, 8, 8, 3), np.uint8), model="nope"), "NOT_FOUND", "unknown model"),
        (dict(array=np.zeros((1, 8, 8, 3), np.uint8), outputs=[("logits", {})]), "INVALID_ARGUMENT", "outputs"),
        (dict(array=np.zeros((1, 8, 8, 3), np.uint8), metod="cam"), "INVALID_ARGUMENT", "unknown request param"),
        (dict(array=np.zeros((1, 8, 8, 3), np.uint8), method="magic"), "INVALID_ARGUMENT", "unknown method"),
        (dict(array=np.zeros((1, 8, 8, 3), np.uint8), target="zebra"), "NOT_FOUND", "zebra"),
        (
            dict(array=np.zeros((1, 8, 8, 3), np.uint8), outputs=[("scores", {"classification": 9})]),
            "INVALID_ARGUMENT",
            "class_count",
        ),
        (dict(array=np.zeros((9, 8, 8, 3), np.uint8)), "INVALID_ARGUMENT", "max_images"),
    ],
)
def test_bad_requests_get_their_codes(stub, request_args: dict, code: str, words: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(_request(**request_args))
    assert _code(e) == grpc.StatusCode[code], e.value.details()
    assert words in e.value.details()


def test_triton_timeout_parameter_sets_the_deadline(served, stub, pixels, monkeypatch) -> None:
    """``timeout`` (microseconds) reaches the data plane as the deadline, the sooner of it and
    the call's own; a tiny one is DEADLINE_EXCEEDED; bad values name the parameter."""
    import time

    plane = served.server.dataplane
    seen: list[float | None] = []
    predict = plane.predict

    async def recording(*args, deadline=None, **kw):
        seen.append(deadline)
        return await predict(*args, deadline=deadline, **kw)

    monkeypatch.setattr(plane, "predict", recording)
    t0 = time.monotonic()
    stub.ModelInfer(_request(pixels, timeout=50_000_000))  # 50 s, no call deadline
    t1 = time.monotonic()
    assert t0 + 50 <= seen[-1] <= t1 + 50
    t0 = time.monotonic()
    stub.ModelInfer(_request(pixels, timeout=50_000_000), timeout=20)  # the call's 20 s are sooner
    assert t0 + 19 < seen[-1] < t0 + 30  # about 20 s (gRPC rounds timeouts up a little), not 50
    stub.ModelInfer(_request(pixels, timeout=0))  # 0: no timeout
    assert seen[-1] is None
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(_request(pixels, timeout=1))  # 1 µs: over before the batcher sees it
    assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in e.value.details()
    for bad in (-5, "soon"):
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(_request(pixels, timeout=bad))
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "parameter 'timeout'" in e.value.details()
        assert "microseconds >= 0" in e.value.details()


def test_malformed_message_and_unsupported_calls(channel, stub, pixels) -> None:
    infer = channel.unary_unary(f"/{SERVICE_NAME}/ModelInfer")
    with pytest.raises(grpc.RpcError) as e:
        infer(b"\xff\xff\xff")
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "inference.ModelInferRequest" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.ModelStreamInfer(iter([_request(pixels)])))
    assert _code(e) == grpc.StatusCode.UNIMPLEMENTED and "ModelStreamInfer" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.RepositoryIndex(oip_pb.RepositoryIndexRequest())
    assert _code(e) == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as e:  # a Triton call the .proto does not declare
        channel.unary_unary(f"/{SERVICE_NAME}/ModelConfig")(b"")
    assert _code(e) == grpc.StatusCode.UNIMPLEMENTED
    assert stub.ModelInfer(_request(pixels)).outputs[0].name == "scores"  # still serving


def test_reflection_describes_the_service(served: RunningServer) -> None:
    """grpcurl can list and describe the protocol's service."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    assert SERVICE_NAME in {s.name for s in listed.list_services_response.service}
    assert described.file_descriptor_response.file_descriptor_proto


def test_calls_are_counted_like_camserve_v1(served: RunningServer, stub, pixels) -> None:
    """The status interceptor wraps the protocol's methods too: calls and errors by method and code."""
    from helpers_serving import metric_value
    from prometheus_client import generate_latest

    def count(name: str, code: str) -> float:
        text = generate_latest(served.server.metrics.registry).decode()
        return metric_value(text, name, method="ModelInfer", code=code)

    ok, bad = count("camserve_requests_total", "OK"), count("camserve_errors_total", "NOT_FOUND")
    stub.ModelInfer(_request(pixels))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(_request(pixels, model="nope"))
    assert count("camserve_requests_total", "OK") == ok + 1
    assert count("camserve_errors_total", "NOT_FOUND") == bad + 1


def test_layer_parameter(stub, reference, pixels) -> None:
    from camserve.explain import Explainer

    model, _ = reference
    first_conv = next(layer.name for layer in model.layers if "conv" in type(layer).__name__.lower())
    expected = Explainer(model, layer=first_conv, class_names=CLASSES).explain(model_inputs(pixels), targets=[[2]])
    got = _outputs(stub.ModelInfer(_request(pixels, layer=first_conv, target=2, outputs=[("raw", {})])))["raw"]
    assert got.shape[-2:] == (SIZE, SIZE)  # the first conv keeps the input's resolution
    for i, (e,) in enumerate(expected):
        np.testing.assert_allclose(got[i, 0, 0], e.raw, rtol=1e-4, atol=1e-6)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_request(pixels, layer="no_such_layer"))
    assert _code(err) == grpc.StatusCode.NOT_FOUND and "no_such_layer" in err.value.details()
