"""Open Inference Protocol v2 REST routes (KServe / Triton) on camserve's HTTP port.

``GET /v2/health/live``, ``/v2/health/ready`` (no token needed: probes), ``GET /v2`` (server
metadata), ``GET /v2/models/{name}[/versions/{version}]`` (model metadata), ``.../ready`` and
``POST .../infer``: JSON tensors, and the binary tensor data extension (a JSON header of
``Inference-Header-Content-Length`` bytes followed by the tensors' raw contents, inputs with
the parameter ``binary_data_size``; outputs in binary when asked with ``binary_data: true`` on
the output or ``binary_data_output: true`` on the request), as Triton's ``tritonclient.http``
sends and reads them. ``BYTES`` images in JSON are base64 strings. The request and its answer
go through :mod:`camserve.oip.inference` (the data plane's batcher, limits and checks); errors
have the protocol's body ``{"error": "<message>"}`` with the status of their kind.

>>> oip_error_body("NOT_FOUND", "unknown model 'x'")
{'error': "unknown model 'x'"}
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from aiohttp import web

from camserve.errors import InvalidArgument
from camserve.http.app import HttpContext, deadline_of, error_body, public, read_body
from camserve.oip import inference, tensors
from camserve.oip.tensors import Tensor
from camserve.serving.budget import ResponseTooLarge

__all__ = ["HEADER_LENGTH", "add_routes", "oip_error_body"]

#: The binary tensor data extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"

MODEL = "/v2/models/{name}"
VERSION = "/v2/models/{name}/versions/{version}"

#: Triton's REST extensions camserve does not offer: 501 with what it offers instead.
UNIMPLEMENTED_PATHS = (
    "/v2/repository/index",
    "/v2/repository/models/{name}/{action:load|unload}",
    "/v2/models/stats",
    "/v2/{memory:systemsharedmemory|cudasharedmemory}{tail:.*}",
    "/v2/trace/setting",
    "/v2/logging",
    *(
        base + tail
        for base in (MODEL, VERSION)
        for tail in ("/config", "/stats", "/trace/setting", "/generate", "/generate_stream")
    ),
)
SUPPORTED = (
    "its Open Inference Protocol routes are /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{v}], "
    ".../ready and POST .../infer"
)


def oip_error_body(code: str, message: str) -> dict[str, str]:
    """The protocol's error body (what tritonclient reads)."""
    return {"error": message}


# ---------------------------------------------------------------------------- request parsing


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{what} must be a JSON list, got {type(value).__name__}")
    return value


def _input(item: Any, binary: memoryview, offset: int, max_elements: int) -> tuple[Tensor, int]:
    """One JSON input tensor (its data inline or, with ``binary_data_size``, from ``binary`` at
    ``offset``) and the offset after it."""
    item = _object(item, "each input")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or shape is None:
        raise InvalidArgument('each input needs "name", "datatype" and "shape" (and "data" or binary data)')
    params = _object(item.get("parameters"), f"input {name!r} parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidArgument(
                f"input {name!r}: binary_data_size {size} runs past the {len(binary) - offset} bytes of binary data left"
            )
        return tensors.from_raw(name, datatype, shape, binary[offset : offset + size], max_elements), offset + size
    if "data" not in item:
        raise InvalidArgument(f'input {name!r} has no "data" (and no binary_data_size parameter)')
    tensors.check_shape(shape, f"input {name!r}", max_elements)
    if datatype == "BYTES" and name == inference.INPUT_NAME:
        return _base64_images(name, shape, item["data"]), offset
    return tensors.from_json(name, datatype, shape, item["data"]), offset


def _base64_images(name: str, shape: Any, data: Any) -> Tensor:
    """Encoded images sent as base64 JSON strings."""
    strings = tensors.from_json(name, "BYTES", shape, data)
    out = np.empty(strings.array.shape, dtype=object)
    for index, s in np.ndenumerate(strings.array):
        try:
            out[index] = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(
                f"input {name!r}: BYTES images in JSON must be base64 strings of the image files "
                "(or send them as binary data, binary_data_size)"
            ) from None
    return Tensor(name, "BYTES", out)


def infer_request(body: bytes, header_length: str | None, name: str, version: str, max_elements: int) -> Any:
    """A REST infer body (JSON, or JSON header + binary data) as the transport-independent request.

    >>> body = b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}]}'
    >>> infer_request(body, None, "gap", "", max_elements=100).inputs[0].array.tolist()
    [[[[1, 2, 3]]]]
    """
    view = memoryview(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} must be the byte length of the JSON header (at most the body's {len(body)} bytes), "
                f"got {header_length[:40]!r}"
            )
        head, binary = view[: int(header_length)], view[int(header_length) :]
    else:
        head, binary = view, memoryview(b"")
    if not head:
        raise InvalidArgument('the request body is empty; send a JSON object with "inputs"')
    try:
        doc = json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f'the request\'s JSON is not valid ({e}); send a JSON object with "inputs"') from None
    doc = _object(doc, "the request body")
    inputs, offset = [], 0
    for item in _list(doc.get("inputs"), '"inputs"'):
        tensor, offset = _input(item, binary, offset, max_elements)
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input's binary_data_size"
        )
    outputs = []
    for item in _list(doc.get("outputs"), '"outputs"'):
        item = _object(item, "each output")
        if not isinstance(item.get("name"), str):
            raise InvalidArgument('each requested output needs a "name"')
        outputs.append(inference.RequestedOutput(item["name"], _object(item.get("parameters"), "output parameters")))
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument('"id" must be a string')
    return inference.InferRequest(
        model=name,
        version=version,
        id=request_id,
        parameters=_object(doc.get("parameters"), '"parameters"'),
        inputs=inputs,
        outputs=outputs,
    )


