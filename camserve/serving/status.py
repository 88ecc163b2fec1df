"""Status mapping (SPEC §6): every failed call is answered by its error's *kind*.

:func:`status_for` maps an exception to a gRPC status through :func:`camserve.errors.kind_of`:
a :class:`~camserve.errors.CamserveError` kind carries its code; anything else is a server
bug, answered ``INTERNAL`` with a message that names a request id, and logged (with the
traceback) under that same id. The :class:`StatusInterceptor` applies it around every call
of a service, and also records the call's metrics, logs failed calls and counts the calls
in flight (what a draining server waits for).

>>> from camserve.errors import NotFound
>>> status_for(NotFound("unknown model 'x'"))
(<StatusCode.NOT_FOUND: (5, 'not found')>, "unknown model 'x'")
>>> status_for(KeyError("x"), request_id="4f2a")[1]
'internal error (KeyError); the server log has the details (request id 4f2a)'
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from camserve.errors import kind_of

log = logging.getLogger("camserve.serving.status")

#: Longest status message sent, in UTF-8 bytes. gRPC sends it percent-encoded in a trailer
#: (up to 3 characters per byte) and clients refuse trailers over 8-16 KiB: the call would fail
#: as RESOURCE_EXHAUSTED "Stream removed" instead of the real status. Messages that echo a
#: long client string (a model, layer, class or method name) are cut in the middle.
MAX_STATUS_MESSAGE_BYTES = 2000

#: Metadata key a caller may send to choose the id that its errors and log lines carry.
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def clip_message(msg: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``msg`` cut in the middle to at most about ``limit`` UTF-8 bytes, keeping its head (what
    was wrong) and its tail (what is allowed).

    >>> clip_message("unknown layer '" + "x" * 100 + "'; allowed: a, b", 80)
    "unknown layer 'xxxxx... [91 characters cut] ...xxxx'; allowed: a, b"
    """
    data = msg.encode("utf-8", "replace")
    if len(data) <= limit:
        return msg
    half = max(1, (limit - 40) // 2)
    head = data[:half].decode("utf-8", "ignore")
    tail = data[-half:].decode("utf-8", "ignore")
    return f"{head}... [{len(msg) - len(head) - len(tail)} characters cut] ...{tail}"


def new_request_id() -> str:
    """A fresh id for one call: 12 hex digits."""
    return uuid.uuid4().hex[:12]


def request_id_from(metadata: Any) -> str | None:
    """The caller's ``x-request-id`` when it is a sane token (letters, digits, ``._:-``, at
    most 64 characters), else None.

    >>> request_id_from((("x-request-id", "abc-1"),)), request_id_from((("x-request-id", "a b"),))
    ('abc-1', None)
    """
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID_OK.match(value):
            return value
    return None


def status_for(exc: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an exception, by its kind; INTERNAL (naming ``request_id``) for
    anything that is not a :class:`~camserve.errors.CamserveError`."""
    kind = kind_of(exc)
    if kind is None:
        where = f" (request id {request_id})" if request_id else ""
        return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details{where}"
    return grpc.StatusCode[kind.code], clip_message(str(exc.args[0]) if exc.args else str(exc))


class _Call:
    """Book-keeping of one call: start time, request id (made when first needed)."""

    __slots__ = ("_request_id", "context", "method", "t0")

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.t0 = time.perf_counter()
        self._request_id: str | None = None

    @property
    def request_id(self) -> str:
        if self._request_id is None:
            self._request_id = request_id_from(self.context.invocation_metadata()) or new_request_id()
        return self._request_id


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Around every call of ``service`` (a full service name; other services, like health
    and reflection, pass through untouched): maps exceptions to status codes by kind
    (:func:`status_for`), logs INTERNAL errors with their traceback and every failed call
    ("request failed"), records ``record(method, code_name, seconds)`` and counts the calls
    in flight (:attr:`inflight`). Cancelled calls are CANCELLED, or DEADLINE_EXCEEDED when
    their deadline had passed. Put it first, so that it also answers what later
    interceptors raise (:class:`~camserve.serving.auth.TokenAuthInterceptor`).
    """

    def __init__(self, service: str, record: Callable[[str, str, float], None] | None = None) -> None:
        self._prefix = f"/{service}/"
        self._record = record
        self.inflight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        method = details.method[len(self._prefix) :]
        serialize = dict(
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
        if handler.response_streaming:
            behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            return make(self._streaming(method, behavior), **serialize)
        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary
        make = (
            grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        )
        return make(self._unary(method, behavior), **serialize)

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = self._begin(method, context)
            code, message = grpc.StatusCode.OK, ""
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = self._aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = self._cancelled_code(context)
                raise
            except Exception as e:  # noqa: BLE001 - mapped by kind; a bug becomes INTERNAL
                code, message = self._failed(call, e)
            finally:
                self._end(call, code, message)
            await context.abort(code, message)

        return unary

    def _streaming(self, method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = self._begin(method, context)
            code, message = grpc.StatusCode.OK, ""
            try:
                responses = behavior(request, context)
                if not hasattr(responses, "__aiter__"):  # a coroutine that writes with context.write
                    await responses
                else:
                    async with contextlib.aclosing(responses):
                        async for response in responses:
                            yield response
            except grpc.aio.AbortError:
                code = self._aborted_code(context)
                raise
            except asyncio.CancelledError:
                code = self._cancelled_code(context)
                raise
            except Exception as e:  # noqa: BLE001 - mapped by kind; a bug becomes INTERNAL
                code, message = self._failed(call, e)
            finally:
                self._end(call, code, message)
            if code != grpc.StatusCode.OK:
                await context.abort(code, message)

        return streaming

    # ------------------------------------------------------------ book-keeping

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> _Call:
        self.inflight += 1
        return _Call(method, context)

    @staticmethod
    def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        remaining = context.time_remaining()
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )

    @staticmethod
    def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        """The code of a call the handler aborted itself (its status stands)."""
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN

    @staticmethod
    def _failed(call: _Call, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """Status of a failed call; logs bugs with their traceback (call it in the except block)."""
        code, message = status_for(exc, call.request_id)
        if code == grpc.StatusCode.INTERNAL:
            log.exception(
                "internal error",
                extra={"method": call.method, "request_id": call.request_id, "error": f"{type(exc).__name__}: {exc}"},
            )
        return code, message

    def _end(self, call: _Call, code: grpc.StatusCode, message: str) -> None:
        self.inflight -= 1
        elapsed = time.perf_counter() - call.t0
        if self._record is not None:
            self._record(call.method, code.name, elapsed)
        if code != grpc.StatusCode.OK:
            log.info(
                "request failed",
                extra={
                    "method": call.method,
                    "code": code.name,
                    "error": message,
                    "latency_ms": round(elapsed * 1000, 2),
                    "peer": call.context.peer(),
                    "request_id": call.request_id,
                },
            )
