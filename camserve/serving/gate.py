"""The one door of the gRPC server: every call of camserve's services (and reflection) passes
:class:`ServiceGate`, a generic handler that wraps each method's handler once, when the method
is first called, and then only looks the wrapped handler up:

- the bearer token (:func:`camserve.serving.auth.check_bearer`) is checked first, from the
  call's metadata, before its request is even parsed; health is registered beside the gate
  and needs no token, since probes cannot send headers;
- the request's bytes are parsed under camserve's control
  (:func:`camserve.serving.parsing.parsing`: a malformed message is INVALID_ARGUMENT);
- errors are answered by their kind, calls are counted and logged
  (:class:`camserve.serving.status.CallStatus`).

gRPC's server interceptors would do the same per call, through a chain of coroutines that
costs the event loop about 50 µs a request (bench/results/serve.md); the gate costs a
dictionary look-up.

>>> import grpc
>>> def echo(request, context): return request
>>> inner = grpc.method_handlers_generic_handler("demo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(echo)})
>>> gate = ServiceGate([inner], status=CallStatus(), services=("camserve.v1.CamService",))
>>> details = type("Details", (), {"method": "/demo.Echo/Say", "invocation_metadata": ()})()
>>> gate.service(details).unary_unary is echo   # not one of camserve's services: as registered
True
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn

import grpc

from camserve.errors import Unauthenticated
from camserve.serving.auth import authorization_values, check_bearer
from camserve.serving.parsing import parsing
from camserve.serving.status import CallStatus, with_behavior

__all__ = ["CallStatus", "Registrar", "ServiceGate"]


class Registrar:
    """Stands in for the server when a generated ``add_*Servicer_to_server`` function (or
    reflection's) registers handlers: it keeps them for a :class:`ServiceGate`."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Nothing to do: the generic handlers registered beside these answer the same methods."""


class ServiceGate(grpc.GenericRpcHandler):
    """The handlers of ``handlers`` (generic handlers, in order), each wrapped once: for
    the methods of ``services``, in the request parsing and the ``status`` wrapper; and, when
    ``token`` is set, refused (UNAUTHENTICATED) unless the call carries it."""

    def __init__(
        self,
        handlers: Sequence[grpc.GenericRpcHandler],
        *,
        status: CallStatus,
        services: tuple[str, ...],
        token: str = "",
    ) -> None:
        self._handlers = tuple(handlers)
        self._status = status
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._token = token
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # only methods that exist

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = self._wrapped.get(method)
        if handler is None:
            inner = self._lookup(handler_call_details)
            if inner is None:
                return None  # UNIMPLEMENTED; unknown names are not remembered
            handler = self._wrapped[method] = self._wrap(method, inner)
        if self._token:
            metadata = handler_call_details.invocation_metadata
            problem = check_bearer(authorization_values(metadata), self._token)
            if problem is not None:
                return self._deny(method, handler, problem)
        return handler

    def _lookup(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for generic in self._handlers:
            handler = generic.service(details)
            if handler is not None:
                return handler
        return None

    def _ours(self, method: str) -> bool:
        return method.startswith(self._prefixes)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not self._ours(method):
            return handler
        name = method.rpartition("/")[2]
        return self._status.wrap(name, parsing(name, handler))

    def _deny(self, method: str, handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
        """A handler of the same kind that refuses the call without reading its request:
        for camserve's services through the status wrapper (counted and logged like every
        failed call), for the others (reflection) with UNAUTHENTICATED directly."""
        if self._ours(method):

            async def refuse(_request: Any, _context: grpc.aio.ServicerContext) -> NoReturn:
                raise Unauthenticated(problem)

            async def refuse_stream(_request: Any, _context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                raise Unauthenticated(problem)
                yield  # pragma: no cover - never reached; makes this an async generator

            behavior: Callable[..., Any] = refuse_stream if handler.response_streaming else refuse
            return self._status.wrap(
                method.rpartition("/")[2], with_behavior(handler, behavior, request_deserializer=None)
            )

        async def abort(_request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            raise AssertionError("unreachable: abort raises")  # pragma: no cover

        async def abort_stream(_request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
            yield  # pragma: no cover - never reached

        return with_behavior(handler, abort_stream if handler.response_streaming else abort, request_deserializer=None)
