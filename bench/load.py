"""Load and fault benchmark (issue 5 §2, SPEC §9): many concurrent clients mixing Predict,
Explain and DenseScores against real ``camserve serve`` processes, every answer compared with
the in-process library on the same model files; cancelled calls and expired deadlines; SIGTERM
under load; a replica killed under client round-robin. Results: ``bench/results/load.md``.

    python bench/load.py                                  # 10,000 requests from 64 clients, every scenario
    python bench/load.py --requests 2000 --clients 16 --scenarios mixed,chaos

The models are the tiny ones of the tests (``tests/helpers_serving.py``: ``gap`` for Predict and
Explain, ``fc`` for DenseScores); the point is the service machinery, not the model. The same
functions run the short versions in ``tests/test_load.py`` and the soak in ``bench/soak.py``.

>>> wl = Workload(make_repository(Path(tempfile.mkdtemp())))                        # doctest: +SKIP
>>> report = asyncio.run(run_load(target, wl.mixed(300), wl, clients=16))          # doctest: +SKIP
>>> report.problems, report.codes                                                  # doctest: +SKIP
([], Counter({'OK': 300}))
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import functools
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "bench", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import machine, table  # noqa: E402
from helpers_serving import CLASSES, make_repository, metric_value  # noqa: E402
from serve import Server  # noqa: E402  (the `camserve serve` subprocess of bench/serve.py)

CLASSIFY_SIZE = (32, 32)
DENSE_SIZE = (40, 48)

#: Good request kinds: RPC method and a description. Pictures are raw uint8 tensors.
KINDS = {
    "predict": "Predict gap, top_k=2",
    "explain": "Explain gap, gradcam, top_k=1, raw + heatmap",
    "explain2": "Explain gap, gradcam++ and layercam, targets [0, 'star'], heatmap",
    "dense": "DenseScores fc, 40x48 image, stride 1",
}
MIXED = ("predict", "explain", "explain2", "dense")

#: Bad requests mixed into soaks: kind -> expected status code.
BAD = {
    "bad_png": "INVALID_ARGUMENT",
    "bad_nan": "INVALID_ARGUMENT",
    "bad_layer": "NOT_FOUND",
    "bad_model": "NOT_FOUND",
    "bad_window": "INVALID_ARGUMENT",
}

#: How a call ends when all goes well, per fate.
FATES = {
    "normal": ("OK",),
    "deadline": ("OK", "DEADLINE_EXCEEDED"),  # ``after`` is the call's timeout
    "cancel": ("OK", "CANCELLED"),  # the client cancels the call ``after`` seconds in
    "drain": ("OK", "UNAVAILABLE"),  # sent while the server may be shutting down
}


@dataclasses.dataclass(frozen=True)
class Work:
    """One call to make: a request kind (a key of KINDS or BAD), which picture, and its fate."""

    kind: str
    index: int = 0
    fate: str = "normal"
    after: float = 0.0


@dataclasses.dataclass
class Outcome:
    """How one call ended: status name ("CANCELLED" when the client cancelled it), latency in
    seconds, ``problem`` (why the answer or status is wrong; None when right), end time."""

    work: Work
    code: str
    latency: float
    problem: str | None
    end: float  # time.monotonic()
    client: int = 0
    details: str = ""


# ---------------------------------------------------------------------------- requests and answers


class Workload:
    """Requests over a fixed pool of pictures and their in-process answers (the same model files,
    loaded here with Keras independently of the server, run through camserve.Explainer and
    camserve.dense.dense_scores).

    >>> wl = Workload(root); wl.check(Work("predict", 3), stub.Predict(wl.request(Work("predict", 3))[1]))  # doctest: +SKIP
    """

    def __init__(self, root: Path, pool: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.root = Path(root)
        self.pool = pool
        self.pictures = [rng.integers(0, 256, (*CLASSIFY_SIZE, 3), dtype=np.uint8) for _ in range(pool)]
        self.dense_pictures = [rng.integers(0, 256, (*DENSE_SIZE, 3), dtype=np.uint8) for _ in range(pool)]
        self._lock = threading.Lock()
        self._expected: dict[tuple[str, int], Any] = {}
        self._requests: dict[tuple[str, int], tuple[str, Any]] = {}

    # ------------------------------------------------------------ requests

    def request(self, kind: str, index: int = 0) -> tuple[str, Any]:
        """(RPC method name, request message) of a kind and picture (built once)."""
        key = (kind, index % self.pool)
        if key not in self._requests:
            self._requests[key] = self._build(*key)
        return self._requests[key]

    def _build(self, kind: str, index: int) -> tuple[str, Any]:
        from camserve import wire
        from camserve.imaging import encode_png
        from camserve.proto import pb

        gap, fc = pb.ModelSpec(name="gap"), pb.ModelSpec(name="fc")
        pic = wire.image_to_proto(self.pictures[index % self.pool])
        if kind == "predict":
            return "Predict", pb.PredictRequest(model=gap, images=[pic], top_k=2)
        if kind == "explain":
            return "Explain", pb.ExplainRequest(
                model=gap, images=[pic], methods=["gradcam"], top_k=1, return_raw=True, return_heatmap=True
            )
        if kind == "explain2":
            targets = [pb.TargetList(targets=[pb.Target(index=0), pb.Target(name="star")])]
            return "Explain", pb.ExplainRequest(
                model=gap, images=[pic], methods=["gradcam++", "layercam"], targets=targets, return_heatmap=True
            )
        if kind == "dense":
            dense_pic = wire.image_to_proto(self.dense_pictures[index % self.pool])
            return "DenseScores", pb.DenseScoresRequest(model=fc, image=dense_pic, stride=1)
        if kind == "bad_png":
            return "Predict", pb.PredictRequest(model=gap, images=[pb.Image(encoded=encode_png(self.pictures[0])[:60])])
        if kind == "bad_nan":
            return "Predict", pb.PredictRequest(
                model=gap, images=[wire.image_to_proto(np.full((*CLASSIFY_SIZE, 3), np.nan, np.float32))]
            )
        if kind == "bad_layer":
            return "Explain", pb.ExplainRequest(model=gap, images=[pic], layer="no_such_layer")
        if kind == "bad_model":
            return "Predict", pb.PredictRequest(model=pb.ModelSpec(name="no_such_model"), images=[pic])
        if kind == "bad_window":
            return "DenseScores", pb.DenseScoresRequest(model=fc, image=wire.image_to_proto(self.pictures[0][:20]))
        raise ValueError(f"unknown work kind {kind!r}; known: {sorted(KINDS) + sorted(BAD)}")

    # ------------------------------------------------------------ expected answers

    @functools.cached_property
    def _models(self) -> dict[str, Any]:
        import keras

        from camserve.explain import Explainer

        gap = keras.models.load_model(self.root / "gap" / "2" / "model.keras", safe_mode=True)
        fc = keras.models.load_model(self.root / "fc" / "1" / "model.keras", safe_mode=True)
        return {"gap": gap, "fc": fc, "explainer": Explainer(gap, class_names=CLASSES)}

    def expected(self, kind: str, index: int) -> Any:
        """The in-process answer for a good kind and picture (computed once, then cached)."""
        key = (kind, index % self.pool)
        with self._lock:
            if key not in self._expected:
                self._expected[key] = self._compute(*key)
            return self._expected[key]

    def _compute(self, kind: str, index: int) -> Any:
        from camserve.dense import dense_scores
        from camserve.imaging import preprocess

        m = self._models
        x = preprocess(self.pictures[index], "scale_0_1")[None]
        if kind == "predict":
            return m["explainer"].predict(x)[0]
        if kind == "explain":
            return m["explainer"].explain(x, methods=("gradcam",), top_k=1)[0]
        if kind == "explain2":
            return m["explainer"].explain(x, methods=("gradcam++", "layercam"), targets=[[0, "star"]])[0]
        if kind == "dense":
            return dense_scores(m["fc"], preprocess(self.dense_pictures[index], "scale_0_1"), stride=1)
        raise ValueError(f"no in-process answer for {kind!r}")

    def warm(self) -> None:
        """Compute every expected answer now (so that checking costs nothing under load)."""
        for kind in KINDS:
            for i in range(self.pool):
                self.expected(kind, i)

    def check(self, work: Work, response: Any) -> str | None:
        """None when ``response`` equals the in-process answer, else what differs."""
        from camserve import client

        want = self.expected(work.kind, work.index)
        if work.kind == "predict":
            got = client.predict_result(response)
            if got.scores.shape != (1, len(CLASSES)) or not np.allclose(got.scores[0], want, rtol=1e-4, atol=1e-6):
                return f"scores {got.scores.tolist()} != in-process {want.tolist()}"
            top = [t[0] for t in got.top[0]]
            if len(top) != 2 or not np.allclose(want[top], np.sort(want)[::-1][:2], rtol=1e-4, atol=1e-6):
                return f"top classes {top} are not the 2 best of {want.tolist()}"
            return None
        if work.kind in ("explain", "explain2"):
            (got,) = client.explain_result(response)
            return _compare_explanations(got, want)
        if work.kind == "dense":
            got = client.dense_result(response)
            if (tuple(got.strides), tuple(got.window), len(got)) != (
                tuple(want.strides),
                tuple(want.window),
                len(want),
            ):
                return f"dense strides/window/levels {got.strides}, {got.window}, {len(got)} != {want.strides}, {want.window}, {len(want)}"
            for g, e in zip(got, want):
                if g.scores.shape != e.scores.shape or not np.allclose(g.scores, e.scores, rtol=1e-4, atol=1e-6):
                    return "dense scores differ from the in-process ones"
                if not np.array_equal(g.boxes, e.boxes):
                    return "dense boxes differ from the in-process ones"
            return None
        return f"work kind {work.kind!r} should not have succeeded"

    # ------------------------------------------------------------ workloads

    def mixed(self, n: int, seed: int = 0, kinds: Sequence[str] = MIXED) -> list[Work]:
        """``n`` good calls, kinds and pictures drawn at random (reproducibly)."""
        rng = random.Random(seed)
        return [Work(rng.choice(kinds), rng.randrange(self.pool)) for _ in range(n)]

    def chaos(
        self, n: int, seed: int = 0, bad: float = 0.0, deadline: float = 1 / 3, cancel: float = 1 / 3
    ) -> list[Work]:
        """Good calls of which a share gets a 1-40 ms deadline, a share is cancelled by the
        client 0-30 ms in, and a share (``bad``) are bad requests."""
        rng = random.Random(seed)
        out = []
        for w in self.mixed(n, seed):
            u = rng.random()
            if u < bad:
                out.append(Work(rng.choice(sorted(BAD))))
            elif u < bad + deadline:
                out.append(dataclasses.replace(w, fate="deadline", after=rng.uniform(0.001, 0.040)))
            elif u < bad + deadline + cancel:
                out.append(dataclasses.replace(w, fate="cancel", after=rng.uniform(0.0, 0.030)))
            else:
                out.append(w)
        return out


def _compare_explanations(got: list, want: list) -> str | None:
    from camserve.imaging import heatmap_box

    if [(g.method, g.class_index, g.label) for g in got] != [(e.method, e.class_index, e.label) for e in want]:
        return f"explanations {[(g.method, g.class_index) for g in got]} != in-process {[(e.method, e.class_index) for e in want]}"
    for g, e in zip(got, want):
        if not np.isclose(g.score, e.score, rtol=1e-4, atol=1e-6):
            return f"{g.method} score {g.score} != in-process {e.score}"
        if g.heatmap is None or not np.allclose(g.heatmap, e.heatmap, rtol=1e-4, atol=1e-5):
            return f"{g.method} heatmap differs from the in-process one"
        if g.raw is not None and not np.allclose(g.raw, e.raw, rtol=1e-4, atol=1e-6):
            return f"{g.method} raw map differs from the in-process one"
        # Boxes must be equal; a pixel sitting exactly on the 20 % threshold may tip either way
        # with float noise, so a different box is accepted only when it is its own heatmap's box.
        if g.box != e.box and g.box != heatmap_box(g.heatmap):
            return f"{g.method} box {g.box} != in-process {e.box}"
    return None


# ---------------------------------------------------------------------------- running load


@dataclasses.dataclass
class Report:
    """Every call's Outcome, and the wall time of the run."""

    outcomes: list[Outcome]
    seconds: float

    @property
    def codes(self) -> collections.Counter:
        return collections.Counter(o.code for o in self.outcomes)

    @property
    def problems(self) -> list[str]:
        return [f"{o.work}: {o.code}: {o.problem}" for o in self.outcomes if o.problem]

    def latency_ms(self, kinds: Iterable[str] | None = None) -> tuple[float, float]:
        """p50 and p99 latency in ms of the successful calls (of ``kinds``)."""
        kinds = set(kinds or KINDS)
        lat = sorted(o.latency for o in self.outcomes if o.code == "OK" and o.work.kind in kinds)
        if not lat:
            return float("nan"), float("nan")
        if len(lat) == 1:
            return lat[0] * 1000, lat[0] * 1000
        q = statistics.quantiles(lat, n=100, method="inclusive")
        return q[49] * 1000, q[98] * 1000

    @property
    def throughput(self) -> float:
        """Completed calls per second."""
        return len(self.outcomes) / self.seconds if self.seconds else float("nan")


