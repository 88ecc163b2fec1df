"""Python client of the camserve gRPC service, sync (:class:`Client`) and asyncio
(:class:`AsyncClient`). It does not import TensorFlow: explanations come back as
:class:`~camserve.explanation.Explanation` tuples of numpy arrays.

Images may be numpy arrays (uint8 pixels of any size, or float32 preprocessed inputs of the
model's size), file paths or encoded bytes. Several replicas can be one target,
``"ipv4:127.0.0.1:8500,127.0.0.1:8501"`` or ``"dns:///camserve-headless:8500"``, balanced
round-robin. Calls that fail with UNAVAILABLE (a replica restarting or draining) are retried by
gRPC itself, on the next replica, within the call's deadline (see :func:`service_config`).

The request and response messages are converted by :mod:`camserve.wire`, the same code the
server uses. What comes back: :class:`PredictResult`, Explanations, :class:`DenseReply`. The
options of the explanation calls are :class:`ExplainOptions` (keyword arguments, the same for
every explain method of both clients), those of ``dense`` :class:`DenseOptions`.

>>> c = Client("localhost:8500")                                        # doctest: +SKIP
>>> c.predict(images, model="shapes_gap", top_k=3).top[0]               # doctest: +SKIP
[(3, 'star', 0.91), (0, 'circle', 0.05), (1, 'square', 0.02)]
>>> c.explain(images, model="shapes_gap", methods=["gradcam"])[0][0].box  # doctest: +SKIP
(12, 8, 40, 37)
>>> c.explain(images, model="shapes_gap", heatmap_size="image")[0][0].box  # doctest: +SKIP
(75, 30, 250, 139)
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, Unpack

import grpc

from camserve import wire
from camserve.client import messages
from camserve.client.channel import (
    MAX_ATTEMPTS,
    MIN_BACKOFF,
    RETRYABLE,
    SERVICE,
    channel_args,
    credentials,
    service_config,
)
from camserve.client.messages import *  # noqa: F403 (re-exported: messages.__all__)
from camserve.client.messages import (
    DenseOptions,
    DenseReply,
    ExplainCall,
    ExplainOptions,
    PredictResult,
    dense_request,
    dense_result,
    model_dict,
    predict_request,
    predict_result,
)
from camserve.explanation import Explanation
from camserve.proto import pb, pb_grpc

__all__ = ["MAX_ATTEMPTS", "MIN_BACKOFF", "RETRYABLE", "SERVICE", "AsyncClient", "Client", "service_config"]
__all__ += messages.__all__


def __getattr__(name: str) -> Any:
    if name == "DenseResult":
        warnings.warn(
            "camserve.client.DenseResult is now camserve.client.DenseReply "
            "(camserve.dense.DenseResult is the in-process result)",
            DeprecationWarning,
            stacklevel=2,
        )
        return DenseReply
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Base:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 60.0,
        retries: int = 4,
        backoff: float = 0.05,
        max_message_mb: float = 64.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._creds = credentials(tls, root_certificates)
        self._args = channel_args(max_message_mb, retries, backoff, options)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class Client(_Base):
    """Blocking client.

    ``target``: ``host:port`` or a gRPC target naming several replicas (round-robin).
    ``token``: bearer token. ``tls`` / ``root_certificates``: TLS (PEM roots; None uses the
    system's). ``timeout``: default per-call deadline in seconds, retries included.
    ``retries``: how many times a call answered UNAVAILABLE is tried again, on the next
    replica, inside the deadline (default 4; gRPC allows at most 4: larger values act as 4;
    0: never). ``backoff``: seconds; retry ``n`` waits about ``backoff * 2 ** (n - 1)`` (at
    least 10 ms, see :data:`MIN_BACKOFF`). Both go into gRPC's retry policy
    (:func:`service_config`), so the retries happen inside gRPC, not in this class; a call
    raises the last attempt's status, or DEADLINE_EXCEEDED when the deadline ends a wait
    between attempts. ``max_message_mb``: largest message either way. ``options``: extra gRPC
    channel arguments.

    :meth:`explain_many` (the ExplainStream RPC) is retried too, but gRPC retries a stream
    only until its first response arrives; a stream that fails later raises.

    >>> with Client("localhost:8500") as c:                      # doctest: +SKIP
    ...     print([m["name"] for m in c.models()])
    ['shapes_fc', 'shapes_gap']
    """

    def __init__(self, target: str, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, token, **kwargs)
        if self._creds is None:
            self.channel = grpc.insecure_channel(target, options=self._args)
        else:
            self.channel = grpc.secure_channel(target, self._creds, options=self._args)
        self.stub = pb_grpc.CamServiceStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Call a unary RPC of the service by name; ``timeout`` (default: the client's) bounds
        every attempt together. Raises :class:`grpc.RpcError` with the last attempt's status."""
        return getattr(self.stub, method)(request, timeout=self._timeout(timeout), metadata=self._metadata)

    def models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every model of the server (available or not) as dicts."""
        return [model_dict(m) for m in self.call("ListModels", pb.ListModelsRequest(), timeout).models]

    def model(self, name: str, version: int = 0, timeout: float | None = None) -> dict[str, Any]:
        request = pb.GetModelRequest(model=wire.model_spec(name, version))
        return model_dict(self.call("GetModel", request, timeout).model)

    def predict(
        self, images: Any, model: str, top_k: int = 0, version: int = 0, timeout: float | None = None
    ) -> PredictResult:
        """Class scores (N, classes) and the ``top_k`` best classes per image."""
        return predict_result(self.call("Predict", predict_request(images, model, version, top_k), timeout))

    def explain(self, images: Any, model: str, **options: Unpack[ExplainOptions]) -> list[list[Explanation]]:
        """Per image, one Explanation per (target, method), targets outer, like
        :meth:`camserve.Explainer.explain`; ``options``: :class:`ExplainOptions` (methods,
        targets, top_k, layer, version, raw, heatmap, heatmap_size, timeout)."""
        call = ExplainCall(images, model, options)
        return call.result(self.call("Explain", call.request, call.timeout))

    def explain_with_overlays(
        self, images: Any, model: str, **options: Unpack[ExplainOptions]
    ) -> list[list[tuple[Explanation, bytes]]]:
        """Like :meth:`explain`, with the server-made overlay PNG next to each Explanation."""
        call = ExplainCall(images, model, options, overlay=True)
        return call.result(self.call("Explain", call.request, call.timeout))

    def explain_many(
        self,
        images: Iterable[Any],
        model: str,
        *,
        overlay: bool = False,
        chunk: int = 8,
        **options: Unpack[ExplainOptions],
    ) -> Iterator[Any]:
        """Bulk explanations over one ExplainStream, ``chunk`` images per request: yields per
        image (in input order) what :meth:`explain` (or :meth:`explain_with_overlays` when
        ``overlay``) gives for it. ``options``: :class:`ExplainOptions`, with ``targets``
        None, one target for all, or one per image; ``timeout`` bounds the whole stream.
        UNAVAILABLE is retried only before the first response arrives (gRPC's rule for
        streams)."""
        items = list(images)
        targets = options.get("targets")
        per_image = targets if isinstance(targets, (list, tuple)) and len(targets) == len(items) else None
        calls: dict[str, ExplainCall] = {}

        def make(start: int) -> ExplainCall:
            part = items[start : start + chunk]
            opts = options.copy()
            if per_image is not None:
                opts["targets"] = per_image[start : start + len(part)]
            call = calls[str(start)] = ExplainCall(part, model, opts, overlay=overlay, request_id=str(start))
            return call

        # The first request is built here, so that bad options raise in the caller; the others
        # as gRPC reads them (only what is in flight is held as messages).
        first = make(0) if items else None

        def requests() -> Iterator[pb.ExplainRequest]:
            if first is not None:
                yield first.request
            for start in range(chunk, len(items), chunk):
                yield make(start).request

        results: dict[int, list[Any]] = {}
        stream = self.stub.ExplainStream(
            requests(), timeout=self._timeout(options.get("timeout")), metadata=self._metadata
        )
        next_start = 0
        for resp in stream:
            results[int(resp.request_id)] = calls.pop(resp.request_id).result(resp)
            while next_start in results:
                part = results.pop(next_start)
                yield from part
                next_start += len(part)

    def dense(self, image: Any, model: str, **options: Unpack[DenseOptions]) -> DenseReply:
        """Dense sliding-window scores of one image (see :func:`camserve.dense.dense_scores`);
        ``options``: :class:`DenseOptions` (stride, scales, mode, version, timeout)."""
        return dense_result(self.call("DenseScores", dense_request(image, model, **options), options.get("timeout")))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The health status name of ``service`` ("" = the whole server, or a model name).
        Not retried."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self._metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client` (same arguments, same retry policy, awaitable
    methods; :meth:`explain_stream` is the raw ExplainStream).

    >>> async with AsyncClient("localhost:8500") as c:              # doctest: +SKIP
    ...     result = await c.predict(images, model="shapes_gap")
    """

    def __init__(self, target: str, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, token, **kwargs)
        if self._creds is None:
            self.channel = grpc.aio.insecure_channel(target, options=self._args)
        else:
            self.channel = grpc.aio.secure_channel(target, self._creds, options=self._args)
        self.stub = pb_grpc.CamServiceStub(self.channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Call a unary RPC of the service by name (see :meth:`Client.call`)."""
        return await getattr(self.stub, method)(request, timeout=self._timeout(timeout), metadata=self._metadata)

    async def models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return [model_dict(m) for m in (await self.call("ListModels", pb.ListModelsRequest(), timeout)).models]

    async def model(self, name: str, version: int = 0, timeout: float | None = None) -> dict[str, Any]:
        request = pb.GetModelRequest(model=wire.model_spec(name, version))
        return model_dict((await self.call("GetModel", request, timeout)).model)

    async def predict(
        self, images: Any, model: str, top_k: int = 0, version: int = 0, timeout: float | None = None
    ) -> PredictResult:
        return predict_result(await self.call("Predict", predict_request(images, model, version, top_k), timeout))

    async def explain(self, images: Any, model: str, **options: Unpack[ExplainOptions]) -> list[list[Explanation]]:
        call = ExplainCall(images, model, options)
        return call.result(await self.call("Explain", call.request, call.timeout))

    async def explain_with_overlays(
        self, images: Any, model: str, **options: Unpack[ExplainOptions]
    ) -> list[list[tuple[Explanation, bytes]]]:
        call = ExplainCall(images, model, options, overlay=True)
        return call.result(await self.call("Explain", call.request, call.timeout))

    async def explain_stream(
        self, requests: AsyncIterator[pb.ExplainRequest] | Iterable[pb.ExplainRequest]
    ) -> AsyncIterator[pb.ExplainResponse]:
        """Raw ExplainStream: responses (with their request_id) in completion order, within
        the client's ``timeout``. UNAVAILABLE is retried only before the first response
        arrives (gRPC's rule for streams)."""
        async for resp in self.stub.ExplainStream(requests, metadata=self._metadata, timeout=self.timeout):
            yield resp

    async def dense(self, image: Any, model: str, **options: Unpack[DenseOptions]) -> DenseReply:
        request = dense_request(image, model, **options)
        return dense_result(await self.call("DenseScores", request, options.get("timeout")))

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self._metadata
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
