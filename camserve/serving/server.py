"""The gRPC server: ``camserve.v1.CamService`` over the library, with dynamic batching.

Thin by design: requests are checked and decoded here (:mod:`camserve.wire`), merged by
the :class:`~camserve.serving.batching.Batcher`, and computed by :class:`camserve.Explainer` and
:func:`camserve.dense.dense_scores` in a worker thread. Also served: the standard
``grpc.health.v1`` health service (overall ``""``, ``camserve.v1.CamService`` and one entry
per model name; SERVING only after every (operation, bucket) graph was compiled), server
reflection, Prometheus metrics on an HTTP port, JSON logs. SIGTERM drains then exits 0.

>>> cfg = ServerConfig.load(overrides={"models": "models", "port": 0})   # doctest: +SKIP
>>> asyncio.run(serve(cfg))                                              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_reflection.v1alpha import reflection

from camserve import wire
from camserve.errors import InvalidArgument, NotFound
from camserve.imaging import encode_png, overlay, preprocess, resize
from camserve.proto import pb, pb_grpc
from camserve.serving.batching import Batcher, BatcherClosed, BatcherMetrics, DeadlineExpired, QueueFull
from camserve.serving.config import ServerConfig
from camserve.serving.repository import ModelEntry, ModelNotFound, ModelRepository, ModelUnavailable

log = logging.getLogger("camserve.serving.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CamService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Unauthenticated(Exception):
    """Missing or wrong bearer token."""


# ---------------------------------------------------------------------------- status codes


#: Longest status message sent, in UTF-8 bytes. gRPC sends it percent-encoded in a trailer
#: (up to 3 characters per byte) and clients refuse trailers over 8-16 KiB: the call would fail
#: as RESOURCE_EXHAUSTED "Stream removed" instead of the real status. Messages that echo a
#: long client string (a model, layer, class or method name) are cut in the middle.
MAX_STATUS_MESSAGE_BYTES = 2000


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


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception (SPEC §6); never INTERNAL for what a client sent.

    >>> status_for(QueueFull("full"))[0].name
    'RESOURCE_EXHAUSTED'
    """
    msg = clip_message(str(exc.args[0]) if getattr(exc, "args", None) else str(exc))
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    if isinstance(exc, DeadlineExpired):
        return grpc.StatusCode.DEADLINE_EXCEEDED, msg
    if isinstance(exc, (BatcherClosed, ModelUnavailable)):
        return grpc.StatusCode.UNAVAILABLE, msg
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, msg
    if isinstance(exc, (NotFound, LookupError)):
        return grpc.StatusCode.NOT_FOUND, msg
    if isinstance(exc, (InvalidArgument, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, msg
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details"


# ---------------------------------------------------------------------------- metrics and logs


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

    def batcher_hooks(self) -> BatcherMetrics:
        return BatcherMetrics(
            queue_depth=self.queue_depth.set,
            batch=lambda key, n: self.batch_size.labels(key[0]).observe(n),
            queue_time=lambda key, s: self.queue_time.labels(key[0]).observe(s),
            dropped=lambda key, reason: self.dropped.labels(reason).inc(),
        )

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        if code != grpc.StatusCode.OK:
            self.errors.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
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
    """One JSON object per line: ts, level, logger, msg and any ``extra=`` fields."""

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


# ---------------------------------------------------------------------------- auth


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless ``authorization: Bearer <token>`` matches; health is exempt
    (probes cannot send headers)."""

    def __init__(self, token: str, on_denied: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_denied = on_denied

    async def intercept_service(self, continuation, details):  # type: ignore[override]
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if self._on_denied:
            self._on_denied(details.method)
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'" if not got else "invalid bearer token"
        )

        async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return make(
            deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


# ---------------------------------------------------------------------------- models at run time


@dataclasses.dataclass
class _Runtime:
    """A loaded model version with its explainers (one per layer) and readiness."""

    entry: ModelEntry
    explainers: dict[str, Any] = dataclasses.field(default_factory=dict)  # layer name ("" = default) -> Explainer
    ready: bool = False
    methods: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass(eq=False)
class _Job:
    """One request's share of a batch."""

    runtime: _Runtime
    explainer: Any
    images: np.ndarray | None = None  # (n, H, W, C) preprocessed
    image: np.ndarray | None = None  # DenseScores: one (H, W, C) image
    targets: list[list[int]] | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------- the server


class CamServer:
    """``camserve.v1.CamService`` plus health, reflection and metrics.

    >>> server = CamServer(ServerConfig.load(overrides={"models": "models", "port": 0}))  # doctest: +SKIP
    >>> await server.start(); await server.wait_ready(); ...; await server.stop()        # doctest: +SKIP
    """

    def __init__(self, config: ServerConfig, repository: ModelRepository | None = None) -> None:
        self.config = config.validate()
        self.repository = repository or ModelRepository(config.models, version_policy=config.version_policy)
        self.metrics = ServerMetrics()
        self.health = HealthServicer()
        self.port: int | None = None
        self._runtimes: dict[tuple[str, int], _Runtime] = {}
        self._ready = asyncio.Event()
        self._draining = False
        self._inflight = 0
        self._server: grpc.aio.Server | None = None
        self._load_task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="camserve-io"
        )
        self.batcher = Batcher(
            self._compute,
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            max_queued=config.max_queued,
            workers=config.workers,
            metrics=self.metrics.batcher_hooks(),
        )

    # ------------------------------------------------------------ life cycle

    async def start(self) -> int:
        """Bind the ports, answer health (NOT_SERVING), then load and warm up in the
        background. Returns the gRPC port."""
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = []
        token = cfg.bearer_token()
        if token:
            interceptors.append(
                TokenAuthInterceptor(
                    token,
                    on_denied=lambda m: self.metrics.record(m.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED, 0.0),
                )
            )
        server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_CamServiceServicer_to_server(_Servicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
            with open(cfg.tls_cert, "rb") as f:
                cert = f.read()
            self.port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"could not bind {address}")
        await server.start()
        self._server = server
        await self.batcher.start()
        if cfg.metrics_port >= 0:
            self.metrics.serve_http(cfg.host, cfg.metrics_port)
        log.info(
            "listening",
            extra={
                "port": self.port,
                "metrics_port": self.metrics.port,
                "tls": bool(cfg.tls_cert),
                "auth": bool(token),
                "config": cfg.public_dict(),
            },
        )
        self._load_task = asyncio.create_task(self._load_and_warm_up())
        return self.port

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every model has loaded (or failed) and warmed up."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _load_and_warm_up(self) -> None:
        loop = asyncio.get_running_loop()
        repo = self.repository
        for name in repo.names():
            await self.health.set(name, NOT_SERVING)
        try:
            for name in repo.names():
                await loop.run_in_executor(self._pool, repo.load, [name])
                st = repo.status(name)
                if st.errors:
                    log.warning("model failed to load", extra={"model": name, "reason": st.reason})
                for version, entry in sorted(st.entries.items()):
                    rt = _Runtime(entry)
                    t0 = time.perf_counter()
                    try:
                        await loop.run_in_executor(self._pool, self._warm_up, rt)
                    except Exception as e:
                        log.exception("warm-up failed", extra={"model": name, "version": version})
                        st.errors[version] = f"warm-up failed: {type(e).__name__}: {e}"
                        del st.entries[version]
                        continue
                    self._runtimes[(name, version)] = rt
                    rt.ready = True
                    self.metrics.model_ready.labels(name, str(version)).set(1)
                    log.info(
                        "model ready",
                        extra={
                            "model": name,
                            "version": version,
                            "layer": rt.explainers[""].layer_name,
                            "warmup_s": round(time.perf_counter() - t0, 3),
                        },
                    )
                await self.health.set(name, SERVING if st.available else NOT_SERVING)
        except Exception:
            log.exception("loading the repository failed")
        if not self._draining:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, SERVING)
        self._ready.set()

    def _warm_up(self, rt: _Runtime) -> None:
        from camserve import keras_graph as graph

        ex = self._make_explainer(rt.entry, rt.entry.config.default_layer)
        rt.explainers[""] = ex
        usable = []
        for m in ex.methods:
            try:
                ex.check_methods((m,))
                usable.append(m)
            except InvalidArgument:
                pass
        rt.methods = tuple(usable)
        rt.layers = tuple(graph.layer_path_name(p) for p in graph.candidate_layers(rt.entry.model))
        warm = [m for m in self.config.warmup_methods if m in usable]
        ex.warm_up(methods=tuple(warm) or ("gradcam",))

    def _make_explainer(self, entry: ModelEntry, layer: str | None):
        from camserve.explain import Explainer

        return Explainer(
            entry.model,
            layer=layer or None,
            class_names=entry.config.class_names,
            chunk_size=self.config.chunk_size,
            max_channels=self.config.max_channels or None,
            max_batch_size=self.config.max_batch_size,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls (UNAVAILABLE), let accepted ones finish
        (at most ``grace`` seconds, default ``drain_timeout_s``), then stop."""
        if self._server is None:
            return
        grace = self.config.drain_timeout_s if grace is None else grace
        self._draining = True
        log.info("draining", extra={"inflight": self._inflight, "queued": self.batcher.depth})
        await self.health.enter_graceful_shutdown()
        t0 = time.monotonic()
        while self._inflight > 0 and time.monotonic() - t0 < grace:
            await asyncio.sleep(0.01)
        await self._server.stop(max(0.0, grace - (time.monotonic() - t0)))
        await self.batcher.close(drain=False)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        self.metrics.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._server = None
        log.info("stopped", extra={"drain_s": round(time.monotonic() - t0, 3)})

    # ------------------------------------------------------------ request helpers

    def runtime(self, spec: pb.ModelSpec) -> _Runtime:
        """The ready runtime for a ModelSpec (NOT_FOUND / UNAVAILABLE otherwise)."""
        if self._draining:
            raise BatcherClosed("the server is draining (shutting down); retry on another replica")
        if not spec.name:
            raise InvalidArgument(f"model.name is required; models: {self.repository.names()}")
        if spec.version < 0:
            raise InvalidArgument(f"model.version must be >= 0 (0: newest), got {spec.version}")
        entry = self.repository.get(spec.name, spec.version or None)
        rt = self._runtimes.get((entry.name, entry.version))
        if rt is None or not rt.ready:
            raise ModelUnavailable(f"model {entry.name!r} version {entry.version} is warming up; retry shortly")
        return rt

    def explainer(self, rt: _Runtime, layer: str) -> Any:
        """The Explainer of ``layer`` ("" = the default), built on first use."""
        ex = rt.explainers.get(layer)
        if ex is None:
            if layer not in rt.layers:
                from camserve.keras_graph import resolve_layer

                resolve_layer(rt.entry.model, layer)  # raises UnknownLayer listing the choices
            with rt.lock:
                ex = rt.explainers.get(layer) or self._make_explainer(rt.entry, layer)
                rt.explainers[layer] = ex
        return ex

    def check_count(self, n: int, what: str = "images") -> None:
        if n < 1:
            raise InvalidArgument(f"no {what} in the request; send 1 to {self.config.max_images}")
        if n > self.config.max_images:
            raise InvalidArgument(
                f"{n} {what} in one request; at most {self.config.max_images} are allowed (max_images)"
            )

    def prepare(self, rt: _Runtime, images: Sequence[pb.Image]) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Decode, resize and preprocess to the model's input: (N, H, W, C) float32, plus the
        pixels as sent (None for preprocessed tensors)."""
        cfg = rt.entry.config
        h, w = cfg.input_size
        expected = (h, w, cfg.channels)
        arrays, pixels = [], []
        for i, msg in enumerate(images):
            what = f"image {i}" if len(images) > 1 else "image"
            img = wire.decode_image_proto(msg, self.config.max_pixels, what=what)
            if img.preprocessed:
                if img.array.shape != expected:
                    raise InvalidArgument(
                        f"{what}: float32 tensor of shape {list(img.array.shape)}; model {rt.entry.name!r} takes "
                        f"preprocessed inputs of shape {list(expected)} (send uint8 pixels or encoded bytes of any size "
                        "to have them resized)"
                    )
                arrays.append(img.array)
                pixels.append(None)
                continue
            x = preprocess(resize(img.array, (h, w)), cfg.preprocessing)
            if cfg.channels == 1:
                x = x.mean(axis=-1, keepdims=True)
            arrays.append(x)
            pixels.append(img.array)
        return np.stack(arrays).astype(np.float32, copy=False), pixels

    def deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def in_pool(self, fn: Callable[..., Any], *args: Any, inline: bool = False) -> Any:
        """Run ``fn`` in the I/O pool (decoding, encoding), or right here when ``inline``
        (small work, where the thread hop would cost more than the work)."""
        if inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    @staticmethod
    def small(images: Sequence[pb.Image]) -> bool:
        """Raw tensors of at most 256 KiB in all: cheap enough to prepare on the event loop."""
        return sum(len(m.tensor.data) if m.WhichOneof("source") == "tensor" else 1 << 30 for m in images) <= 256 * 1024

    # ------------------------------------------------------------ compute (worker thread)

    def _compute(self, key: tuple, jobs: list[_Job]) -> list[Any]:
        run = {"predict": self._run_predict, "explain": self._run_explain, "dense": self._run_dense}[key[0]]
        try:
            return run(jobs)
        except (InvalidArgument, NotFound, ValueError, LookupError):
            if len(jobs) == 1:
                raise
        # One bad request must not fail the others it was batched with.
        out: list[Any] = []
        for job in jobs:
            try:
                out.extend(run([job]))
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    @staticmethod
    def _split(values: Sequence[Any], jobs: list[_Job]) -> list[Any]:
        out, start = [], 0
        for job in jobs:
            n = len(job.images)
            out.append(values[start : start + n])
            start += n
        return out

    def _run_predict(self, jobs: list[_Job]) -> list[Any]:
        scores = jobs[0].explainer.predict(np.concatenate([j.images for j in jobs]))
        return self._split(scores, jobs)

    def _run_explain(self, jobs: list[_Job]) -> list[Any]:
        p = jobs[0].params
        images = np.concatenate([j.images for j in jobs])
        targets = None if jobs[0].targets is None else [t for j in jobs for t in j.targets]
        results = jobs[0].explainer.explain(images, methods=p["methods"], targets=targets, top_k=p["top_k"])
        return self._split(results, jobs)

    def _run_dense(self, jobs: list[_Job]) -> list[Any]:
        from camserve.dense import dense_scores

        out: list[Any] = []
        for job in jobs:
            p = job.params
            try:
                out.append(
                    dense_scores(
                        job.runtime.entry.model, job.image, stride=p["stride"], scales=p["scales"], mode=p["mode"]
                    )
                )
            except Exception as e:  # noqa: BLE001 - per request
                out.append(e)
        return out


# ---------------------------------------------------------------------------- RPC handlers


def _rpc(fn: Callable) -> Callable:
    """Status mapping, metrics and logs around a unary handler."""
    method = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: _Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        server = self.server
        t0 = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        server._inflight += 1
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED
            )
            raise
        except Exception as e:
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error", extra={"method": method})
        finally:
            server._inflight -= 1
            elapsed = time.perf_counter() - t0
            server.metrics.record(method, code, elapsed)
            if code != grpc.StatusCode.OK:
                log.info(
                    "request failed",
                    extra={
                        "method": method,
                        "code": code.name,
                        "error": message,
                        "latency_ms": round(elapsed * 1000, 2),
                        "peer": context.peer(),
                    },
                )
        await context.abort(code, message)

    return wrapper