def _judge(workload: Workload, work: Work, code: str, response: Any, details: str) -> str | None:
    if work.kind in BAD:
        if code != BAD[work.kind] or not details:
            return f"expected {BAD[work.kind]} with a message, got {code} {details!r}"
        return None
    if code not in FATES[work.fate]:
        return f"{code}: {details}"
    return workload.check(work, response) if code == "OK" else None


async def run_load(
    target: str,
    works: Iterable[Work],
    workload: Workload,
    clients: int,
    *,
    retries: int = 0,
    timeout: float = 120.0,
    token: str | None = None,
    stop_on: Callable[[list[Outcome]], bool] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> Report:
    """Make the ``works`` calls from ``clients`` concurrent clients (one channel each, one call
    in flight each), check every answer, return the Report. ``works`` may be a generator (the
    soak); ``stop_on(mine)`` True, given that client's outcomes so far, makes the client stop;
    ``on_outcome`` sees every outcome as it comes.
    """
    import grpc

    from camserve.client import AsyncClient

    source = iter(works)
    outcomes: list[Outcome] = []

    async def one(c: AsyncClient, work: Work, k: int) -> Outcome:
        method, request = workload.request(work.kind, work.index)
        t0 = time.perf_counter()
        response, details = None, ""
        try:
            if work.fate == "cancel":
                task = asyncio.ensure_future(c.call(method, request, timeout=timeout))
                done, _ = await asyncio.wait({task}, timeout=work.after)
                if not done:
                    task.cancel()
                try:
                    response = await task
                    code = "OK"
                except asyncio.CancelledError:
                    code = "CANCELLED"
            else:
                response = await c.call(method, request, timeout=work.after if work.fate == "deadline" else timeout)
                code = "OK"
        except grpc.aio.AioRpcError as e:
            code, details = e.code().name, e.details() or ""
        latency = time.perf_counter() - t0
        problem = _judge(workload, work, code, response, details)
        return Outcome(work, code, latency, problem, time.monotonic(), k, details)

    async def client_loop(k: int) -> None:
        mine: list[Outcome] = []
        async with AsyncClient(target, token, retries=retries, timeout=timeout, backoff=0.05) as c:
            for work in source:
                outcome = await one(c, work, k)
                outcomes.append(outcome)
                mine.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
                if stop_on is not None and stop_on(mine):
                    return
                await asyncio.sleep(0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(clients)))
    return Report(outcomes, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- server state


def metrics_text(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def wait_queue_empty(metrics_port: int, timeout: float = 30.0) -> float:
    """Poll ``camserve_queue_depth`` until it is 0 (or ``timeout``); returns the last value."""
    t0 = time.monotonic()
    while True:
        depth = metric_value(metrics_text(metrics_port), "camserve_queue_depth")
        if depth == 0 or time.monotonic() - t0 > timeout:
            return depth
        time.sleep(0.02)


def dropped(metrics_port: int) -> dict[str, float]:
    text = metrics_text(metrics_port)
    return {r: metric_value(text, "camserve_dropped_total", reason=r) for r in ("deadline", "cancelled")}


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS of /proc/<pid>/status), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_servers(root: Path, n: int, max_batch_size: int = 32, batch_timeout_ms: float = 5.0) -> list[Server]:
    """``n`` ``camserve serve`` processes started concurrently, each SERVING."""
    servers: list[Any] = [None] * n
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            s = Server(root, max_batch_size, batch_timeout_ms)
            servers[i] = s
            s.wait_serving(300)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        stop_servers([s for s in servers if s is not None])
        raise errors[0]
    return servers


def stop_servers(servers: Sequence[Server]) -> None:
    for s in servers:
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in servers:
        try:
            s.proc.wait(60)
        except Exception:  # noqa: BLE001
            s.proc.kill()


def log_records(server: Server, msg: str) -> list[dict]:
    return [
        json.loads(line) for line in list(server.log) if line.startswith("{") and json.loads(line).get("msg") == msg
    ]


# ---------------------------------------------------------------------------- scenarios


@dataclasses.dataclass
class SigtermResult:
    report: Report
    signal_at: float  # time.monotonic() when SIGTERM was sent
    exit_code: int | None
    draining: dict  # the server's "draining" log record (in-flight and queued counts)
    stopped: bool  # the server logged "stopped"

    @property
    def raced(self) -> list[Outcome]:
        """Calls that gRPC itself cancelled as the server shut down: received by the transport
        but not yet handed to the server's handlers (grpc-core answers them CANCELLED, which
        clients do not retry). Not accepted by the server, but not UNAVAILABLE either."""
        return [o for o in self.report.outcomes if o.code == "CANCELLED" and o.details == "CANCELLED"]

    @property
    def unexpected(self) -> list[str]:
        """Calls that ended neither OK-and-correct, nor UNAVAILABLE, nor raced."""
        raced = set(map(id, self.raced))
        return [f"{o.work}: {o.code}: {o.problem}" for o in self.report.outcomes if o.problem and id(o) not in raced]

    @property
    def ok_after_signal(self) -> int:
        return sum(1 for o in self.report.outcomes if o.code == "OK" and o.end > self.signal_at)

    @property
    def last_codes(self) -> collections.Counter:
        """Status of each client's last call (all UNAVAILABLE when the server went away cleanly)."""
        last = {}
        for o in self.report.outcomes:
            last[o.client] = o.code
        return collections.Counter(last.values())


async def sigterm_under_load(
    server: Server, workload: Workload, clients: int, warm_calls: int, seed: int = 0
) -> SigtermResult:
    """Clients call in a loop (no retries); after ``warm_calls`` answers the server gets SIGTERM;
    each client goes on until it has seen UNAVAILABLE twice (the server is gone by then). Every
    call should end OK (and correct) or UNAVAILABLE; see :attr:`SigtermResult.raced`."""
    rng = random.Random(seed)
    state = {"signal_at": float("inf"), "done": 0}

    def works():
        while True:
            yield Work(rng.choice(MIXED), rng.randrange(workload.pool), fate="drain")

    def seen(o: Outcome) -> None:
        state["done"] += 1
        if state["done"] == warm_calls:
            state["signal_at"] = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)

    def stop_on(mine: list[Outcome]) -> bool:
        last = mine[-1]
        if last.problem is not None and not (last.code == "CANCELLED" and last.details == "CANCELLED"):
            return True
        return sum(o.code == "UNAVAILABLE" for o in mine) >= 2

    report = await run_load(
        server.target, works(), workload, clients, retries=0, timeout=60, stop_on=stop_on, on_outcome=seen
    )
    exit_code = await asyncio.get_running_loop().run_in_executor(None, lambda: server.proc.wait(60))
    await asyncio.sleep(0.2)  # the log reader thread catches the last lines
    drain = log_records(server, "draining")
    return SigtermResult(
        report, state["signal_at"], exit_code, drain[0] if drain else {}, bool(log_records(server, "stopped"))
    )


