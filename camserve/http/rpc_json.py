"""Every ``camserve.v1.CamService`` RPC over HTTP: ``POST /camserve.v1.CamService/{Method}``.

The path is the gRPC method's (the Connect protocol's convention); the body is the request
message in the protobuf JSON mapping (``Content-Type: application/json``; field names in
lowerCamelCase or as in the ``.proto``; ``bytes`` as base64) or serialized protobuf
(``application/proto``), and the answer comes back in the same encoding. Each call runs the
gRPC servicer's own method over the same data plane, so the answer is the gRPC answer.
Errors are the HTTP status of their kind with ``{"error": {"code", "message"}}``.

``ExplainStream`` takes a JSON array of ExplainRequests (or NDJSON, one request per line,
with ``Content-Type: application/x-ndjson``); requests run concurrently
(``stream_inflight`` at a time) and the answers come back in completion order, each with its
``requestId``: a JSON array, or NDJSON lines sent as they complete when the request says
``Accept: application/x-ndjson`` (an error then ends the stream with a last line
``{"error": {...}}``, as in gRPC where the first error ends the stream).

>>> json_to_message("Predict", {"model": {"name": "gap"}, "topK": 2}).top_k
2
>>> json_to_message("Predict", {"modle": {}})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
camserve.errors.InvalidArgument: Predict: the body is not a valid camserve.v1.PredictRequest in the protobuf JSON mapping (...)...
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any, cast

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from camserve.errors import CamserveError, InvalidArgument, NotFound
from camserve.http.app import CONTEXT_KEY, HttpContext, deadline_of, default_error_body, read_body, read_json
from camserve.http.middleware import log, request_id
from camserve.proto import pb
from camserve.serving.servicer import SERVICE_NAME, completion_order
from camserve.serving.status import clip_message

JSON = "application/json"
PROTO = "application/proto"
NDJSON = "application/x-ndjson"

#: Unary methods and their request types (ExplainStream is handled on its own).
_SERVICE = pb.DESCRIPTOR.services_by_name["CamService"]
METHODS: dict[str, Any] = {m.name: getattr(pb, m.input_type.name) for m in _SERVICE.methods if not m.client_streaming}
#: Method name -> response message type (the servicer may answer with its bytes).
ANSWERS: dict[str, Any] = {m.name: getattr(pb, m.output_type.name) for m in _SERVICE.methods}
STREAM_METHOD = "ExplainStream"


def as_message(method: str, answer: Any) -> Any:
    """The servicer's answer as a message: it sends some answers already serialized (bytes).

    >>> as_message("GetModel", pb.GetModelResponse(model={"name": "m"}).SerializeToString()).model.name
    'm'
    """
    return ANSWERS[method].FromString(answer) if isinstance(answer, bytes) else answer


class UnsupportedMediaType(InvalidArgument, http_status=415):
    """A body in an encoding the route does not read."""


class CallContext:
    """The little of ``grpc.aio.ServicerContext`` the servicer uses: the deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


def json_to_message(method: str, value: Any) -> Any:
    """The request message of ``method`` from a parsed JSON value (InvalidArgument naming
    the problem)."""
    message = (METHODS.get(method) or pb.ExplainRequest)()
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"{method}: the body is a JSON {type(value).__name__}; send a JSON object, a "
            f"{message.DESCRIPTOR.full_name} in the protobuf JSON mapping"
        )
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as e:
        raise InvalidArgument(
            f"{method}: the body is not a valid {message.DESCRIPTOR.full_name} in the protobuf JSON mapping "
            f"({clip_message(str(e), 400)}); fields: {[f.json_name for f in message.DESCRIPTOR.fields]}"
        ) from None
    return message


def message_to_json(message: Message) -> Any:
    """A response message in the protobuf JSON mapping (lowerCamelCase names, defaults left out)."""
    return json_format.MessageToDict(message)


def media_type(request: web.Request) -> str:
    """The body's media type: JSON (also when none is given), protobuf or NDJSON; 415 otherwise."""
    kind = request.content_type if request.headers.get("Content-Type") else JSON
    if kind not in (JSON, PROTO, NDJSON):
        hint = (
            " (curl -d sends a form: add -H 'Content-Type: application/json')"
            if kind.startswith("application/x-www")
            else ""
        )
        raise UnsupportedMediaType(f"Content-Type {kind!r} is not read here; send {JSON} or {PROTO}{hint}")
    return kind


