"""Soak (issue 5 §2, SPEC §8.5): a ``camserve serve`` process under steady mixed load for a long
time (default 12 minutes, the first 2 of them warm-up); its resident memory (VmRSS of
/proc/<pid>/status) must grow less than 10 % after warm-up, and every answer must still equal
the in-process library. Results: ``bench/results/soak.md``.

    python bench/soak.py                          # 12 min, 16 clients
    python bench/soak.py --minutes 30 --warmup-minutes 5 --clients 32

The load mixes good Predict / Explain / DenseScores calls (80 %), bad requests (8 %: corrupt
PNG, NaN tensor, unknown layer and model, image smaller than the window), calls with 1-40 ms
deadlines (6 %) and calls the client cancels 0-30 ms in (6 %), so that the error, deadline and
cancellation paths are soaked too. Growth is the median RSS of the last minute over the median
of the last minute of warm-up; the least-squares slope after warm-up (and over its second half
alone: a slope that falls is memory settling, a steady one a leak) is reported as well.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load
from common import machine, table

MIX = {"good": 0.80, "bad": 0.08, "deadline": 0.06, "cancel": 0.06}


def parse_mix(text: str) -> dict[str, float]:
    """``"good=0.8,bad=0.08,deadline=0.06,cancel=0.06"`` as shares of MIX's keys summing to 1.

    >>> parse_mix("good=1")
    {'good': 1.0, 'bad': 0.0, 'deadline': 0.0, 'cancel': 0.0}
    """
    mix = dict.fromkeys(MIX, 0.0)
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in mix:
            raise ValueError(f"unknown share {key!r} in --mix; allowed: {', '.join(MIX)}")
        mix[key.strip()] = float(value)
    if abs(sum(mix.values()) - 1) > 1e-6 or min(mix.values()) < 0:
        raise ValueError(f"--mix shares must be >= 0 and sum to 1, got {mix}")
    return mix


def works(wl: load.Workload, until: float, mix: dict[str, float] = MIX, seed: int = 0) -> Iterator[load.Work]:
    """Calls drawn from ``mix`` until ``until`` (time.monotonic())."""
    rng = random.Random(seed)
    bad = sorted(load.BAD)
    while time.monotonic() < until:
        kind, index, u = rng.choice(load.MIXED), rng.randrange(wl.pool), rng.random()
        if u < mix["good"]:
            yield load.Work(kind, index)
        elif u < mix["good"] + mix["bad"]:
            yield load.Work(rng.choice(bad))
        elif u < mix["good"] + mix["bad"] + mix["deadline"]:
            yield load.Work(kind, index, fate="deadline", after=rng.uniform(0.001, 0.040))
        else:
            yield load.Work(kind, index, fate="cancel", after=rng.uniform(0.0, 0.030))


async def sample_rss(pid: int, every: float, until: float, out: list[tuple[float, int]], t0: float) -> None:
    while time.monotonic() < until:
        out.append((time.monotonic() - t0, load.rss_kib(pid)))
        await asyncio.sleep(every)


def slope_mib_per_hour(points: list[tuple[float, int]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] / 1024 for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 3600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


async def soak(
    server: load.Server, wl: load.Workload, minutes: float, clients: int, every: float, mix: dict[str, float]
):
    t0 = time.monotonic()
    until = t0 + minutes * 60
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_rss(server.proc.pid, every, until, samples, t0))
    report = await load.run_load(server.target, works(wl, until, mix), wl, clients)
    await sampler
    samples.append((time.monotonic() - t0, load.rss_kib(server.proc.pid)))
    return report, samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=12.0, help="whole run, warm-up included (default 12)")
    p.add_argument("--warmup-minutes", type=float, default=2.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--limit", type=float, default=0.10, help="largest allowed RSS growth after warm-up (default 0.10)")
    p.add_argument(
        "--mix",
        type=parse_mix,
        default=MIX,
        help="shares of good, bad, deadline and cancel calls, "
        "e.g. good=0.8,bad=0.08,deadline=0.06,cancel=0.06 (the default)",
    )
    p.add_argument("--out", type=Path, default=load.REPO / "bench" / "results" / "soak.md")
    args = p.parse_args(argv)
    if args.minutes - args.warmup_minutes < 1:
        p.error("need at least one minute after warm-up")

    root = load.make_repository(Path(tempfile.mkdtemp(prefix="camserve-soak-")), corrupt=False)
    wl = load.Workload(root)
    wl.warm()
    (server,) = load.start_servers(root, 1)
    try:
        rss_start = load.rss_kib(server.proc.pid)
        report, samples = asyncio.run(soak(server, wl, args.minutes, args.clients, args.sample_seconds, args.mix))
        depth = load.wait_queue_empty(server.info["metrics_port"])
        text = load.metrics_text(server.info["metrics_port"])
    finally:
        load.stop_servers([server])
    exit_code = server.proc.returncode

    w = args.warmup_minutes * 60
    end = samples[-1][0]
    base = statistics.median(v for t, v in samples if w - 60 <= t <= w)
    final = statistics.median(v for t, v in samples if t >= end - 60)
    after = [(t, v) for t, v in samples if t >= w]
    peak = max(v for _, v in after)
    growth = final / base - 1
    slope = slope_mib_per_hour(after)
    late = slope_mib_per_hour([(t, v) for t, v in after if t >= (w + end) / 2])
    codes = report.codes
    ok = growth < args.limit and not report.problems and depth == 0 and exit_code == 0
    p50, p99 = report.latency_ms()

    per_minute = []
    for m in range(int(end // 60) + 1):
        chunk = [v for t, v in samples if m * 60 <= t < (m + 1) * 60]
        if chunk:
            per_minute.append(
                [
                    m + 1,
                    f"{statistics.median(chunk) / 1024:.1f}",
                    f"{max(chunk) / 1024:.1f}",
                    "warm-up" if (m + 1) * 60 <= w else "",
                ]
            )
    text_md = "\n\n".join(
        [
            "# Soak (`python bench/soak.py`)",
            f"Machine: {machine()}. One `camserve serve` process (max_batch_size=32, batch_timeout_ms=5) with the tiny "
            f"`gap` / `fc` models of tests/helpers_serving.py; {args.clients} concurrent clients in one asyncio process on the "
            f"same cores; {args.minutes:g} minutes, the first {args.warmup_minutes:g} warm-up. Mix: "
            + ", ".join(f"{k} {v:.0%}" for k, v in args.mix.items())
            + " (bad: corrupt PNG, NaN tensor, unknown layer, unknown model, image smaller than the dense window; deadlines "
            "1-40 ms; client cancellations 0-30 ms). RSS: VmRSS of the server process every "
            f"{args.sample_seconds:g} s.",
            "## Result",
            table(
                ["measure", "value"],
                [
                    ["calls", f"{len(report.outcomes)} ({report.throughput:.1f}/s)"],
                    ["outcomes", ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))],
                    ["wrong answers or unexpected codes", len(report.problems)],
                    ["latency of successful calls p50 / p99", f"{p50:.1f} / {p99:.1f} ms"],
                    ["queue depth at the end", f"{depth:g}"],
                    [
                        "server errors by code",
                        ", ".join(
                            f"{c} {load.metric_value(text, 'camserve_errors_total', code=c):g}"
                            for c in ("INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL")
                        ),
                    ],
                    ["RSS at start (before any call)", f"{rss_start / 1024:.1f} MiB"],
                    ["RSS after warm-up (median of its last minute)", f"{base / 1024:.1f} MiB"],
                    ["RSS at the end (median of the last minute)", f"{final / 1024:.1f} MiB"],
                    ["peak RSS after warm-up", f"{peak / 1024:.1f} MiB"],
                    ["growth after warm-up", f"{growth:+.2%} (limit {args.limit:.0%})"],
                    ["least-squares slope after warm-up", f"{slope:+.2f} MiB/hour (second half alone: {late:+.2f})"],
                    ["server exit code after SIGTERM", exit_code],
                ],
            ),
            *(
                [
                    "## Wrong answers and unexpected codes (most common)",
                    table(
                        ["calls", "fate", "code", "problem"],
                        [
                            [n, fate, code, problem]
                            for (fate, code, problem), n in collections.Counter(
                                (o.work.fate, o.code, (o.problem or "")[:160]) for o in report.outcomes if o.problem
                            ).most_common(10)
                        ],
                    ),
                ]
                if report.problems
                else []
            ),
            "## RSS per minute (MiB)",
            table(["minute", "median", "max", ""], per_minute),
            "## Verdict\n\n"
            + ("PASS: " if ok else "FAIL: ")
            + f"RSS growth {growth:+.2%} after warm-up (limit {args.limit:.0%}), {len(report.problems)} wrong answers, "
            f"queue depth {depth:g} at the end, exit code {exit_code}.",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text_md + "\n")
    print(text_md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
