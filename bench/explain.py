"""Benchmark: explanation cost against plain prediction, and against tf-keras-vis and the
keras.io Grad-CAM recipe, side by side in one run on the same model and batch.

    python bench/explain.py [--quick] [--out bench/results/explain.md]

Targets (SPEC §8.1-8.2): Grad-CAM and CAM ≤ 1.10× prediction; ≥ 5× faster than tf-keras-vis
Grad-CAM(++); Score-CAM ≥ 2× faster than tf-keras-vis Scorecam at the same channel count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import keras
import numpy as np
import tensorflow as tf
from common import machine, table, timeit

from camserve import Explainer

REPO = Path(__file__).resolve().parents[1]


def keras_io_gradcam(model, layer_name: str):
    """The keras.io "Grad-CAM class activation visualization" recipe, applied to a batch."""
    grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])

    def run(images):
        with tf.GradientTape() as tape:
            conv, preds = grad_model(images)
            idx = tf.argmax(preds, axis=1)
            channel = tf.gather(preds, idx, batch_dims=1)
        grads = tape.gradient(channel, conv)
        pooled = tf.reduce_mean(grads, axis=(1, 2))
        heat = tf.einsum("bhwk,bk->bhw", conv, pooled)
        heat = tf.maximum(heat, 0) / tf.reduce_max(heat)
        return heat.numpy()

    return run


def tf_keras_vis_runners(model, layer_name: str, max_n: int):
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    def scores(images):
        return CategoricalScore(list(np.argmax(model.predict(images, verbose=0), axis=1)))

    gradcam = Gradcam(model, model_modifier=ReplaceToLinear(), clone=True)
    gradcampp = GradcamPlusPlus(model, model_modifier=ReplaceToLinear(), clone=True)
    scorecam = Scorecam(model)
    return {
        "tf-keras-vis Gradcam": lambda x, s: gradcam(s, x, penultimate_layer=layer_name),
        "tf-keras-vis GradcamPlusPlus": lambda x, s: gradcampp(s, x, penultimate_layer=layer_name),
        f"tf-keras-vis Scorecam (max_N={max_n})": lambda x, s: scorecam(
            s, x, penultimate_layer=layer_name, max_N=max_n
        ),
    }, scores


def bench_model(name: str, model, images: np.ndarray, methods, score_channels: int, repeats: int, class_names=None):
    layer_name = None
    ex = Explainer(model, class_names=class_names, max_batch_size=len(images))
    capped = Explainer(model, class_names=class_names, max_batch_size=len(images), max_channels=score_channels)
    layer_name = ex.layer_name
    predict = tf.function(lambda x: model(x, training=False))
    x = tf.constant(images)
    base = timeit(lambda: predict(x).numpy(), repeats=repeats)
    rows = [[name, "plain prediction (compiled model call)", f"{base * 1000:.1f}", "1.00", ""]]

    def add(label, seconds, note=""):
        rows.append([name, label, f"{seconds * 1000:.1f}", f"{seconds / base:.2f}", note])

    ours = {}
    for m in methods:
        runner = capped if m in ("scorecam", "ablationcam") else ex
        note = (
            f"{score_channels} of {model.get_layer(layer_name.split('/')[0]).output.shape[-1]} channels"
            if m in ("scorecam", "ablationcam")
            else ""
        )
        r = 1 if m in ("scorecam", "ablationcam") else repeats
        ours[m] = timeit(lambda m=m, runner=runner: runner.explain(images, methods=(m,)), repeats=r)
        add(f"camserve {m}", ours[m], note)
    all_grad = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")
    t = timeit(lambda: ex.explain(images, methods=all_grad), repeats=repeats)
    add("camserve 5 gradient methods in one call", t, "one forward + one backward")
    add("keras.io Grad-CAM recipe (eager)", timeit(lambda: keras_io_gradcam(model, layer_name)(x), repeats=repeats))
    runners, scores = tf_keras_vis_runners(model, layer_name, score_channels)
    s = scores(images)
    theirs = {}
    for label, fn in runners.items():
        r = 1 if "Scorecam" in label else repeats
        theirs[label] = timeit(lambda fn=fn: fn(images, s), repeats=r)
        add(label, theirs[label])
    speedups = {
        "Grad-CAM vs tf-keras-vis": theirs["tf-keras-vis Gradcam"] / ours["gradcam"],
        "Grad-CAM++ vs tf-keras-vis": theirs["tf-keras-vis GradcamPlusPlus"] / ours["gradcam++"],
        "Score-CAM vs tf-keras-vis": theirs[f"tf-keras-vis Scorecam (max_N={score_channels})"] / ours["scorecam"],
    }
    return rows, speedups, base, ours


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small repeats, fewer methods (smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/explain.md")
    parser.add_argument("--resnet-batch", type=int, default=8)
    parser.add_argument("--shapes-batch", type=int, default=64)
    parser.add_argument("--score-channels", type=int, default=16, help="channel cap for Score-CAM on both sides")
    parser.add_argument(
        "--full-scorecam",
        action="store_true",
        help="also Score-CAM over all 2048 ResNet50 channels (1 image), with peak memory",
    )
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    methods = ("cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam", "ablationcam")
    rng = np.random.default_rng(0)
    all_rows, summary = [], []
    shapes_dir = REPO / "models/shapes_gap"
    if (shapes_dir / "config.toml").exists():
        from camserve.datasets.shapes import make_dataset
        from camserve.serving.repository import load_model_dir

        entry = load_model_dir(shapes_dir)
        raw, _, _ = make_dataset(args.shapes_batch, seed=123, size=entry.config.input_size)
        images = (raw / 255.0).astype(np.float32)
        rows, speedups, base, ours = bench_model(
            "shapes_gap", entry.model, images, methods, args.score_channels, repeats, entry.config.class_names
        )
        all_rows += rows
        summary.append(("shapes_gap", args.shapes_batch, speedups, base, ours))
    keras.utils.set_random_seed(0)
    resnet = keras.applications.ResNet50(weights=None)
    images = rng.normal(0, 50, (args.resnet_batch, 224, 224, 3)).astype(np.float32)
    rows, speedups, base, ours = bench_model("ResNet50", resnet, images, methods, args.score_channels, repeats)
    all_rows += rows
    summary.append(("ResNet50", args.resnet_batch, speedups, base, ours))

    full = []
    if args.full_scorecam:
        import resource
        import time

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ex = Explainer(resnet, chunk_size=32, max_batch_size=1)
        start = time.perf_counter()
        ex.explain(images[:1], methods=("scorecam",))
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        full = [
            "",
            "## Score-CAM over all 2048 channels of ResNet50 (1 image, chunk_size=32)",
            "",
            f"{seconds:.1f} s (2048 masked forward passes, including compilation); peak resident memory "
            f"{after:.0f} MiB after vs {before:.0f} MiB before (whole process, all benchmarks above included).",
        ]

    lines = [
        "# Explanation benchmark",
        "",
        f"Machine: {machine()}",
        f"Command: `python bench/explain.py{' --quick' if args.quick else ''}` (median of {repeats} timed runs after a warm-up; Score-CAM / Ablation-CAM: 1 timed run)",
        "",
        table(["model", "what", "ms / batch", "× prediction", "note"], all_rows),
        "",
        "## Targets",
        "",
    ]
    for name, batch, sp, base, ours in summary:
        lines.append(
            f"- {name} (batch {batch}): Grad-CAM {ours['gradcam'] / base:.2f}× prediction, CAM {ours['cam'] / base:.2f}× (target ≤ 1.10); "
            + "; ".join(f"{k}: {v:.1f}× faster" for k, v in sp.items())
            + " (targets: ≥ 5× for Grad-CAM(++), ≥ 2× for Score-CAM)"
        )
    text = "\n".join(lines + full) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
