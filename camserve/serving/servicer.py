"""``camserve.v1.CamService`` over gRPC: thin adapters from request messages to
:class:`~camserve.serving.dataplane.DataPlane` calls and from its results to response
messages (:mod:`camserve.serving.convert`). Nothing else happens here: errors are raised as
they come and answered by the :class:`~camserve.serving.status.CallStatus` wrapper (behind the
:class:`~camserve.serving.gate.ServiceGate`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from camserve import wire
from camserve.errors import kind_of
from camserve.proto import pb, pb_grpc
from camserve.serving import convert
from camserve.serving.budget import Outputs, ResponseTooLarge
from camserve.serving.dataplane import DataPlane
from camserve.serving.parsing import WithTensorData

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["CamService"].full_name

R = TypeVar("R")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant (None: none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def message_of(request: Any) -> Any:
    """The request message itself (:class:`~camserve.serving.parsing.WithTensorData` wraps it
    when the images' tensor data stayed in the request's bytes): its fields, read without the
    wrapper's look-up."""
    return request.message if type(request) is WithTensorData else request


def outputs_of(request: Any) -> Outputs:
    """What an ExplainRequest asks to get back besides labels, scores and boxes."""
    return Outputs(
        raw=request.return_raw,
        heatmap=request.return_heatmap,
        heatmap_png=request.return_heatmap_png,
        overlay=request.return_overlay,
    )


def targets_of(request: Any) -> list[list[Any]] | None:
    """An ExplainRequest's TargetLists as targets (class indices or names, or
    :mod:`camserve.targets` objects); None when it has none."""
    if not request.targets:
        return None
    return [[wire.target_from_proto(t) for t in tl.targets] for tl in request.targets]


async def explain_answer(
    plane: DataPlane, result: Any, outputs: Outputs, request_id: str = "", *, serialized: bool = False
) -> Any:
    """The ExplainResponse of a data-plane explain result with the ``outputs`` asked for (gRPC
    and HTTP alike; ``serialized``: as bytes, :func:`convert.serialized_explain_response`): maps are
    bytes (cheap, built on the event loop); PNG overlays and heatmap PNGs are encoding work
    (built in the data plane's pool)."""
    build = functools.partial(
        convert.serialized_explain_response if serialized else convert.explain_response,
        result,
        raw=outputs.raw,
        heatmap=outputs.heatmap,
        heatmap_png=outputs.heatmap_png,
        overlay=outputs.overlay,
        request_id=request_id,
    )
    return await plane.in_pool(build, inline=not (outputs.overlay or outputs.heatmap_png))


def for_request(exc: Exception, request_id: str) -> Exception:
    """``exc`` with ``request '<id>': `` before its message (same kind), so that a stream's
    error names the request that failed; bugs stay as they are (INTERNAL)."""
    kind = kind_of(exc)
    if not request_id or kind is None:
        return exc
    tagged = kind(f"request {request_id!r}: {exc.args[0] if exc.args else exc}")
    tagged.__cause__ = exc
    return tagged


class StreamCounters:
    """ExplainStream book-keeping across all streams: ``unsent`` answers computed and not yet
    sent (at most ``stream_inflight`` per stream), ``handling`` requests read and not yet
    answered."""

    def __init__(self) -> None:
        self.unsent = 0
        self.handling = 0


