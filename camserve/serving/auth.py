"""Bearer-token authentication for the gRPC server (and, optionally, ``/metrics``).

A call without exactly one ``authorization: Bearer <token>`` metadata entry matching the
configured token is answered UNAUTHENTICATED (the :class:`~camserve.errors.Unauthenticated`
kind) before its request is even parsed; the health service is exempt, since probes cannot
send headers. The scheme is case-insensitive (RFC 7235: ``bearer``, ``BEARER``), two
``authorization`` entries are refused (which one would count?), and the token is compared in
constant time.

>>> check_bearer(["bearer s3cret"], "s3cret") is None
True
>>> check_bearer(["Bearer s3cret", "Bearer other"], "s3cret")
"2 'authorization' headers: send exactly one, 'authorization: Bearer <token>'"
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn

import grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE

from camserve.errors import Unauthenticated
from camserve.serving.status import Continuation, with_behavior

MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"
INVALID = "invalid bearer token"


def check_bearer(values: Sequence[str], token: str) -> str | None:
    """Why the ``authorization`` values of one request do not carry ``token`` (None: they do):
    exactly one value, ``Bearer`` in any case, one or more spaces, then the token (compared in
    constant time)."""
    if not values:
        return MISSING
    if len(values) > 1:
        return f"{len(values)} 'authorization' headers: send exactly one, 'authorization: Bearer <token>'"
    scheme, _, credentials = str(values[0]).partition(" ")
    ok = hmac.compare_digest(credentials.lstrip(" ").encode(), token.encode())
    return None if ok and scheme.lower() == "bearer" else INVALID


def authorization_values(metadata: Any) -> list[str]:
    """Every ``authorization`` value of gRPC metadata (keys arrive in lower case)."""
    return [value for key, value in metadata or () if key == "authorization"]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries the token (:func:`check_bearer`); health is
    exempt.

    A denied call's handler raises :class:`~camserve.errors.Unauthenticated` without reading
    its request; the :class:`~camserve.serving.status.StatusInterceptor` (placed before this
    one) answers, counts and logs it like every other failed call. Put it before the
    :class:`~camserve.serving.parsing.ParsingInterceptor`, so that unauthenticated bytes are
    never parsed.
    """

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return await continuation(details)
        problem = check_bearer(authorization_values(details.invocation_metadata), self._token)
        handler = await continuation(details)
        if problem is None or handler is None:
            return handler
        message = problem

        async def deny(_request: Any, _context: grpc.aio.ServicerContext) -> NoReturn:
            raise Unauthenticated(message)

        async def deny_stream(_request: Any, _context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            raise Unauthenticated(message)
            yield  # pragma: no cover - never reached; makes this an async generator

        return with_behavior(handler, deny_stream if handler.response_streaming else deny)