# ---------------------------------------------------------------------------- answers


def _binary(t: Tensor, binary_default: bool) -> bool:
    return t.parameters.get("binary_data", binary_default) is True


def infer_response(result: inference.InferResult, binary_default: bool, limit: int) -> web.Response:
    """The answer: JSON, or JSON header + binary data for outputs that asked for it;
    RESOURCE_EXHAUSTED when it is over ``limit`` bytes (JSON numbers take about five times the
    bytes of binary float32, which the data plane's estimate counted before compute).

    >>> scores = Tensor("scores", "FP32", np.array([[0.5]], np.float32))
    >>> infer_response(inference.InferResult("gap", "1", "", [scores]), False, 1000).text
    '{"model_name":"gap","model_version":"1","outputs":[{"name":"scores","datatype":"FP32","shape":[1,1],"data":[0.5]}]}'
    """
    outputs, blobs = [], []
    for t in result.outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if _binary(t, binary_default):
            raw = tensors.to_raw(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensors.to_json(t)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
    if result.id:
        doc["id"] = result.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    size = len(head) + sum(len(b) for b in blobs)
    if size > limit:
        raise ResponseTooLarge(
            f"the answer is {size} bytes, more than the largest the server sends (max_message_mb={limit / 2**20:g}); "
            "ask for the outputs as binary data (parameters binary_data: true), fewer outputs or fewer images"
        )
    if not blobs:
        return web.Response(body=head, content_type="application/json")
    response = web.Response(body=b"".join([head, *blobs]), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(head))
    return response


# ---------------------------------------------------------------------------- routes


def add_routes(app: web.Application, ctx: HttpContext) -> None:
    """The protocol's REST routes over ``ctx.dataplane``."""
    plane = ctx.dataplane
    oip = error_body(oip_error_body)

    @public
    @oip
    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})  # it answers: it lives (as gRPC's ServerLive)

    @public
    @oip
    async def ready(request: web.Request) -> web.Response:
        ok = bool(ctx.ready()) and inference.server_ready(plane)
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    @oip
    async def server_metadata(request: web.Request) -> web.Response:
        return web.json_response(inference.server_metadata())

    @oip
    async def model_metadata(request: web.Request) -> web.Response:
        info = request.match_info
        return web.json_response(inference.model_metadata(plane, info["name"], info.get("version", "")))

    @oip
    async def model_ready(request: web.Request) -> web.Response:
        info = request.match_info
        ok = inference.model_ready(plane, info["name"], info.get("version", ""))
        return web.json_response({"name": info["name"], "ready": ok}, status=200 if ok else 503)

    @oip
    async def infer(request: web.Request) -> web.Response:
        info = request.match_info
        deadline = deadline_of(request)
        body = await read_body(request)
        cfg = ctx.config
        header = request.headers.get(HEADER_LENGTH)
        json_bytes = len(body) if header is None or not header.isdigit() else int(header)
        # JSON numbers cost about 70 ns each to parse: a large JSON body is parsed in the I/O pool.
        req = await plane.in_pool(
            infer_request,
            body,
            header,
            info["name"],
            info.get("version", ""),
            inference.max_elements(cfg),
            inline=json_bytes <= 1 << 16,
        )
        del body
        result = await inference.infer(plane, req, deadline=deadline)
        binary = req.parameters.get("binary_data_output") is True
        as_json = sum(t.array.size for t in result.outputs if not _binary(t, binary))
        # Large JSON answers are encoded in the I/O pool, off the event loop.
        return await plane.in_pool(infer_response, result, binary, cfg.max_message_bytes, inline=as_json <= 1 << 16)

    @oip
    async def unimplemented(request: web.Request) -> web.Response:
        # No camserve error kind means UNIMPLEMENTED (gRPC's servicer aborts with it directly).
        message = f"{request.method} {request.path} is not implemented by camserve; {SUPPORTED}"
        return web.json_response(oip_error_body("UNIMPLEMENTED", message), status=501)

    router = app.router
    for path in UNIMPLEMENTED_PATHS:  # before the model routes: /v2/models/stats is not a model
        router.add_route("*", path, unimplemented)
    router.add_get("/v2/health/live", live)
    router.add_get("/v2/health/ready", ready)
    router.add_get("/v2", server_metadata)
    for base in (MODEL, VERSION):
        router.add_get(base, model_metadata)
        router.add_get(base + "/ready", model_ready)
        router.add_post(base + "/infer", infer)
