"""Benchmark: one FCN pass against the same windows classified as batched crops, side by side.

    python bench/dense.py [--repeats 5] [--models VGG16,ResNet50] [--out bench/results/dense.md]
    python bench/dense.py --fine-stride 640 [--out bench/results/dense_fine_stride.md]

VGG16 with its Flatten → Dense head (384 px image, 224 px window, stride 32: 6×6 = 36 windows)
and the ResNet50 window model (GAP → 7×7 average pool, same geometry). The FLOP ratio is
(36 × FLOPs of the classifier at 224 px) / (FLOPs of the FCN at 384 px), both counted from the
layer shapes (Conv2D / DepthwiseConv2D / Dense multiply-adds). Target (SPEC §8.3): measured
speedup ≥ 90 % of the FLOP ratio. Timings are medians of interleaved repeats (FCN, then crops,
in every round), after one untimed warm-up call of each.

``--fine-stride SIZE``: instead, the peak resident memory and CPU time of one stride-1 call on a
SIZE×SIZE image with the bundled ``shapes_fc`` (total stride 8: 64 shifted copies), each in a
fresh process, with the default pixel budget per forward pass and with the budget lifted (the
forward batches as they were before issue 9: ``batch_size`` copies, 32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras
import numpy as np
import tensorflow as tf
from common import machine, table

from camserve.dense import dense_scores
from camserve.dense.fcn import layer_flops, to_fully_convolutional

IMAGE, WINDOW, STRIDE = 384, 224, 32


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Wall-clock min / median and process CPU-time median (all threads) per function."""
    for fn in fns.values():
        fn()  # warm-up: tracing, allocation
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return {
        k: {
            "min": min(wall[k]),
            "median": statistics.median(wall[k]),
            "cpu": statistics.median(cpu[k]),
            "cpu_min": min(cpu[k]),
        }
        for k in fns
    }


def bench(name: str, repeats: int) -> tuple[list[list[object]], dict[str, object]]:
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, include_top=True)
    fcn = to_fully_convolutional(model)
    image = np.random.default_rng(0).uniform(-120, 120, (IMAGE, IMAGE, 3)).astype(np.float32)
    n = (IMAGE - WINDOW) // STRIDE + 1
    crops = np.stack(
        [image[i * STRIDE : i * STRIDE + WINDOW, j * STRIDE : j * STRIDE + WINDOW] for i in range(n) for j in range(n)]
    )
    flops_crops = len(crops) * layer_flops(model, (WINDOW, WINDOW, 3))
    flops_fcn = layer_flops(fcn.model, (IMAGE, IMAGE, 3))
    ratio = flops_crops / flops_fcn

    fcn_call = tf.function(lambda x: fcn.model(x, training=False), jit_compile=False)
    clf_call = tf.function(lambda x: model(x, training=False), jit_compile=False)
    x_img, x_crops = tf.constant(image[None]), tf.constant(crops)
    grid_fcn = fcn_call(x_img).numpy()[0]
    grid_crops = clf_call(x_crops).numpy().reshape(n, n, -1)
    t = _interleaved(
        {
            "fcn": lambda: fcn_call(x_img).numpy(),
            "crops": lambda: clf_call(x_crops).numpy(),
            "lib_fcn": lambda: dense_scores(fcn, image, mode="fcn"),
            "lib_crops": lambda: dense_scores(fcn, image, mode="crops", batch_size=len(crops)),
        },
        repeats,
    )
    rows = []
    for label, a, b in (
        ("compiled model calls", t["fcn"], t["crops"]),
        ("`dense_scores` fcn vs crops", t["lib_fcn"], t["lib_crops"]),
    ):
        for stat, unit in (("min", "wall min"), ("median", "wall median"), ("cpu", "CPU time median")):
            speedup = b[stat] / a[stat]
            rows.append(
                [
                    name,
                    label,
                    unit,
                    f"{a[stat] * 1000:.0f}",
                    f"{b[stat] * 1000:.0f}",
                    f"{speedup:.2f}×",
                    f"{ratio:.2f}×",
                    f"{speedup / ratio * 100:.0f} %",
                    "yes" if speedup >= 0.9 * ratio else "**no**",
                ]
            )
    info = {
        "name": name,
        "grid": grid_fcn.shape,
        "exact": fcn.exact,
        "flops_crops": flops_crops,
        "flops_fcn": flops_fcn,
        "max_abs_diff": float(np.max(np.abs(grid_fcn - grid_crops))),
        "argmax_agree": float(np.mean(grid_fcn.argmax(-1) == grid_crops.argmax(-1))),
    }
    return rows, info


