"""Load and faults, short versions (issue 5 §2, SPEC §9); the long ones are ``bench/load.py``
(whose functions these tests drive) and ``bench/soak.py``.

- mixed Predict / Explain / DenseScores from 16 concurrent clients: none lost, every answer
  equal to the in-process library, no error;
- cancelled calls and expired deadlines leave no queue entry behind (queue depth back to 0),
  are never computed, and the server answers correctly afterwards;
- SIGTERM under load on a real ``camserve serve`` process: accepted calls finish, new ones get
  UNAVAILABLE, exit code 0;
- three ``camserve serve`` replicas behind one round-robin Client with retries, one SIGKILLed
  under load: no call lost or answered wrongly.

Nothing here is timed: throughput and latency are recorded by bench/load.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from pathlib import Path

import grpc
import pytest
from helpers_serving import RunningServer, local_config, make_repository, metric_value

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import load
from test_server_ops import Gate, _wait

from camserve.proto import pb_grpc

CLIENTS = 16


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"), corrupt=False)


@pytest.fixture(scope="module")
def workload(repo: Path) -> load.Workload:
    wl = load.Workload(repo)
    wl.warm()
    return wl


@pytest.fixture(scope="module")
def served(repo: Path):
    cfg = local_config(
        repo,
        max_batch_size=8,
        batch_timeout_ms=5,
        warmup_methods=["gradcam", "gradcam++", "layercam"],
        log_level="WARNING",
    )
    with RunningServer(cfg) as rs:
        yield rs


def _idle(rs: RunningServer) -> None:
    """Wait until nothing is queued, computing or in a handler; then check the metric agrees."""
    server = rs.server
    _wait(lambda: not server.batcher.busy and server.inflight == 0, 30, "the server to go idle")
    assert server.batcher.depth == 0 and not server.batcher._pending
    assert metric_value(rs.metrics_text(), "camserve_queue_depth") == 0


# ------------------------------------------------------------------ mixed load


def test_mixed_load_every_answer_equals_in_process(served: RunningServer, workload: load.Workload) -> None:
    before = served.metrics_text()
    works = workload.mixed(300, seed=1)
    assert {w.kind for w in works} == set(load.MIXED)
    report = asyncio.run(load.run_load(served.target, works, workload, CLIENTS))
    assert len(report.outcomes) == 300, "calls lost"
    assert sorted(map(str, (o.work for o in report.outcomes))) == sorted(map(str, works))
    assert report.problems == []
    assert report.codes == {"OK": 300}
    after = served.metrics_text()
    assert metric_value(after, "camserve_errors_total") - metric_value(before, "camserve_errors_total") == 0
    assert (
        metric_value(after, "camserve_requests_total", code="OK")
        - metric_value(before, "camserve_requests_total", code="OK")
        == 300
    )
    # The calls were merged into batches (otherwise this is not a load test of the batcher).
    batches = metric_value(after, "camserve_batch_size_count") - metric_value(before, "camserve_batch_size_count")
    assert batches < 300, f"300 calls in {batches} batches"
    _idle(served)


# ------------------------------------------------------------------ cancellations and deadlines


def test_random_cancels_and_deadlines_leave_no_queue_entries(served: RunningServer, workload: load.Workload) -> None:
    text = served.metrics_text()
    before = {r: metric_value(text, "camserve_dropped_total", reason=r) for r in ("deadline", "cancelled")}
    works = workload.chaos(240, seed=5)
    report = asyncio.run(load.run_load(served.target, works, workload, CLIENTS))
    assert len(report.outcomes) == 240 and report.problems == []
    codes = report.codes
    assert codes["DEADLINE_EXCEEDED"] > 0 and codes["CANCELLED"] > 0 and codes["OK"] > 0, codes
    _idle(served)
    text = served.metrics_text()
    drops = sum(metric_value(text, "camserve_dropped_total", reason=r) - before[r] for r in before)
    assert drops > 0, "no call was dropped from the queue: the test did not exercise the paths"
    follow_up = asyncio.run(load.run_load(served.target, workload.mixed(40, seed=6), workload, 4))
    assert follow_up.codes == {"OK": 40} and follow_up.problems == []


def test_gated_cancels_and_deadlines_are_removed_and_never_computed(
    served: RunningServer, workload: load.Workload
) -> None:
    """With compute held, queue calls of every kind: some to keep, some to cancel, some with a
    short deadline. The queue drops exactly the cancelled and expired ones before compute."""
    gate = Gate(served)
    channel = grpc.insecure_channel(served.target)
    stub = pb_grpc.CamServiceStub(channel)
    text = served.metrics_text()
    dropped_before = sum(metric_value(text, "camserve_dropped_total", reason=r) for r in ("deadline", "cancelled"))
    try:
        blocker = load.Work("predict", 7)
        method, request = workload.request(blocker.kind, blocker.index)
        first = getattr(stub, method).future(request, timeout=60)
        assert gate.started.wait(30)
        kinds = [load.Work(k, i) for i, k in enumerate(load.MIXED)]

        def send(work: load.Work, timeout: float) -> grpc.Future:
            m, r = workload.request(work.kind, work.index)
            return getattr(stub, m).future(r, timeout=timeout)

        keep = [(w, send(w, 60)) for w in kinds]
        doomed = [send(w, 60) for w in kinds]
        expiring = [send(w, 2.0) for w in kinds]
        _wait(lambda: served.server.batcher.depth == 12, 30, "12 queued calls")
        for f in doomed:
            assert f.cancel()
        _wait(lambda: served.server.batcher.depth == 4, 30, "the cancelled and expired calls to leave the queue")
        for f in expiring:
            with pytest.raises(grpc.RpcError) as e:
                f.result()
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert metric_value(served.metrics_text(), "camserve_queue_depth") == 4
        gate.open.set()
        assert workload.check(blocker, first.result()) is None
        for w, f in keep:
            assert workload.check(w, f.result()) is None, w
        assert gate.items == 1 + 4, "a cancelled or expired call was computed"
    finally:
        gate.open.set()
        served.server.batcher.compute = gate.inner
        channel.close()
    _idle(served)
    text = served.metrics_text()
    assert (
        sum(metric_value(text, "camserve_dropped_total", reason=r) for r in ("deadline", "cancelled")) - dropped_before
        == 8
    )


# ------------------------------------------------------------------ real processes: SIGTERM and replicas


@pytest.fixture(scope="module")
def processes(repo: Path):
    """Four ``camserve serve`` processes started at once: three replicas and one to SIGTERM
    (batch_timeout 150 ms, so that calls are queued when the signal comes)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replicas = pool.submit(load.start_servers, repo, 3, 8, 5)
        drained = pool.submit(load.start_servers, repo, 1, 64, 150)
        servers = replicas.result() + drained.result()
    yield servers[:3], servers[3]
    load.stop_servers(servers)


