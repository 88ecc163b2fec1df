"""Status mapping (SPEC §6): every failed call is answered by its error's *kind*.

:func:`status_for` maps an exception to a gRPC status through :func:`camserve.errors.kind_of`:
a :class:`~camserve.errors.CamserveError` kind carries its code; anything else is a server
bug, answered ``INTERNAL`` with a message that names a request id, and logged (with the
traceback) under that same id. The :class:`CallStatus` wrapper applies it around every call
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
from collections.abc import AsyncIterator, Callable
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


_MAKE_HANDLER = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_SAME: Any = object()


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that answers ``handler``'s calls, whatever its kind."""
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


def with_behavior(
    handler: grpc.RpcMethodHandler,
    behavior: Callable[..., Any],
    request_deserializer: Any = _SAME,
    response_serializer: Any = _SAME,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that runs ``behavior`` (and, when given, parses
    requests with ``request_deserializer`` and writes responses with ``response_serializer``;
    None: raw bytes; not given: ``handler``'s)."""
    make = _MAKE_HANDLER[(bool(handler.request_streaming), bool(handler.response_streaming))]
    deserializer = handler.request_deserializer if request_deserializer is _SAME else request_deserializer
    serializer = handler.response_serializer if response_serializer is _SAME else response_serializer
    return make(behavior, request_deserializer=deserializer, response_serializer=serializer)


def forget_tracebacks(exc: BaseException | None) -> None:
    """Drop the tracebacks of ``exc`` and of the exceptions it chains to: a traceback holds the
    frames it went through, and so the request they handled (its bytes, its images). gRPC keeps
    the AbortError of a failed call in a reference cycle until the garbage collector runs; without
    the tracebacks, the cycle no longer reaches the request."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__, *(e.exceptions if isinstance(e, BaseExceptionGroup) else ())]


class _Call:
    """One call: start time, request id (made when first needed) and, as an ``async with``
    block around the handler, its outcome (:attr:`code`, :attr:`message`). The block lets
    cancellation and the handler's own aborts through, swallows anything else after mapping it
    (the caller then aborts with :attr:`code`), and drops the tracebacks either way."""

    __slots__ = ("_request_id", "code", "context", "message", "method", "owner", "t0")

    def __init__(self, owner: CallStatus, method: str, context: grpc.aio.ServicerContext) -> None:
        self.owner = owner
        self.method = method
        self.context = context
        self.t0 = time.perf_counter()
        self._request_id: str | None = None
        self.code = grpc.StatusCode.OK
        self.message = ""

    @property
    def request_id(self) -> str:
        if self._request_id is None:
            self._request_id = request_id_from(self.context.invocation_metadata()) or new_request_id()
        return self._request_id

    async def __aenter__(self) -> _Call:
        self.owner.inflight += 1
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        swallowed = False
        try:
            if isinstance(exc, grpc.aio.AbortError):
                self.code = self._aborted_code()
            elif isinstance(exc, asyncio.CancelledError):
                self.code = self._cancelled_code()
            elif isinstance(exc, Exception):
                self.code, self.message = self._failed(exc)
                swallowed = True
        finally:
            forget_tracebacks(exc)
            self.owner._end(self)
        return swallowed

    def _cancelled_code(self) -> grpc.StatusCode:
        remaining = self.context.time_remaining()
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )

    def _aborted_code(self) -> grpc.StatusCode:
        """The code of a call the handler aborted itself (its status stands)."""
        code = self.context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN

    def _failed(self, exc: Exception) -> tuple[grpc.StatusCode, str]:
        """Status of a failed call; logs bugs with their traceback (before it is dropped)."""
        code, message = status_for(exc, self.request_id)
        if code == grpc.StatusCode.INTERNAL:
            log.error(
                "internal error",
                exc_info=(type(exc), exc, exc.__traceback__),
                extra={"method": self.method, "request_id": self.request_id, "error": f"{type(exc).__name__}: {exc}"},
            )
        return code, message


class CallStatus:
    """Around every call of the handlers it wraps (:meth:`wrap`, once per method; the
    :class:`~camserve.serving.gate.ServiceGate` wraps camserve's services, not health or
    reflection): maps exceptions to status codes by kind (:func:`status_for`), logs INTERNAL
    errors with their traceback and every failed call ("request failed"), records
    ``record(method, code_name, seconds)`` and counts the calls in flight (:attr:`inflight`).
    Cancelled calls are CANCELLED, or DEADLINE_EXCEEDED when their deadline had passed. It
    wraps the parsing too, so that it also answers malformed requests and refused tokens.

    A failed call keeps nothing of its request: the exception's tracebacks are dropped
    (:func:`forget_tracebacks`) and the request let go before the abort.
    """

    def __init__(self, record: Callable[[str, str, float], None] | None = None) -> None:
        self._record = record
        self.inflight = 0

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler answering ``method`` (its short name, for metrics and logs) in place of
        ``handler``, of the same kind."""
        around = self._streaming if handler.response_streaming else self._unary
        return with_behavior(handler, around(method, behavior_of(handler)))

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Call(self, method, context) as call:
                return await behavior(request, context)
            del request  # the abort below ends in a reference cycle (gRPC's): it must not hold the request
            await context.abort(call.code, call.message)

        return unary

    def _streaming(self, method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Call(self, method, context) as call:
                responses = behavior(request, context)
                if not hasattr(responses, "__aiter__"):  # a coroutine that writes with context.write
                    await responses
                else:
                    async with contextlib.aclosing(responses):
                        async for response in responses:
                            yield response
            del request  # as in unary: the abort must not hold it
            if call.code != grpc.StatusCode.OK:
                await context.abort(call.code, call.message)

        return streaming

    # ------------------------------------------------------------ book-keeping

    def _end(self, call: _Call) -> None:
        self.inflight -= 1
        elapsed = time.perf_counter() - call.t0
        if self._record is not None:
            self._record(call.method, call.code.name, elapsed)
        if call.code != grpc.StatusCode.OK:
            log.info(
                "request failed",
                extra={
                    "method": call.method,
                    "code": call.code.name,
                    "error": call.message,
                    "latency_ms": round(elapsed * 1000, 2),
                    "peer": call.context.peer(),
                    "request_id": call.request_id,
                },
            )
