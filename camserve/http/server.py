"""Binding, TLS, start and stop of the HTTP API (:class:`HttpServer`), on the running event loop.
:func:`start_for` starts a CamServer's (``await start_for(cam_server)``: its ``http_port``,
TLS files, token, data plane and metrics registry).

>>> server = HttpServer(web.Application())
>>> server.port is None, server.idle_timeout_s  # not started: ``await server.start(host, port)``
(True, 30.0)
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from camserve.http.app import HttpContext, make_app
from camserve.serving.observability import HTTP_IDLE_TIMEOUT_S, SHUTDOWN_TIMEOUT_S, Listener

if TYPE_CHECKING:
    from camserve.serving.config import ServerConfig
    from camserve.serving.dataplane import DataPlane
    from camserve.serving.observability import ServerMetrics
    from camserve.serving.servicer import CamServicer


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from the same PEM files as the gRPC port (TLS 1.2 or later).

    >>> tls_context("", "")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ...
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class HttpServer(Listener):
    """An aiohttp application on every address of ``host`` (see
    :func:`~camserve.serving.observability.listen_host`), one port for all, optionally TLS."""

    def __init__(
        self, app: web.Application, ctx: HttpContext | None = None, idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S
    ) -> None:
        super().__init__()
        self.app = app
        self.ctx = ctx
        self.idle_timeout_s = idle_timeout_s

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen (``port`` 0: a free one) and return the port."""
        runner = web.AppRunner(
            self.app, access_log=None, keepalive_timeout=self.idle_timeout_s, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        return await self.listen(runner, host, port, tls)

    @property
    def inflight(self) -> int:
        """HTTP requests in progress."""
        return self.ctx.inflight if self.ctx is not None else 0


class CamServerLike(Protocol):
    """What :func:`start_for` needs of a :class:`~camserve.serving.server.CamServer`."""

    config: ServerConfig
    dataplane: DataPlane
    servicer: CamServicer
    metrics: ServerMetrics

    def serving(self) -> bool: ...


async def start_for(server: CamServerLike) -> HttpServer:
    """The HTTP API of a CamServer, started on its ``http_port`` with its TLS settings, token,
    data plane and metrics registry."""
    cfg = server.config
    ctx = HttpContext(
        dataplane=server.dataplane,
        servicer=server.servicer,
        registry=server.metrics.registry,
        ready=server.serving,
        token=cfg.bearer_token(),
    )
    http = HttpServer(make_app(ctx), ctx=ctx)
    await http.start(cfg.host, cfg.http_port, tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None)
    return http
