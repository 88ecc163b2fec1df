"""A dynamic batcher for asyncio servers; it knows nothing about models or CAMs.

Requests submitted under the same *key* (for the server: model version, operation, input
shape and the parameters that change the computation) are merged into one call of a
``compute(key, items)`` function, which runs in a worker thread, off the event loop.

The policy is Triton's dynamic batcher: a request that finds the device idle (no batch in
compute) runs at once, alone or with whatever already waits; while a batch computes,
arrivals accumulate, and the next batch takes up to ``max_batch_size`` units of them as soon
as a worker is free and the device idle. With several workers, a free worker waits for
company while another batch computes: it starts when ``max_batch_size`` units wait, when the
oldest request has waited ``batch_timeout`` seconds, or when the device goes idle. So a lone
request never waits for ``batch_timeout``, and under load batches are as large as the load
allows. Given the ``batch_sizes`` compute runs without padding (the Explainer's buckets), a
batch that padding would grow by as much as or more than it leaves behind is cut to the size
below: of 17 waiting, 16 go now and one with the next batch, rather than 17 padded to 32; of 24,
16 and then 8 (padding to 32 would compute 8 images for nobody).

The queue is bounded: :meth:`Batcher.submit` raises :class:`QueueFull` at once when
``max_queued`` requests are waiting. A request whose deadline has passed is dropped before
compute (:class:`DeadlineExpired`); a cancelled request leaves the queue at once. Padding
to fixed batch sizes is the compute function's business (:class:`camserve.Explainer`
buckets its batches itself). Every request of a failed batch gets its own copy of the
error; :meth:`Batcher.close` resolves every request it does not compute.

Scheduling is event-driven, on the loop's thread: a submit or a finished batch looks for a
batch to start (no worker coroutines, no per-request tasks); the only timer is the one of a
free worker waiting for company.

>>> async def demo():
...     b = Batcher(lambda key, items: [x * 10 for x in items], max_batch_size=8, batch_timeout=0.01)
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
import copy
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

    ``queue_depth(n)``: requests waiting, after every change. ``batch(key, size, padded)``: a
    batch of ``size`` units went to compute, which runs it at ``padded`` units (the smallest of
    ``batch_sizes`` that holds it; ``size`` without them) where its compute pads batches (the
    hook knows which keys' do). ``queue_time(key, seconds)``: per request, from submit
    to the start of its batch's compute. ``dropped(key, reason)``: "deadline" or "cancelled".
    """

    queue_depth: Callable[[int], None] | None = None
    batch: Callable[[K, int, int], None] | None = None
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


class _Queue(Generic[K, T]):
    """The waiting entries of one key, oldest first, and their units of work."""

    __slots__ = ("entries", "units")

    def __init__(self) -> None:
        self.entries: collections.deque[_Entry[K, T]] = collections.deque()
        self.units = 0


def own_copy(exc: BaseException) -> BaseException:
    """A fresh exception of the same type and arguments (its own traceback and notes), so that
    requests that failed together do not share, and cannot rewrite, one object.

    >>> e = ValueError("bad")
    >>> c = own_copy(e)
    >>> c is not e and type(c) is ValueError and c.args == ("bad",)
    True
    """
    try:
        fresh = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied
        return exc
    if fresh is exc or type(fresh) is not type(exc):
        return exc
    fresh.__traceback__ = None
    fresh.__cause__ = exc.__cause__
    return fresh


def _as_failure(exc: BaseException) -> BaseException:
    """What the requests of a batch whose compute raised ``exc`` get."""
    if isinstance(exc, asyncio.CancelledError | concurrent.futures.CancelledError):
        return BatcherClosed("the server shut down before this request was computed")
    return exc


