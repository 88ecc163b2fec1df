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
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=64, batch_timeout=0.2)
        busy = asyncio.create_task(b.submit("busy", 0))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit(k, i)) for i in range(6) for k in ("a", "b")]
        await asyncio.sleep(0.01)
        gate.set()
        out = await asyncio.gather(*rest)
        await busy
        await b.close()
        return out

    out = run(main())
    assert out == [(k, i) for i in range(6) for k in ("a", "b")]
    assert sorted((k, sorted(items)) for k, items in rec.batches) == [
        ("a", list(range(6))),
        ("b", list(range(6))),
        ("busy", [0]),
    ]
    assert threading.main_thread().ident not in rec.threads, "compute ran on the event loop thread"


def test_batch_closes_at_max_size_without_waiting_for_timeout() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=4, batch_timeout=30.0)  # the timeout would hang the test
        busy = asyncio.create_task(b.submit("k", "busy"))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit("k", i)) for i in range(8)]
        await asyncio.sleep(0.01)
        gate.set()
        out = await asyncio.wait_for(asyncio.gather(busy, *rest), 10)
        await b.close()
        return out

    run(main())
    assert [len(items) for _, items in rec.batches] == [1, 4, 4]


@pytest.mark.parametrize(
    ("waiting", "sizes", "expected"),
    [
        (17, (1, 2, 4, 8, 16, 32), [16, 1]),  # 17 padded to 32 wastes 15; the cut leaves 1
        (20, (1, 2, 4, 8, 16, 32), [16, 4]),
        (24, (1, 2, 4, 8, 16, 32), [16, 8]),  # padding adds 8, the cut leaves 8: a tie cuts (no compute wasted)
        (3, (1, 2, 4, 8, 16, 32), [2, 1]),
        (13, (1, 2, 4, 8, 16, 32), [13]),
        (16, (1, 2, 4, 8, 16, 32), [16]),
        (17, None, [17]),  # no sizes given: as many as wait, up to max_batch_size
    ],
)
def test_batch_sizes_cut_a_batch_that_padding_would_grow_more_than_it_leaves(
    waiting: int, sizes: tuple[int, ...] | None, expected: list[int]
) -> None:
    """Requests wait while a batch computes; when it ends, the next batch takes them all unless
    padding up to the next allowed size would add as many images as cutting down to the size
    below leaves for the batch after, or more (the oldest go first)."""
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=32, batch_timeout=30.0, batch_sizes=sizes)
        busy = asyncio.create_task(b.submit("k", "busy"))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit("k", i)) for i in range(waiting)]
        await asyncio.sleep(0.01)
        gate.set()
        out = await asyncio.wait_for(asyncio.gather(busy, *rest), 10)
        await b.close()
        return out

    out = run(main())
    assert out == [("k", "busy")] + [("k", i) for i in range(waiting)]
    assert [items for _, items in rec.batches[1:]] == [
        list(range(sum(expected[:j]), sum(expected[: j + 1]))) for j in range(len(expected))
    ]


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


def test_lone_request_on_an_idle_device_runs_at_once() -> None:
    """Issue 9 item 2: a request that finds nothing computing is not held for batch_timeout
    (30 s here: waiting for it would hit the 10 s limit below)."""
    rec = Recorder()
    sizes: list[int] = []

    async def main():
        b = Batcher(
            rec,
            max_batch_size=100,
            batch_timeout=30.0,
            metrics=BatcherMetrics(batch=lambda k, n, padded: sizes.append(n)),
        )
        out = [await asyncio.wait_for(b.submit("k", i), 10) for i in range(3)]  # one after the other
        await b.close()
        return out

    assert run(main()) == [("k", 0), ("k", 1), ("k", 2)]
    assert sizes == [1, 1, 1]


def test_the_batch_hook_hears_the_size_compute_pads_the_batch_to() -> None:
    """With compiled sizes (1, 2, 4, 8), 7 waiting requests go as one batch padded to 8, and
    3 as 2 (a tie: padding to 4 would add as many as the cut leaves) then 1; no sizes: none."""
    gate = threading.Event()
    heard: list[tuple[int, int]] = []

    async def main(waiting: int, sizes: tuple[int, ...]):
        rec = Recorder(gate)
        hooks = BatcherMetrics(batch=lambda k, n, padded: heard.append((n, padded)))
        b = Batcher(rec, max_batch_size=8, batch_timeout=30.0, metrics=hooks, batch_sizes=sizes)
        first = asyncio.create_task(b.submit("k", -1))  # keeps the device busy while the rest queue
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit("k", i)) for i in range(waiting)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        gate.clear()
        await b.close()

    run(main(7, (1, 2, 4, 8)))
    assert heard == [(1, 1), (7, 8)]
    heard.clear()
    run(main(3, (1, 2, 4, 8)))
    assert heard == [(1, 1), (2, 2), (1, 1)]
    heard.clear()
    run(main(7, ()))
    assert heard == [(1, 1), (7, 7)]


