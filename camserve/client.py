"""Python client of the camserve gRPC service, sync (:class:`Client`) and asyncio
(:class:`AsyncClient`). TensorFlow is imported only when explanations arrive (the
:class:`~camserve.explanation.Explanation` type lives in :mod:`camserve.explanation`).

Images may be numpy arrays (uint8 pixels of any size, or float32 preprocessed inputs of the
model's size), file paths or encoded bytes; explanations come back as the library's own
:class:`camserve.explanation.Explanation` tuples. Calls that fail with UNAVAILABLE (a replica
restarting or draining) are retried with backoff; several replicas can be one target,
``"ipv4:127.0.0.1:8500,127.0.0.1:8501"`` or ``"dns:///camserve-headless:8500"``, balanced
round-robin.

>>> c = Client("localhost:8500")                                        # doctest: +SKIP
>>> c.predict(images, model="shapes_gap", top_k=3).top[0]               # doctest: +SKIP
[(3, 'star', 0.91), (0, 'circle', 0.05), (1, 'square', 0.02)]
>>> c.explain(images, model="shapes_gap", methods=["gradcam"])[0][0].box  # doctest: +SKIP
(12, 8, 40, 37)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import grpc
import numpy as np
from google.protobuf import json_format

from camserve import wire
from camserve.proto import pb, pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class PredictResult(NamedTuple):
    """``scores`` (N, classes) float32; ``top`` per image the best (index, label, score)."""

    scores: np.ndarray
    top: list[list[tuple[int, str, float]]]
    model: tuple[str, int]


@dataclasses.dataclass
class ScaleScores:
    """One pyramid level: ``scores`` (gh, gw, classes), ``boxes`` (gh, gw, 4) in input pixels."""

    scale: float
    scores: np.ndarray
    boxes: np.ndarray


@dataclasses.dataclass
class DenseResult:
    """What DenseScores answers: one :class:`ScaleScores` per scale, the stride used, and
    whether the FCN pass equals the classifier on every crop."""

    scales: list[ScaleScores]
    stride: int
    exact: bool
    class_names: list[str]
    model: tuple[str, int]
    strides: tuple[int, int] = (0, 0)
    window: tuple[int, int] = (0, 0)
    mode: str = "fcn"

    def __iter__(self):
        return iter(self.scales)

    def __getitem__(self, i: int) -> ScaleScores:
        return self.scales[i]

    def __len__(self) -> int:
        return len(self.scales)


# ---------------------------------------------------------------------------- requests / responses


def _spec(model: str, version: int) -> pb.ModelSpec:
    return pb.ModelSpec(name=model, version=int(version or 0))


def predict_request(images: Any, model: str, version: int = 0, top_k: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(model=_spec(model, version), images=wire.images_to_proto(images), top_k=top_k)


def explain_request(
    images: Any,
    model: str,
    methods: Sequence[str] = ("gradcam",),
    targets: Any = None,
    top_k: int = 1,
    layer: str | None = None,
    version: int = 0,
    raw: bool = True,
    heatmap: bool = True,
    overlay: bool = False,
    request_id: str = "",
) -> pb.ExplainRequest:
    msgs = wire.images_to_proto(images)
    if isinstance(methods, str):
        methods = [methods]
    return pb.ExplainRequest(
        model=_spec(model, version),
        images=msgs,
        methods=list(methods),
        targets=wire.targets_to_proto(targets, len(msgs)),
        top_k=top_k,
        layer=layer or "",
        return_raw=raw,
        return_heatmap=heatmap,
        return_overlay=overlay,
        request_id=request_id,
    )


def dense_request(
    image: Any,
    model: str,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    mode: str = "fcn",
    version: int = 0,
) -> pb.DenseScoresRequest:
    (msg,) = wire.images_to_proto([image] if isinstance(image, np.ndarray) and image.ndim == 3 else image)
    return pb.DenseScoresRequest(
        model=_spec(model, version), image=msg, stride=int(stride or 0), scales=list(scales), mode=mode
    )


def predict_result(resp: pb.PredictResponse) -> PredictResult:
    return PredictResult(
        scores=wire.predictions_from_proto(resp),
        top=[[(c.index, c.label, c.score) for c in p.top] for p in resp.predictions],
        model=(resp.model.name, int(resp.model.version)),
    )


def explain_result(resp: pb.ExplainResponse, overlays: bool = False) -> list[list[Any]]:
    """Per image, the Explanations (or (Explanation, overlay PNG bytes) pairs)."""
    out = []
    for img in resp.images:
        if overlays:
            out.append([(wire.explanation_from_proto(e), e.overlay_png) for e in img.explanations])
        else:
            out.append([wire.explanation_from_proto(e) for e in img.explanations])
    return out


def dense_result(resp: pb.DenseScoresResponse) -> DenseResult:
    return DenseResult(
        scales=[
            ScaleScores(s.scale, wire.floatmap_to_array(s.scores), wire.floatmap_to_array(s.boxes)) for s in resp.scales
        ],
        stride=int(resp.stride),
        exact=bool(resp.exact),
        class_names=list(resp.class_names),
        model=(resp.model.name, int(resp.model.version)),
        strides=tuple(resp.strides) or (resp.stride, resp.stride),
        window=tuple(resp.window),
        mode=resp.mode,
    )


def model_dict(info: pb.ModelInfo) -> dict[str, Any]:
    """A ModelInfo as a plain dict with every field present."""
    return json_format.MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


# ---------------------------------------------------------------------------- channels


def _channel_args(target: str, max_message_mb: float, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    size = int(max_message_mb * 1024 * 1024)
    service_config = {"loadBalancingConfig": [{"round_robin": {}}]}
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 0),  # retries are ours (below), bounded by the call's deadline
        *options,
    ]


def _credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    if not tls and root_certificates is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


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
        self._creds = _credentials(tls, root_certificates)
        self._args = _channel_args(target, max_message_mb, options)

    def _delay(self, attempt: int) -> float:
        return self.backoff * (2**attempt) * (0.5 + random.random())

    def _budget(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t


class Client(_Base):
    """Blocking client. ``target``: ``host:port`` or a gRPC target naming several replicas
    (round-robin). ``token``: bearer token. ``tls`` / ``root_certificates``: TLS (PEM roots;
    None uses the system's). ``timeout``: default per-call deadline in seconds (retries
    included). ``retries``: extra attempts on UNAVAILABLE.

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
        """Call a unary RPC by name with retries on UNAVAILABLE inside the deadline."""
        fn = getattr(self.stub, method)
        deadline = self._budget(timeout)
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return fn(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = self._delay(attempt)
                if e.code() not in RETRYABLE or attempt >= self.retries:
                    raise
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                attempt += 1

    def models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every model of the server (available or not) as dicts."""
        return [model_dict(m) for m in self.call("ListModels", pb.ListModelsRequest(), timeout).models]

    def model(self, name: str, version: int = 0, timeout: float | None = None) -> dict[str, Any]:
        return model_dict(self.call("GetModel", pb.GetModelRequest(model=_spec(name, version)), timeout).model)

    def predict(
        self, images: Any, model: str, top_k: int = 0, version: int = 0, timeout: float | None = None
    ) -> PredictResult:
        """Class scores (N, classes) and the ``top_k`` best classes per image."""
        return predict_result(self.call("Predict", predict_request(images, model, version, top_k), timeout))

    def explain(
        self,
        images: Any,
        model: str,
        methods: Sequence[str] = ("gradcam",),
        targets: Any = None,
        top_k: int = 1,
        layer: str | None = None,
        version: int = 0,
        raw: bool = True,
        heatmap: bool = True,
        timeout: float | None = None,
    ) -> list[list[Any]]:
        """Per image, one Explanation per (target, method), targets outer, like
        :meth:`camserve.Explainer.explain`. ``raw`` / ``heatmap``: False saves bandwidth
        (the field is then None)."""
        req = explain_request(images, model, methods, targets, top_k, layer, version, raw, heatmap)
        return explain_result(self.call("Explain", req, timeout))

    def explain_with_overlays(
        self,
        images: Any,
        model: str,
        methods: Sequence[str] = ("gradcam",),
        targets: Any = None,
        top_k: int = 1,
        layer: str | None = None,
        version: int = 0,
        raw: bool = True,
        heatmap: bool = True,
        timeout: float | None = None,
    ) -> list[list[tuple[Any, bytes]]]:
        """Like :meth:`explain`, with the server-made overlay PNG next to each Explanation."""
        req = explain_request(images, model, methods, targets, top_k, layer, version, raw, heatmap, overlay=True)
        return explain_result(self.call("Explain", req, timeout), overlays=True)

    def explain_many(
        self,
        images: Iterable[Any],
        model: str,
        methods: Sequence[str] = ("gradcam",),
        targets: Any = None,
        top_k: int = 1,
        layer: str | None = None,
        version: int = 0,
        raw: bool = True,
        heatmap: bool = True,
        overlay: bool = False,
        chunk: int = 8,
        timeout: float | None = None,
    ) -> Iterator[list[Any]]:
        """Bulk explanations over one ExplainStream: yields per image (in input order) what
        :meth:`explain` (or :meth:`explain_with_overlays` when ``overlay``) gives for it.
        ``targets``: None, one target for all, or per image."""
        items = list(images)
        per_image = targets if isinstance(targets, (list, tuple)) and len(targets) == len(items) else None

        def requests() -> Iterator[pb.ExplainRequest]:
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                t = per_image[start : start + len(part)] if per_image is not None else targets
                yield explain_request(
                    part, model, methods, t, top_k, layer, version, raw, heatmap, overlay, request_id=str(start)
                )

        results: dict[int, list[list[Any]]] = {}
        deadline = self._budget(timeout)
        stream = self.stub.ExplainStream(
            requests(), timeout=None if deadline is None else deadline - time.monotonic(), metadata=self._metadata
        )
        next_start = 0
        for resp in stream:
            results[int(resp.request_id)] = explain_result(resp, overlays=overlay)
            while next_start in results:
                part = results.pop(next_start)
                yield from part
                next_start += len(part)

    def dense(
        self,
        image: Any,
        model: str,
        stride: int | None = None,
        scales: Sequence[float] = (1.0,),
        mode: str = "fcn",
        version: int = 0,
        timeout: float | None = None,
    ) -> DenseResult:
        """Dense sliding-window scores of one image (see :func:`camserve.dense.dense_scores`)."""
        return dense_result(
            self.call("DenseScores", dense_request(image, model, stride, scales, mode, version), timeout)
        )

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The health status name of ``service`` ("" = the whole server, or a model name)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self._metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client` (same arguments and methods, awaitable).

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
        fn = getattr(self.stub, method)
        deadline = self._budget(timeout)
        attempt = 0
        while True:
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                return await fn(request, timeout=remaining, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                delay = self._delay(attempt)
                if e.code() not in RETRYABLE or attempt >= self.retries:
                    raise
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)
                attempt += 1

    async def models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return [model_dict(m) for m in (await self.call("ListModels", pb.ListModelsRequest(), timeout)).models]

    async def model(self, name: str, version: int = 0, timeout: float | None = None) -> dict[str, Any]:
        return model_dict((await self.call("GetModel", pb.GetModelRequest(model=_spec(name, version)), timeout)).model)

    async def predict(
        self, images: Any, model: str, top_k: int = 0, version: int = 0, timeout: float | None = None
    ) -> PredictResult:
        return predict_result(await self.call("Predict", predict_request(images, model, version, top_k), timeout))

    async def explain(
        self,
        images: Any,
        model: str,
        methods: Sequence[str] = ("gradcam",),
        targets: Any = None,
        top_k: int = 1,
        layer: str | None = None,
        version: int = 0,
        raw: bool = True,
        heatmap: bool = True,
        timeout: float | None = None,
    ) -> list[list[Any]]:
        req = explain_request(images, model, methods, targets, top_k, layer, version, raw, heatmap)
        return explain_result(await self.call("Explain", req, timeout))

    async def explain_with_overlays(
        self,
        images: Any,
        model: str,
        methods: Sequence[str] = ("gradcam",),
        targets: Any = None,
        top_k: int = 1,
        layer: str | None = None,
        version: int = 0,
        raw: bool = True,
        heatmap: bool = True,
        timeout: float | None = None,
    ) -> list[list[tuple[Any, bytes]]]:
        req = explain_request(images, model, methods, targets, top_k, layer, version, raw, heatmap, overlay=True)
        return explain_result(await self.call("Explain", req, timeout), overlays=True)

    async def explain_stream(
        self, requests: AsyncIterator[pb.ExplainRequest] | Iterable[pb.ExplainRequest]
    ) -> AsyncIterator[pb.ExplainResponse]:
        """Raw ExplainStream: responses (with their request_id) in completion order."""
        async for resp in self.stub.ExplainStream(requests, metadata=self._metadata, timeout=self.timeout):
            yield resp

    async def dense(
        self,
        image: Any,
        model: str,
        stride: int | None = None,
        scales: Sequence[float] = (1.0,),
        mode: str = "fcn",
        version: int = 0,
        timeout: float | None = None,
    ) -> DenseResult:
        return dense_result(
            await self.call("DenseScores", dense_request(image, model, stride, scales, mode, version), timeout)
        )

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self._metadata
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