def vgg16_blocks(repeats: int) -> list[list[object]]:
    """Where the time goes: VGG16 prefixes up to each block's pool, FCN image vs crops batch,
    process CPU time (min over interleaved repeats), differenced block by block."""
    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None, include_top=True)
    image = np.random.default_rng(0).uniform(-120, 120, (1, IMAGE, IMAGE, 3)).astype(np.float32)
    n = (IMAGE - WINDOW) // STRIDE + 1
    crops = np.stack(
        [
            image[0, i * STRIDE : i * STRIDE + WINDOW, j * STRIDE : j * STRIDE + WINDOW]
            for i in range(n)
            for j in range(n)
        ]
    )
    rows, prev = [], (0.0, 0.0, 0, 0)
    for block in range(1, 6):
        prefix = []
        for layer in model.layers[1:]:
            prefix.append(layer)
            if layer.name == f"block{block}_pool":
                break
        calls, flops = [], []
        for size, x in ((IMAGE, image), (WINDOW, crops)):
            inp = keras.Input((size, size, 3))
            y = inp
            for layer in prefix:
                y = layer(y)
            sub = keras.Model(inp, y)
            flops.append(layer_flops(sub, (size, size, 3)) * len(x))
            fn = tf.function(lambda a, sub=sub: sub(a, training=False))
            xt = tf.constant(x)
            calls.append(lambda fn=fn, xt=xt: fn(xt).numpy())
        t = _interleaved({"fcn": calls[0], "crops": calls[1]}, repeats)
        cum = (t["fcn"]["cpu_min"], t["crops"]["cpu_min"], flops[0], flops[1])
        d = [c - p for c, p in zip(cum, prev)]
        prev = cum
        rows.append(
            [
                f"block{block}",
                f"{d[2] / 1e9:.1f}",
                f"{d[3] / 1e9:.1f}",
                f"{d[0] * 1000:.0f}",
                f"{d[1] * 1000:.0f}",
                f"{d[2] / d[0] / 1e9:.0f}",
                f"{d[3] / d[1] / 1e9:.0f}",
                f"{d[1] / d[0]:.2f}×",
                f"{d[3] / d[2]:.2f}×",
            ]
        )
    return rows


