"""``camserve dense``: sliding-window class scores over whole images, through the fully
convolutional form of the model (or batched crops).

    camserve dense scene.png --model models/shapes_fc --stride 8 --scales 1,0.5 --out out/

Writes, per image, ``<stem>.<class>.dense.png`` (each class's score map blended on the image),
``<stem>.argmax.png`` (the best class at every pixel, in the palette listed in the JSON, with
the detections drawn), and one ``dense.json`` with the grids, the arg-max class map per scale
and the detections (per-class NMS).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from camserve import imaging
from camserve.cli import add_command, load_tensorflow, log_level
from camserve.errors import InvalidArgument

#: Class colours of the arg-max map (RGB, matplotlib's tab10), repeated for more classes.
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    np.uint8,
)
MAX_DEFAULT_HEATMAPS = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "dense", "dense sliding-window class scores; writes score heatmaps, an arg-max map and detections"
    )
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, WebP), any size ≥ the model's")
    p.add_argument(
        "--model", type=Path, required=True, help="model folder: <dir>/config.toml and <dir>/<version>/model.keras"
    )
    p.add_argument("--version", type=int, default=None, help="model version (default: newest)")
    p.add_argument(
        "--stride", type=int, default=None, help="window stride in pixels (default: the network's total stride)"
    )
    p.add_argument(
        "--scales", type=_scales, default=(1.0,), help="comma-separated pyramid scales, e.g. 1,0.5 (default 1)"
    )
    p.add_argument(
        "--mode",
        choices=("fcn", "crops"),
        default="fcn",
        help="fcn: one pass of the converted model (default); crops: the classifier on every window",
    )
    p.add_argument("--logits", action="store_true", help="scores before the final activation (fcn mode)")
    p.add_argument("--pad", action="store_true", help="zero-pad images smaller than the window instead of failing")
    p.add_argument("--threshold", type=float, default=0.5, help="detection score threshold (default 0.5)")
    p.add_argument("--iou", type=float, default=0.3, help="NMS IoU threshold (default 0.3)")
    p.add_argument(
        "--classes",
        default=None,
        help=f"comma-separated class names or indices to draw heatmaps for (default: all when ≤ "
        f"{MAX_DEFAULT_HEATMAPS} classes, else the {MAX_DEFAULT_HEATMAPS} best)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="windows or shifted copies per forward pass")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=run)


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(not np.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be comma-separated positive numbers, e.g. 1,0.5; got {text!r}")
    return values


def _class_list(raw: str | None, names: tuple[str, ...], peaks: np.ndarray) -> list[int]:
    if raw is None:
        order = np.argsort(-peaks, kind="stable")
        return sorted(int(c) for c in order[:MAX_DEFAULT_HEATMAPS])
    chosen = []
    for token in (t.strip() for t in raw.split(",") if t.strip()):
        if token.isdigit() and int(token) < len(names):
            chosen.append(int(token))
        elif token in names:
            chosen.append(names.index(token))
        else:
            raise InvalidArgument(f"unknown class {token!r}; allowed: {', '.join(names)} or 0..{len(names) - 1}")
    return chosen


def _heat(score: np.ndarray, probabilities: bool) -> np.ndarray:
    """Scores as a [0, 1] heatmap: probabilities as they are, other scores min-max scaled."""
    if probabilities:
        return np.clip(score, 0.0, 1.0)
    lo, hi = float(score.min()), float(score.max())
    return (score - lo) / (hi - lo) if hi > lo else np.zeros_like(score)


def _argmax_picture(rgb: np.ndarray, cls: np.ndarray, dets: list[Any], names: tuple[str, ...]) -> np.ndarray:
    colours = PALETTE[cls % len(PALETTE)]
    out = cv2.addWeighted(np.ascontiguousarray(rgb), 0.55, colours, 0.45, 0)
    for d in dets:
        colour = tuple(int(v) for v in PALETTE[d.class_index % len(PALETTE)])
        x0, y0, x1, y1 = (int(round(v)) for v in d.box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 2)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, 1)
        cv2.putText(
            out,
            f"{names[d.class_index]} {d.score:.2f}",
            (x0 + 2, max(y0 + 10, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.35,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
    return out


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return stem


def run(args: argparse.Namespace) -> int:
    load_tensorflow(log_level(args))
    from camserve.dense import dense_scores, detections, score_map
    from camserve.serving.repository import load_model_dir

    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size must be ≥ 1, got {args.batch_size}")
    entry = load_model_dir(args.model, args.version)
    cfg = entry.config
    names = tuple(cfg.class_names)
    args.out.mkdir(parents=True, exist_ok=True)
    report: list[dict[str, Any]] = []
    used: set[str] = set()
    for path in tqdm(args.images, unit="img", desc="dense", disable=len(args.images) < 2):
        rgb = imaging.read_image(path)
        x = imaging.model_input(rgb, cfg, resize_to_input=False)
        try:
            result = dense_scores(
                entry.model,
                x,
                stride=args.stride,
                scales=args.scales,
                mode=args.mode,
                batch_size=args.batch_size,
                logits=args.logits,
                pad=args.pad,
            )
        except ValueError as e:
            raise InvalidArgument(f"{path}: {e}") from None
        n_classes = result[0].scores.shape[-1]
        if n_classes != len(names):
            raise InvalidArgument(
                f"{args.model}: config.toml names {len(names)} classes but the model outputs {n_classes}"
            )
        dets = detections(result, threshold=args.threshold, iou_threshold=args.iou, class_names=names)
        stem = _unique_stem(path, used)
        peaks = np.array([max(float(level.scores[..., c].max()) for level in result) for c in range(n_classes)])
        probabilities = all(0.0 <= float(level.scores.min()) and float(level.scores.max()) <= 1.0 for level in result)
        heatmaps = {}
        for c in _class_list(args.classes, names, peaks):
            score, _ = score_map(result, rgb.shape, class_index=c)
            png = args.out / f"{stem}.{names[c]}.dense.png"
            png.write_bytes(imaging.encode_png(imaging.overlay(rgb, _heat(score, probabilities))))
            heatmaps[names[c]] = png.name
        _, cls = score_map(result, rgb.shape)
        argmax_png = args.out / f"{stem}.argmax.png"
        argmax_png.write_bytes(imaging.encode_png(_argmax_picture(rgb, cls, dets, names)))
        report.append(
            {
                "image": str(path),
                "height": rgb.shape[0],
                "width": rgb.shape[1],
                "mode": result.mode,
                "exact": result.exact,
                "stride": list(result.strides),
                "window": list(result.window),
                "scales": [
                    {
                        "scale": level.scale,
                        "image_size": list(level.image_size),
                        "grid": list(level.scores.shape[:2]),
                        "argmax": np.argmax(level.scores, -1).tolist(),
                        "max_score": np.round(level.scores.max(-1), 6).tolist(),
                    }
                    for level in result
                ],
                "detections": [
                    {
                        "class_index": d.class_index,
                        "label": d.label,
                        "score": round(d.score, 6),
                        "box": [round(v, 2) for v in d.box],
                        "scale": d.scale,
                    }
                    for d in dets
                ],
                "heatmaps": heatmaps,
                "argmax_map": argmax_png.name,
            }
        )
    palette = {name: PALETTE[i % len(PALETTE)].tolist() for i, name in enumerate(names)}
    (args.out / "dense.json").write_text(
        json.dumps(
            {
                "model": entry.name,
                "version": entry.version,
                "class_names": list(names),
                "palette": palette,
                "images": report,
            },
            indent=1,
        )
    )
    n_det = sum(len(r["detections"]) for r in report)
    print(f"wrote dense maps of {len(report)} image(s), {n_det} detection(s) and dense.json to {args.out}")
    return 0
