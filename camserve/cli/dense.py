"""``camserve dense``: sliding-window class scores over whole images, through the fully
convolutional form of the model (or batched crops).

    camserve dense scene.png --model models/shapes_fc --stride 8 --scales 1,0.5 --out out/

Writes, per image, ``<stem>.<class>.dense.png`` (each class's score map blended on the image),
``<stem>.argmax.png`` (the best class at every pixel, in the palette listed in the JSON; the
background class left uncoloured; each detection's window drawn thin and its tight box thick),
and one ``dense.json`` with the grids, the arg-max class map per scale and the detections
(window and tight box each). Detection settings come from the model's ``config.toml``
(``[dense]``, ``background_class``; see :mod:`camserve.dense.detect`); the flags override them.
``--boxes labels.json`` (``{"<image file name>": {"labels": [...], "boxes": [[x0, y0, x1, y1],
...]}}``, as ``samples/ground_truth.json``) prints precision, recall and AP of the windows
(containment ≥ 0.8) and of the tight boxes (IoU ≥ 0.5).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from camserve import imaging
from camserve.cli import add_command, load_tensorflow, log_level
from camserve.cli.options import add_model_options
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
    add_model_options(p)
    p.add_argument(
        "--stride", type=int, default=None, help="window stride in pixels (default: config, else the total stride)"
    )
    p.add_argument(
        "--scales",
        type=_scales,
        default=None,
        help="comma-separated pyramid scales, e.g. 1,0.5 (default: config, else 1)",
    )
    p.add_argument(
        "--mode",
        choices=("fcn", "crops"),
        default="fcn",
        help="fcn: one pass of the converted model (default); crops: the classifier on every window",
    )
    p.add_argument("--logits", action="store_true", help="scores before the final activation (fcn mode)")
    p.add_argument("--pad", action="store_true", help="zero-pad images smaller than the window instead of failing")
    p.add_argument(
        "--threshold", type=float, default=None, help="detection score threshold (default: config, else 0.5)"
    )
    p.add_argument("--iou", type=float, default=None, help="NMS IoU threshold (default: config, else 0.3)")
    p.add_argument(
        "--nms",
        choices=("auto", "agnostic", "per_class"),
        default=None,
        help="NMS across classes and scales, or per class (default: config, else auto: agnostic for softmax heads)",
    )
    p.add_argument(
        "--margin", type=int, default=None, help="zero margin around each scaled image (default: config, else 0)"
    )
    p.add_argument(
        "--tight-boxes",
        choices=("on", "off"),
        default=None,
        help="tight boxes from the class's CAM inside each window (default: config, else on)",
    )
    p.add_argument("--boxes", type=Path, default=None, help="ground-truth labels.json: print detection metrics")
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


def _argmax_picture(
    rgb: np.ndarray, cls: np.ndarray, dets: list[Any], names: tuple[str, ...], background: int | None = None
) -> np.ndarray:
    colours = PALETTE[cls % len(PALETTE)]
    out = cv2.addWeighted(np.ascontiguousarray(rgb), 0.55, colours, 0.45, 0)
    if background is not None:  # background stays the image itself
        out[cls == background] = rgb[cls == background]
    for d in dets:
        colour = tuple(int(v) for v in PALETTE[d.class_index % len(PALETTE)])
        x0, y0, x1, y1 = (int(round(v)) for v in d.box)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, 1)
        if d.tight_box is not None:
            tx0, ty0, tx1, ty1 = (int(round(v)) for v in d.tight_box)
            cv2.rectangle(out, (tx0, ty0), (tx1 - 1, ty1 - 1), (255, 255, 255), 3)
            cv2.rectangle(out, (tx0, ty0), (tx1 - 1, ty1 - 1), colour, 2)
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


def _ground_truth(path: Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    try:
        data = json.loads(path.read_text())
        out = {}
        for name, e in data.items():
            objects = []
            for label, b in zip(e["labels"], e["boxes"], strict=True):
                x0, y0, x1, y1 = (float(v) for v in b)
                objects.append((str(label), (x0, y0, x1, y1)))
            out[str(name)] = objects
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidArgument(
            f'{path}: expected {{"<image file name>": {{"labels": [...], "boxes": [[x0, y0, x1, y1], ...]}}}} ({e})'
        ) from None


def _settings(args: argparse.Namespace, config: Any) -> Any:
    from camserve.dense.detect import DetectionSettings

    tight = None if args.tight_boxes is None else args.tight_boxes == "on"
    return DetectionSettings.from_config(config).with_overrides(
        threshold=args.threshold,
        iou=args.iou,
        nms=args.nms,
        scales=args.scales,
        stride=args.stride,
        margin=args.margin,
        tight_boxes=tight,
    )


def _tight_box_explainer(args: argparse.Namespace, entry: Any, settings: Any) -> Any:
    """The Explainer whose CAM gives the tight boxes: of the model itself, or of the config's
    ``tight_box_model`` from the same repository folder."""
    from camserve.dense.detect import tight_box_explainer

    return tight_box_explainer(args.model, entry, settings)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return stem


def run(args: argparse.Namespace) -> int:
    load_tensorflow(log_level(args))
    from camserve.dense import detect, score_map
    from camserve.evaluation.detection import window_and_tight_report
    from camserve.serving.repository import load_model_dir

    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size must be ≥ 1, got {args.batch_size}")
    entry = load_model_dir(args.model, args.version)
    cfg = entry.config
    names = tuple(cfg.class_names)
    settings = _settings(args, cfg)
    background = settings.background_index(names)
    truth = _ground_truth(args.boxes) if args.boxes else None
    explainer = _tight_box_explainer(args, entry, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    report: list[dict[str, Any]] = []
    found, expected = [], []
    used: set[str] = set()
    for path in tqdm(args.images, unit="img", desc="dense", disable=len(args.images) < 2):
        rgb = imaging.read_image(path)
        x = imaging.model_input(rgb, cfg, resize_to_input=False)
        try:
            detected = detect(
                entry.model,
                x,
                settings,
                names,
                explainer=explainer,
                mode=args.mode,
                batch_size=args.batch_size,
                logits=args.logits,
                pad=args.pad,
            )
        except ValueError as e:
            raise InvalidArgument(f"{path}: {e}") from None
        result, dets = detected.scores, detected.detections
        n_classes = result[0].scores.shape[-1]
        if truth is not None:
            if path.name not in truth:
                raise InvalidArgument(f"{args.boxes} has no entry for {path.name}; it names {sorted(truth)[:5]}")
            found.append(dets)
            expected.append(truth[path.name])
        stem = _unique_stem(path, used)
        peaks = np.array([max(float(level.scores[..., c].max()) for level in result) for c in range(n_classes)])
        if background is not None:
            peaks[background] = -np.inf  # a heatmap of "nothing here" only on request
        probabilities = all(0.0 <= float(level.scores.min()) and float(level.scores.max()) <= 1.0 for level in result)
        heatmaps = {}
        for c in _class_list(args.classes, names, peaks):
            if args.classes is None and c == background:
                continue
            score, _ = score_map(result, rgb.shape, class_index=c)
            png = args.out / f"{stem}.{names[c]}.dense.png"
            png.write_bytes(imaging.encode_png(imaging.overlay(rgb, _heat(score, probabilities))))
            heatmaps[names[c]] = png.name
        _, cls = score_map(result, rgb.shape)
        argmax_png = args.out / f"{stem}.argmax.png"
        argmax_png.write_bytes(imaging.encode_png(_argmax_picture(rgb, cls, dets, names, background)))
        report.append(
            {
                "image": str(path),
                "height": rgb.shape[0],
                "width": rgb.shape[1],
                "mode": result.mode,
                "exact": result.exact,
                "stride": list(result.strides),
                "window": list(result.window),
                "margin": settings.margin,
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
                        "tight_box": None if d.tight_box is None else [round(v, 2) for v in d.tight_box],
                        "scale": d.scale,
                    }
                    for d in dets
                ],
                "heatmaps": heatmaps,
                "argmax_map": argmax_png.name,
            }
        )
    palette = {name: PALETTE[i % len(PALETTE)].tolist() for i, name in enumerate(names) if i != background}
    summary: dict[str, Any] = {
        "model": entry.name,
        "version": entry.version,
        "class_names": list(names),
        "background_class": settings.background_class,
        "palette": palette,
        "settings": dataclasses.asdict(detected.settings) if report else dataclasses.asdict(settings),
        "images": report,
    }
    if truth is not None:
        summary["metrics"] = window_and_tight_report(found, expected)
    (args.out / "dense.json").write_text(json.dumps(summary, indent=1))
    n_det = sum(len(r["detections"]) for r in report)
    print(f"wrote dense maps of {len(report)} image(s), {n_det} detection(s) and dense.json to {args.out}")
    if truth is not None:
        m = summary["metrics"]
        w, t = m["windows"], m["tight_boxes"]
        print(
            f"windows (containment >= 0.8): precision {w['precision']:.3f} recall {w['recall']:.3f} AP {w['ap']:.3f}; "
            f"tight boxes (IoU >= 0.5): precision {t['precision']:.3f} recall {t['recall']:.3f} AP@0.5 {t['ap50']:.3f}; "
            f"true windows whose tight box has IoU >= 0.5: {m['tight_iou_share']:.3f} "
            f"(mean IoU tight {m['mean_tight_iou']:.3f}, window {m['mean_window_iou']:.3f}) "
            f"over {w['objects']} objects"
        )
    return 0
