"""Service benchmark (SPEC §8.4, issue 9 §8): what ``camserve serve`` costs per single-image
request on the host, beside the model, against a bare ``grpc.aio`` server; 1-client latency with
and without dynamic batching; throughput at 32 clients against the in-process batched
throughput, and with batching against ``max_batch_size=1``. Not a test; results go to
``bench/results/serve.md`` (a section per ``--label``; other sections are kept).

    python bench/serve.py                                  # shapes_gap (64 px) and gap224, Predict and Explain
    python bench/serve.py --quick                          # a smoke run: a few hundred requests per measurement
    python bench/serve.py --code /tmp/camserve_base --label before   # the server from another checkout
    python bench/serve.py --models shapes_gap --ops explain --profile bench/results/serve_profile.md

Processes: the server (``camserve serve``, or ``bench/bare_grpc.py``) runs on its own; every
measurement starts a separate load-generator process (this script's ``_load`` command: one
asyncio loop, K requests in flight, raw bytes in and out, no protobuf work; or, with ``--loadgen
h2load``, nghttp2's C load generator, which leaves the cores to the server); the in-process cost
of the model is measured in a third process (``_inproc``) with the same code as the server.

Figures:
- **server CPU per request**: CPU time of the server's threads (``/proc/<pid>/task/*/schedstat``,
  to the ns; checked against the process's utime + stime from ``/proc/<pid>/stat``, in 10 ms
  ticks) across a fixed number of requests at 32 clients, read just before the first and just
  after the last (the load generator connects and warms up first, then waits for a go);
- **model CPU per image**: ``process_time`` of ``Explainer.predict`` / ``.explain(gradcam)`` on
  a batch of 32 images (uint8 pixels preprocessed in the graph, as the server computes a raw
  uint8 request; float32 model input for code before that path), the median of several calls,
  divided by 32;
- **camserve beyond the model** = the first minus the second; **bare floor** = the CPU per
  request of ``bench/bare_grpc.py`` under the same load: it parses each request into its
  message and answers with a canned copy of camserve's real answer (same size on the wire).
  Target: beyond-model ≤ 1.5× the floor.

``--rest`` measures, on one batching server, the same single-image requests over gRPC and
over every HTTP path (camserve.v1 as protobuf and JSON, v1 ``:predict``/``:explain``, Open
Inference Protocol v2 infer as JSON and binary): throughput and server CPU per request beside
gRPC's, into the section ``rest``.

    python bench/serve.py --rest --models shapes_gap,gap224 --count 300

``--code DIR`` runs the server and the in-process measurement with ``PYTHONPATH=DIR`` from a
neutral working directory, so that ``camserve`` is imported from ``DIR`` (the editable install
comes later on ``sys.path``); the server process prints where it imported camserve from, and
the run stops if that is not ``DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, process_cpu_seconds, table, threads_cpu_seconds

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SERVICE = "camserve.v1.CamService"
OPS = {"predict": "Predict", "explain": "Explain"}
MODELS = {
    "shapes_gap": "the bundled model (models/shapes_gap), 64 px",
    "gap224": "4 strided 3x3 convs (16-32-64-64 channels) -> GAP -> Dense(10), random weights, 224 px",
    "resnet50": "keras.applications.ResNet50(weights=None), 224 px (slow on CPU)",
}
LIMIT = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]


# ------------------------------------------------------------------ models


def _write_config(
    model_dir: Path, name: str, classes: list[str], size: int, pre: str, default_layer: str | None = None
) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    names = ", ".join(json.dumps(c) for c in classes)
    text = f'name = "{name}"\nclass_names = [{names}]\ninput_size = [{size}, {size}]\nchannels = 3\npreprocessing = "{pre}"\n'
    if default_layer:
        text += f'default_layer = "{default_layer}"\n'
    (model_dir / "config.toml").write_text(text)


def gap224_model():
    """A cheap 224 px GAP classifier: the host path dominates, as on an accelerator."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((224, 224, 3))
    x = inputs
    for i, filters in enumerate((16, 32, 64, 64)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"conv{i}")(x)
    x = keras.layers.Activation("linear", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="gap224")


def build_repository(root: Path, models: list[str] | bool = ("shapes_gap",)) -> dict[str, str]:
    """A model repository under ``root`` with ``models``; returns model name -> what it is.
    (``models`` True / False: shapes_gap with / without ResNet50, the old signature.)"""
    if isinstance(models, bool):
        models = ["shapes_gap", "resnet50"] if models else ["shapes_gap"]
    notes = {}
    for name in models:
        if name == "shapes_gap":
            bundled = REPO / "models" / "shapes_gap"
            if not (bundled / "config.toml").is_file():
                raise SystemExit(f"{bundled} is missing")
            shutil.copytree(bundled, root / "shapes_gap")
        elif name == "gap224":
            _write_config(root / name, name, [f"c{i}" for i in range(10)], 224, "scale_0_1", "last_conv")
            (root / name / "1").mkdir()
            gap224_model().save(root / name / "1" / "model.keras")
        elif name == "resnet50":
            import keras

            _write_config(root / name, name, [f"c{i}" for i in range(1000)], 224, "caffe")
            (root / name / "1").mkdir()
            keras.applications.ResNet50(weights=None).save(root / name / "1" / "model.keras")
        else:
            raise SystemExit(f"unknown model {name!r}; use {', '.join(MODELS)}")
        notes[name] = MODELS[name]
    return notes


def input_size(root: Path, name: str) -> tuple[int, int]:
    import tomllib

    with open(root / name / "config.toml", "rb") as f:
        h, w = tomllib.load(f)["input_size"]
    return int(h), int(w)


def request_bytes(name: str, size: tuple[int, int], op: str) -> bytes:
    """A single-image request as a typical client sends it: a raw uint8 tensor of the model's
    input size; Predict with top_k=1; Explain gradcam with the raw map and the heatmap."""
    from camserve.proto import pb

    h, w = size
    pixels = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = pb.Image(tensor=pb.Tensor(dtype="uint8", shape=[h, w, 3], data=pixels.tobytes()))
    spec = pb.ModelSpec(name=name)
    if op == "predict":
        return pb.PredictRequest(model=spec, images=[image], top_k=1).SerializeToString()
    return pb.ExplainRequest(
        model=spec, images=[image], methods=["gradcam"], return_heatmap=True, return_raw=True
    ).SerializeToString()


#: An HTTP twin of a gRPC request: (label, path, content type, body, extra headers).
RestRequest = tuple[str, str, str, bytes, tuple[str, ...]]


