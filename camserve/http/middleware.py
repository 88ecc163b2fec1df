"""The middlewares of the HTTP application: metrics, security headers, CORS (only with
``http_cors_origins``), error answers, body limits and bearer-token auth (in that order,
outermost first; see :mod:`camserve.http.app`).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from camserve.errors import CamserveError, Unauthenticated
from camserve.http.app import (
    CONTENT_SECURITY_POLICY,
    TIMEOUT_HEADER,
    HttpContext,
    PayloadTooLarge,
    default_error_body,
    too_large_message,
)
from camserve.http.oip import HEADER_LENGTH
from camserve.serving.auth import check_bearer
from camserve.serving.observability import LATENCY_BUCKETS
from camserve.serving.status import clip_message, new_request_id, request_id_from

log = logging.getLogger("camserve.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: aiohttp's own refusals (no route, wrong method, body too long) and their status code names.
_OWN_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 400: "INVALID_ARGUMENT"}


#: A CORS preflight's answer for an allowed origin (no token needed: browsers send none).
PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST",
    "Access-Control-Allow-Headers": f"Authorization, Content-Type, {TIMEOUT_HEADER}, {HEADER_LENGTH}, X-Request-Id",
    "Access-Control-Max-Age": "600",
}


def cors_headers(origin: str) -> dict[str, str]:
    """The CORS headers of any answer to a page of the allowed ``origin``.

    >>> cors_headers("https://a.example")["Access-Control-Allow-Origin"]
    'https://a.example'
    """
    return {
        "Access-Control-Allow-Origin": origin,
        "Vary": "Origin",
        "Access-Control-Expose-Headers": f"X-Request-Id, {HEADER_LENGTH}",
    }


class HttpMetrics:
    """``camserve_http_requests_total{method, route, status}`` and
    ``camserve_http_request_latency_seconds{route}`` in one registry (made once per registry)."""

    _made: weakref.WeakKeyDictionary[Any, HttpMetrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "camserve_http_requests_total",
            "HTTP requests by method, route pattern and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "camserve_http_request_latency_seconds",
            "HTTP request latency",
            ["route"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )

    @classmethod
    def of(cls, registry: Any) -> HttpMetrics:
        made = cls._made.get(registry)
        if made is None:
            made = cls._made[registry] = cls(registry)
        return made


def route_of(request: web.Request) -> str:
    """The matched route's pattern (``/v1/models/{name}``), or ``unmatched``."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    return resource.canonical if resource is not None and info.http_exception is None else "unmatched"


REQUEST_ID: web.RequestKey[str] = web.RequestKey("camserve_request_id", str)


def request_id(request: web.Request) -> str:
    """The caller's ``X-Request-Id`` when sane (the gRPC rule:
    :func:`~camserve.serving.status.request_id_from`), else a new one (kept on the request)."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        sent = request_id_from((k.lower(), v) for k, v in request.headers.items())
        rid = request[REQUEST_ID] = sent if sent is not None else new_request_id()
    return rid


def _error_answer(
    request: web.Request, shape: Callable[[str, str], Any], code: str, status: int, text: str, error: Exception
) -> web.Response:
    """The JSON error answer (``shape(code, message)``) with ``X-Request-Id``, logged as the
    gRPC CallStatus wrapper logs a failed call; for camserve errors and aiohttp's own refusals."""
    message = clip_message(text)
    response = web.json_response(shape(code, message), status=status)
    rid = response.headers["X-Request-Id"] = request_id(request)
    log.info(
        "request failed",
        extra={
            "method": f"{request.method} {route_of(request)}",
            "code": code,
            "status": status,
            "error": message,
            "peer": request.remote,
            "request_id": rid,
        },
    )
    if isinstance(error, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="camserve"'
    if isinstance(error, web.HTTPException) and "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    if isinstance(error, PayloadTooLarge) or status == 413:
        response.force_close()  # the body was not read: do not read it to reuse the connection
    return response


def _own_message(request: web.Request, e: web.HTTPException, limit: int) -> str:
    """What one of aiohttp's own refusals (no route, wrong method, body too long) says: what
    exists or what is allowed."""
    if e.status == 413:
        return too_large_message(None, limit)
    if e.status == 404 and route_of(request) == "unmatched":
        prefixes = sorted({"/" + _first_segment(r.canonical) for r in request.app.router.resources()})
        return (
            f"no route {request.method} {clip_message(request.path, 200)}; paths start with {prefixes} "
            "(see the README's HTTP API section)"
        )
    if e.status == 405:
        return f"{request.method} is not allowed here; allowed: {e.headers.get('Allow', '')}"
    return e.text or e.reason


def _first_segment(path: str) -> str:
    """The first segment of a route pattern, up to its first variable or verb.

    >>> _first_segment("/v1/models/{name}"), _first_segment("/"), _first_segment("/camserve.v1.CamService/{method}")
    ('v1', '', 'camserve.v1.CamService')
    """
    return path.lstrip("/").split("/")[0].split("{")[0].split(":")[0]


def middlewares(ctx: HttpContext) -> list[Middleware]:
    """The middlewares for ``ctx``, outermost first."""
    metrics = HttpMetrics.of(ctx.registry) if ctx.registry is not None else None
    limit = ctx.config.max_message_bytes
    token = ctx.token
    allowed = frozenset(ctx.config.http_cors_origins)

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        ctx.inflight += 1
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            ctx.inflight -= 1
            if metrics is not None:
                route = route_of(request)
                metrics.requests.labels(request.method, route, str(status)).inc()
                metrics.latency.labels(route).observe(time.perf_counter() - t0)

    @web.middleware
    async def headers(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if (response.content_type or "").startswith("text/html"):
            response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            response.headers.setdefault("X-Frame-Options", "DENY")
            response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or not (origin in allowed or "*" in allowed):
            return await handler(request)  # no CORS headers: the browser keeps the answer from the page
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={**cors_headers(origin), **PREFLIGHT_HEADERS})
        try:
            response = await handler(request)
        except web.HTTPException as e:
            e.headers.update(cors_headers(origin))
            raise
        response.headers.update(cors_headers(origin))
        return response

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        shape = getattr(request.match_info.handler, "camserve_error_body", default_error_body)
        try:
            return await handler(request)
        except CamserveError as e:
            return _error_answer(request, shape, e.code, e.http_status, str(e.args[0]) if e.args else str(e), e)
        except web.HTTPException as e:
            if e.status not in _OWN_CODES or e.content_type == "application/json":
                raise
            return _error_answer(request, shape, _OWN_CODES[e.status], e.status, _own_message(request, e, limit), e)
        except Exception as e:  # a bug: 500 naming the request id, logged
            rid = request_id(request)
            log.error(
                "internal error",
                exc_info=(type(e), e, e.__traceback__),
                extra={"path": request.path, "request_id": rid, "error": f"{type(e).__name__}: {e}"},
            )
            message = f"internal error ({type(e).__name__}); the server log has the details (request id {rid})"
            return web.json_response(shape("INTERNAL", message), status=500, headers={"X-Request-Id": rid})

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > limit:
            raise PayloadTooLarge(too_large_message(length, limit))
        if token and not getattr(request.match_info.handler, "camserve_public", False):
            if request.match_info.http_exception is None:  # unknown routes answer 404, as gRPC's UNIMPLEMENTED
                problem = check_bearer(request.headers.getall("Authorization", []), token)
                if problem is not None:
                    raise Unauthenticated(problem.replace("send metadata", "send the header"))
        return await handler(request)

    return [count, headers, cors, errors, guard] if allowed else [count, headers, errors, guard]
