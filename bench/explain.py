"""Benchmark: explanation cost against plain prediction, and against tf-keras-vis and the
keras.io Grad-CAM recipe, side by side in one run on the same model and batch.

    python bench/explain.py [--quick] [--out bench/results/explain.md]
    python bench/explain.py --new-methods   # issue 12's methods on ResNet50: appends a section
    python bench/explain.py --aug-smooth    # aug_smooth / eigen_smooth on ResNet50: appends a section

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


#: Issue 12's methods, timed by :func:`new_methods_section`.
NEW_METHODS = (
    "kpcacam",
    "fem",
    "gradcamelementwise",
    "eigengradcam",
    "finercam",
    "shapleycam",
    "guidedbackprop",
    "guided_gradcam",
    "smoothgrad",
    "integrated_gradients",
)


def cpu_and_wall(fn, repeats: int) -> tuple[float, float]:
    """Median process CPU seconds (user + system, every thread: resource.getrusage) and wall
    seconds of ``fn()`` after one untimed warm-up call (which compiles)."""
    import resource
    import statistics
    import time

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    fn()
    cpus, walls = [], []
    for _ in range(repeats):
        c0, w0 = cpu(), time.perf_counter()
        fn()
        cpus.append(cpu() - c0)
        walls.append(time.perf_counter() - w0)
    return statistics.median(cpus), statistics.median(walls)


def new_methods_section(batch: int, repeats: int) -> list[str]:
    """Each issue-12 method against plain prediction on ResNet50 (weights=None), side by side in
    one run: the Markdown section appended to the results."""
    from camserve.explain.methods import METHODS

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None)
    images = np.random.default_rng(0).normal(0, 50, (batch, 224, 224, 3)).astype(np.float32)
    ex = Explainer(model, max_batch_size=batch)
    base_cpu, base_wall = cpu_and_wall(lambda: ex.predict(images), repeats)
    rows = [["plain prediction (Explainer.predict)", f"{base_cpu:.2f}", "1.00", f"{base_wall:.2f}", "1.00", ""]]
    for m in ("gradcam",) + NEW_METHODS:
        n = 1 if METHODS[m].samples else repeats
        c, w = cpu_and_wall(lambda m=m: ex.explain(images, methods=(m,)), n)
        note = f"{METHODS[m].samples} copies per image, chunk_size {ex.chunk_size}" if METHODS[m].samples else ""
        rows.append([m, f"{c:.2f}", f"{c / base_cpu:.2f}", f"{w:.2f}", f"{w / base_wall:.2f}", note])
    return [
        "",
        f"## Issue 12 methods against prediction (ResNet50, weights=None, batch {batch})",
        "",
        f"Machine: {machine()} (shared 2-core CPU, no GPU, other engineers' jobs running).",
        f"Command: `python bench/explain.py --new-methods` (median of {repeats} timed runs after a warm-up "
        "call that compiles; SmoothGrad / Integrated Gradients: 1 timed run). CPU: user + system seconds of "
        "the process (resource.getrusage), steadier than wall time on a shared machine.",
        "",
        table(["method", "CPU s / batch", "× prediction (CPU)", "wall s / batch", "× prediction (wall)", "note"], rows),
        "",
    ]


def aug_smooth_section(batch: int, repeats: int) -> list[str]:
    """aug_smooth's cost (6 views batched into one pass) against plain prediction on ResNet50
    (weights=None), side by side in one run, with the 6 views looped as separate calls and
    eigen_smooth beside: the Markdown section appended to the results (goal: aug_smooth
    Grad-CAM ≤ 6.5× prediction)."""
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None)
    images = np.random.default_rng(0).normal(0, 50, (batch, 224, 224, 3)).astype(np.float32)
    ex = Explainer(model, max_batch_size=batch)
    views = [(images[:, :, ::-1] if flip else images) * s for flip in (False, True) for s in (1.0, 1.1, 0.9)]
    runs = {
        "plain prediction (Explainer.predict)": lambda: ex.predict(images),
        "gradcam": lambda: ex.explain(images),
        "gradcam, aug_smooth=True (6 views, one pass)": lambda: ex.explain(images, aug_smooth=True),
        "gradcam on the 6 views, 6 calls (looped)": lambda: [ex.explain(v) for v in views],
        "gradcam, eigen_smooth=True": lambda: ex.explain(images, eigen_smooth=True),
    }
    rows, base = [], None
    for label, fn in runs.items():
        c, w = cpu_and_wall(fn, repeats)
        base = base or (c, w)
        rows.append([label, f"{c:.2f}", f"{c / base[0]:.2f}", f"{w:.2f}", f"{w / base[1]:.2f}"])
    return [
        "",
        f"## aug_smooth and eigen_smooth against prediction (ResNet50, weights=None, batch {batch})",
        "",
        f"Machine: {machine()} (shared 2-core CPU, no GPU, other engineers' jobs running).",
        f"Command: `python bench/explain.py --aug-smooth` (median of {repeats} timed runs after a warm-up call "
        "that compiles). CPU: user + system seconds of the process (resource.getrusage). Goal: aug_smooth "
        "≤ 6.5× prediction (the 6 views batched, not looped).",
        "",
        table(["what", "CPU s / batch", "× prediction (CPU)", "wall s / batch", "× prediction (wall)"], rows),
        "",
    ]


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
    parser.add_argument(
        "--new-methods", action="store_true", help="only issue 12's methods on ResNet50; appends a section to --out"
    )
    parser.add_argument(
        "--aug-smooth", action="store_true", help="only aug_smooth / eigen_smooth on ResNet50; appends a section"
    )
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    if args.aug_smooth:
        section = "\n".join(aug_smooth_section(args.resnet_batch, 2 if args.quick else 3))
        with args.out.open("a") as f:
            f.write(section)
        print(section)
        return 0
    if args.new_methods:
        section = "\n".join(new_methods_section(args.resnet_batch, 2 if args.quick else 3))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(section)
        print(section)
        return 0
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