def rest_requests(name: str, size: tuple[int, int], op: str) -> list[RestRequest]:
    """The request of :func:`request_bytes` (the same pixels) over each HTTP path: camserve.v1
    over HTTP as protobuf and as JSON; v1 REST with the pixels as nested lists (and, for
    Predict, as a base64 PNG); for Predict the Open Inference Protocol v2 infer with a JSON
    UINT8 tensor and with the binary tensor data extension."""
    import base64

    from google.protobuf import json_format

    from camserve.imaging import encode_png
    from camserve.proto import pb

    h, w = size
    pixels = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    method = OPS[op]
    proto = request_bytes(name, size, op)
    message = (pb.PredictRequest if op == "predict" else pb.ExplainRequest).FromString(proto)
    as_json = lambda value: json.dumps(value).encode()
    out: list[RestRequest] = [
        ("HTTP camserve.v1, protobuf", f"/{SERVICE}/{method}", "application/proto", proto, ()),
        (
            "HTTP camserve.v1, JSON",
            f"/{SERVICE}/{method}",
            "application/json",
            as_json(json_format.MessageToDict(message)),
            (),
        ),
    ]
    if op == "explain":
        body = {
            "instances": [pixels.tolist()],
            "method": "gradcam",
            "heatmap": "float",
            "raw": True,
            "predictions": False,
        }
        out.append(("v1 :explain, pixel lists", f"/v1/models/{name}:explain", "application/json", as_json(body), ()))
        return out
    png = base64.b64encode(encode_png(pixels)).decode()
    tensor = {"name": "images", "datatype": "UINT8", "shape": [1, h, w, 3]}
    header = as_json({"inputs": [{**tensor, "parameters": {"binary_data_size": pixels.nbytes}}]})
    out += [
        (
            "v1 :predict, pixel lists",
            f"/v1/models/{name}:predict",
            "application/json",
            as_json({"instances": [pixels.tolist()]}),
            (),
        ),
        (
            "v1 :predict, base64 PNG",
            f"/v1/models/{name}:predict",
            "application/json",
            as_json({"instances": [{"b64": png}]}),
            (),
        ),
        (
            "v2 infer, JSON UINT8",
            f"/v2/models/{name}/infer",
            "application/json",
            as_json({"inputs": [{**tensor, "data": pixels.ravel().tolist()}]}),
            (),
        ),
        (
            "v2 infer, binary UINT8",
            f"/v2/models/{name}/infer",
            "application/octet-stream",
            header + pixels.tobytes(),
            (f"Inference-Header-Content-Length: {len(header)}",),
        ),
    ]
    return out  # fmt: skip


# ------------------------------------------------------------------ in-process cost (subprocess)