def test_arrivals_during_compute_merge_and_start_when_the_device_frees() -> None:
    """While a batch computes, arrivals accumulate; when it ends they run at once as one batch
    (not after batch_timeout: 30 s here)."""
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=32, batch_timeout=30.0)
        first = asyncio.create_task(b.submit("k", 0))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit("k", i)) for i in range(1, 11)]
        await asyncio.sleep(0.01)
        assert b.depth == 10 and b.running == 1
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        await b.close()

    run(main())
    assert [items for _, items in rec.batches] == [[0], list(range(1, 11))]


def test_free_worker_waits_for_company_while_another_batch_computes() -> None:
    """With two workers and one busy, a second key's lone request waits (batch_timeout) for
    company instead of starting a batch of one; a full batch starts at once."""
    gate = threading.Event()
    sizes: list[tuple[str, int]] = []
    started: dict[str, float] = {}

    def compute(key, items):
        started.setdefault(key, time.monotonic())
        if key == "slow":
            assert gate.wait(10)
        return items

    async def main():
        b = Batcher(
            compute,
            max_batch_size=4,
            batch_timeout=0.05,
            workers=2,
            metrics=BatcherMetrics(batch=lambda k, n, padded: sizes.append((k, n))),
        )
        slow = asyncio.create_task(b.submit("slow", 0))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        lone = asyncio.create_task(b.submit("lone", 1))
        await asyncio.sleep(0)
        company = asyncio.create_task(b.submit("lone", 2))
        assert await asyncio.wait_for(asyncio.gather(lone, company), 10) == [1, 2]
        waited = started["lone"] - t0
        full = await asyncio.wait_for(asyncio.gather(*(b.submit("full", i) for i in range(4))), 10)
        gate.set()
        await slow
        await b.close()
        return waited, full

    waited, full = run(main())
    assert waited >= 0.05  # a lower bound: it waited for company (not a timing assertion)
    assert full == [0, 1, 2, 3]
    assert sizes == [("slow", 1), ("lone", 2), ("full", 4)]


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
    gate = threading.Event()
    qtimes: list[float] = []
    depths: list[int] = []

    async def main():
        rec = Recorder(gate)
        b = Batcher(
            rec,
            max_batch_size=4,
            batch_timeout=0.01,
            metrics=BatcherMetrics(queue_time=lambda k, s: qtimes.append(s), queue_depth=depths.append),
        )
        busy = asyncio.create_task(b.submit("busy", 0))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        rest = [asyncio.create_task(b.submit("k", i)) for i in range(4)]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(busy, *rest)
        await b.close()

    run(main())
    assert len(qtimes) == 5 and all(t >= 0 for t in qtimes)
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


def test_a_failed_batch_gives_each_request_its_own_exception() -> None:
    """Issue 9: one exception object was shared by every request of a failed batch (and then
    rewritten by whoever tagged it); each request now gets its own, of the same kind."""
    gate = threading.Event()
    rec = Recorder(gate)

    def compute(key, items):
        if key == "boom":
            raise DeadlineExpired("the batch ran out of time")
        return rec(key, items)

    async def main():
        b = Batcher(compute, max_batch_size=8, batch_timeout=0.0)
        busy = asyncio.create_task(b.submit("busy", 0))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        doomed = [asyncio.create_task(b.submit("boom", i)) for i in range(3)]
        await asyncio.sleep(0.01)
        gate.set()
        await busy
        out = await asyncio.gather(*doomed, return_exceptions=True)
        await b.close()
        return out

    errors = run(main())
    assert all(isinstance(e, DeadlineExpired) and e.args == ("the batch ran out of time",) for e in errors)
    assert len({id(e) for e in errors}) == 3
    errors[0].args = ("request 'x': rewritten",)
    assert errors[1].args == ("the batch ran out of time",)


def test_close_without_drain_resolves_every_future() -> None:
    """Issue 9: Batcher.close(drain=False) left the requests of the batch in compute pending
    for ever; now queued and computing requests all fail UNAVAILABLE at once."""
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=1, batch_timeout=0.0)
        computing = asyncio.create_task(b.submit("k", "computing"))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.create_task(b.submit("k", "queued"))
        await asyncio.sleep(0.01)
        await asyncio.wait_for(b.close(drain=False), 10)
        done, pending = await asyncio.wait([computing, queued], timeout=5)
        gate.set()
        return [t.exception() for t in done], pending

    errors, pending = run(main())
    assert not pending, "close(drain=False) left requests unresolved"
    assert len(errors) == 2 and all(isinstance(e, BatcherClosed) for e in errors)


def test_close_with_drain_computes_what_waits_without_waiting_for_company() -> None:
    gate = threading.Event()
    rec = Recorder(gate)

    async def main():
        b = Batcher(rec, max_batch_size=8, batch_timeout=30.0, workers=2)
        busy = asyncio.create_task(b.submit("busy", 0))
        while not rec.started.is_set():
            await asyncio.sleep(0.001)
        waiting = asyncio.create_task(b.submit("k", 1))  # a free worker waits up to 30 s for company
        await asyncio.sleep(0.01)
        assert b.depth == 1
        gate.set()
        await asyncio.wait_for(b.close(drain=True), 10)
        return await busy, await waiting

    assert run(main()) == (("busy", 0), ("k", 1))
