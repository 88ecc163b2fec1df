"""Benchmark: detection quality of `camserve dense` with its defaults on generated scenes.

    python bench/dense_detections.py [--scenes 30] [--model models/shapes_fc]
        [--before-model DIR] [--out bench/results/dense_detections.md]

Scenes: 256 px, four shapes each, from camserve.datasets.shapes with three seeds never used
in training (the first is the one config.toml's [metrics] records), each alone and pooled; two sets: the training sizes' range (20–44 px, the generator's default) and 15–60 px
(the pyramid's range). Each image runs the same library call as `camserve dense`
(camserve.dense.detect with the model's [dense] settings). Figures: windows by containment
(a detection is right when its class matches an object and its window holds ≥ 80 % of it;
the issue's rule), tight boxes by IoU ≥ 0.5 (precision, recall, AP@0.5), and over the true
window detections the share of tight boxes with IoU ≥ 0.5 and the mean IoU of tight boxes
and of windows. ``--before-model``: also the pipeline as it was (per-class NMS at threshold 0.5,
IoU 0.3, scale 1, no margin, windows only) on that model folder, e.g. the shapes_fc of the
commit before the background class (``git show <commit>:models/shapes_fc/1/model.keras``).
CPU time per image from resource.getrusage.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table

from camserve.datasets import shapes
from camserve.datasets.bundled import to_input
from camserve.datasets.detection_figures import DETECTION_SEED, load_detector, scene_detections
from camserve.dense import detections
from camserve.dense.detect import DetectionSettings
from camserve.dense.scores import dense_scores
from camserve.evaluation.detection import window_and_tight_report
from camserve.serving.repository import load_model_dir

#: config.toml's seed first; train-bundled uses 1000 * seed + 0..4 and + 500..504. The first
#: three chose shapes_fc's [dense] rules and scales; the last three only check them.
SEEDS = (DETECTION_SEED, 424_242, 777, 31_337, 2024, 99)
SETS = {"20-44 px (default sizes)": (20, 44), "15-60 px": (15, 60)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_set(model_dir: Path, scenes, before: bool = False) -> tuple[dict, float]:
    entry, settings, explainer = load_detector(model_dir)
    names = list(entry.config.class_names)
    t0 = _cpu()
    if before:
        found = [
            detections(dense_scores(entry.model, to_input(s.image[None])[0]), 0.5, 0.3, class_names=names)
            for s in scenes
        ]
    else:
        found = scene_detections(entry, settings, explainer, scenes)
    cpu = (_cpu() - t0) / len(scenes)
    truth = [[(shapes.CLASS_NAMES[label], box) for label, box in zip(s.labels, s.boxes)] for s in scenes]
    return window_and_tight_report(found, truth), cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=30, help="scenes per seed and set")
    ap.add_argument("--model", type=Path, default=Path("models/shapes_fc"))
    ap.add_argument("--before-model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    entry = load_model_dir(args.model)
    runs = [("after", args.model, False)]
    if args.before_model:
        runs.insert(0, ("before", args.before_model, True))
    rows, raw = [], {}
    for label, (lo, hi) in SETS.items():
        for seed in (*SEEDS, "tuning", "held-out"):
            if seed in ("tuning", "held-out"):
                chosen = SEEDS[:3] if seed == "tuning" else SEEDS[3:]
                scenes = [
                    s
                    for k in chosen
                    for s in shapes.make_scenes(args.scenes, k, (256, 256), n_shapes=4, shape_size=(lo, hi))
                ]
            else:
                scenes = shapes.make_scenes(args.scenes, seed, (256, 256), n_shapes=4, shape_size=(lo, hi))
            for name, e, before in runs:
                report, cpu = run_set(e, scenes, before)
                raw[f"{name} / {label} / seed {seed}"] = report
                w, t = report["windows"], report["tight_boxes"]
                rows.append(
                    [
                        name,
                        label,
                        seed,
                        w["precision"],
                        w["recall"],
                        w["ap"],
                        t["precision"],
                        t["recall"],
                        t["ap50"],
                        report["tight_iou_share"],
                        report["mean_tight_iou"],
                        report["mean_window_iou"],
                        f"{cpu:.2f}",
                    ]
                )
                print(rows[-1], flush=True)
    header = [
        "pipeline",
        "objects",
        "seed",
        "win P",
        "win R",
        "win AP",
        "tight P",
        "tight R",
        "tight AP@0.5",
        "tight IoU≥0.5",
        "mean tight IoU",
        "mean window IoU",
        "CPU s/img",
    ]
    settings = DetectionSettings.from_config(entry.config)
    text = "\n".join(
        [
            "# Dense detections: quality of `camserve dense` defaults",
            "",
            f"Machine: {machine()}",
            f"Command: `python bench/dense_detections.py --scenes {args.scenes}"
            + (f" --before-model {args.before_model}" if args.before_model else "")
            + "`",
            *(
                [
                    f"before: {args.before_model} (the shapes_fc of commit 2d587ef, 5 classes) with the pipeline"
                    " as it was: per-class NMS, threshold 0.5, IoU 0.3, scale 1, no margin, windows only."
                ]
                if args.before_model
                else []
            ),
            f"Model: {args.model} ({', '.join(entry.config.class_names)}); settings: {settings}",
            f"{args.scenes} scenes of 256 px with 4 shapes ({4 * args.scenes} objects) per set and seed; seed"
            f" {SEEDS[0]} is config.toml's [metrics]; 'tuning' pools the first three seeds (on which the"
            " detection rules and scales were chosen), 'held-out' the last three (checked only).",
            "win: windows by containment (≥ 80 % of the object inside, class equal); tight: tight boxes by",
            "IoU ≥ 0.5; tight IoU≥0.5: share of the true window detections whose tight box has IoU ≥ 0.5.",
            "",
            table(header, rows),
            "",
            "```json",
            json.dumps(raw, indent=1),
            "```",
            "",
        ]
    )
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
