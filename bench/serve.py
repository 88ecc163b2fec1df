"""Service benchmark (SPEC §8.4, issue 4 §8): throughput and p50 / p99 latency of single-image
Predict and Explain (gradcam) requests at several client concurrencies, with dynamic batching
and with ``max_batch_size=1``, against the in-process batched throughput of the same
operation. Not a test; results go to ``bench/results/serve.md``.

    python bench/serve.py                              # shapes_gap, 1/8/32/64 clients, 8 s per level
    python bench/serve.py --resnet --seconds 15        # also ResNet50 (weights=None, 224 px)

The server runs as a separate ``camserve serve`` process; the load generator is one asyncio
process with one in-flight request per simulated client. Both share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, timeit

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ models


def _write_config(model_dir: Path, name: str, classes: list[str], size: int, pre: str) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    names = ", ".join(json.dumps(c) for c in classes)
    (model_dir / "config.toml").write_text(
        f'name = "{name}"\nclass_names = [{names}]\ninput_size = [{size}, {size}]\nchannels = 3\npreprocessing = "{pre}"\n'
    )


def build_repository(root: Path, resnet: bool) -> dict[str, str]:
    """shapes_gap (bundled, or an untrained stand-in of the same shape) and optionally ResNet50.
    Returns model name -> a note on what it is."""
    import keras

    notes = {}
    bundled = REPO / "models" / "shapes_gap"
    if (bundled / "config.toml").is_file():
        shutil.copytree(bundled, root / "shapes_gap")
        notes["shapes_gap"] = "bundled model"
    else:
        from camserve.datasets.bundled import build_gap_model

        model = build_gap_model()
        _write_config(
            root / "shapes_gap", "shapes_gap", ["circle", "square", "triangle", "star", "cross"], 64, "scale_0_1"
        )
        (root / "shapes_gap" / "1").mkdir()
        model.save(root / "shapes_gap" / "1" / "model.keras")
        notes["shapes_gap"] = "untrained stand-in with the bundled architecture (models/ not committed yet)"
    if resnet:
        model = keras.applications.ResNet50(weights=None)
        _write_config(root / "resnet50", "resnet50", [f"c{i}" for i in range(1000)], 224, "caffe")
        (root / "resnet50" / "1").mkdir()
        model.save(root / "resnet50" / "1" / "model.keras")
        notes["resnet50"] = "keras.applications.ResNet50(weights=None), 224 px"
    return notes


# ------------------------------------------------------------------ in-process baseline


def in_process(root: Path, name: str, batch: int) -> dict[str, float]:
    """Images per second of Explainer.predict / .explain(gradcam) on full batches."""
    from camserve.explain import Explainer
    from camserve.serving.repository import load_model_dir

    entry = load_model_dir(root / name)
    ex = Explainer(
        entry.model, layer=entry.config.default_layer, class_names=entry.config.class_names, max_batch_size=batch
    )
    h, w = entry.config.input_size
    x = np.random.default_rng(0).random((batch, h, w, 3), dtype=np.float32) * 255
    from camserve.imaging import preprocess

    x = preprocess(x, entry.config.preprocessing)
    return {
        "predict": batch / timeit(lambda: ex.predict(x), repeats=5, warmup=2),
        "explain": batch / timeit(lambda: ex.explain(x, methods=("gradcam",)), repeats=5, warmup=2),
    }


# ------------------------------------------------------------------ server process


class Server:
    def __init__(self, root: Path, max_batch_size: int, batch_timeout_ms: float) -> None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CAMSERVE_LOG_FORMAT="json", CAMSERVE_LOG_LEVEL="INFO")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "camserve",
                "serve",
                "--models",
                str(root),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--max-batch-size",
                str(max_batch_size),
                "--batch-timeout-ms",
                str(batch_timeout_ms),
                "--max-queued",
                "4096",
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.info: dict = {}
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.monotonic()
        while not self.info:
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))
            time.sleep(0.1)
        self.target = f"127.0.0.1:{self.info['port']}"

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.log.append(line)
            if line.startswith("{") and json.loads(line).get("msg") == "listening":
                self.info = json.loads(line)

    def wait_serving(self, timeout: float = 1800) -> None:
        from camserve.client import Client

        t0 = time.monotonic()
        with Client(self.target, retries=0) as c:
            while True:
                try:
                    if c.health(timeout=2) == "SERVING":
                        return
                except Exception:  # noqa: BLE001
                    pass
                if time.monotonic() - t0 > timeout or self.proc.poll() is not None:
                    raise RuntimeError("server never became SERVING:\n" + "".join(self.log[-30:]))
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)


# ------------------------------------------------------------------ load


async def load(target: str, request, method: str, clients: int, seconds: float) -> dict[str, float]:
    from camserve.client import AsyncClient

    async with AsyncClient(target, timeout=600, retries=0) as c:
        await c.call(method, request)  # connection up
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                await c.call(method, request)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [latencies[0]] * 99
    return {"rps": len(latencies) / elapsed, "p50": q[49] * 1000, "p99": q[98] * 1000, "n": len(latencies)}


def requests_for(name: str, size: int):
    from camserve import wire
    from camserve.proto import pb

    img = wire.image_to_proto(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))
    spec = pb.ModelSpec(name=name)
    return {
        "predict": ("Predict", pb.PredictRequest(model=spec, images=[img])),
        "explain": ("Explain", pb.ExplainRequest(model=spec, images=[img], methods=["gradcam"])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", default="1,8,32,64", help="concurrent clients per level (default 1,8,32,64)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of load per level (default 8)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--resnet", action="store_true", help="also ResNet50 (weights=None); slow on CPU")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.md")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    root = Path(tempfile.mkdtemp(prefix="camserve-bench-"))
    notes = build_repository(root, args.resnet)
    sizes = {"shapes_gap": 64, "resnet50": 224}
    rows, summary = [], []
    baselines = {name: in_process(root, name, args.max_batch_size) for name in notes}
    results: dict[tuple, dict] = {}
    for label, mbs in [("batching", args.max_batch_size), ("max_batch_size=1", 1)]:
        server = Server(root, mbs, args.batch_timeout_ms)
        try:
            server.wait_serving()
            for name in notes:
                for op, (method, req) in requests_for(name, sizes[name]).items():
                    for c in levels:
                        r = asyncio.run(load(server.target, req, method, c, args.seconds))
                        results[(name, op, label, c)] = r
                        print(
                            f"{name} {op} {label} clients={c}: {r['rps']:.1f} req/s p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms",
                            flush=True,
                        )
        finally:
            server.stop()
    for name in notes:
        for op in ("predict", "explain"):
            base = baselines[name][op]
            for c in levels:
                b, n = results[(name, op, "batching", c)], results[(name, op, "max_batch_size=1", c)]
                rows.append(
                    [
                        name,
                        op,
                        c,
                        f"{b['rps']:.1f}",
                        f"{b['p50']:.1f} / {b['p99']:.1f}",
                        f"{n['rps']:.1f}",
                        f"{n['p50']:.1f} / {n['p99']:.1f}",
                        f"{b['rps'] / base:.0%}",
                        f"{b['rps'] / n['rps']:.1f}x",
                    ]
                )
            at = 32 if 32 in levels else levels[-1]
            b, n = results[(name, op, "batching", at)], results[(name, op, "max_batch_size=1", at)]
            summary.append(
                [name, op, f"{base:.1f}", at, f"{b['rps'] / base:.0%}", "≥ 80 %", f"{b['rps'] / n['rps']:.1f}x", "≥ 3x"]
            )
    text = "\n\n".join(
        [
            "# Service benchmark (`python bench/serve.py`)",
            f"Machine: {machine()}. Server: `camserve serve` in its own process "
            f"(max_batch_size={args.max_batch_size}, batch_timeout_ms={args.batch_timeout_ms}); load: one asyncio process, one "
            f"in-flight single-image request per client, {args.seconds:g} s per level, raw uint8 tensors of the model's size. "
            "Client and server share the machine's cores.",
            "Models: " + "; ".join(f"`{k}`: {v}" for k, v in notes.items()) + ".",
            "## Targets (SPEC §8.4)",
            table(
                [
                    "model",
                    "op",
                    "in-process img/s (batch %d)" % args.max_batch_size,
                    "clients",
                    "served / in-process",
                    "target",
                    "batching / no batching",
                    "target",
                ],
                summary,
            ),
            "## All levels (throughput in requests = images per second; latency p50 / p99 in ms)",
            table(
                [
                    "model",
                    "op",
                    "clients",
                    "batching req/s",
                    "batching ms",
                    "no-batching req/s",
                    "no-batching ms",
                    "batching / in-process",
                    "batching / no batching",
                ],
                rows,
            ),
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