def test_replica_killed_under_round_robin_loses_nothing(processes, workload: load.Workload) -> None:
    replicas, _ = processes
    assert all(s.proc.poll() is None for s in replicas)
    result = asyncio.run(load.replicas_under_kill(replicas, workload, 360, CLIENTS, kill=1, kill_after=120))
    assert result.report.problems == []
    assert result.report.codes == {"OK": 360}, "calls lost"
    assert min(result.served_before_kill) > 0, f"round-robin did not reach every replica: {result.served_before_kill}"
    assert replicas[1].proc.wait(10) == -9
    survivors = [
        metric_value(load.metrics_text(s.info["metrics_port"]), "camserve_requests_total", code="OK")
        for i, s in enumerate(replicas)
        if i != 1
    ]
    before = [v for i, v in enumerate(result.served_before_kill) if i != 1]
    assert all(a > b for a, b in zip(survivors, before)), "the survivors did not take over"


def test_sigterm_under_load_finishes_accepted_calls_then_exits_0(processes, workload: load.Workload) -> None:
    _, server = processes
    result = asyncio.run(load.sigterm_under_load(server, workload, CLIENTS, warm_calls=60))
    # Known gap (reported to the lead): calls that reach the transport at the very moment the
    # drained server hands over to gRPC's shutdown are cancelled by grpc-core (CANCELLED, which
    # the Client does not retry) instead of UNAVAILABLE. They were never accepted by a handler.
    assert result.unexpected == [], "a call ended other than OK-and-correct, UNAVAILABLE or gRPC's shutdown race"
    assert result.exit_code == 0 and result.stopped
    assert result.draining, "no drain record in the server log"
    # Calls accepted before the drain began (in flight or queued) were all answered.
    assert result.draining["inflight"] > 0 and result.ok_after_signal >= result.draining["inflight"]
    # And afterwards every client was refused with UNAVAILABLE.
    assert result.last_codes == {"UNAVAILABLE": CLIENTS}
    assert sum(o.code == "OK" for o in result.report.outcomes) >= 60
