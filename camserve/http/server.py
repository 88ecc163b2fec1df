"""Binding, TLS, start and stop of the HTTP API (:class:`HttpServer`), on the running event loop.

>>> server = HttpServer(make_app(ctx), ctx)             # doctest: +SKIP
>>> port = await server.start("[::]", 0)                # doctest: +SKIP
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from camserve.http.app import HttpContext, make_app
from camserve.serving.observability import METRICS_IDLE_TIMEOUT_S, _bind, listen_host

if TYPE_CHECKING:
    from camserve.serving.config import ServerConfig
    from camserve.serving.dataplane import DataPlane
    from camserve.serving.observability import ServerMetrics
    from camserve.serving.servicer import CamServicer

#: Seconds a stopping server gives requests in progress (the data plane drains before).
SHUTDOWN_TIMEOUT_S = 2.0


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


class HttpServer:
    """An aiohttp application on every address of ``host`` (see
    :func:`~camserve.serving.observability.listen_host`), one port for all, optionally TLS."""

    def __init__(
        self, app: web.Application, ctx: HttpContext | None = None, idle_timeout_s: float = METRICS_IDLE_TIMEOUT_S
    ) -> None:
        self.app = app
        self.ctx = ctx
        self.idle_timeout_s = idle_timeout_s
        self.port: int | None = None
        self.sockets: list[socket.socket] = []
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen (``port`` 0: a free one) and return the port."""
        self._runner = web.AppRunner(
            self.app, access_log=None, keepalive_timeout=self.idle_timeout_s, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        try:
            self.sockets = await _bind(listen_host(host), port)
            for sock in self.sockets:
                await web.SockSite(self._runner, sock, ssl_context=tls, shutdown_timeout=SHUTDOWN_TIMEOUT_S).start()
        except BaseException:
            await self.close()
            raise
        self.port = int(self.sockets[0].getsockname()[1])
        return self.port

    @property
    def inflight(self) -> int:
        """HTTP requests in progress."""
        return self.ctx.inflight if self.ctx is not None else 0

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for sock in self.sockets:
            sock.close()
        self.sockets = []


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