class _Servicer(pb_grpc.CamServiceServicer):
    def __init__(self, server: CamServer) -> None:
        self.server = server

    @_rpc
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        s = self.server
        rt = s.runtime(request.model)
        s.check_count(len(request.images))
        classes = rt.entry.config.class_names
        if not 0 <= request.top_k <= len(classes):
            raise InvalidArgument(f"top_k must be between 0 and {len(classes)} (the class count), got {request.top_k}")
        images, _ = await s.in_pool(s.prepare, rt, request.images, inline=s.small(request.images))
        ex = s.explainer(rt, "")
        key = ("predict", rt.entry.name, rt.entry.version, images.shape[1:])
        scores = await s.batcher.submit(key, _Job(rt, ex, images), size=len(images), deadline=s.deadline(context))
        return pb.PredictResponse(
            model=pb.ModelSpec(name=rt.entry.name, version=rt.entry.version),
            predictions=[wire.prediction_to_proto(row, request.top_k, classes) for row in scores],
        )

    async def _explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        s = self.server
        rt = s.runtime(request.model)
        n = len(request.images)
        s.check_count(n)
        ex = s.explainer(rt, request.layer)
        methods = tuple(dict.fromkeys(request.methods)) or ("gradcam",)
        ex.check_methods(methods)  # UnknownMethod / cam on a non-GAP head, before batching
        n_classes = ex.num_classes
        top_k = request.top_k or 1
        targets: list[list[int]] | None = None
        if request.targets:
            if len(request.targets) not in (1, n):
                raise InvalidArgument(
                    f"{len(request.targets)} target lists for {n} images: give none (top_k), one for all images, "
                    "or one per image"
                )
            lists = list(request.targets) * (n if len(request.targets) == 1 else 1)
            targets = []
            for i, tl in enumerate(lists):
                if not tl.targets:
                    raise InvalidArgument(f"image {i} has an empty target list; give at least one class")
                if len(tl.targets) > n_classes:
                    raise InvalidArgument(
                        f"image {i} has {len(tl.targets)} targets; at most {n_classes} (the class count)"
                    )
                targets.append([ex.class_index(wire.target_from_proto(t)) for t in tl.targets])
        elif not 1 <= top_k <= n_classes:
            raise InvalidArgument(f"top_k must be between 1 and {n_classes} (the class count), got {request.top_k}")
        images, pixels = await s.in_pool(s.prepare, rt, request.images, inline=s.small(request.images))
        key = (
            "explain",
            rt.entry.name,
            rt.entry.version,
            ex.layer_name,
            methods,
            images.shape[1:],
            "targets" if targets is not None else top_k,
        )
        job = _Job(rt, ex, images, targets=targets, params={"methods": methods, "top_k": top_k})
        results = await s.batcher.submit(key, job, size=n, deadline=s.deadline(context))
        inline = (
            not request.return_overlay
            and not (request.return_raw or request.return_heatmap)
            or (not request.return_overlay and s.small(request.images))
        )
        return await s.in_pool(self._explain_response, rt, ex, request, results, pixels, images, inline=inline)

    @staticmethod
    def _explain_response(
        rt: _Runtime, ex: Any, request: pb.ExplainRequest, results: list, pixels: list, images: np.ndarray
    ) -> pb.ExplainResponse:
        resp = pb.ExplainResponse(
            model=pb.ModelSpec(name=rt.entry.name, version=rt.entry.version),
            layer=ex.layer_name,
            request_id=request.request_id,
        )
        for i, per_image in enumerate(results):
            background = pixels[i] if pixels[i] is not None else _display(images[i])
            msgs = []
            for e in per_image:
                png = encode_png(overlay(background, e.heatmap, box=e.box)) if request.return_overlay else None
                msgs.append(
                    wire.explanation_to_proto(
                        e, raw=request.return_raw, heatmap=request.return_heatmap, overlay_png=png
                    )
                )
            resp.images.append(pb.ImageExplanations(explanations=msgs))
        return resp

    @_rpc
    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        return await self._explain(request, context)

    async def ExplainStream(
        self, request_iterator: AsyncIterator[pb.ExplainRequest], context: grpc.aio.ServicerContext
    ):
        """Requests are processed concurrently (``stream_inflight`` at a time, batched with
        everything else); answers come in completion order with their request_id."""
        s = self.server
        t0 = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        s._inflight += 1
        done = object()
        out: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(s.config.stream_inflight)
        tasks: set[asyncio.Task] = set()

        async def one(req: pb.ExplainRequest) -> None:
            try:
                await out.put(await self._explain(req, context))
            except Exception as e:  # noqa: BLE001
                if req.request_id:
                    e.args = (f"request {req.request_id!r}: {e.args[0] if e.args else e}",) + tuple(e.args[1:])
                await out.put(e)
            finally:
                slots.release()

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    await slots.acquire()
                    t = asyncio.create_task(one(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            except Exception as e:  # noqa: BLE001 - e.g. a request that failed to parse
                await out.put(e)
            finally:
                await out.put(done)

        read = asyncio.create_task(reader())
        try:
            while True:
                item = await out.get()
                if item is done:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            code, message = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("internal error", extra={"method": "ExplainStream"})
        finally:
            read.cancel()
            for t in list(tasks):
                t.cancel()
            s._inflight -= 1
            s.metrics.record("ExplainStream", code, time.perf_counter() - t0)
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)

    @_rpc
    async def DenseScores(
        self, request: pb.DenseScoresRequest, context: grpc.aio.ServicerContext
    ) -> pb.DenseScoresResponse:
        s = self.server
        rt = s.runtime(request.model)
        if not request.HasField("image"):
            raise InvalidArgument("image is required: one image at least the model's input size")
        if request.stride < 0:
            raise InvalidArgument(f"stride must be >= 0 (0: the network's total stride), got {request.stride}")
        scales = tuple(float(x) for x in request.scales) or (1.0,)
        if any(not np.isfinite(x) or x <= 0 for x in scales) or len(scales) > 16:
            raise InvalidArgument(f"scales must be 1 to 16 positive finite numbers, got {list(scales)}")
        if request.image.WhichOneof("source") == "encoded":
            _, width, height = wire.encoded_size(request.image.encoded)
        else:
            height, width = (list(request.image.tensor.shape) + [0, 0])[:2]
        for x in scales:
            wire.check_pixels(round(width * x), round(height * x), s.config.max_pixels, f"image at scale {x}")
        mode = request.mode or "fcn"
        if mode not in ("fcn", "crops"):
            raise InvalidArgument(f"mode must be 'fcn' or 'crops', got {mode!r}")
        image = await s.in_pool(self._dense_input, rt, request.image)
        key = ("dense", rt.entry.name, rt.entry.version, image.shape, request.stride, scales, mode)
        job = _Job(rt, None, image=image, params={"stride": request.stride or None, "scales": scales, "mode": mode})
        result = await s.batcher.submit(key, job, size=1, deadline=s.deadline(context))
        return await s.in_pool(dense_to_proto, result, rt.entry)

    def _dense_input(self, rt: _Runtime, msg: pb.Image) -> np.ndarray:
        cfg = rt.entry.config
        img = wire.decode_image_proto(msg, self.server.config.max_pixels)
        if img.preprocessed:
            if img.array.shape[-1] != cfg.channels:
                raise InvalidArgument(
                    f"float32 tensor has {img.array.shape[-1]} channels; model {rt.entry.name!r} takes {cfg.channels}"
                )
            x = img.array
        else:
            x = preprocess(img.array, cfg.preprocessing)
        h, w = cfg.input_size
        if x.shape[0] < h or x.shape[1] < w:
            raise InvalidArgument(
                f"image of {x.shape[1]}x{x.shape[0]} is smaller than the model's window {w}x{h}; send at least that size"
            )
        return x

    @_rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        s = self.server
        return pb.ListModelsResponse(models=[self._model_info(name) for name in s.repository.names()])

    @_rpc
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        if not request.model.name:
            raise InvalidArgument(f"model.name is required; models: {self.server.repository.names()}")
        info = self._model_info(request.model.name)
        if request.model.version and request.model.version not in info.versions:
            raise ModelNotFound(
                f"model {request.model.name!r} has no version {request.model.version}; versions: {list(info.versions)}"
            )
        return pb.GetModelResponse(model=info)

    def _model_info(self, name: str) -> pb.ModelInfo:
        s = self.server
        st = s.repository.status(name)
        ready = {v: s._runtimes[(name, v)] for v in sorted(st.entries) if (name, v) in s._runtimes}
        info = pb.ModelInfo(name=name, versions=st.versions, available_versions=list(ready), available=bool(ready))
        reason = st.reason
        if not ready and not reason:
            reason = "warming up"
        info.reason = reason
        if st.config is not None:
            c = st.config
            info.class_names.extend(c.class_names)
            info.input_height, info.input_width = c.input_size
            info.channels = c.channels
            info.preprocessing = c.preprocessing
        if ready:
            version = max(ready)
            rt = ready[version]
            info.version = version
            info.default_layer = rt.explainers[""].layer_name
            info.target_layers.extend(rt.layers)
            info.methods.extend(rt.methods)
        return info


def _display(x: np.ndarray) -> np.ndarray:
    """A preprocessed input rescaled to uint8 RGB, as the background of an overlay."""
    x = np.asarray(x, np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x[..., :3]
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)


def dense_to_proto(result: Any, entry: ModelEntry) -> pb.DenseScoresResponse:
    """A :func:`camserve.dense.dense_scores` result as a DenseScoresResponse."""
    sy, sx = (int(v) for v in result.strides)
    resp = pb.DenseScoresResponse(
        model=pb.ModelSpec(name=entry.name, version=entry.version),
        stride=sy if sy == sx else 0,
        strides=[sy, sx],
        window=[int(v) for v in result.window],
        exact=bool(result.exact),
        mode=str(result.mode),
        class_names=list(entry.config.class_names),
    )
    for level in result:
        resp.scales.append(
            pb.ScaleScores(
                scale=float(level.scale),
                scores=wire.array_to_floatmap(level.scores),
                boxes=wire.array_to_floatmap(level.boxes),
            )
        )
    return resp


# ---------------------------------------------------------------------------- entry point


async def serve(config: ServerConfig, ready: Callable[[CamServer], None] | None = None) -> int:
    """Run until SIGTERM / SIGINT, then drain and return 0 (the ``camserve serve`` body)."""
    server = CamServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(server)
    await stop.wait()
    log.info("signal received: draining")
    await server.stop()
    return 0
