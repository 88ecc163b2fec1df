"""``inference.GRPCInferenceService`` (Open Inference Protocol v2 over gRPC) on camserve's gRPC
server, beside ``camserve.v1.CamService``: thin adapters from the protocol's messages to
:mod:`camserve.oip.inference` and back. It runs behind the same
:class:`~camserve.serving.gate.ServiceGate` (bearer-token auth, request parsing, status
mapping) as camserve.v1.

Input tensors come as ``raw_input_contents`` (what tritonclient sends) or as typed
``contents``; outputs go back as ``raw_output_contents``. ``ModelStreamInfer`` and the
repository calls answer UNIMPLEMENTED saying what to use instead; Triton's calls that the
``.proto`` does not declare (ModelConfig, statistics, shared memory, trace, logging) get
gRPC's own UNIMPLEMENTED.

>>> parameter_value(oip_pb.InferParameter(int64_param=3)), parameter_value(oip_pb.InferParameter(string_param="cam"))
(3, 'cam')
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from camserve.errors import InvalidArgument
from camserve.oip import inference, tensors
from camserve.oip.tensors import Tensor
from camserve.proto.inference import grpc_service_pb2 as oip_pb
from camserve.proto.inference import grpc_service_pb2_grpc as oip_grpc
from camserve.serving.dataplane import DataPlane
from camserve.serving.servicer import deadline_of

__all__ = ["SERVICE_NAME", "InferenceServicer", "add_to_server", "oip_pb", "parameter_value"]

SERVICE_NAME: str = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

#: The InferTensorContents field that holds each datatype's elements.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(p: Any) -> Any:
    """An InferParameter's value (bool, int, str or float); None when none is set."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def parameters_of(params: Mapping[str, Any]) -> dict[str, Any]:
    """A message's ``parameters`` map as plain values.

    >>> parameters_of({"top_k": oip_pb.InferParameter(int64_param=2)})
    {'top_k': 2}
    """
    return {k: parameter_value(v) for k, v in params.items()}


def _inputs(request: Any, max_elements: int) -> list[Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input, in the same order"
        )
    out = []
    for i, t in enumerate(request.inputs):
        if raw:
            if t.HasField("contents"):
                raise InvalidArgument(f"input {t.name!r}: set either raw_input_contents or contents, not both")
            out.append(tensors.from_raw(t.name, t.datatype, t.shape, raw[i], max_elements))
            continue
        field = CONTENTS_FIELD.get(t.datatype)
        if field is None:
            tensors.check_datatype(t.datatype, f"input {t.name!r}")
            raise InvalidArgument(f"input {t.name!r}: {t.datatype} travels in raw_input_contents only")
        tensors.check_shape(t.shape, f"input {t.name!r}", max_elements)
        out.append(tensors.from_values(t.name, t.datatype, t.shape, getattr(t.contents, field)))
    return out


def infer_request(request: Any, max_elements: int) -> inference.InferRequest:
    """A ModelInferRequest as the transport-independent request."""
    return inference.InferRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        parameters=parameters_of(request.parameters),
        inputs=_inputs(request, max_elements),
        outputs=[inference.RequestedOutput(o.name, parameters_of(o.parameters)) for o in request.outputs],
    )


def infer_response(result: inference.InferResult) -> Any:
    """The result as a ModelInferResponse with raw_output_contents."""
    return oip_pb.ModelInferResponse(
        model_name=result.model,
        model_version=result.version,
        id=result.id,
        outputs=[
            oip_pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in result.outputs
        ],
        raw_output_contents=[tensors.to_raw(t) for t in result.outputs],
    )


def _unimplemented_message(method: str) -> str:
    return (
        f"{method} is not implemented by camserve; its Open Inference Protocol service answers ServerLive, "
        "ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer (camserve.v1.CamService has "
        "ExplainStream for streaming, ListModels for the repository)"
    )


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over one :class:`DataPlane`; ``ready`` is the server's own readiness
    (CamServer.serving: every model loaded or failed, and warmed up), which ServerReady also
    requires, as the REST ``/v2/health/ready`` does."""

    def __init__(self, plane: DataPlane, ready: Callable[[], bool] = lambda: True) -> None:
        self.plane = plane
        self.ready = ready

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip_pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip_pb.ServerReadyResponse(ready=bool(self.ready()) and inference.server_ready(self.plane))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip_pb.ModelReadyResponse(ready=inference.model_ready(self.plane, request.name, request.version))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip_pb.ServerMetadataResponse(**inference.server_metadata())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = inference.model_metadata(self.plane, request.name, request.version)
        tensor = oip_pb.ModelMetadataResponse.TensorMetadata
        return oip_pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = infer_request(request, max_elements=inference.max_elements(self.plane.config))
        del request  # the tensors view its bytes; nothing else needs the message
        result = await inference.infer(self.plane, req, deadline=deadline_of(context))
        return infer_response(result)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _unimplemented_message("ModelStreamInfer"))
        yield  # pragma: no cover - never reached; makes this a response stream

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _unimplemented_message("RepositoryIndex"))

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _unimplemented_message("RepositoryModelLoad"))

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _unimplemented_message("RepositoryModelUnload"))


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` on ``server``."""
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
