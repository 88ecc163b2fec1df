"""The HTTP application of the serving process (aiohttp), and the interface its routes plug into.

:func:`make_app` builds one :class:`aiohttp.web.Application` over the server's
:class:`~camserve.serving.dataplane.DataPlane` (one batcher, one set of limits, one auth for
gRPC and HTTP). Middlewares (:mod:`camserve.http.middleware`), outermost first:

1. **metrics** – ``camserve_http_requests_total{method, route, status}`` and
   ``camserve_http_request_latency_seconds{route}`` in the server's registry (``route`` is the
   route's pattern, e.g. ``/v1/models/{name}``: bounded label values); in-flight count.
2. **headers** – ``X-Content-Type-Options: nosniff`` everywhere, and the strict
   :data:`CONTENT_SECURITY_POLICY` on every ``text/html`` answer.
3. **cors** (only when ``http_cors_origins`` is set) – for a request whose ``Origin`` is listed
   (or ``*``), ``Access-Control-Allow-Origin: <that origin>`` and ``Vary: Origin`` on the answer,
   errors included; its ``OPTIONS`` preflight answered 204 without the token. Other origins,
   and every origin by default, get no CORS headers.
4. **errors** – a :class:`~camserve.errors.CamserveError` raised by a handler becomes its
   ``http_status`` (400/401/404/413/429/503/504) with the JSON body
   ``{"error": {"code": "INVALID_ARGUMENT", "message": "..."}}`` (or the route's own shape,
   see :func:`error_body`); anything else is a bug: 500 naming a request id, logged with the
   traceback. aiohttp's own 404/405/413 take the same path (JSON body naming the paths that
   exist or the methods allowed, ``X-Request-Id``, logged).
5. **limits and auth** – ``Content-Length`` over ``max_message_mb`` is 413 before the body is
   read (a chunked body is cut off at the same size while reading, also 413); then, when the
   server has a token, exactly one ``Authorization: Bearer <token>`` header (scheme in any case,
   :func:`~camserve.serving.auth.check_bearer`) or 401 — except for handlers marked
   :func:`public`.

Interface for route modules (:data:`ROUTE_MODULES`: ``rest_v1``, ``rpc_json``, ``oip`` and
``viewer``): :func:`make_app` calls each one's ``add_routes(app, ctx)``, which adds its routes
with ``app.router.add_get/add_post/...`` and may:

- use ``ctx`` (a :class:`HttpContext`): ``ctx.dataplane`` (``predict``, ``explain``,
  ``dense_scores``, ``list_models``, ``get_model``, ``runtime``; ``ctx.dataplane.repository``,
  ``ctx.dataplane.runtimes``), ``ctx.config`` (:class:`~camserve.serving.config.ServerConfig`),
  ``ctx.servicer`` (the gRPC :class:`~camserve.serving.servicer.CamServicer`, for answers
  identical to gRPC), ``ctx.registry`` (the Prometheus registry), ``ctx.ready()`` (the
  server has started serving and is not stopping);
- await :func:`read_json` (the body as JSON, size-checked, 400 naming the problem) or
  :func:`read_body` (the bytes, size-checked);
- use :func:`deadline_of` (the ``Connect-Timeout-Ms`` header as a ``time.monotonic()``
  instant, or None) for the data plane's ``deadline=``;
- mark handlers with ``@public`` (no token needed: health probes, static viewer files) and
  ``@error_body(fn)`` (``fn(code, message) -> JSON value``, e.g. the Open Inference
  Protocol's ``{"error": "message"}``);
- raise :mod:`camserve.errors` kinds (or :class:`PayloadTooLarge`): never build error
  answers by hand.

>>> CONTENT_SECURITY_POLICY.split("; ")[:2]
["default-src 'self'", "script-src 'self'"]
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from camserve.errors import InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from camserve.serving.config import ServerConfig
    from camserve.serving.dataplane import DataPlane
    from camserve.serving.servicer import CamServicer

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "ROUTE_MODULES",
    "HttpContext",
    "PayloadTooLarge",
    "deadline_of",
    "error_body",
    "make_app",
    "public",
    "read_body",
    "read_json",
]

log = logging.getLogger("camserve.http")

#: Modules whose ``add_routes(app, ctx)`` :func:`make_app` calls, in this order.
ROUTE_MODULES: tuple[str, ...] = (
    "camserve.http.rest_v1",
    "camserve.http.rpc_json",
    "camserve.http.oip",
    "camserve.http.viewer",
)

#: Sent with every HTML answer: everything from this origin only, no inline script, no
#: framing; images may also be ``data:``/``blob:`` URLs (heatmaps, dropped files).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

#: The request header giving the caller's timeout in milliseconds (the Connect protocol's).
TIMEOUT_HEADER = "Connect-Timeout-Ms"

H = TypeVar("H", bound=Callable[..., Any])


class PayloadTooLarge(ResourceExhausted, http_status=413):
    """A request body over ``max_message_mb`` (gRPC's RESOURCE_EXHAUSTED, HTTP 413)."""


@dataclasses.dataclass
class HttpContext:
    """What HTTP routes need from the server (see the module docstring)."""

    dataplane: DataPlane
    servicer: CamServicer
    registry: Any = None  # prometheus_client.CollectorRegistry (None: no HTTP metrics)
    ready: Callable[[], bool] = lambda: True
    token: str = ""  # the bearer token ("" : no auth)
    inflight: int = 0  # HTTP requests in progress (what a draining server waits for)

    @property
    def config(self) -> ServerConfig:
        return self.dataplane.config


def public(handler: H) -> H:
    """Mark a route handler as answering without the bearer token (health, static files).

    >>> public(lambda request: None).camserve_public
    True
    """
    handler.camserve_public = True  # type: ignore[attr-defined]
    return handler


def error_body(shape: Callable[[str, str], Any]) -> Callable[[H], H]:
    """Give a route handler its own error body: ``shape(code, message)`` → a JSON value
    (default ``{"error": {"code": code, "message": message}}``)."""

    def mark(handler: H) -> H:
        handler.camserve_error_body = shape  # type: ignore[attr-defined]
        return handler

    return mark


def default_error_body(code: str, message: str) -> Any:
    """``{"error": {"code": ..., "message": ...}}``.

    >>> default_error_body("NOT_FOUND", "no model 'x'")
    {'error': {'code': 'NOT_FOUND', 'message': "no model 'x'"}}
    """
    return {"error": {"code": code, "message": message}}


def deadline_of(request: web.Request) -> float | None:
    """The caller's deadline (header ``Connect-Timeout-Ms``) as a ``time.monotonic()``
    instant; None without the header; 400 for a value that is not a positive number."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not ms > 0 or ms != ms or ms == float("inf"):
        raise InvalidArgument(f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {value[:40]!r}")
    return time.monotonic() + ms / 1000.0


async def read_body(request: web.Request) -> bytes:
    """The request body: :class:`PayloadTooLarge` over ``max_message_mb``, also for a body
    without a length (cut off while reading)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(too_large_message(None, request.app[CONFIG_KEY].max_message_bytes)) from None


async def read_json(request: web.Request) -> Any:
    """The request body parsed as JSON: 413 over ``max_message_mb`` (:func:`read_body`), 400
    for an empty or malformed body (naming where it broke)."""
    data = await read_body(request)
    if not data:
        raise InvalidArgument("the request body is empty; send a JSON object (Content-Type: application/json)")
    try:
        return json.loads(data)
    except RecursionError:
        raise InvalidArgument("the request body is JSON nested too deeply; images are [H][W][C] lists") from None
    except UnicodeDecodeError:
        raise InvalidArgument("the request body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as e:
        raise InvalidArgument(
            f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); send a JSON object"
        ) from None


def too_large_message(length: int | None, limit: int) -> str:
    """What a 413 says.

    >>> too_large_message(100, 10)
    'the request body is 100 bytes, more than the 10 bytes allowed (max_message_mb=9.53674e-06)'
    """
    what = f"is {length} bytes" if length is not None else "is longer"
    return f"the request body {what}, more than the {limit} bytes allowed (max_message_mb={limit / 2**20:g})"


#: Application keys.
CONTEXT_KEY: web.AppKey[HttpContext] = web.AppKey("camserve_context", HttpContext)
CONFIG_KEY: web.AppKey[Any] = web.AppKey("camserve_config", object)


def make_app(ctx: HttpContext, route_modules: tuple[str, ...] = ROUTE_MODULES) -> web.Application:
    """The application: middlewares, then the routes of every module in ``route_modules``
    (each one's ``add_routes(app, ctx)``)."""
    from camserve.http import middleware

    limit = ctx.config.max_message_bytes
    app = web.Application(
        client_max_size=limit,
        middlewares=middleware.middlewares(ctx),
    )
    app[CONTEXT_KEY] = ctx
    app[CONFIG_KEY] = ctx.config
    for name in route_modules:
        importlib.import_module(name).add_routes(app, ctx)
    return app
