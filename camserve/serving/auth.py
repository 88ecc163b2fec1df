"""Bearer-token authentication for the gRPC server.

A call without ``authorization: Bearer <token>`` metadata matching the configured token is
answered UNAUTHENTICATED (the :class:`~camserve.errors.Unauthenticated` kind) before its
handler runs; the health service is exempt, since probes cannot send headers. The
comparison takes constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE

from camserve.errors import Unauthenticated


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <token>`` matches; health is exempt.

    A denied call's handler raises :class:`~camserve.errors.Unauthenticated`, which the
    :class:`~camserve.serving.status.StatusInterceptor` (placed before this one) answers,
    counts and logs like every other failed call.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'" if not got else "invalid bearer token"
        )

        async def deny(_request: Any, _context: grpc.aio.ServicerContext) -> NoReturn:
            raise Unauthenticated(message)

        async def deny_stream(_request: Any, _context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            raise Unauthenticated(message)
            yield  # pragma: no cover - never reached; makes this an async generator

        serialize = dict(
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
        if handler.response_streaming:
            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            return make(deny_stream, **serialize)
        make = (
            grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
        )
        return make(deny, **serialize)