def inproc_main(argv: list[str]) -> int:
    """``_inproc``: model CPU time and throughput at one batch, printed as JSON."""
    p = argparse.ArgumentParser(prog="serve.py _inproc")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--models", required=True)
    p.add_argument("--ops", default="predict,explain")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    import tomllib

    import keras

    import camserve
    from camserve import Explainer

    out: dict = {"camserve": camserve.__file__, "models": {}}
    for name in args.models.split(","):
        with open(args.root / name / "config.toml", "rb") as f:
            cfg = tomllib.load(f)
        model = keras.models.load_model(args.root / name / "1" / "model.keras", compile=False)
        h, w = cfg["input_size"]
        options = {"layer": cfg.get("default_layer"), "class_names": cfg["class_names"], "max_batch_size": args.batch}
        if "preprocessing" in inspect.signature(Explainer).parameters:
            # What the server computes for a raw uint8 request: pixels -> scores, preprocessed in the graph.
            ex = Explainer(model, preprocessing=cfg.get("preprocessing", "scale_0_1"), **options)
            x = np.random.default_rng(0).integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
            out["input"] = "uint8 pixels, preprocessed in the graph"
        else:  # code before the pixel path: preprocessed float input (the server's preprocessing not counted)
            ex = Explainer(model, **options)
            x = np.random.default_rng(0).random((args.batch, h, w, 3), dtype=np.float32)
            out["input"] = "float32 model input"
        fns = {
            "predict": lambda ex=ex, x=x: ex.predict(x),
            "explain": lambda ex=ex, x=x: ex.explain(x, methods=("gradcam",)),
        }
        res = {}
        for op in args.ops.split(","):
            fn = fns[op]
            for _ in range(3):
                fn()
            cpu, wall = [], []
            for _ in range(args.repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
            res[op] = {
                "cpu_ms_per_image": statistics.median(cpu) / args.batch * 1000,
                "images_per_s": args.batch / statistics.median(wall),
            }
        out["models"][name] = res
    print(json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------ load generator (subprocess)


class CallFailed(Exception):
    """A failed call of the load generator: its status code name and details."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


async def _load_async(args) -> None:
    """gRPC (raw bytes to ``--method``) or, with ``--url``, HTTP POSTs of the same body."""
    request = args.request.read_bytes()
    if args.url:
        import aiohttp

        headers = {"Content-Type": args.content_type}
        headers.update(h.split(":", 1) for h in args.header)
        connector = aiohttp.TCPConnector(limit=args.clients)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def post() -> bytes:
                async with session.post(args.url, data=request, headers=headers) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise CallFailed(f"HTTP_{r.status}", body[:300].decode("utf-8", "replace"))
                    return body

            await _measure(args, post)
        return
    import grpc

    async with grpc.aio.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(f"/{SERVICE}/{args.method}")  # no (de)serializers: bytes in and out

        async def unary() -> bytes:
            try:
                return await call(request, timeout=120)
            except grpc.aio.AioRpcError as e:
                raise CallFailed(e.code().name, e.details() or "") from None

        await _measure(args, unary)


async def _measure(args, send) -> None:
    """Warm up, print ready, wait for the go on stdin, run ``args.count`` calls of ``send`` at
    ``args.clients`` in flight, print the figures as JSON."""
    loop = asyncio.get_running_loop()

    async def phase(n: int) -> dict:
        remaining = n
        latencies: list[float] = []
        errors: dict[str, int] = {}
        first_error = ""
        last = b""

        async def worker() -> None:
            nonlocal remaining, first_error, last
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                try:
                    last = await send()
                except CallFailed as e:
                    errors[e.code] = errors.get(e.code, 0) + 1
                    first_error = first_error or f"{e.code}: {e.details}"
                    continue
                latencies.append(time.perf_counter() - t)

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(min(args.clients, n))))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return {
            "count": len(latencies),
            "errors": errors,
            "first_error": first_error,
            "wall_s": wall,
            "rps": len(latencies) / wall,
            **latency_figures(latencies),
            "loadgen_cpu_ms_per_request": cpu / max(len(latencies), 1) * 1000,  # the cores it shares
            "response_bytes": len(last),
            "_last": last,
        }

    warm = await phase(args.warmup) if args.warmup else {"count": 0, "errors": {}}
    print(json.dumps({"ready": True, "warmup_errors": warm["errors"]}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # the go: the caller has read the CPU clock
    res = await phase(args.count)
    last = res.pop("_last")
    print(json.dumps(res), flush=True)
    if args.save and last:
        args.save.write_bytes(last)


def latency_figures(latencies: list[float]) -> dict[str, float]:
    """p50, p90 and p99 in ms of ``latencies`` (seconds; NaN when there are none)."""
    q = sorted(latencies) or [float("nan")]
    pick = lambda f: q[min(len(q) - 1, int(f * len(q)))] * 1000
    return {"p50_ms": statistics.median(q) * 1000, "p90_ms": pick(0.90), "p99_ms": pick(0.99)}


def load_main(argv: list[str]) -> int:
    """``_load``: warm up, print ready, wait for a line on stdin, run ``--count`` requests, print JSON."""
    p = argparse.ArgumentParser(prog="serve.py _load")
    p.add_argument("--target", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--request", type=Path, required=True, help="serialized request message")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--save", type=Path, help="write the last response's bytes here")
    p.add_argument("--url", help="POST the request to this HTTP URL instead of calling --method over gRPC")
    p.add_argument("--content-type", default="application/json", help="of the HTTP request body")
    p.add_argument("--header", action="append", default=[], help="extra HTTP header 'Name: value' (repeatable)")
    asyncio.run(_load_async(p.parse_args(argv)))
    return 0


#: ``--loadgen``: "python" (this script's ``_load``: grpc.aio, 0.1-0.5 ms of CPU a request in
#: bench/results/serve.md) or "h2load" (nghttp2's HTTP/2 load generator, C: 0.02-0.14 ms), for the
#: gRPC runs.
LOAD_GENERATOR = "python"


def run_h2load(
    pid: int, target: str, method: str, request: Path, clients: int, count: int, warmup: int, save=None
) -> dict:
    """``count`` gRPC calls of ``method`` by h2load (one connection, ``clients`` streams in
    flight) after ``warmup`` uncounted ones; the figures of :func:`run_load`. h2load does
    not read gRPC's trailers: every call must bring back exactly as many bytes as the answer
    one grpcio call gets first (``save``: written there), or this raises."""
    import grpc

    body = request.read_bytes()
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        answer = channel.unary_unary(f"/{SERVICE}/{method}")(body, timeout=120)
    expected = len(answer)
    if save:
        Path(save).write_bytes(answer)
    with tempfile.TemporaryDirectory() as tmp:
        framed, log = Path(tmp) / "request.grpc", Path(tmp) / "requests.tsv"
        framed.write_bytes(b"\0" + len(body).to_bytes(4, "big") + body)  # gRPC's length-prefixed message

        def h2load(n: int, log_file: Path | None = None) -> tuple[str, object]:
            cmd = ["h2load", "-n", str(n), "-c", "1", "-t", "1", "-m", str(min(clients, n)), "-d", str(framed)]
            cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
            cmd += [f"--log-file={log_file}"] if log_file else []
            proc = subprocess.Popen([*cmd, f"http://{target}/{SERVICE}/{method}"], stdout=subprocess.PIPE, text=True)
            out = proc.stdout.read()  # type: ignore[union-attr]
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                raise RuntimeError(f"h2load exited {proc.returncode}:\n{out[-2000:]}")
            return out, usage

        if warmup:
            h2load(warmup)
        cpu0, fine0, main0 = process_cpu_seconds(pid), threads_cpu_seconds(pid), main_thread_cpu_seconds(pid)
        out, usage = h2load(count, log)
        cpu1, fine1, main1 = process_cpu_seconds(pid), threads_cpu_seconds(pid), main_thread_cpu_seconds(pid)
        latencies = [int(line.split("\t")[2]) / 1e6 for line in log.read_text().splitlines() if line]
    ok = int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]
    data = int(re.search(r"\((\d+)\) data", out).group(1))  # type: ignore[union-attr]
    if ok != count or data != count * (5 + expected):
        raise RuntimeError(f"h2load: {ok} of {count} HTTP 200, {data} DATA bytes for {count} x {5 + expected}:\n{out}")
    wall = float(re.search(r"finished in ([\d.]+)(m?s)", out).group(1))  # type: ignore[union-attr]
    wall /= 1000 if re.search(r"finished in [\d.]+ms", out) else 1
    return {
        "count": count,
        "errors": {},
        "first_error": "",
        "wall_s": wall,
        "rps": count / wall,
        **latency_figures(latencies),
        "loadgen_cpu_ms_per_request": (usage.ru_utime + usage.ru_stime) / count * 1000,  # type: ignore[attr-defined]
        "response_bytes": expected,
        "warmup_errors": {},
        **cpu_figures(count, (cpu0, fine0, main0), (cpu1, fine1, main1)),
    }


def load_generator() -> str:
    """The load generator of the gRPC runs, in words (for the results)."""
    if LOAD_GENERATOR == "h2load":
        return "h2load (nghttp2, C; one HTTP/2 connection; each answer's bytes checked against a grpcio call's answer)"
    return "this script's `_load` (grpc.aio, one channel)"


def cpu_figures(count: int, before: tuple[float, float, float], after: tuple[float, float, float]) -> dict:
    """The server's CPU per request from (process ticks, threads' schedstat, main thread)
    read before and after ``count`` requests."""
    (cpu0, fine0, main0), (cpu1, fine1, main1) = before, after
    # The threads' schedstat sum is exact to the ns but misses threads that ended during the run;
    # the process's clock ticks count every thread, to 10 ms. The finer one unless they disagree.
    n = max(count, 1)
    res = {
        "cpu_ticks_ms_per_request": (cpu1 - cpu0) / n * 1000,
        "cpu_ms_per_request": (fine1 - fine0) / n * 1000,
        "main_cpu_ms_per_request": (main1 - main0) / n * 1000,
    }
    if abs((fine1 - fine0) - (cpu1 - cpu0)) > 0.03 + 0.05 * (cpu1 - cpu0):
        print(f"  (threads' CPU {fine1 - fine0:.3f} s, process ticks {cpu1 - cpu0:.2f} s: using the ticks)", flush=True)
        res["cpu_ms_per_request"] = res["cpu_ticks_ms_per_request"]
    return res


def run_load(
    pid: int,
    target: str,
    method: str,
    request: Path,
    clients: int,
    count: int,
    warmup: int,
    save=None,
    http: tuple[str, str, tuple[str, ...]] | None = None,
):
    """One load-generator process against server ``pid``; the server's CPU seconds across the
    counted requests go in ``cpu_s``. ``http``: (URL, content type, extra headers) to POST the
    request over HTTP instead of calling ``method`` over gRPC."""
    if LOAD_GENERATOR == "h2load" and not http:
        return run_h2load(pid, target, method, request, clients, count, warmup, save)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_load", "--target", target, "--method", method]
    cmd += ["--request", str(request), "--clients", str(clients), "--count", str(count), "--warmup", str(warmup)]
    if save:
        cmd += ["--save", str(save)]
    if http:
        url, content_type, headers = http
        cmd += ["--url", url, "--content-type", content_type, *(f"--header={h}" for h in headers)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline() or "{}")  # type: ignore[union-attr]
        if not ready.get("ready"):
            raise RuntimeError(f"load generator failed to start ({method} {target})")
        before = process_cpu_seconds(pid), threads_cpu_seconds(pid), main_thread_cpu_seconds(pid)
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        line = proc.stdout.readline()  # type: ignore[union-attr]
        after = process_cpu_seconds(pid), threads_cpu_seconds(pid), main_thread_cpu_seconds(pid)
        res = json.loads(line)
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(60)
    res.update(cpu_figures(res["count"], before, after))
    res["warmup_errors"] = ready.get("warmup_errors", {})
    return res


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's main thread (for a server: its event loop, gRPC's Python
    side included), from its schedstat; 0 when unreadable."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


# ------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def code_env(code: Path | None) -> dict[str, str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if code is not None:
        env["PYTHONPATH"] = str(code) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


#: Runs ``camserve`` as ``python -m camserve`` would, after printing where camserve comes from.
#: With BENCH_PROFILE set, SIGUSR1 starts cProfile on the main thread (the event loop) and
#: SIGUSR2 stops it and writes the stats to that file.
_SERVER_MAIN = """\
import os, runpy, signal, sys
import camserve
print("camserve from " + camserve.__file__, file=sys.stderr, flush=True)
sys.argv = ["camserve"] + sys.argv[1:]
if os.environ.get("BENCH_PROFILE"):
    import cProfile, time
    # BENCH_PROFILE_CLOCK=cpu: the thread's CPU time (GIL waits and sleeps not counted), else wall time.
    _prof = cProfile.Profile(time.thread_time) if os.environ.get("BENCH_PROFILE_CLOCK") == "cpu" else cProfile.Profile()
    signal.signal(signal.SIGUSR1, lambda *_: _prof.enable())

    def _dump(*_):
        _prof.disable()
        _prof.dump_stats(os.environ["BENCH_PROFILE"] + ".part")
        os.replace(os.environ["BENCH_PROFILE"] + ".part", os.environ["BENCH_PROFILE"])

    signal.signal(signal.SIGUSR2, _dump)
runpy.run_module("camserve", run_name="__main__", alter_sys=True)
"""


def thread_flags(env: dict[str, str]) -> list[str]:
    """``--tf-threads``' server flags when the camserve the server imports (PYTHONPATH's first
    entry, else this checkout) has them."""
    flags = env.get("BENCH_THREAD_FLAGS", "").split()
    code = Path(env["PYTHONPATH"].split(os.pathsep)[0]) if env.get("PYTHONPATH") else REPO
    config = code / "camserve" / "serving" / "config.py"
    return flags if flags and config.is_file() and "intra_op_threads" in config.read_text() else []


class BenchServer:
    """A server process on a free loopback port: ``camserve serve`` (``kind`` "camserve") or
    ``bench/bare_grpc.py`` (``kind`` "bare"), started from a neutral working directory."""

    def __init__(self, kind: str, workdir: Path, env: dict[str, str], args: list[str], profile: Path | None = None):
        self.port = free_port()
        self.http_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.logfile = workdir / f"{kind}-{self.port}.log"
        env = dict(env)
        if profile:
            env["BENCH_PROFILE"] = str(profile)
        if kind == "camserve":
            cmd = [sys.executable, "-c", _SERVER_MAIN, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
            cmd += ["--metrics-port", "-1", "--http-port", str(self.http_port), "--max-queued", "4096"]
            cmd += ["--log-level", "WARNING", *args, *thread_flags(env)]
        else:
            cmd = [sys.executable, str(BENCH / "bare_grpc.py"), "--port", str(self.port), *args]
        with open(self.logfile, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=log)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def camserve_file(self, timeout: float = 120) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            m = re.search(r"^camserve from (.*)$", self.log(), re.M)
            if m:
                return m.group(1).strip()
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("server did not say where camserve comes from:\n" + self.log()[-3000:])

    def wait_answering(self, calls: list[tuple[str, bytes]], timeout: float = 900) -> None:
        """Until every (method, request) is answered OK (models loaded, warmed up)."""
        import grpc

        t0 = time.monotonic()
        with grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
            for method, request in calls:
                call = channel.unary_unary(f"/{SERVICE}/{method}")
                while True:
                    try:
                        call(request, timeout=60)
                        break
                    except grpc.RpcError as e:
                        if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                            raise RuntimeError(f"server never answered {method}: {e}\n" + self.log()[-3000:]) from e
                        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


class Server:
    """``camserve serve`` in its own process (used by ``bench/load.py`` and ``bench/soak.py``):
    port and metrics port from its "listening" log record, the log kept in ``log``."""

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
                "--http-port",
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


# ------------------------------------------------------------------ the run


def git_describe(code: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no", "--", "camserve"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown commit"
    if head.returncode:
        return "not a git checkout"
    return head.stdout.strip() + (" with uncommitted changes under camserve/" if dirty.stdout.strip() else "")


def measure_server(
    server: BenchServer, work: list[tuple[str, str, Path]], args, save_dir: Path | None = None
) -> dict[tuple[str, str], dict[str, dict]]:
    """Per (model, op): the ``clients``-client run (CPU, throughput) and the 1-client run (latency)."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for name, op, request in work:
        method = OPS[op]
        save = save_dir / f"{method}__{name}.bin" if save_dir else None
        many = run_load(
            server.pid, server.target, method, request, args.clients, args.count, args.warmup or 2 * args.clients, save
        )
        one = run_load(server.pid, server.target, method, request, 1, args.latency_count, args.warmup or 20)
        out[(name, op)] = {"many": many, "one": one}
        for label, r in ((f"{args.clients} clients", many), ("1 client", one)):
            err = f" errors {r['errors']} ({r['first_error']})" if r["errors"] else ""
            print(
                f"  {name} {op} {label}: {r['count']} ok, {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                f"p99 {r['p99_ms']:.2f} ms, server CPU {r['cpu_ms_per_request']:.3f} ms/request{err}",
                flush=True,
            )
    return out


