"""Shared benchmark helpers: timing, machine description, Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows; no TensorFlow."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def machine() -> str:
    """A one-line description of the machine the figures come from."""
    cpu = cpu_name()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    accel = (
        f"{len(gpus)} GPU(s): "
        + ", ".join(tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in gpus)
        if gpus
        else "no GPU"
    )
    return f"{cpu}, {os.cpu_count()} cores, {accel}; TensorFlow {tf.__version__}, Python {platform.python_version()}"


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_per_call(fn: Callable[[], object], count: int, repeats: int, warmup: int = 1) -> float:
    """Median over ``repeats`` of the process CPU time of ``count`` calls, per call, in µs, after
    ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(count):
            fn()
        runs.append((time.process_time() - t0) / count * 1e6)
    return statistics.median(runs)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (every thread), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_cpu_seconds(pid: int) -> float:
    """CPU time of the live threads of process ``pid`` so far, to the nanosecond (the sum of
    ``/proc/<pid>/task/*/schedstat``); threads that have ended are not counted (unlike
    :func:`process_cpu_seconds`, which counts in clock ticks of 10 ms)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return total / 1e9
