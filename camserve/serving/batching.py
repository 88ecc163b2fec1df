"""A dynamic batcher for asyncio servers; it knows nothing about models or CAMs.

Requests submitted under the same *key* (for the server: model version, operation, input
shape and the parameters that change the computation) are merged into one call of a
``compute(key, items)`` function, which runs in a worker thread, off the event loop. A batch
closes when it holds ``max_batch_size`` units of work or when its oldest request has waited
``batch_timeout`` seconds; while every worker is busy, requests keep accumulating, so the next
batch is as large as the load allows (the Triton "dynamic batcher" behaviour).

The queue is bounded: :meth:`Batcher.submit` raises :class:`QueueFull` at once when
``max_queued`` requests are waiting. A request whose deadline has passed is dropped before
compute (:class:`DeadlineExpired`); a cancelled request leaves the queue at once. Padding
to fixed batch sizes is the compute function's business (:class:`camserve.Explainer`
buckets its batches itself).

>>> async def demo():
...     b = Batcher(lambda key, items: [x * 10 for x in items], max_batch_size=8, batch_timeout=0.01)
...     await b.start()
...     out = await asyncio.gather(*(b.submit("k", i) for i in range(3)))
...     await b.close()
...     return out
>>> asyncio.run(demo())
[0, 10, 20]
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from camserve.errors import CamserveError, DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger("camserve.serving.batching")

#: The batch key type (anything hashable) and the item type of a batcher.
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: compute(key, items) -> one result per item (an Exception instance fails only that item).
ComputeFn = Callable[[K, list[T]], Sequence[Any]]


class BatcherError(CamserveError):
    """Base of the batcher's own errors."""


class QueueFull(BatcherError, ResourceExhausted):
    """The bounded queue is full (a gRPC RESOURCE_EXHAUSTED)."""


class DeadlineExpired(BatcherError, DeadlineExceeded):
    """The request's deadline passed before it could be computed (DEADLINE_EXCEEDED)."""


class BatcherClosed(BatcherError, Unavailable):
    """The batcher is draining or closed and accepts no new work (UNAVAILABLE)."""


@dataclasses.dataclass
class BatcherMetrics(Generic[K]):
    """Optional hooks, called on the event loop thread.

    ``queue_depth(n)``: requests waiting, after every change. ``batch(key, size)``: a batch
    of ``size`` units went to compute. ``queue_time(key, seconds)``: per request, from submit
    to the start of its batch's compute. ``dropped(key, reason)``: "deadline" or "cancelled".
    """

    queue_depth: Callable[[int], None] | None = None
    batch: Callable[[K, int], None] | None = None
    queue_time: Callable[[K, float], None] | None = None
    dropped: Callable[[K, str], None] | None = None


@dataclasses.dataclass(eq=False)
class _Entry(Generic[K, T]):
    key: K
    item: T
    size: int
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future
    enqueued: float


