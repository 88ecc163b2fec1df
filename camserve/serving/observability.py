"""What the serving process tells its operators: Prometheus metrics and structured logs.

:class:`ServerMetrics` holds one server's metrics in its own registry (so tests can run
several servers in one process) and serves them over HTTP (:class:`MetricsHTTP`: on the
server's event loop, on the addresses of the server's host setting, optionally behind the
bearer token); :func:`configure_logging` sends ``camserve.*`` logs to stderr as JSON lines
(:class:`JsonFormatter`).

>>> m = ServerMetrics()
>>> m.record("Predict", "NOT_FOUND", 0.002)
>>> m.registry.get_sample_value("camserve_errors_total", {"method": "Predict", "code": "NOT_FOUND"})
1.0
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import ssl
import sys
from typing import Any

from camserve.serving.auth import check_bearer
from camserve.serving.batching import BatcherMetrics
from camserve.serving.jobs import BatchKey

#: How long an HTTP connection (``/metrics``, the HTTP API) may stay idle (before its first
#: request too): idle connections are bounded by time, not by a thread each.
HTTP_IDLE_TIMEOUT_S = 30.0
#: Seconds a stopping HTTP listener gives requests in progress (the data plane drains before).
SHUTDOWN_TIMEOUT_S = 2.0
#: Labelled metric children kept for reuse (methods x codes and operations are far fewer).
MAX_CACHED_CHILDREN = 1024
#: Operations whose batches are padded up to a compiled batch size (DenseScores' are not).
PADDED_OPERATIONS = frozenset({"predict", "explain"})
#: Histogram buckets (seconds) of request latencies, gRPC and HTTP alike.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    """Prometheus metrics of one server (own registry, so tests can run several servers)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "camserve_requests_total", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.errors = Counter(
            "camserve_errors_total", "failed RPCs by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "camserve_request_latency_seconds",
            "RPC latency",
            ["method"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_time = Histogram(
            "camserve_queue_time_seconds",
            "time from arrival to the start of the batch's compute",
            ["operation"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.batch_size = Histogram(
            "camserve_batch_size",
            "images per computed batch",
            ["operation"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.batch_padding = Counter(
            "camserve_batch_padding_images",
            "images computed for nobody: batches padded up to the next compiled batch size",
            ["operation"],
            registry=r,
        )
        self.queue_depth = Gauge("camserve_queue_depth", "requests waiting for a batch", registry=r)
        self.dropped = Counter("camserve_dropped_total", "requests dropped before compute", ["reason"], registry=r)
        self.model_ready = Gauge("camserve_model_ready", "1 when the model serves", ["model", "version"], registry=r)
        self.http: MetricsHTTP | None = None
        # The labelled children, looked up once: ``labels()`` takes a lock and builds a key on
        # every call, several times per request otherwise.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _labels(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*values)
            if len(self._children) < MAX_CACHED_CHILDREN:  # label values are few; bounded all the same
                self._children[key] = child
        return child

    def batcher_hooks(self) -> BatcherMetrics[BatchKey]:
        """Hooks for the :class:`~camserve.serving.batching.Batcher`, labelled by the batch
        key's ``operation``; the images Predict and Explain batches are padded with (up to the
        batcher's next compiled batch size) are counted in ``camserve_batch_padding_images_total``."""

        def batch(key: BatchKey, n: int, padded: int) -> None:
            self._labels(self.batch_size, key.operation).observe(n)
            if padded > n and key.operation in PADDED_OPERATIONS:
                self._labels(self.batch_padding, key.operation).inc(padded - n)

        return BatcherMetrics(
            queue_depth=self.queue_depth.set,
            batch=batch,
            queue_time=lambda key, s: self._labels(self.queue_time, key.operation).observe(s),
            dropped=lambda key, reason: self.dropped.labels(reason).inc(),
        )

    def record(self, method: str, code: str, seconds: float) -> None:
        """One finished call: ``code`` is the status code's name (``"OK"``, ``"NOT_FOUND"``, ...)."""
        self._labels(self.requests, method, code).inc()
        if code != "OK":
            self._labels(self.errors, method, code).inc()
        self._labels(self.latency, method).observe(seconds)

    def model_is_ready(self, name: str, version: int) -> None:
        self.model_ready.labels(name, str(version)).set(1)

    @property
    def port(self) -> int | None:
        """The port of ``/metrics`` (None: not served)."""
        return self.http.port if self.http is not None else None

    async def serve_http(
        self, host: str, port: int, token: str = "", idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S
    ) -> int:
        """Serve ``/metrics`` on ``host``'s addresses and ``port`` (0: a free one) from the
        running event loop, behind ``token`` when given; returns the port."""
        self.http = MetricsHTTP(self.registry, token=token, idle_timeout_s=idle_timeout_s)
        return await self.http.start(host, port)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None


def listen_host(host: str) -> str | None:
    """The address to bind for a gRPC-style ``host`` setting: None (every interface, IPv4 and
    IPv6, as gRPC's ``[::]``) for ``[::]``, ``::`` or empty; brackets dropped otherwise.

    >>> listen_host("[::]"), listen_host("127.0.0.1"), listen_host("[::1]"), listen_host("localhost")
    (None, '127.0.0.1', '::1', 'localhost')
    """
    if host in ("", "[::]", "::"):
        return None
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class Listener:
    """An aiohttp runner served on every address of a ``host`` setting (see :func:`listen_host`),
    one port for all, optionally over TLS: :class:`MetricsHTTP` and the HTTP API's
    :class:`~camserve.http.server.HttpServer` are both one.

    >>> Listener().port is None
    True
    """

    def __init__(self) -> None:
        self.port: int | None = None
        self.sockets: list[socket.socket] = []
        self._runner: Any = None

    async def listen(self, runner: Any, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Set ``runner`` (an aiohttp ``BaseRunner``) up and serve it on ``host``'s addresses,
        all on ``port`` (0: the one picked for the first address); returns the port."""
        from aiohttp import web

        self._runner = runner
        await runner.setup()
        try:
            self.sockets = await _bind(listen_host(host), port)
            for sock in self.sockets:
                await web.SockSite(runner, sock, ssl_context=tls, shutdown_timeout=SHUTDOWN_TIMEOUT_S).start()
        except BaseException:
            await self.close()
            raise
        self.port = int(self.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for sock in self.sockets:
            sock.close()
        self.sockets = []


class MetricsHTTP(Listener):
    """``GET /metrics`` (Prometheus text or OpenMetrics, as the scraper asks) served by aiohttp
    on the event loop it is started from: no thread per connection, and a connection idle for
    ``idle_timeout_s`` (before its first request too) is closed. With ``token``, a request
    without exactly one ``Authorization: Bearer <token>`` header gets 401 (the same rules as
    the gRPC calls: :func:`~camserve.serving.auth.check_bearer`).
    """

    def __init__(self, registry: Any, token: str = "", idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S) -> None:
        super().__init__()
        self.registry = registry
        self.token = token
        self.idle_timeout_s = idle_timeout_s

    async def start(self, host: str, port: int) -> int:
        """Listen on every address of ``host`` (see :func:`listen_host`), all on one port
        (``port``, or the one picked for the first address when 0); returns the port."""
        from aiohttp import web

        server = web.Server(self._handle, keepalive_timeout=self.idle_timeout_s, access_log=None)
        return await self.listen(web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT_S), host, port)

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client.exposition import choose_encoder

        if request.path != "/metrics":
            return web.Response(status=404, text="not found: the metrics are at /metrics\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="use GET /metrics\n", headers={"Allow": "GET, HEAD"})
        if self.token:
            problem = check_bearer(request.headers.getall("Authorization", []), self.token)
            if problem is not None:
                return web.Response(
                    status=401,
                    text=problem.replace("metadata", "the header") + "\n",
                    headers={"WWW-Authenticate": 'Bearer realm="camserve metrics"'},
                )
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})


async def _bind(host: str | None, port: int) -> list[socket.socket]:
    """Bound TCP sockets for every address of ``host`` (None: all interfaces, IPv4 and IPv6),
    one port for all; an address the machine lacks (no IPv6, say) is skipped when another one
    binds, any other error (the port in use) raised."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    missing: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as e:  # the family is not supported here
                missing = missing or e
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if sockets:  # the port the first address got
                    address = (address[0], sockets[0].getsockname()[1], *address[2:])
                sock.bind(address)
            except OSError as e:
                sock.close()
                if e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                missing = missing or e
                continue
            sockets.append(sock)
        if not sockets:
            raise missing or OSError(f"no address to listen on for host {host!r}")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, any ``extra=`` fields and, with an
    exception, its traceback as ``exc``.

    >>> rec = logging.LogRecord("camserve", logging.INFO, "", 0, "ready", (), None)
    >>> rec.model = "gap"
    >>> json.loads(JsonFormatter().format(rec))["model"]
    'gap'
    """

    _STD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self._STD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Log ``camserve.*`` to stderr as JSON lines (or plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger("camserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
