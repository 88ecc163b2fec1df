"""Benchmark: the accelerator options of the engine (XLA, mixed precision) against plain float32,
per model and operation, in CPU time per call (all threads, ``time.process_time``) and wall time.

    python bench/accelerator.py [--quick] [--resnet] [--out bench/results/accelerator.md]

On a CPU-only machine this measures what ``--xla`` and ``--precision mixed_float16`` cost or
save there; on a GPU the same script shows their effect on the device (the model pinned to
``/GPU:0`` by ``device="auto"``). First-call times include tracing and (XLA) compilation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras
import numpy as np
from common import machine, table

from camserve import Explainer

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "float32": {},
    "xla": {"jit_compile": True},
    "mixed_float16": {"precision": "mixed_float16"},
    "mixed_float16 + xla": {"precision": "mixed_float16", "jit_compile": True},
}


def measure(fn, repeats: int) -> tuple[float, float, float]:
    """(first call wall s, median CPU s per call, median wall s per call) after the first call."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return first, statistics.median(cpu), statistics.median(wall)


def models(resnet: bool) -> list[tuple[str, keras.Model, np.ndarray, int]]:
    """(name, model, images of one batch, batch size) for each benchmarked model."""
    from serve import gap224_model

    from camserve.serving.repository import load_model_dir

    rng = np.random.default_rng(0)
    out = []
    entry = load_model_dir(REPO / "models/shapes_gap")
    size = tuple(entry.config.input_size)
    out.append(("shapes_gap (64 px)", entry.model, rng.random((32, *size, 3), dtype=np.float32), 32))
    keras.utils.set_random_seed(0)
    out.append(("gap224 (224 px)", gap224_model(), rng.random((8, 224, 224, 3), dtype=np.float32), 8))
    if resnet:
        keras.utils.set_random_seed(0)
        net = keras.applications.ResNet50(weights=None)
        out.append(("ResNet50 (224 px)", net, rng.normal(0, 50, (4, 224, 224, 3)).astype(np.float32), 4))
    return out


def summary(rows: list[list[str]]) -> list[str]:
    """What the table says, per option: its CPU time against float32 over every model and operation."""
    out = ["## Summary", ""]
    for label in list(CONFIGS)[1:]:
        ratios = sorted(float(r[5]) for r in rows if r[2] == label)
        out.append(
            f"- `{label}`: {min(ratios):.2f}–{max(ratios):.2f}× the CPU time of float32 "
            f"(median {statistics.median(ratios):.2f}×, {len(ratios)} model/operation pairs)"
        )
    return out + [
        "",
        "On a CPU neither option pays: TensorFlow's own CPU kernels are as good as XLA's here and XLA adds "
        "compilation to the first call of every batch bucket, and CPUs have no fast float16 arithmetic, so "
        "mixed precision only adds casts. Both are meant for GPUs (`mixed_float16` runs convolutions and "
        "matrix products on tensor cores, Volta and later; XLA fuses the element-wise work around them): "
        "run this script on the GPU before turning them on there. Accuracy of both against float32 is "
        "checked in `tests/explain/test_accelerator_options.py` (maps within 2e-2 of their peak and "
        "probabilities within 2e-3 for mixed_float16; 1e-4 for XLA).",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 timed runs instead of 5")
    parser.add_argument("--resnet", action="store_true", help="also ResNet50 (slow on CPU)")
    parser.add_argument("--score-channels", type=int, default=16, help="Score-CAM channel cap")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/accelerator.md")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    rows = []
    for name, model, images, batch in models(args.resnet):
        base: dict[str, float] = {}
        for label, options in CONFIGS.items():
            ex = Explainer(model, max_batch_size=batch, max_channels=args.score_channels, **options)
            ops = {
                f"predict, batch {batch}": lambda ex=ex, images=images: ex.predict(images),
                f"gradcam, batch {batch}": lambda ex=ex, images=images: ex.explain(images, methods=("gradcam",)),
                "gradcam, batch 1": lambda ex=ex, images=images: ex.explain(images[:1], methods=("gradcam",)),
                # batch x channels masked passes, in chunks of 32 with a checkpoint between them
                f"scorecam ({args.score_channels} channels), batch {batch}": lambda ex=ex, images=images: ex.explain(
                    images, methods=("scorecam",)
                ),
            }
            for op, fn in ops.items():
                first, cpu, wall = measure(fn, repeats)
                if label == "float32":
                    base[op] = cpu
                rows.append(
                    [
                        name,
                        op,
                        label,
                        f"{cpu * 1000:.1f}",
                        f"{wall * 1000:.1f}",
                        f"{cpu / base[op]:.2f}",
                        f"{first:.2f}",
                    ]
                )
                print(*rows[-1], sep=" | ", flush=True)
    lines = [
        "# Accelerator options: XLA and mixed precision",
        "",
        f"Machine: {machine()}",
        f"Command: `python bench/accelerator.py{' --quick' if args.quick else ''}{' --resnet' if args.resnet else ''}` "
        f"(median of {repeats} timed calls after a first call; CPU = process CPU time of all threads)",
        "",
        table(
            ["model", "operation", "options", "CPU ms / call", "wall ms / call", "CPU × float32", "first call s"],
            rows,
        ),
        "",
    ]
    text = "\n".join(lines + summary(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