def write_section(path: Path, label: str, body: str) -> None:
    """Replace (or add, before "## Earlier runs") the section ``## <label> ...`` of ``path``."""
    header = (
        "# Service benchmark (`python bench/serve.py`)\n\n"
        "Host cost of `camserve serve` per single-image request (SPEC §8.4, issue 9): see the script's "
        "docstring for the method. One section per labelled run; the latest run of a label replaces "
        "its section.\n"
    )
    text = path.read_text() if path.is_file() else header
    parts = re.split(r"(?m)^(?=## )", text)
    head, sections = parts[0], parts[1:]
    new = f"## {label}{body}".rstrip() + "\n\n"
    title = lambda s: s.split("\n", 1)[0][3:].split(" — ")[0].strip()
    for i, s in enumerate(sections):
        if title(s) == label:
            sections[i] = new
            break
    else:
        at = next((i for i, s in enumerate(sections) if title(s).lower().startswith("earlier runs")), len(sections))
        sections.insert(at, new)
    if not head.endswith("\n\n"):
        head = head.rstrip("\n") + "\n\n"
    path.write_text((head + "".join(sections)).rstrip() + "\n")


def profile_report(prof: Path, out: Path, heading: str, top: int = 25) -> None:
    import io
    import pstats

    parts = [f"# {heading}\n"]
    for key, only, title in (
        ("cumulative", (), f"Top {top} by cumulative time"),
        ("tottime", (), f"Top {top} by tottime time"),
        ("cumulative", ("camserve/",), f"camserve's own functions, top {top} by cumulative time"),
    ):
        s = io.StringIO()
        st = pstats.Stats(str(prof), stream=s)
        if only:
            st.sort_stats(key).print_stats(*only, top)
        else:
            st.strip_dirs().sort_stats(key).print_stats(top)
        body = s.getvalue()
        body = body[body.find("   ncalls") :] if "   ncalls" in body else body
        body = re.sub(r"\S*/camserve/", "camserve/", body)  # the checkout's path is in the heading
        parts.append(f"## {title}\n\n```\n{body.rstrip()}\n```\n")
    out.write_text("\n".join(parts))
    shutil.copyfile(prof, out.with_suffix(".prof"))  # the whole profile, for pstats


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        return load_main(argv[1:])
    if argv[:1] == ["_inproc"]:
        return inproc_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="shapes_gap,gap224", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--resnet", action="store_true", help="also resnet50 (same as adding it to --models)")
    p.add_argument("--ops", default="predict,explain", help="comma-separated, from predict, explain")
    p.add_argument("--clients", type=int, default=32, help="concurrent requests of the CPU / throughput runs")
    p.add_argument("--count", type=int, default=1000, help="counted requests per CPU / throughput run")
    p.add_argument("--latency-count", type=int, default=200, help="counted requests per 1-client run")
    p.add_argument("--warmup", type=int, default=0, help="uncounted requests first (default 2 x clients; 20)")
    p.add_argument("--repeats", type=int, default=10, help="in-process calls timed per model and op")
    p.add_argument("--quick", action="store_true", help="a smoke run: --count 200 --latency-count 50 --repeats 3")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=5.0)
    p.add_argument("--code", type=Path, help="run the server (and the in-process cost) from this checkout")
    p.add_argument("--label", default="latest", help="section of the results file to write (default latest)")
    p.add_argument("--note", default="", help="a sentence added to the section (e.g. what else ran)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare grpc.aio server")
    p.add_argument("--profile", type=Path, help="also profile the batching server (cProfile) into this .md")
    p.add_argument("--profile-only", action="store_true", help="only the --profile run (no results file)")
    p.add_argument(
        "--profile-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cProfile's clock: wall time, or the main thread's CPU time (GIL waits not counted)",
    )
    p.add_argument("--rest", action="store_true", help="only REST vs gRPC on the batching server (label 'rest')")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.md")
    p.add_argument(
        "--compare",
        type=Path,
        metavar="BASE",
        help="only server CPU per request at --clients, batching servers from BASE (before) and from "
        "--code or this checkout (after) beside the bare one, alternated --rounds times (label 'compare')",
    )
    p.add_argument("--rounds", type=int, default=3, help="with --compare: alternations per model and op (median)")
    p.add_argument(
        "--tf-threads",
        metavar="INTRA,INTER",
        help="TensorFlow's thread pools in every server and the in-process measurement (TF_NUM_INTRAOP_THREADS, "
        "TF_NUM_INTEROP_THREADS: what camserve serve --intra-op-threads / --inter-op-threads set); default TF's choice",
    )
    p.add_argument(
        "--passes",
        type=int,
        default=1,
        help="whole measurement passes (servers restarted each time); every measured figure is the median of the "
        "passes' (ratios are taken between the medians)",
    )
    p.add_argument(
        "--loadgen",
        choices=("python", "h2load"),
        default="python",
        help="load generator of the gRPC runs: this script's grpc.aio client (0.1-0.5 ms of CPU a request, on the "
        "cores the server uses) or nghttp2's h2load (C, 0.02-0.14 ms; Debian/Ubuntu: apt-get install nghttp2-client)",
    )
    args = p.parse_args(argv)
    global LOAD_GENERATOR
    LOAD_GENERATOR = args.loadgen
    if args.loadgen == "h2load" and not shutil.which("h2load"):
        p.error("--loadgen h2load needs h2load on PATH (apt-get install nghttp2-client)")
    if args.tf_threads:
        intra, _, inter = args.tf_threads.partition(",")
        # The environment reaches every process (code before the flags too); servers whose code
        # has the flags get them as well (what a user runs).
        os.environ["TF_NUM_INTRAOP_THREADS"], os.environ["TF_NUM_INTEROP_THREADS"] = intra, inter or intra
        os.environ["OPENCV_FOR_THREADS_NUM"] = intra
        os.environ["BENCH_THREAD_FLAGS"] = f"--intra-op-threads {intra} --inter-op-threads {inter or intra}"
        args.note = (
            f"Threads: TensorFlow intra-op {intra}, inter-op {inter or intra}, OpenCV {intra} in the servers and the "
            "in-process measurement (`camserve serve --intra-op-threads / --inter-op-threads` where the server's "
            "code has them, and TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS / OPENCV_FOR_THREADS_NUM). " + args.note
        ).strip()
    if args.rest and args.label == "latest":
        args.label = "rest"
    if args.compare and args.label == "latest":
        args.label = "compare"
    if args.quick:
        args.count, args.latency_count, args.repeats = 200, 50, 3
    models = [m for m in args.models.split(",") if m] + (["resnet50"] if args.resnet else [])
    ops = [o for o in args.ops.split(",") if o]
    if unknown := [o for o in ops if o not in OPS]:
        p.error(f"unknown ops {unknown}; use {', '.join(OPS)}")
    code = args.code.resolve() if args.code else REPO
    env = code_env(args.code.resolve() if args.code else None)

    work_dir = Path(tempfile.mkdtemp(prefix="camserve-bench-"))
    root, responses = work_dir / "models", work_dir / "responses"
    root.mkdir()
    responses.mkdir()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        notes = build_repository(root, models)
        work = []
        for name in models:
            for op in ops:
                f = work_dir / f"{op}__{name}.req"
                f.write_bytes(request_bytes(name, input_size(root, name), op))
                work.append((name, op, f))
        calls = [(OPS[op], f.read_bytes()) for _, op, f in work]

        if args.compare:
            base = args.compare.resolve()
            rows = measure_compare(args, work, calls, root, responses, work_dir, base, code)
            body = compare_report(args, argv, notes, rows, base, code, started)
            write_section(args.out, args.label, body)
            print(f"## {args.label}{body}")
            return 0
        if args.rest:
            rows = measure_rest(args, models, ops, calls, root, work_dir, env, code)
            body = rest_report(args, argv, notes, rows, code)
            write_section(args.out, args.label, body)
            print(f"## {args.label}{body}")
            return 0
        if not args.profile_only:
            passes = [
                measure_all(args, models, ops, work, calls, root, responses, work_dir, env, code)
                for _ in range(args.passes)
            ]
            inproc, results, imported = median_of(passes)
        if args.profile:
            profile_server(args, argv, work, calls, root, work_dir, env, code, started)
        if not args.profile_only:
            body = report(args, argv, models, ops, notes, inproc, results, imported, code, started)
            write_section(args.out, args.label, body)
            print(f"## {args.label}{body}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def checked_import(server: BenchServer, code: Path) -> str:
    """Where the server imported camserve from; an error unless from ``code``."""
    found = server.camserve_file()
    expected = (code / "camserve" / "__init__.py").resolve()
    if Path(found).resolve() != expected:
        raise RuntimeError(f"the server imported {found}, not {expected}")
    return found


def median_of(passes: list[tuple[dict, dict, dict]]) -> tuple[dict, dict, dict]:
    """Several whole passes of :func:`measure_all` as one: every number the median of the
    passes' (error counts summed; texts: the first that says something)."""
    if len(passes) == 1:
        return passes[0]

    def merge(values: list, key: object = None) -> object:
        first = values[0]
        if key in ("errors", "warmup_errors"):  # {status code: count}
            return {k: sum(v.get(k, 0) for v in values) for k in set().union(*values)}
        if isinstance(first, dict):
            return {k: merge([v[k] for v in values], k) for k in first}
        if isinstance(first, bool) or not isinstance(first, int | float):
            return next((v for v in values if v), first)  # e.g. the first error said
        return statistics.median(values)

    inprocs, results, imported = zip(*passes, strict=True)
    return merge(list(inprocs)), merge(list(results)), imported[0]  # type: ignore[return-value]


def measure_all(args, models, ops, work, calls, root, responses, work_dir, env, code):
    """The in-process cost, then each server under load: (in-process, results, where camserve came from)."""
    print("in-process model cost ...", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_inproc", "--root", str(root), "--models"]
    cmd += [",".join(models), "--ops", ",".join(ops), "--batch", str(args.max_batch_size)]
    cmd += ["--repeats", str(args.repeats)]
    done = subprocess.run(cmd, cwd=work_dir, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError("in-process measurement failed:\n" + done.stderr[-3000:])
    inproc = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(inproc["models"]), flush=True)

    results: dict[str, dict] = {}
    imported: dict[str, str] = {"in-process": inproc["camserve"]}
    configs = [
        ("batching", "camserve", ["--max-batch-size", str(args.max_batch_size)]),
        ("unbatched", "camserve", ["--max-batch-size", "1"]),
    ]
    if not args.no_bare:
        configs.append(("bare", "bare", ["--responses", str(responses)]))
    for label, kind, extra in configs:
        if kind == "camserve":
            extra = ["--models", str(root), "--batch-timeout-ms", str(args.batch_timeout_ms), *extra]
        print(f"{label} server ...", flush=True)
        server = BenchServer(kind, work_dir, env, extra)
        try:
            imported[label] = checked_import(server, code)
            server.wait_answering(calls)
            results[label] = measure_server(server, work, args, responses if label == "batching" else None)
        finally:
            server.stop()
    if not args.no_bare and "batching" in results:
        results["paced"] = measure_paced_bare(args, work, results["batching"], responses, work_dir, env)
    return inproc, results, imported


def measure_paced_bare(args, work, batching: dict, responses: Path, work_dir: Path, env) -> dict:
    """Per (model, op): the bare server answering each call after the batching server's p50
    latency at ``clients`` clients (so at about its request rate): grpc.aio's own cost per
    request when answers wait, as any server's that computes something, rather than at the
    bare server's full speed."""
    out = {}
    for name, op, request in work:
        delay = batching[(name, op)]["many"]["p50_ms"]
        print(f"bare server paced at {delay:.1f} ms ({name} {op}) ...", flush=True)
        server = BenchServer("bare", work_dir, env, ["--responses", str(responses), "--delay-ms", f"{delay:.3f}"])
        try:
            server.wait_answering([(OPS[op], request.read_bytes())])
            r = run_load(
                server.pid, server.target, OPS[op], request, args.clients, args.count, args.warmup or 2 * args.clients
            )
            out[(name, op)] = {"many": r, "delay_ms": delay}
        finally:
            server.stop()
    return out


def measure_rest(args, models, ops, calls, root, work_dir, env, code) -> list[dict]:
    """The batching server under the same load over gRPC and over every HTTP path of
    :func:`rest_requests`: one row per (model, op, path)."""
    extra = ["--models", str(root), "--batch-timeout-ms", str(args.batch_timeout_ms)]
    print("batching server (gRPC and HTTP) ...", flush=True)
    server = BenchServer("camserve", work_dir, env, [*extra, "--max-batch-size", str(args.max_batch_size)])
    rows = []
    try:
        checked_import(server, code)
        server.wait_answering(calls)
        for name in models:
            for op in ops:
                grpc_request = work_dir / f"{op}__{name}.req"
                paths: list[RestRequest] = [("gRPC", "", "", grpc_request.read_bytes(), ())]
                paths += rest_requests(name, input_size(root, name), op)
                for label, path, content_type, body, headers in paths:
                    f = work_dir / f"rest__{op}__{name}__{len(rows)}.body"
                    f.write_bytes(body)
                    http = (f"http://127.0.0.1:{server.http_port}{path}", content_type, headers) if path else None
                    warm = args.warmup or 2 * args.clients
                    r = run_load(server.pid, server.target, OPS[op], f, args.clients, args.count, warm, http=http)
                    r.update(model=name, op=op, path=label, request_bytes=len(body))
                    rows.append(r)
                    err = f" errors {r['errors']} ({r['first_error'][:200]})" if r["errors"] else ""
                    print(
                        f"  {name} {op} {label}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                        f"server CPU {r['cpu_ms_per_request']:.3f} ms/request{err}",
                        flush=True,
                    )
    finally:
        server.stop()
    return rows


def measure_compare(args, work, calls, root, responses, work_dir, base: Path, code: Path) -> list[dict]:
    """Server CPU per request at ``args.clients`` clients: the bare server, a batching server
    from ``base`` and one from ``code``, all three up at once and loaded in turn, ``args.rounds``
    times per (model, op) (the median of each); the model's in-process cost from ``code``."""
    print("in-process model cost ...", flush=True)
    models = sorted({n for n, _, _ in work}, key=[n for n, _, _ in work].index)
    ops = sorted({o for _, o, _ in work}, key=[o for _, o, _ in work].index)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_inproc", "--root", str(root), "--models"]
    cmd += [",".join(models), "--ops", ",".join(ops), "--batch", str(args.max_batch_size)]
    cmd += ["--repeats", str(args.repeats)]
    done = subprocess.run(cmd, cwd=work_dir, env=code_env(code), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError("in-process measurement failed:\n" + done.stderr[-3000:])
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    inproc, args.inproc_input = answer["models"], answer.get("input", "float32 model input")
    extra = ["--models", str(root), "--batch-timeout-ms", str(args.batch_timeout_ms)]
    extra += ["--max-batch-size", str(args.max_batch_size)]
    servers: dict[str, BenchServer] = {}
    try:
        # The bare server answers with camserve's real answers: save them from one camserve call each.
        for label, where in (("before", base), ("after", code)):
            servers[label] = BenchServer("camserve", work_dir, code_env(where), extra)
            checked_import(servers[label], where)
            servers[label].wait_answering(calls)
        for name, op, request in work:
            save = responses / f"{OPS[op]}__{name}.bin"
            run_load(servers["after"].pid, servers["after"].target, OPS[op], request, 1, 1, 0, save)
        servers["bare"] = BenchServer("bare", work_dir, code_env(code), ["--responses", str(responses)])
        servers["bare"].wait_answering(calls)
        rows = []
        for name, op, request in work:
            cpu: dict[str, list[float]] = {k: [] for k in servers}
            main: dict[str, list[float]] = {k: [] for k in servers}
            for _ in range(args.rounds):
                for label, server in servers.items():
                    warm = args.warmup or 2 * args.clients
                    r = run_load(server.pid, server.target, OPS[op], request, args.clients, args.count, warm)
                    if r["errors"]:
                        raise RuntimeError(f"{label} {name} {op}: errors {r['errors']} ({r['first_error']})")
                    cpu[label].append(r["cpu_ms_per_request"])
                    main[label].append(r["main_cpu_ms_per_request"])
            row = {k: statistics.median(v) for k, v in cpu.items()}
            row.update(model=name, op=op, model_ms=inproc[name][op]["cpu_ms_per_image"], runs=cpu)
            row["main"] = {k: statistics.median(v) for k, v in main.items()}
            rows.append(row)
            print(f"  {name} {op}: " + ", ".join(f"{k} {v}" for k, v in cpu.items()), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return rows


def compare_report(args, argv, notes, rows: list[dict], base: Path, code: Path, started: str) -> str:
    ms = lambda v: f"{v:.3f} ms"
    table_rows = []
    for r in rows:
        floor = r["bare"]
        beyond = {k: r[k] - r["model_ms"] for k in ("before", "after")}
        table_rows.append(
            [
                r["model"],
                r["op"],
                f"{ms(r['before'])} / {ms(r['after'])}",
                ms(r["model_ms"]),
                f"{ms(beyond['before'])} / **{ms(beyond['after'])}**",
                ms(floor),
                f"{beyond['before'] / floor:.1f}× / **{beyond['after'] / floor:.1f}×**",
                f"{ms(r['main']['before'])} / {ms(r['main']['after'])} ({ms(r['main']['bare'])})",
                " ".join(f"{v:.3f}" for v in r["runs"]["before"])
                + " / "
                + " ".join(f"{v:.3f}" for v in r["runs"]["after"]),
            ]
        )
    lines = [
        f" — before {git_describe(base)} (`{base}`) vs after {git_describe(code)} (`{code}`), run {started}",
        f"Command: `{shlex.join(['python', 'bench/serve.py', *argv])}`.",
        f"Machine: {machine()}; shared 2-core CPU, no GPU, other jobs running. "
        + (args.note + " " if args.note else "")
        + f"Three servers up at once (bare, before, after: batching, max_batch_size={args.max_batch_size}, "
        f"batch_timeout_ms={args.batch_timeout_ms:g}), loaded in turn by a separate load-generator process "
        f"({load_generator()}; {args.clients} requests in flight, {args.count} counted after a warm-up), {args.rounds} rounds per "
        "model and op; figures are the medians. Main thread: the server process's main thread alone "
        "(the asyncio loop with gRPC's Python side and camserve's handlers; the batch worker, TensorFlow's "
        "threads and gRPC's C++ threads are the rest). Server CPU per request, model CPU (in-process, batch "
        f"{args.max_batch_size}, from the after code: {args.inproc_input}) and the bare floor as in the sections above. "
        "Models: " + "; ".join(f"`{k}`: {v}" for k, v in notes.items()) + ".",
        table(
            [
                "model",
                "op",
                "server CPU / request, before / after",
                "model CPU / image",
                "beyond model, before / after",
                "bare grpc.aio floor",
                "beyond / floor, before / after (target ≤ 1.5×)",
                "main thread (event loop) CPU / request, before / after (bare)",
                "every round, before / after (ms)",
            ],
            table_rows,
        ),
    ]
    return lines[0] + "\n\n" + "\n\n".join(lines[1:])


def rest_report(args, argv, notes, rows: list[dict], code: Path) -> str:
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    table_rows = []
    for r in rows:
        base = next(g for g in rows if (g["model"], g["op"], g["path"]) == (r["model"], r["op"], "gRPC"))
        errs = sum(r["errors"].values()) + sum(r["warmup_errors"].values())
        table_rows.append(
            [
                r["model"],
                r["op"],
                r["path"],
                r["request_bytes"],
                r["response_bytes"],
                f"{r['rps']:.0f}",
                f"**{r['rps'] / base['rps']:.2f}×**",
                f"{r['cpu_ms_per_request']:.3f}",
                f"**{r['cpu_ms_per_request'] / base['cpu_ms_per_request']:.2f}×**",
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
                errs,
            ]
        )
    lines = [
        f" — REST vs gRPC, code {git_describe(code)} (`{code}`), run {started}",
        f"Command: `{shlex.join(['python', 'bench/serve.py', *argv])}`.",
        f"Machine: {machine()}; shared 2-core CPU, no GPU. The cores are shared with the load generator and "
        "other jobs: the ratios of one run, side by side, are the figures to read; absolute req/s move "
        "with the machine's load. " + (args.note + " " if args.note else ""),
        "One `camserve serve` process (max_batch_size="
        f"{args.max_batch_size}, batch_timeout_ms={args.batch_timeout_ms:g}) answers gRPC and HTTP; each row "
        f"is a separate load-generator process with {args.clients} requests in flight for {args.count} "
        "counted requests after a warm-up (gRPC: raw bytes through grpc.aio; HTTP: aiohttp client, "
        "keep-alive). Every path carries the same single image (a uint8 tensor of the model's input size, "
        "or its PNG); Predict top_k=1, Explain gradcam with the raw map and the heatmap as floats. "
        "Server CPU per request as in the sections above (the server's threads, over the counted requests). "
        "Models: " + "; ".join(f"`{k}`: {v}" for k, v in notes.items()) + ".",
        table(
            [
                "model",
                "op",
                "path",
                "request bytes",
                "response bytes",
                "req/s",
                "req/s vs gRPC",
                "server CPU ms / request",
                "CPU vs gRPC",
                "p50 / p99 ms",
                "errors",
            ],
            table_rows,
        ),
    ]
    return lines[0] + "\n\n" + "\n\n".join(lines[1:])


def profile_server(args, argv, work, calls, root, work_dir, env, code, started):
    """cProfile of a batching server's main thread under load, into ``args.profile``."""
    print("profiled batching server ...", flush=True)
    prof = work_dir / "server.prof"
    extra = ["--models", str(root), "--batch-timeout-ms", str(args.batch_timeout_ms)]
    env = dict(env, BENCH_PROFILE_CLOCK=args.profile_clock)
    server = BenchServer("camserve", work_dir, env, [*extra, "--max-batch-size", str(args.max_batch_size)], prof)
    try:
        checked_import(server, code)
        server.wait_answering(calls)
        for _name, op, request in work:  # warm up, outside the profile
            run_load(server.pid, server.target, OPS[op], request, args.clients, 2 * args.clients, 0)
        server.proc.send_signal(signal.SIGUSR1)
        for _name, op, request in work:
            run_load(server.pid, server.target, OPS[op], request, args.clients, args.count, 0)
        server.proc.send_signal(signal.SIGUSR2)
        t0 = time.monotonic()
        while not prof.is_file() and time.monotonic() - t0 < 60:
            time.sleep(0.2)
    finally:
        server.stop()
    if not prof.is_file():
        raise RuntimeError("no profile written:\n" + server.log()[-3000:])
    profile_report(
        prof,
        args.profile,
        f"Profile of the `camserve serve` process under load ({args.label}: code {git_describe(code)})\n\n"
        f"cProfile of the server's main thread (the asyncio event loop; executor threads are not "
        f"seen; clock: {'the thread CPU time, GIL waits not counted' if args.profile_clock == 'cpu' else 'wall time, GIL waits counted'}; the profiler adds its own overhead, and every resumption of a coroutine counts as a call) while it answered {args.count} single-image requests at {args.clients} clients for each "
        f"of {', '.join(f'{n} {o}' for n, o, _ in work)} (after start-up and a warm-up, which are not in the profile); "
        f"max_batch_size={args.max_batch_size}, batch_timeout_ms={args.batch_timeout_ms:g}. "
        f"Run {started}; machine: {machine()} (cores shared with the load generator and other jobs). "
        f"Command: `{shlex.join(['python', 'bench/serve.py', *argv])}`.",
    )
    print(f"profile written to {args.profile}", flush=True)


def report(args, argv, models, ops, notes, inproc, results, imported, code, started) -> str:
    ms = lambda v: f"{v:.3f} ms"
    host, lat, detail = [], [], []
    for name in models:
        for op in ops:
            model = inproc["models"][name][op]
            b, u = results["batching"][(name, op)], results["unbatched"][(name, op)]
            bare = results.get("bare", {}).get((name, op))
            beyond = b["many"]["cpu_ms_per_request"] - model["cpu_ms_per_image"]
            floor = bare["many"]["cpu_ms_per_request"] if bare else float("nan")
            paced = results.get("paced", {}).get((name, op))
            paced_floor = paced["many"]["cpu_ms_per_request"] if paced else float("nan")
            host.append(
                [
                    name,
                    op,
                    ms(b["many"]["cpu_ms_per_request"]),
                    ms(model["cpu_ms_per_image"]),
                    f"**{ms(beyond)}**",
                    ms(floor),
                    f"**{beyond / floor:.1f}×**" if bare else "-",
                    "≤ 1.5×",
                    f"{ms(paced_floor)} ({paced['many']['rps']:.0f} req/s, {paced['delay_ms']:.0f} ms wait)"
                    if paced
                    else "-",
                    f"{beyond / paced_floor:.1f}×" if paced else "-",
                ]
            )
            lat.append(
                [
                    name,
                    op,
                    f"{b['one']['p50_ms']:.2f} ms",
                    f"{u['one']['p50_ms']:.2f} ms",
                    f"**{b['one']['p50_ms'] / u['one']['p50_ms']:.2f}×** (≤ 1.1×)",
                    f"{b['many']['rps']:.0f}",
                    f"{model['images_per_s']:.0f}",
                    f"**{b['many']['rps'] / model['images_per_s']:.0%}** (≥ 60 %)",
                    f"{u['many']['rps']:.0f}",
                    f"**{b['many']['rps'] / u['many']['rps']:.1f}×** (≥ 3×)",
                    f"{model['images_per_s'] / u['many']['rps']:.1f}×",
                ]
            )
            for label in ("batching", "unbatched", "bare", "paced"):
                if (name, op) not in results.get(label, {}):
                    continue
                for which, clients in (("many", args.clients), ("one", 1)):
                    if which not in results[label][(name, op)]:
                        continue  # the paced floor runs at clients only
                    r = results[label][(name, op)][which]
                    errs = sum(r["errors"].values()) + sum(r["warmup_errors"].values())
                    detail.append(
                        [
                            name,
                            op,
                            label,
                            clients,
                            r["count"],
                            errs,
                            f"{r['rps']:.0f}",
                            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}",
                            f"{r['cpu_ms_per_request']:.3f} ({r['cpu_ticks_ms_per_request']:.2f})",
                            f"{r['loadgen_cpu_ms_per_request']:.3f}" if "loadgen_cpu_ms_per_request" in r else "",
                            r["response_bytes"],
                        ]
                    )
    where = "; ".join(f"{k}: `{v}`" for k, v in imported.items())
    lines = [
        f" — code {git_describe(code)} (`{code}`), run {started}",
        f"Command: `{shlex.join(['python', 'bench/serve.py', *argv])}`.",
        f"Machine: {machine()}. The cores are shared: the server, the load-generator process and "
        "the other processes on the machine all run on them, so wall-clock figures (latency, "
        "throughput) move with whatever else runs; the server's CPU time per request is the steady "
        "figure. " + (args.note + " " if args.note else "") + f"camserve imported from: {where}.",
        "Models: " + "; ".join(f"`{k}`: {v}" for k, v in notes.items()) + ". Requests: one raw uint8 "
        "image tensor of the model's input size; Predict with top_k=1; Explain with gradcam, "
        "return_raw and return_heatmap. Servers: `camserve serve` with max_batch_size="
        f"{args.max_batch_size}, batch_timeout_ms={args.batch_timeout_ms:g} (batching) or max_batch_size=1 "
        "(unbatched), metrics off; `bench/bare_grpc.py` (bare). Load: " + load_generator() + ", a separate process per "
        f"measurement, {args.clients} requests in flight for {args.count} counted requests (CPU and "
        f"throughput), 1 in flight for {args.latency_count} (latency), after a warm-up."
        + (
            f" Every measured figure is the median of {args.passes} whole passes (servers restarted each "
            "time); ratios are taken between the medians."
            if args.passes > 1
            else ""
        ),
        f"### Host path: server CPU per request at {args.clients} clients (batching server)",
        "Server CPU = CPU time of the server's threads (/proc/<pid>/task/*/schedstat; checked against "
        "the process's utime + stime in clock ticks) over the counted requests / their number; "
        f"model CPU = in-process `Explainer` on a batch of {args.max_batch_size} ({inproc.get('input', 'float32 model input')}), "
        f"process CPU time / {args.max_batch_size} (median of {args.repeats} calls); beyond = server − model; bare "
        "floor = bench/bare_grpc.py's CPU per request under the same load. The batches the server "
        "forms at this load are not always full, so a part of 'beyond' can be the model's own extra cost "
        "at smaller batches. Paced floor (not the issue's target, shown beside it): the same bare server "
        "answering each call after the batching server's p50 latency at this load, so at about its request "
        "rate: grpc.aio's own cost per request when answers wait, as they do in any server that computes.",
        table(
            [
                "model",
                "op",
                "server CPU / request",
                f"model CPU / image (batch {args.max_batch_size})",
                "camserve beyond model",
                "bare grpc.aio floor",
                "beyond / floor",
                "target",
                "paced bare floor",
                "beyond / paced floor",
            ],
            host,
        ),
        f"### Latency and throughput ({args.clients} clients unless said)",
        "Batching's ceiling here: the in-process batched throughput over the unbatched server's, what "
        "batching / no batching would be if serving cost nothing beside the model (the load generator "
        "and the server share the cores).",
        table(
            [
                "model",
                "op",
                "1-client p50, batching",
                "1-client p50, max_batch_size=1",
                "batching / unbatched",
                "req/s, batching",
                f"in-process img/s (batch {args.max_batch_size})",
                "served / in-process",
                "req/s, max_batch_size=1",
                "batching / no batching",
                "in-process / no batching (batching's ceiling here)",
            ],
            lat,
        ),
        "### Every run",
        table(
            [
                "model",
                "op",
                "server",
                "clients",
                "requests",
                "errors",
                "req/s",
                "p50 / p99 ms",
                "server CPU ms / request (from clock ticks)",
                "load generator CPU ms / request",
                "response bytes",
            ],
            detail,
        ),
    ]
    return lines[0] + "\n\n" + "\n\n".join(lines[1:])


if __name__ == "__main__":
    sys.exit(main())