BLOCK_HEADER = [
    "VGG16 part",
    "FCN GFLOPs",
    "crops GFLOPs",
    "FCN CPU ms",
    "crops CPU ms",
    "FCN GFLOP/s",
    "crops GFLOP/s",
    "speedup",
    "FLOP ratio",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="VGG16,ResNet50")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    parser.add_argument("--blocks", action="store_true", help="also break VGG16 down block by block")
    parser.add_argument("--fine-stride", type=int, default=0, metavar="SIZE", help="memory of stride 1 instead")
    args = parser.parse_args(argv)
    if args.fine_stride:
        text = fine_stride(args.fine_stride)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0
    rows, infos = [], []
    load_before = os.getloadavg()
    for name in args.models.split(","):
        r, info = bench(name.strip(), args.repeats)
        rows += r
        infos.append(info)
        print(table(HEADER, r), flush=True)
    blocks = vgg16_blocks(args.repeats) if args.blocks else []
    load_after = os.getloadavg()
    report = [
        "# Dense scores: one FCN pass vs batched crops",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `python bench/dense.py --repeats {args.repeats} --models {args.models}"
        + (" --blocks" if args.blocks else "")
        + (f" --out {args.out}`" if args.out else "`"),
        "",
        f"{IMAGE}×{IMAGE} image, {WINDOW}×{WINDOW} window, stride {STRIDE}: "
        f"{((IMAGE - WINDOW) // STRIDE + 1) ** 2} windows. `weights=None` (random weights; timing does not depend "
        f"on them). {args.repeats} interleaved repeats after a warm-up; wall-clock min and median, and the median "
        "process CPU time (all threads). The machine is shared: 1-minute load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after the run on its 2 cores, so wall medians carry "
        "other people's work; the wall minimum and the CPU time are the better measures of the cost. "
        "Target: speedup ≥ 90 % of the FLOP ratio.",
        "",
        table(HEADER, rows),
        "",
        "FLOPs from the layer shapes (2 × multiply-adds of Conv2D / DepthwiseConv2D / Dense):",
        "",
        table(
            ["model", "grid", "crops GFLOPs", "FCN GFLOPs", "exact", "max abs diff FCN vs crops", "arg-max agreement"],
            [
                [
                    i["name"],
                    "×".join(map(str, i["grid"])),
                    f"{i['flops_crops'] / 1e9:.1f}",
                    f"{i['flops_fcn'] / 1e9:.1f}",
                    i["exact"],
                    f"{i['max_abs_diff']:.2e}",
                    f"{i['argmax_agree'] * 100:.0f} %",
                ]
                for i in infos
            ],
        ),
        "",
        "Both models pad (`padding='same'` / ZeroPadding2D), so `exact` is False: the FCN grid is not "
        'the classifier on each crop near crop borders (last table); use `mode="crops"` where exactness matters.',
    ]
    if blocks:
        report += [
            "",
            "VGG16 block by block (process CPU time, min over the repeats, of prefixes up to each block's pool, "
            "differenced; the head is the rest):",
            "",
            table(BLOCK_HEADER, blocks),
        ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


FINE_STRIDE_CHILD = """
import os, resource, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
from camserve.dense import dense_scores
from camserve.serving.repository import load_model_dir
root, size, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
entry = load_model_dir(root)
dense_scores(entry.model, np.zeros((*entry.config.input_size, 3), np.float32))  # convert and trace first
image = np.random.default_rng(0).random((size, size, 3), dtype=np.float32)
before, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.process_time()
result = dense_scores(entry.model, image, stride=1, max_batch_pixels=budget)
cpu = time.process_time() - cpu
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{result[0].scores.shape[0]}x{result[0].scores.shape[1]} {grew:.0f} {cpu:.2f}")
"""


def fine_stride(size: int) -> str:
    """The ``--fine-stride`` report: peak RSS growth and CPU time of one stride-1 call."""
    import subprocess

    from camserve.dense.scores import MAX_BATCH_PIXELS

    root = str(Path(__file__).resolve().parents[1] / "models" / "shapes_fc")
    rows = []
    for label, budget in ((f"default ({MAX_BATCH_PIXELS} pixels per pass)", MAX_BATCH_PIXELS), ("lifted", 1 << 60)):
        out = subprocess.run(
            [sys.executable, "-c", FINE_STRIDE_CHILD, root, str(size), str(budget)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        rows.append([f"{size}×{size}", out[0], label, out[1], out[2]])
    return "\n".join(
        [
            "# Dense scores at stride 1: memory of the shifted copies",
            "",
            f"Machine: {machine()}.",
            "",
            f"Command: `python bench/dense.py --fine-stride {size}` (each row a fresh process; peak resident "
            "memory growth over the call, process CPU time of all threads).",
            "",
            table(["image", "grid", "pixel budget per forward pass", "peak RSS growth MiB", "CPU s"], rows),
            "",
        ]
    )


HEADER = ["model", "what", "time", "FCN ms", "crops ms", "speedup", "FLOP ratio", "speedup / ratio", "≥ 90 %"]

if __name__ == "__main__":
    sys.exit(main())
