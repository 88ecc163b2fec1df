"""The serving process's life cycle: bind, load and warm up, serve, drain, stop.

:class:`CamServer` puts the pieces together: ``camserve.v1.CamService``
(:mod:`~camserve.serving.servicer` over the :mod:`~camserve.serving.dataplane`) and, on the
same port over the same data plane, the Open Inference Protocol's
``inference.GRPCInferenceService`` (:mod:`camserve.oip`), the standard
``grpc.health.v1`` health service (overall ``""``, ``camserve.v1.CamService`` and one entry
per model name; SERVING only after every (operation, bucket) graph was compiled, and overall
only when at least one model serves; then what is alive, the models with it, is left out
of later garbage collections: ``gc_freeze``, :func:`freeze_heap`), server
reflection, status mapping (:mod:`~camserve.serving.status`), optional TLS and bearer-token
auth (:mod:`~camserve.serving.auth`), Prometheus metrics and JSON logs
(:mod:`~camserve.serving.observability`). SIGTERM drains then exits 0 (:func:`serve`):
in-flight calls get ``drain_timeout_s`` to finish; compute still running then stops at its
next checkpoint (UNAVAILABLE), so the process never waits for work nobody will receive.

>>> cfg = ServerConfig.load(overrides={"models": "models", "port": 0})   # doctest: +SKIP
>>> asyncio.run(serve(cfg))                                              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from camserve import accelerator
from camserve.http import server as http_server
from camserve.http.server import HttpServer
from camserve.oip import grpc_service as oip_grpc_service
from camserve.oip import inference as oip_inference
from camserve.proto import pb_grpc
from camserve.serving.batching import Batcher
from camserve.serving.config import ServerConfig
from camserve.serving.dataplane import DataPlane
from camserve.serving.gate import Registrar, ServiceGate
from camserve.serving.jobs import BatchKey, Job
from camserve.serving.observability import ServerMetrics, configure_logging
from camserve.serving.repository import ModelRepository
from camserve.serving.runtime import ExplainerSettings, ModelRuntimes
from camserve.serving.servicer import SERVICE_NAME, CamServicer
from camserve.serving.status import CallStatus

__all__ = ["SERVICE_NAME", "CamServer", "configure_logging", "serve"]

log = logging.getLogger("camserve.serving.server")
T = TypeVar("T")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CamServer:
    """``camserve.v1.CamService`` plus health, reflection and metrics.

    >>> server = CamServer(ServerConfig.load(overrides={"models": "models", "port": 0}))  # doctest: +SKIP
    >>> await server.start(); await server.wait_ready(); ...; await server.stop()        # doctest: +SKIP
    """

    def __init__(self, config: ServerConfig, repository: ModelRepository | None = None) -> None:
        self.config = config.validate()
        # before any model is loaded: GPU memory growth and thread pools are fixed once TensorFlow starts
        accelerator.configure(config.gpu_memory_growth, None, config.intra_op_threads, config.inter_op_threads)
        self.repository = repository or ModelRepository(config.models, version_policy=config.version_policy)
        self.metrics = ServerMetrics()
        self.health = HealthServicer()
        self.port: int | None = None
        self.runtimes = ModelRuntimes(self.repository, ExplainerSettings.from_config(config), self.metrics)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="camserve-io"
        )
        self.dataplane = DataPlane(config, self.runtimes, self._pool, metrics=self.metrics.batcher_hooks())
        self.servicer = CamServicer(self.dataplane)
        self.oip_servicer = oip_grpc_service.InferenceServicer(self.dataplane, ready=self.serving)
        self._services = (SERVICE_NAME, oip_grpc_service.SERVICE_NAME)  # both behind the same gate
        self._status = CallStatus(record=self.metrics.record)
        self._ready = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._gate: ServiceGate | None = None  # every gRPC call but health's (set by start)
        self.http: HttpServer | None = None  # the HTTP API (camserve.http), when http_port >= 0
        self._load_task: asyncio.Task[None] | None = None
        self._frozen = False  # gc.freeze() at readiness (config.gc_freeze); undone by stop()

    @property
    def batcher(self) -> Batcher[BatchKey, Job]:
        """The data plane's batcher (queue depth, busy)."""
        return self.dataplane.batcher

    @property
    def inflight(self) -> int:
        """CamService calls and HTTP requests in progress."""
        return self._status.inflight + (self.http.inflight if self.http is not None else 0)

    def serving(self) -> bool:
        """Loaded and warmed up, at least one model ready, and not draining (HTTP readiness)."""
        return self._ready.is_set() and oip_inference.server_ready(self.dataplane)

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
        token = cfg.bearer_token()
        server = grpc.aio.server(options=options)
        behind_gate = Registrar()  # everything but health: token, parsing, status (camserve.serving.gate)
        pb_grpc.add_CamServiceServicer_to_server(self.servicer, behind_gate)
        oip_grpc_service.add_to_server(self.oip_servicer, behind_gate)
        # reflection's asyncio servicer (enable_server_reflection would pick the threaded one for a Registrar)
        described = (*self._services, HEALTH_SERVICE, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(described), behind_gate
        )
        self._gate = ServiceGate(behind_gate.handlers, status=self._status, services=self._services, token=token)
        server.add_generic_rpc_handlers((self._gate,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)  # probes send no token
        for name in ("", SERVICE_NAME):
            await self.health.set(name, NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        credentials = None
        if cfg.tls_cert:
            with open(cfg.tls_key, "rb") as f:
                key = f.read()
            with open(cfg.tls_cert, "rb") as f:
                cert = f.read()
            credentials = grpc.ssl_server_credentials([(key, cert)])
        try:  # gRPC raises RuntimeError("Failed to bind to address ...") for a port in use
            if credentials is not None:
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"could not listen on {address} (--port): {e}") from None
        if not self.port:
            raise OSError(f"could not listen on {address} (--port)")
        await server.start()
        self._server = server
        try:
            await self.dataplane.start()
            if cfg.metrics_port >= 0:
                metrics = self.metrics.serve_http(cfg.host, cfg.metrics_port, token=token if cfg.metrics_auth else "")
                await _listening(metrics, cfg.host, cfg.metrics_port, "--metrics-port")
            if cfg.http_port >= 0:
                self.http = await _listening(http_server.start_for(self), cfg.host, cfg.http_port, "--http-port")
        except BaseException:  # nothing left running behind the error (gRPC's server would complain at exit)
            await self.stop(grace=0)
            raise
        log.info(
            "listening",
            extra={
                "port": self.port,
                "metrics_port": self.metrics.port,
                "http_port": self.http.port if self.http is not None else None,
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
        for name in self.repository.names():
            await self.health.set(name, NOT_SERVING)

        async def model_done(name: str, available: bool) -> None:
            await self.health.set(name, SERVING if available else NOT_SERVING)

        try:
            await self.runtimes.load_all(self._pool, on_model=model_done)
        except Exception:  # logged; the models that loaded serve
            log.exception("loading the repository failed")
        if self.config.gc_freeze and not self.dataplane.draining:
            self._frozen = True
            t0 = time.perf_counter()
            frozen = freeze_heap()
            log.info("heap frozen", extra={"objects": frozen, "collect_s": round(time.perf_counter() - t0, 3)})
        serving = any(self.runtimes.ready_versions(name) for name in self.repository.names())
        if not self.dataplane.draining:
            if not serving:
                log.error("no model could be loaded: the server answers health NOT_SERVING")
            for name in ("", SERVICE_NAME):
                await self.health.set(name, SERVING if serving else NOT_SERVING)
        self._ready.set()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls (UNAVAILABLE), let accepted ones finish
        (at most ``grace`` seconds, default ``drain_timeout_s``), then stop."""
        if self._server is None:
            return
        grace = self.config.drain_timeout_s if grace is None else grace
        t0 = time.monotonic()
        self.dataplane.drain(stop_at=t0 + grace)
        log.info("draining", extra={"inflight": self.inflight, "queued": self.batcher.depth})
        await self.health.enter_graceful_shutdown()
        while self.inflight > 0 and time.monotonic() - t0 < grace:
            await asyncio.sleep(0.01)
        await self._server.stop(max(0.0, grace - (time.monotonic() - t0)))
        if self.http is not None:
            await self.http.close()
            self.http = None
        await self.dataplane.close()
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        await self.metrics.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._frozen:  # a process that goes on (tests, an embedding application) can free the models
            gc.unfreeze()
            self._frozen = False
        self._server = None
        log.info("stopped", extra={"drain_s": round(time.monotonic() - t0, 3)})


async def _listening(start: Awaitable[T], host: str, port: int, flag: str) -> T:
    """``start`` awaited; an OSError (the port in use, an address not on this machine) names
    the address and the flag that set it."""
    try:
        return await start
    except OSError as e:
        raise OSError(f"could not listen on {host}:{port} ({flag}; -1 turns it off): {e.strerror or e}") from e


def freeze_heap() -> int:
    """Collect once, then leave every object alive now out of later collections
    (:func:`gc.freeze`); returns how many were frozen.

    Loaded models and their compiled graphs are hundreds of thousands of objects that live as
    long as the server. A full collection walks all of them while holding the GIL (~0.1 s for
    one small model), and the first came seconds after the server began to answer: a stall of
    every request in flight. Objects made later (requests, graphs compiled on demand) are
    collected as before.

    >>> freeze_heap() > 0 and gc.get_freeze_count() > 0   # doctest: +SKIP
    True
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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
