"""The dynamic batcher with a fake compute function (no TensorFlow)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest

from camserve.serving.batching import (
    Batcher,
    BatcherClosed,
    BatcherMetrics,
    DeadlineExpired,
    QueueFull,
)


class Recorder:
    """A compute function that records its batches and may block until released."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[tuple[Hashable, list[Any]]] = []
        self.threads: set[int] = set()
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, key: Hashable, items: list[Any]) -> list[Any]:
        self.threads.add(threading.get_ident())
        self.batches.append((key, list(items)))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test never released the compute gate"
        return [(key, x) for x in items]


def run(coro):
    return asyncio.run(coro)


def test_same_key_merges_different_keys_do_not() -> None:
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch_size=64, batch_timeout=0.2)
        out = await asyncio.gather(*(b.submit(k, i) for i in range(6) for k in ("a", "b")))
        await b.close()
        return out

    out = run(main())
    assert out == [(k, i) for i in range(6) for k in ("a", "b")]
    assert sorted((k, sorted(items)) for k, items in rec.batches) == [("a", list(range(6))), ("b", list(range(6)))]
    assert threading.main_thread().ident not in rec.threads, "compute ran on the event loop thread"


def test_batch_closes_at_max_size_without_waiting_for_timeout() -> None:
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch_size=4, batch_timeout=30.0)  # the timeout would hang the test
        out = await asyncio.wait_for(asyncio.gather(*(b.submit("k", i) for i in range(8))), 10)
        await b.close()
        return out

    run(main())
    assert [len(items) for _, items in rec.batches] == [4, 4]


def test_sizes_count_units_and_oversize_request_runs_alone() -> None:
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch_size=4, batch_timeout=30.0)
        await asyncio.wait_for(
            asyncio.gather(b.submit("k", "big", size=9), b.submit("k", "x", size=2), b.submit("k", "y", size=2)), 10
        )
        await b.close()

    run(main())
    assert [items for _, items in rec.batches] == [["big"], ["x", "y"]]


def test_timeout_closes_partial_batch() -> None:
    rec = Recorder()
    sizes: list[int] = []

    async def main():
        b = Batcher(
            rec, max_batch_size=100, batch_timeout=0.05, metrics=BatcherMetrics(batch=lambda k, n: sizes.append(n))
        )
        t0 = time.monotonic()
        out = await b.submit("k", 1)
        waited = time.monotonic() - t0
        await b.close()
        return out, waited

    out, waited = run(main())
    assert out == ("k", 1) and sizes == [1]
    assert waited >= 0.05  # it waited for company (a lower bound, not a timing assertion)


def test_requests_accumulate_while_worker_busy() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=32, batch_timeout=0.0)
        first = asyncio.create_task(b.submit("k", 0))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit("k", i)) for i in range(1, 11)]
        await asyncio.sleep(0.05)
        assert b.depth == 10
        gate.set()
        await asyncio.gather(first, *rest)
        await b.close()

    run(main())
    assert [len(items) for _, items in rec.batches] == [1, 10]


def test_full_queue_fails_at_once() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=1, batch_timeout=0.0, max_queued=3)
        busy = asyncio.create_task(b.submit("k", "busy"))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        waiting = [asyncio.create_task(b.submit("k", i)) for i in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match=r"queue is full \(3 of max_queued=3 waiting\)"):
            await b.submit("k", "one too many")
        gate.set()
        await asyncio.gather(busy, *waiting)
        assert b.depth == 0
        await b.close()

    run(main())


def test_expired_deadline_dropped_before_compute() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    dropped: list[str] = []

    async def main():
        b = Batcher(
            rec, max_batch_size=8, batch_timeout=0.0, metrics=BatcherMetrics(dropped=lambda k, r: dropped.append(r))
        )
        with pytest.raises(DeadlineExpired, match="already passed"):
            await b.submit("k", "late", deadline=time.monotonic() - 1)
        busy = asyncio.create_task(b.submit("k", "busy"))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        short = asyncio.create_task(b.submit("k", "short", deadline=time.monotonic() + 0.02))
        ok = asyncio.create_task(b.submit("k", "ok", deadline=time.monotonic() + 60))
        await asyncio.sleep(0.05)  # "short" expires while the worker is busy
        gate.set()
        await busy
        assert await ok == ("k", "ok")
        with pytest.raises(DeadlineExpired, match="while it waited"):
            await short
        await b.close()

    run(main())
    assert [items for _, items in rec.batches] == [["busy"], ["ok"]]
    assert dropped == ["deadline", "deadline"]


def test_cancelled_request_leaves_no_queue_entry() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    depths: list[int] = []

    async def main():
        b = Batcher(rec, max_batch_size=8, batch_timeout=0.0, metrics=BatcherMetrics(queue_depth=depths.append))
        busy = asyncio.create_task(b.submit("k", "busy"))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        doomed = [asyncio.create_task(b.submit("k", i)) for i in range(5)]
        keep = asyncio.create_task(b.submit("k", "keep"))
        await asyncio.sleep(0.01)
        assert b.depth == 6
        for t in doomed:
            t.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        await asyncio.sleep(0)
        assert b.depth == 1
        gate.set()
        await busy
        assert await keep == ("k", "keep")
        assert b.depth == 0 and not b._pending
        await b.close()

    run(main())
    assert [items for _, items in rec.batches] == [["busy"], ["keep"]]
    assert depths[-1] == 0


def test_compute_errors_per_batch_and_per_item() -> None:
    def compute(key, items):
        if key == "boom":
            raise RuntimeError("model exploded")
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async def main():
        b = Batcher(compute, max_batch_size=8, batch_timeout=0.01)
        r = await asyncio.gather(b.submit("ok", 1), b.submit("ok", -1), b.submit("boom", 2), return_exceptions=True)
        await b.close()
        return r

    ok, bad, boom = run(main())
    assert ok == 1
    assert isinstance(bad, ValueError) and str(bad) == "bad -1"
    assert isinstance(boom, RuntimeError)


def test_close_drains_then_refuses() -> None:
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch_size=2, batch_timeout=0.01)
        tasks = [asyncio.create_task(b.submit("k", i)) for i in range(5)]
        await asyncio.sleep(0)
        await b.close(drain=True)
        assert [t.result() for t in tasks] == [("k", i) for i in range(5)]
        with pytest.raises(BatcherClosed, match="shutting down"):
            await b.submit("k", 99)

    run(main())


def test_queue_time_and_depth_metrics() -> None:
    qtimes: list[float] = []
    depths: list[int] = []

    async def main():
        b = Batcher(
            Recorder(),
            max_batch_size=4,
            batch_timeout=0.01,
            metrics=BatcherMetrics(queue_time=lambda k, s: qtimes.append(s), queue_depth=depths.append),
        )
        await asyncio.gather(*(b.submit("k", i) for i in range(4)))
        await b.close()

    run(main())
    assert len(qtimes) == 4 and all(t >= 0 for t in qtimes)
    assert max(depths) == 4 and depths[-1] == 0


def test_several_workers_compute_concurrently() -> None:
    barrier = threading.Barrier(2, timeout=10)

    def compute(key, items):
        barrier.wait()  # deadlocks (and times out) unless two batches run at once
        return items

    async def main():
        b = Batcher(compute, max_batch_size=1, batch_timeout=0.0, workers=2)
        out = await asyncio.wait_for(asyncio.gather(b.submit("a", 1), b.submit("b", 2)), 10)
        await b.close()
        return out

    assert run(main()) == [1, 2]
