"""What the serving process tells its operators: Prometheus metrics and structured logs.

:class:`ServerMetrics` holds one server's metrics in its own registry (so tests can run
several servers in one process) and serves them over HTTP; :func:`configure_logging` sends
``camserve.*`` logs to stderr as JSON lines (:class:`JsonFormatter`).

>>> m = ServerMetrics()
>>> m.record("Predict", "NOT_FOUND", 0.002)
>>> m.registry.get_sample_value("camserve_errors_total", {"method": "Predict", "code": "NOT_FOUND"})
1.0
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from camserve.serving.batching import BatcherMetrics
from camserve.serving.jobs import BatchKey


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
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
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
        self.queue_depth = Gauge("camserve_queue_depth", "requests waiting for a batch", registry=r)
        self.dropped = Counter("camserve_dropped_total", "requests dropped before compute", ["reason"], registry=r)
        self.model_ready = Gauge("camserve_model_ready", "1 when the model serves", ["model", "version"], registry=r)
        self._http: Any = None
        self.port: int | None = None

    def batcher_hooks(self) -> BatcherMetrics[BatchKey]:
        """Hooks for the :class:`~camserve.serving.batching.Batcher`, labelled by the batch
        key's ``operation``."""
        return BatcherMetrics(
            queue_depth=self.queue_depth.set,
            batch=lambda key, n: self.batch_size.labels(key.operation).observe(n),
            queue_time=lambda key, s: self.queue_time.labels(key.operation).observe(s),
            dropped=lambda key, reason: self.dropped.labels(reason).inc(),
        )

    def record(self, method: str, code: str, seconds: float) -> None:
        """One finished call: ``code`` is the status code's name (``"OK"``, ``"NOT_FOUND"``, ...)."""
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def model_is_ready(self, name: str, version: int) -> None:
        self.model_ready.labels(name, str(version)).set(1)

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``port`` (0: a free one); returns the port."""
        from prometheus_client import start_http_server

        addr = "0.0.0.0" if host in ("[::]", "", "0.0.0.0") else host.strip("[]")
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._http.server_address[1])
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


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
