"""Where a ``camserve serve`` process spends its CPU, thread by thread (issue 9's "reading"
sections of ``bench/results/serve.md``): a batching server (or the bare ``grpc.aio`` server)
loaded by h2load at 32 streams, every thread's ``/proc/<pid>/task/*/schedstat`` read before and
after, µs per request grouped by thread name: the event loop (``MAIN``: gRPC's Python side and
camserve's handlers), the batch worker (``python``: the Explainer's host side), TensorFlow
(``tf_Compute``), gRPC's C++ threads (``event_engine``); and from /metrics the batches formed,
their mean size and the images they were padded with. Prints one line per run; no results file.

    python bench/serve_threads.py                          # shapes_gap explain, this checkout
    python bench/serve_threads.py --code /tmp/base --model gap224 --op predict --runs 3
    python bench/serve_threads.py --bare                   # the bare grpc.aio server instead
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import urllib.request
from pathlib import Path

import serve


def per_thread_ns(pid: int) -> collections.Counter[str]:
    """CPU ns so far of the live threads of ``pid`` by name (digits and dashes dropped; the main
    thread is ``MAIN``)."""
    out: collections.Counter[str] = collections.Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
            ns = int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        out["MAIN" if task == str(pid) else name.rstrip("0123456789-_")] += ns
    return out


def batch_figures(port: int, op: str, bare: bool) -> tuple[float, float, float]:
    """(batches, images in them, padding images) of ``op`` so far, from the server's /metrics
    (zeros for the bare server, which has none)."""
    if bare:
        return 0.0, 0.0, 0.0
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = {
        "camserve_batch_size_count": 0,
        "camserve_batch_size_sum": 1,
        "camserve_batch_padding_images_total": 2,
    }
    out = [0.0, 0.0, 0.0]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("operation") == op:
                out[wanted[sample.name]] += sample.value
    return out[0], out[1], out[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", type=Path, help="run the server from this checkout")
    p.add_argument("--model", default="shapes_gap", choices=sorted(serve.MODELS))
    p.add_argument("--op", default="explain", choices=sorted(serve.OPS))
    p.add_argument("--count", type=int, default=3000, help="counted requests per run")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--bare", action="store_true", help="the bare grpc.aio server (bench/bare_grpc.py)")
    args = p.parse_args(argv)
    serve.LOAD_GENERATOR = "h2load"
    work = Path(tempfile.mkdtemp(prefix="camserve-threads-"))
    root = work / "models"
    serve.build_repository(root, [args.model])
    request = work / "request.bin"
    request.write_bytes(serve.request_bytes(args.model, serve.input_size(root, args.model), args.op))
    method = serve.OPS[args.op]
    env = serve.code_env(args.code)
    env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OPENCV_FOR_THREADS_NUM="1")
    env["BENCH_THREAD_FLAGS"] = "--intra-op-threads 1 --inter-op-threads 1"
    metrics_port = serve.free_port()
    flags = ["--models", str(root), "--max-batch-size", "32", "--batch-timeout-ms", "5"]
    server = serve.BenchServer("camserve", work, env, [*flags, "--metrics-port", str(metrics_port)])
    try:
        server.wait_answering([(method, request.read_bytes())])
        if args.bare:  # camserve's real answer, canned
            responses = work / "responses"
            responses.mkdir()
            serve.run_load(
                server.pid, server.target, method, request, 1, 1, 0, save=responses / f"{method}__{args.model}.bin"
            )
            server.stop()
            server = serve.BenchServer("bare", work, env, ["--responses", str(responses)])
            server.wait_answering([(method, request.read_bytes())])
        serve.run_load(server.pid, server.target, method, request, 32, 500, 100)  # warm-up
        for _ in range(args.runs):
            before, batches = per_thread_ns(server.pid), batch_figures(metrics_port, args.op, args.bare)
            res = serve.run_load(server.pid, server.target, method, request, 32, args.count, 0)
            after, batched = per_thread_ns(server.pid), batch_figures(metrics_port, args.op, args.bare)
            used = {k: (after[k] - before.get(k, 0)) / args.count / 1000 for k in after}
            shown = "  ".join(f"{k} {v:.0f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 1)
            n, images, padding = (b - a for a, b in zip(batches, batched))
            batching = f"; {n:.0f} batches, {images / n:.1f} images each, {padding:.0f} padded" if n else ""
            print(
                f"{args.model} {args.op}: {res['rps']:.0f} req/s, {sum(used.values()):.0f} µs a request: {shown}{batching}"
            )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