async def call_unary(request: web.Request) -> web.StreamResponse:
    """``POST /camserve.v1.CamService/{method}``: the gRPC servicer's method on the decoded body."""
    ctx = request.app[CONTEXT_KEY]
    method = request.match_info["method"]
    if method == STREAM_METHOD:
        return await call_stream(request, ctx)
    request_type = METHODS.get(method)
    if request_type is None:
        raise NotFound(
            f"{SERVICE_NAME} has no method {clip_message(method, 100)!r}; methods: {sorted([*METHODS, STREAM_METHOD])}"
        )
    kind = media_type(request)
    if kind == PROTO:
        data = await read_body(request)
        try:
            message = request_type.FromString(data)
        except DecodeError:
            raise InvalidArgument(
                f"{method}: the body ({len(data)} bytes) is not a serialized {request_type.DESCRIPTOR.full_name}"
            ) from None
    else:
        message = json_to_message(method, await read_json(request))
    answer = await getattr(ctx.servicer, method)(message, CallContext(deadline_of(request)))
    if kind == PROTO:
        body = answer if isinstance(answer, bytes) else answer.SerializeToString()
        return web.Response(body=body, content_type=PROTO)
    return web.json_response(message_to_json(as_message(method, answer)))


async def _requests_of(request: web.Request, kind: str) -> list[Any]:
    if kind == PROTO:
        raise UnsupportedMediaType(f"{STREAM_METHOD} over HTTP reads a JSON array or NDJSON, not {PROTO}")
    if kind == NDJSON:
        text = (await read_body(request)).decode("utf-8", "replace")
        values: list[Any] = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    values.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InvalidArgument(f"{STREAM_METHOD}: NDJSON line {n} is not valid JSON ({e.msg})") from None
    else:
        values = await read_json(request)
        if not isinstance(values, list):
            raise InvalidArgument(
                f"{STREAM_METHOD}: send a JSON array of ExplainRequests (or NDJSON lines), got a JSON "
                f"{type(values).__name__}"
            )
    return [_stream_request(v, i) for i, v in enumerate(values, 1)]


def _stream_request(value: Any, index: int) -> Any:
    """The ``index``-th ExplainRequest of a stream (its errors say which one)."""
    try:
        return json_to_message(STREAM_METHOD, value)
    except InvalidArgument as e:
        raise InvalidArgument(f"request {index} of the stream: {e.args[0]}") from None


async def _iterate(items: Iterable[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def call_stream(request: web.Request, ctx: HttpContext) -> web.StreamResponse:
    """ExplainStream: the answers as one JSON array, or as NDJSON lines sent as they complete.
    However the call ends (an error, the client gone), the answers not yet computed are given
    up (their jobs abandoned), as when a gRPC stream ends."""
    requests = await _requests_of(request, media_type(request))
    context = CallContext(deadline_of(request))

    async def handle(req: Any) -> Any:
        return as_message(STREAM_METHOD, await ctx.servicer.Explain(req, context))

    answers = cast(  # an async generator: closing it cancels the requests in progress
        AsyncGenerator[Any, None],
        completion_order(_iterate(requests), handle, ctx.config.stream_inflight, ctx.servicer.streams),
    )
    try:
        if NDJSON not in request.headers.get("Accept", ""):
            return web.json_response([message_to_json(a) async for a in answers])
        return await _stream_ndjson(request, answers)
    finally:
        await answers.aclose()


async def _stream_ndjson(request: web.Request, answers: AsyncIterator[Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    line = lambda value: json.dumps(value).encode() + b"\n"
    try:
        async for answer in answers:
            await response.write(line(message_to_json(answer)))
    except ConnectionError:  # the client went away: nobody to tell
        return response
    except CamserveError as e:
        await response.write(line(default_error_body(e.code, clip_message(str(e)))))
    except Exception as e:  # noqa: BLE001 - a bug; the headers are sent, so it ends the stream as a line
        rid = request_id(request)
        log.error("internal error", exc_info=e, extra={"path": request.path, "request_id": rid})
        message = f"internal error ({type(e).__name__}); the server log has the details (request id {rid})"
        await response.write(line(default_error_body("INTERNAL", message)))
    await response.write_eof()
    return response


def add_routes(app: web.Application, ctx: HttpContext) -> None:
    """``POST /camserve.v1.CamService/{method}``."""
    app.router.add_post(f"/{SERVICE_NAME}/{{method}}", call_unary)