async def completion_order(
    requests: AsyncIterator[Any],
    handle: Callable[[Any], Awaitable[R]],
    inflight: int,
    counters: StreamCounters | None = None,
) -> AsyncIterator[R]:
    """Handle ``requests`` concurrently and yield the answers as they complete; the first
    error (tagged with its request's ``request_id``) ends the stream.

    Backpressure: a request holds one of ``inflight`` slots from the moment it is read until
    its answer is *sent* (the consumer asks for the next answer after writing this one), so a
    client that does not read makes the server stop reading its requests: at most ``inflight``
    answers wait, computed, in a bounded queue."""
    counters = counters or StreamCounters()
    done = object()
    out: asyncio.Queue[Any] = asyncio.Queue(maxsize=inflight + 2)  # answers (one per slot), an error, the end
    slots = asyncio.Semaphore(inflight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(req: Any) -> None:
        counters.handling += 1
        try:
            item: Any = await handle(req)
        except Exception as e:  # noqa: BLE001 - handed to the consumer below
            item = for_request(e, req.request_id)
        finally:
            counters.handling -= 1
        counters.unsent += 1
        await out.put(item)  # never waits: the slots bound the answers

    async def reader() -> None:
        try:
            async for req in requests:
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
                counters.unsent -= 1
                raise item
            try:
                yield item  # resumed once the answer is sent (or never, when the call ends)
            finally:
                counters.unsent -= 1
            slots.release()
    finally:
        read.cancel()
        for t in list(tasks):
            t.cancel()
        while not out.empty():  # answers computed for a call that ended
            if out.get_nowait() is not done:
                counters.unsent -= 1


class CamServicer(pb_grpc.CamServiceServicer):
    """The RPCs of ``camserve.v1.CamService`` over one :class:`DataPlane`."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.streams = StreamCounters()

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        images, request = request.images, message_of(request)
        m = request.model
        result = await self.plane.predict(m.name, m.version, images, top_k=request.top_k, deadline=deadline_of(context))
        return convert.predict_response(result, request.top_k)

    async def Explain(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._explain(request, context)

    async def ExplainStream(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """Requests are processed concurrently (``stream_inflight`` at a time, batched with
        everything else); answers come in completion order with their request_id."""
        handle = lambda req: self._explain(req, context)
        inflight = self.plane.config.stream_inflight
        async for response in completion_order(request_iterator, handle, inflight, self.streams):
            yield response

    async def _explain(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        images, request = request.images, message_of(request)
        plane, m = self.plane, request.model
        outputs = outputs_of(request)
        result = await plane.explain(
            m.name,
            m.version,
            images,
            layer=request.layer,
            methods=request.methods,
            targets=targets_of(request),
            top_k=request.top_k,
            outputs=outputs,
            deadline=deadline_of(context),
            layers=request.layers,
            aug_smooth=request.aug_smooth,
            eigen_smooth=request.eigen_smooth,
        )
        large = result.answer_bytes >= convert.BYTES_ANSWER_FROM
        response = await explain_answer(plane, result, outputs, request.request_id, serialized=large)
        return self._checked(response, result.answer_bytes)

    async def DenseScores(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        image = request.image if request.HasField("image") else None
        request = message_of(request)
        m = request.model
        result = await self.plane.dense_scores(
            m.name,
            m.version,
            image,
            stride=request.stride,
            scales=request.scales,
            mode=request.mode,
            deadline=deadline_of(context),
            detection=wire.detection_options(request),
        )
        cells = sum(level.scores.size + level.boxes.size for level in result.result)
        large = cells * 4 >= convert.BYTES_ANSWER_FROM
        build = convert.serialized_dense_response if large else convert.dense_response
        response = await self.plane.in_pool(build, result, inline=cells <= 1 << 16)
        return self._checked(response, result.answer_bytes)

    def _checked(self, response: Any, estimate: int) -> Any:
        """``response`` (a message or its bytes), or RESOURCE_EXHAUSTED (counted as such) when
        it is larger than the server sends. The data plane refused, before compute, any request
        whose answer's upper estimate exceeds the limit; this is the backstop, measured only
        when the estimate is within a factor 2 of the limit (``ByteSize`` encodes the whole
        message)."""
        limit = self.plane.config.max_message_bytes
        if 0 < estimate <= limit // 2:
            return response
        size = len(response) if isinstance(response, bytes) else response.ByteSize()
        if size > limit:
            raise ResponseTooLarge(
                f"the answer is {size} bytes, more than the largest message the server sends "
                f"(max_message_mb={limit / 2**20:g}: {limit} bytes); ask for fewer maps, overlays or images per request"
            )
        return response

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ListModelsResponse(models=[convert.model_info(d) for d in self.plane.list_models()])

    async def GetModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.GetModelResponse(
            model=convert.model_info(self.plane.get_model(request.model.name, request.model.version))
        )