class Batcher(Generic[K, T]):
    """Merge concurrent requests with equal keys into batched ``compute`` calls.

    ``max_batch_size``: units of work per batch (a request of ``size`` n counts n; a single
    request larger than the limit runs alone). ``batch_timeout``: seconds a free worker waits
    for company while another batch computes. ``max_queued``: waiting requests before
    :class:`QueueFull`. ``workers``: batches computed concurrently (threads). ``batch_sizes``:
    the sizes compute runs without padding (see :meth:`batch_units`; None: any size).
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
        batch_sizes: Sequence[int] | None = None,
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
        self.batch_sizes = tuple(sorted(set(batch_sizes))) if batch_sizes else ()
        self.metrics: BatcherMetrics[K] = metrics or BatcherMetrics()
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="camserve-batch")
        # key -> waiting entries; dict order = order in which keys became non-empty.
        self._pending: dict[K, _Queue[K, T]] = {}
        self._depth = 0
        self._running: set[int] = set()  # ids of the batches in compute
        self._batches: dict[int, list[_Entry[K, T]]] = {}  # those batches' entries
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle: asyncio.Event | None = None  # while close() drains
        self._closing = False

    # ------------------------------------------------------------ public

    @property
    def depth(self) -> int:
        """Requests waiting (not yet in compute)."""
        return self._depth

    @property
    def running(self) -> int:
        """Batches in compute."""
        return len(self._running)

    @property
    def busy(self) -> bool:
        """True while anything waits or computes."""
        return self._depth > 0 or bool(self._running)

    async def start(self) -> None:
        """Bind the batcher to the running loop (``submit`` does it too when needed)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()

    async def submit(self, key: K, item: T, *, size: int = 1, deadline: float | None = None) -> Any:
        """Queue ``item`` under ``key`` and wait for its result.

        ``deadline`` is a ``time.monotonic()`` instant. Raises QueueFull, DeadlineExpired,
        BatcherClosed, or what compute raised / returned for this item.
        """
        if self._loop is None:
            await self.start()
        loop = self._loop
        assert loop is not None
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
        entry = _Entry(key, item, max(1, int(size)), deadline, loop.create_future(), now)
        q = self._pending.get(key)
        if q is None:
            q = self._pending[key] = _Queue()
        q.entries.append(entry)
        q.units += entry.size
        self._set_depth(self._depth + 1)
        self._dispatch()
        try:
            return await entry.future
        except asyncio.CancelledError:
            # A cancelled (or timed out) request leaves the queue at once.
            if self._remove(entry):
                self._drop_metric(key, "cancelled")
            raise

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; with ``drain`` compute what is queued and wait (at most
        ``timeout`` seconds) for it. Every request not computed by then fails with
        :class:`BatcherClosed`, also those of batches still in compute (their threads run on
        until the compute function returns)."""
        self._closing = True
        if self._loop is not None:
            self._dispatch()  # closing: what waits starts without waiting for company
        if drain and self.busy:
            self._idle = asyncio.Event()  # set by _dispatch once nothing waits or computes
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for q in list(self._pending.values()):
            for e in q.entries:
                if not e.future.done():
                    e.future.set_exception(BatcherClosed("the server shut down before this request was computed"))
        self._pending.clear()
        self._set_depth(0)
        for batch in self._batches.values():
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(BatcherClosed("the server shut down while this request was computed"))
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
            q.entries.remove(entry)
        except ValueError:
            return False
        q.units -= entry.size
        if not q.entries:
            del self._pending[entry.key]
        self._set_depth(self._depth - 1)
        self._dispatch()  # a waiting batch may be complete now (or the timer obsolete)
        return True

    def _ready(self, now: float) -> tuple[K | None, float | None]:
        """(the key whose batch starts now, None) or (None, when to look again)."""
        idle = not self._running or self._closing
        best: K | None = None
        best_t = 0.0
        wake: float | None = None
        for key, q in self._pending.items():
            head = q.entries[0].enqueued
            if idle or q.units >= self.max_batch_size or head + self.batch_timeout <= now:
                if best is None or head < best_t:
                    best, best_t = key, head
            elif wake is None or head + self.batch_timeout < wake:
                wake = head + self.batch_timeout
        return best, None if best is not None else wake

    def _dispatch(self) -> None:
        """Start every batch that should start now; arm the timer for the next one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending and len(self._running) < self.workers:
            now = time.monotonic()
            key, wake = self._ready(now)
            if key is None:
                if wake is not None and self._loop is not None:
                    self._timer = self._loop.call_later(max(0.0, wake - now), self._dispatch)
                break
            batch = self._take(key, now)
            if batch:
                self._launch(key, batch, now)
        if self._idle is not None and not self.busy:
            self._idle.set()

    def batch_units(self, waiting: int) -> int:
        """The units the next batch takes when ``waiting`` units wait: at most
        ``max_batch_size``; cut to the largest of ``batch_sizes`` below when padding up to the
        next one would add as many images as the cut leaves for the next batch, or more (on a
        tie the padded images would be computed for nobody; the cut ones are computed later).

        >>> b = Batcher(lambda key, items: items, batch_sizes=(1, 2, 4, 8, 16, 32))
        >>> [b.batch_units(n) for n in (3, 13, 16, 17, 20, 24, 40)]
        [2, 13, 16, 16, 16, 16, 32]
        """
        n = min(waiting, self.max_batch_size)
        below = [s for s in self.batch_sizes if s < n]
        above = [s for s in self.batch_sizes if s > n]
        if n in self.batch_sizes or not below or not above:
            return n
        return below[-1] if n - below[-1] <= above[0] - n else n

    def padded_size(self, units: int) -> int:
        """The smallest of ``batch_sizes`` that holds ``units`` (``units`` without them, or
        beyond the largest).

        >>> Batcher(lambda key, items: items, batch_sizes=(1, 2, 4, 8)).padded_size(5)
        8
        """
        return next((s for s in self.batch_sizes if s >= units), units)

    def _take(self, key: K, now: float) -> list[_Entry[K, T]]:
        q = self._pending[key]
        batch: list[_Entry[K, T]] = []
        units = taken = 0
        entries = q.entries
        limit = self.batch_units(q.units) if self.batch_sizes else self.max_batch_size
        while entries:
            e = entries[0]
            if batch and units + e.size > limit:
                break
            entries.popleft()
            taken += 1
            q.units -= e.size
            if e.future.done():
                continue
            if e.deadline is not None and e.deadline <= now:
                self._drop_metric(key, "deadline")
                e.future.set_exception(DeadlineExpired("the request's deadline passed while it waited in the queue"))
                continue
            batch.append(e)
            units += e.size
        if not entries:
            del self._pending[key]
        self._set_depth(self._depth - taken)
        return batch

    def _launch(self, key: K, batch: list[_Entry[K, T]], now: float) -> None:
        m = self.metrics
        if m.batch:
            size = sum(e.size for e in batch)
            m.batch(key, size, self.padded_size(size))
        if m.queue_time:
            for e in batch:
                m.queue_time(key, now - e.enqueued)
        token = id(batch)
        self._running.add(token)
        self._batches[token] = batch
        items = [e.item for e in batch]
        try:
            cf = self._executor.submit(self.compute, key, items)
        except RuntimeError as exc:  # the executor was shut down
            cf = concurrent.futures.Future()
            cf.set_exception(BatcherClosed(f"the server shut down before this request was computed ({exc})"))
        fut = asyncio.wrap_future(cf, loop=self._loop)
        fut.add_done_callback(functools.partial(self._finished, token))

    def _finished(self, token: int, fut: asyncio.Future) -> None:
        self._running.discard(token)
        batch = self._batches.pop(token, [])
        try:
            results = fut.result()
            if len(results) != len(batch):
                raise RuntimeError(f"compute returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every request of the batch gets the error
            failure = _as_failure(exc)
            first = True
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(failure if first else own_copy(failure))
                    first = False
        else:
            seen: set[int] = set()
            for e, r in zip(batch, results):
                if e.future.done():
                    continue
                if isinstance(r, BaseException):
                    e.future.set_exception(own_copy(r) if id(r) in seen else r)
                    seen.add(id(r))
                else:
                    e.future.set_result(r)
        self._dispatch()