@dataclasses.dataclass
class ReplicaResult:
    report: Report
    served_before_kill: list[float]  # OK requests per replica when the kill came
    killed: int
    kill_at: float


async def replicas_under_kill(
    servers: Sequence[Server],
    workload: Workload,
    n: int,
    clients: int,
    kill: int,
    kill_after: int,
    seed: int = 0,
    sig: int = signal.SIGKILL,
) -> ReplicaResult:
    """``n`` mixed calls from ``clients`` Clients whose target names every replica (round-robin,
    retries on UNAVAILABLE); replica ``kill`` gets ``sig`` (SIGKILL, or SIGTERM for a rolling
    restart) after ``kill_after`` answers."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.info['port']}" for s in servers)
    state: dict[str, Any] = {"done": 0, "served": [], "kill_at": float("nan")}

    def seen(o: Outcome) -> None:
        state["done"] += 1
        if state["done"] == kill_after:
            state["served"] = [
                metric_value(metrics_text(s.info["metrics_port"]), "camserve_requests_total", code="OK")
                for s in servers
            ]
            servers[kill].proc.send_signal(sig)
            state["kill_at"] = time.monotonic()

    report = await run_load(target, workload.mixed(n, seed), workload, clients, retries=8, timeout=120, on_outcome=seen)
    return ReplicaResult(report, state["served"], kill, state["kill_at"])


# ---------------------------------------------------------------------------- the benchmark


def _row(name: str, clients: int, r: Report) -> list[Any]:
    p50, p99 = r.latency_ms()
    errors = sum(n for code, n in r.codes.items() if code != "OK")
    return [
        name,
        len(r.outcomes),
        clients,
        r.codes.get("OK", 0),
        errors,
        len(r.problems),
        f"{r.seconds:.1f}",
        f"{r.throughput:.1f}",
        f"{p50:.1f} / {p99:.1f}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="mixed-load requests (default 10000)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--scenarios", default="mixed,chaos,sigterm,replicas,rolling")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.md")
    args = p.parse_args(argv)
    scenarios = args.scenarios.split(",")
    root = make_repository(Path(tempfile.mkdtemp(prefix="camserve-load-")), corrupt=False)
    wl = Workload(root)
    wl.warm()
    sections: list[str] = []
    rows: list[list[Any]] = []
    failures: list[str] = []
    known: list[str] = []

    if "mixed" in scenarios or "chaos" in scenarios:
        (server,) = start_servers(root, 1)
        try:
            if "mixed" in scenarios:
                r = asyncio.run(run_load(server.target, wl.mixed(args.requests, seed=1), wl, args.clients))
                rows.append(_row("mixed", args.clients, r))
                per_kind = [
                    [k, sum(1 for o in r.outcomes if o.work.kind == k), *(f"{v:.1f}" for v in r.latency_ms([k]))]
                    for k in MIXED
                ]
                sections.append(
                    "### Mixed load, latency by kind (ms)\n\n" + table(["kind", "requests", "p50", "p99"], per_kind)
                )
                text = metrics_text(server.info["metrics_port"])
                server_errors = metric_value(text, "camserve_errors_total")
                sections.append(
                    f"Server-side: camserve_errors_total = {server_errors:g}, camserve_requests_total{{code=OK}} = "
                    f"{metric_value(text, 'camserve_requests_total', code='OK'):g}."
                )
                if r.problems or len(r.outcomes) != args.requests or server_errors:
                    failures.append(
                        f"mixed: {len(r.problems)} wrong, {len(r.outcomes)} of {args.requests} answered, {server_errors:g} server errors"
                    )
            if "chaos" in scenarios:
                n = max(300, args.requests // 3)
                before = dropped(server.info["metrics_port"])
                r = asyncio.run(run_load(server.target, wl.chaos(n, seed=2, bad=0.1), wl, args.clients))
                depth = wait_queue_empty(server.info["metrics_port"])
                after = dropped(server.info["metrics_port"])
                check = asyncio.run(run_load(server.target, wl.mixed(200, seed=3), wl, 8))
                rows.append(_row("chaos (deadlines 1-40 ms, cancels 0-30 ms, 10 % bad)", args.clients, r))
                sections.append(
                    f"### Chaos\n\n{n} calls: outcomes {dict(r.codes)}; wrong answers or unexpected codes: {len(r.problems)}. "
                    f"Afterwards camserve_queue_depth = {depth:g}; dropped before compute: "
                    f"{ {k: after[k] - before[k] for k in after} }; 200 follow-up calls: {dict(check.codes)}, "
                    f"{len(check.problems)} wrong."
                )
                if r.problems or depth != 0 or check.problems or check.codes.get("OK") != 200:
                    failures.append(f"chaos: {len(r.problems)} problems, depth {depth}, follow-up {dict(check.codes)}")
        finally:
            stop_servers([server])

    if "sigterm" in scenarios:
        (server,) = start_servers(root, 1, max_batch_size=64, batch_timeout_ms=100)
        try:
            res = asyncio.run(sigterm_under_load(server, wl, args.clients, warm_calls=max(200, args.requests // 20)))
        finally:
            stop_servers([server])
        rows.append(_row("SIGTERM under load", args.clients, res.report))
        sections.append(
            f"### SIGTERM under load\n\nSIGTERM after {max(200, args.requests // 20)} answers; each client (no retries) "
            f"calls until it has seen UNAVAILABLE twice. Server's drain record: in flight {res.draining.get('inflight')}, "
            f"queued {res.draining.get('queued')}. Answered OK after the signal: {res.ok_after_signal}; outcomes "
            f"{dict(res.report.codes)}; cancelled by gRPC's shutdown (received, never handed to a handler): "
            f"{len(res.raced)}; wrong answers or other codes: {len(res.unexpected)}; exit code {res.exit_code}; "
            f"'stopped' logged: {res.stopped}."
        )
        if res.unexpected or res.exit_code != 0 or res.ok_after_signal < (res.draining.get("inflight") or 0):
            failures.append(f"sigterm: {res.unexpected[:3]}, exit {res.exit_code}")
        if res.raced:
            known.append(f"SIGTERM: {len(res.raced)} calls racing the shutdown ended CANCELLED instead of UNAVAILABLE")

    if "replicas" in scenarios:
        servers = start_servers(root, 3)
        try:
            n = max(600, args.requests // 2)
            res = asyncio.run(replicas_under_kill(servers, wl, n, args.clients, kill=1, kill_after=n // 3))
            survivors = [
                metric_value(metrics_text(s.info["metrics_port"]), "camserve_requests_total", code="OK")
                for i, s in enumerate(servers)
                if i != res.killed
            ]
        finally:
            stop_servers(servers)
        rows.append(_row("3 replicas, one SIGKILLed", args.clients, res.report))
        sections.append(
            f"### Three replicas, one killed\n\n{n} calls through `Client` targets naming all three replicas (round-robin, "
            f"retries on UNAVAILABLE); replica {res.killed} got SIGKILL after {n // 3} answers, when the replicas had "
            f"answered {[int(v) for v in res.served_before_kill]}. Survivors' totals at the end: {[int(v) for v in survivors]}. "
            f"Outcomes {dict(res.report.codes)}; lost or wrong: {len(res.report.problems)}."
        )
        if res.report.problems or res.report.codes.get("OK") != n:
            failures.append(f"replicas: {dict(res.report.codes)}, {res.report.problems[:3]}")

    if "rolling" in scenarios:
        servers = start_servers(root, 3)
        try:
            n = max(600, args.requests // 2)
            res = asyncio.run(
                replicas_under_kill(servers, wl, n, args.clients, kill=0, kill_after=n // 3, sig=signal.SIGTERM)
            )
            exit_code = servers[0].proc.wait(60)
        finally:
            stop_servers(servers)
        rows.append(_row("3 replicas, one SIGTERMed (rolling restart)", args.clients, res.report))
        lost = n - res.report.codes.get("OK", 0)
        sections.append(
            f"### Rolling restart: three replicas, one SIGTERMed\n\nAs above, but replica 0 gets SIGTERM (drains, exit code "
            f"{exit_code}) after {n // 3} answers. Outcomes {dict(res.report.codes)}; lost (not OK after retries): {lost}; "
            f"wrong answers: {sum(1 for o in res.report.outcomes if o.code == 'OK' and o.problem)}."
        )
        if lost:
            known.append(
                f"rolling restart: {lost} of {n} calls lost (CANCELLED by gRPC's shutdown, not retried by the Client)"
            )
        if exit_code != 0 or any(o.code == "OK" and o.problem for o in res.report.outcomes):
            failures.append(f"rolling: exit {exit_code}, wrong answers")

    text = "\n\n".join(
        [
            "# Load and faults (`python bench/load.py`)",
            f"Machine: {machine()}. Servers: `camserve serve` processes (max_batch_size=32, batch_timeout_ms=5; the SIGTERM run "
            "uses max_batch_size=64, batch_timeout_ms=100 so that work is queued when the signal comes). Load: one asyncio "
            "process, one channel and one call in flight per client, raw uint8 tensors. Client and servers share the machine's "
            "cores. Models: the tiny `gap` (Predict, Explain) and `fc` (DenseScores) of tests/helpers_serving.py. Every answer "
            "is compared with the in-process library on the same model files (scores and maps to rtol 1e-4, boxes equal).",
            "Kinds: " + "; ".join(f"`{k}`: {v}" for k, v in KINDS.items()) + ".",
            "## Summary (latency of successful calls, ms)",
            table(
                ["scenario", "calls", "clients", "OK", "errors", "wrong / lost", "seconds", "calls/s", "p50 / p99 ms"],
                rows,
            ),
            *sections,
            "## Verdict\n\n"
            + ("All checks passed." if not failures else "FAILED: " + "; ".join(failures))
            + (
                "" if not known else "\n\nKnown gap (gRPC shutdown race, see the note below): " + "; ".join(known) + "."
            ),
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