class Batcher(Generic[K, T]):
    """Merge concurrent requests with equal keys into batched ``compute`` calls.

    ``max_batch_size``: units of work per batch (a request of ``size`` n counts n; a single
    request larger than the limit runs alone). ``batch_timeout``: seconds the oldest request
    of a forming batch may wait for company. ``max_queued``: waiting requests before
    :class:`QueueFull`. ``workers``: batches computed concurrently (threads).
    """

    def __init__(
        self,
        compute: ComputeFn[K, T],
        *,
        max_batch_size: int = 32,
        batch_timeout: float = 0.005,
        max_queued: int = 1024,
        workers: int = 1,
        metrics: BatcherMetrics[K] | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queued < 1 or workers < 1 or batch_timeout < 0:
            raise ValueError(
                "need max_batch_size >= 1, max_queued >= 1, workers >= 1, batch_timeout >= 0; got "
                f"{max_batch_size}, {max_queued}, {workers}, {batch_timeout}"
            )
        self.compute = compute
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.max_queued = max_queued
        self.workers = workers
        self.metrics: BatcherMetrics[K] = metrics or BatcherMetrics()
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="camserve-batch")
        # key -> waiting entries, oldest first; dict order = order in which keys became non-empty.
        self._pending: dict[K, collections.deque[_Entry[K, T]]] = {}
        self._claimed: set[K] = set()
        self._depth = 0
        self._running = 0  # batches in compute
        self._cond: asyncio.Condition | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    # ------------------------------------------------------------ public

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in compute)."""
        return self._depth

    @property
    def busy(self) -> bool:
        """True while anything waits or computes."""
        return self._depth > 0 or self._running > 0

    async def start(self) -> None:
        """Start the worker coroutines on the running loop."""
        if self._tasks:
            return
        self._cond = asyncio.Condition()
        self._tasks = [asyncio.create_task(self._worker(), name=f"batcher-worker-{i}") for i in range(self.workers)]

    async def submit(self, key: K, item: T, *, size: int = 1, deadline: float | None = None) -> Any:
        """Queue ``item`` under ``key`` and wait for its result.

        ``deadline`` is a ``time.monotonic()`` instant. Raises QueueFull, DeadlineExpired,
        BatcherClosed, or what compute raised / returned for this item.
        """
        if self._cond is None:
            await self.start()
        cond = self._cond
        assert cond is not None
        if self._closing:
            raise BatcherClosed("the server is shutting down and accepts no new requests; retry on another replica")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._drop_metric(key, "deadline")
            raise DeadlineExpired("the request's deadline had already passed when it arrived")
        if self._depth >= self.max_queued:
            raise QueueFull(
                f"the request queue is full ({self._depth} of max_queued={self.max_queued} waiting); retry later"
            )
        loop = asyncio.get_running_loop()
        entry = _Entry(key, item, max(1, int(size)), deadline, loop.create_future(), now)
        self._pending.setdefault(key, collections.deque()).append(entry)
        self._set_depth(self._depth + 1)
        entry.future.add_done_callback(functools.partial(self._on_done, entry))
        async with cond:
            cond.notify_all()
        return await entry.future

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; with ``drain`` finish what is queued and running first."""
        self._closing = True
        if drain:
            t0 = time.monotonic()
            while self.busy and (timeout is None or time.monotonic() - t0 < timeout):
                await asyncio.sleep(0.005)
        for entries in list(self._pending.values()):
            for e in list(entries):
                if not e.future.done():
                    e.future.set_exception(BatcherClosed("the server shut down before this request was computed"))
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # ------------------------------------------------------------ internals

    def _set_depth(self, n: int) -> None:
        self._depth = n
        if self.metrics.queue_depth:
            self.metrics.queue_depth(n)

    def _drop_metric(self, key: K, reason: str) -> None:
        if self.metrics.dropped:
            self.metrics.dropped(key, reason)

    def _remove(self, entry: _Entry[K, T]) -> bool:
        q = self._pending.get(entry.key)
        if q is None:
            return False
        try:
            q.remove(entry)
        except ValueError:
            return False
        if not q:
            del self._pending[entry.key]
        self._set_depth(self._depth - 1)
        return True

    def _on_done(self, entry: _Entry[K, T], _future: asyncio.Future | None = None) -> None:
        # A cancelled (or externally failed) request leaves the queue at once.
        if self._remove(entry) and entry.future.cancelled():
            self._drop_metric(entry.key, "cancelled")

    def _units(self, key: K) -> int:
        return sum(e.size for e in self._pending.get(key, ()))

    def _next_key(self) -> K | None:
        best, best_t = None, None
        for key, q in self._pending.items():
            if key in self._claimed or not q:
                continue
            if best_t is None or q[0].enqueued < best_t:
                best, best_t = key, q[0].enqueued
        return best

    def _take(self, key: K) -> list[_Entry[K, T]]:
        q = self._pending.get(key)
        batch: list[_Entry[K, T]] = []
        units = 0
        now = time.monotonic()
        while q:
            e = q[0]
            if batch and units + e.size > self.max_batch_size:
                break
            q.popleft()
            self._set_depth(self._depth - 1)
            if e.future.done():
                continue
            if e.deadline is not None and e.deadline <= now:
                self._drop_metric(key, "deadline")
                e.future.set_exception(DeadlineExpired("the request's deadline passed while it waited in the queue"))
                continue
            batch.append(e)
            units += e.size
        if q is not None and not q:
            self._pending.pop(key, None)
        return batch

    async def _worker(self) -> None:
        assert self._cond is not None
        loop = asyncio.get_running_loop()
        while True:
            async with self._cond:
                key = self._next_key()
                while key is None:
                    await self._cond.wait()
                    key = self._next_key()
                self._claimed.add(key)
                try:
                    # Wait for company until the batch is full or the oldest request's time is up.
                    while True:
                        q = self._pending.get(key)
                        if not q:
                            break
                        if self._units(key) >= self.max_batch_size or self._closing:
                            break
                        remaining = q[0].enqueued + self.batch_timeout - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            await asyncio.wait_for(self._cond.wait(), remaining)
                        except TimeoutError:
                            pass
                    batch = self._take(key)
                finally:
                    self._claimed.discard(key)
                    self._cond.notify_all()
            if not batch:
                continue
            await self._run(loop, key, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, key: K, batch: list[_Entry[K, T]]) -> None:
        start = time.monotonic()
        units = sum(e.size for e in batch)
        if self.metrics.batch:
            self.metrics.batch(key, units)
        if self.metrics.queue_time:
            for e in batch:
                self.metrics.queue_time(key, start - e.enqueued)
        self._running += 1
        try:
            results = await loop.run_in_executor(self._executor, self.compute, key, [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"compute returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        finally:
            self._running -= 1
        for e, r in zip(batch, results):
            if e.future.done():
                continue
            if isinstance(r, BaseException):
                e.future.set_exception(r)
            else:
                e.future.set_result(r)
