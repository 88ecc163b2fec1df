"""``camserve evaluate``: how good are a model's explanations? One table row per method.

camserve evaluate samples/*.png --model models/shapes_gap --boxes samples/ground_truth.json \\
    --method gradcam --method scorecam --out evaluation/

Each image is explained for its predicted class. Columns: localization accuracy (the heatmap's
box, IoU ≥ 0.5 with a ground-truth box of that class) and the pointing game (needs
``--boxes``, a JSON ``{"file.png": {"labels": [...], "boxes": [[x0, y0, x1, y1], ...]}}`` in
image pixels, as ``samples/ground_truth.json``); deletion / insertion AUC; ROAD (combined,
higher is better; left out, with a warning, where SciPy is not installed: ``pip install
'camserve[eval]'``); average drop / increase in confidence; the model-randomization sanity check
(mean Spearman correlation with the maps of the model with its top layer re-initialised: lower
passes). Writes ``curves.png`` (the mean deletion and insertion curves of every method, drawn
with OpenCV: no plotting dependency) and ``evaluation.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from camserve import imaging
from camserve.cli import add_command, load_tensorflow, log_level
from camserve.cli.options import add_method_option, add_model_options, methods_of
from camserve.errors import InvalidArgument

#: Columns of the table: (key in the results, header, format).
COLUMNS = (
    ("localization", "loc.acc", "{:.3f}"),
    ("pointing", "pointing", "{:.3f}"),
    ("deletion_auc", "deletion↓", "{:.3f}"),
    ("insertion_auc", "insertion↑", "{:.3f}"),
    ("road", "ROAD↑", "{:.3f}"),
    ("average_drop", "drop%↓", "{:.1f}"),
    ("increase_in_confidence", "incr%↑", "{:.1f}"),
    ("sanity", "sanity ρ↓", "{:.3f}"),
)
#: BGR colours of the methods' curves, in turn.
COLOURS = ((31, 119, 180)[::-1], (255, 127, 14)[::-1], (44, 160, 44)[::-1], (214, 39, 40)[::-1], (148, 103, 189)[::-1])


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "evaluate", "measure explanation quality per method; prints a table, writes curves.png", __doc__
    )
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, WebP)")
    add_model_options(p)
    p.add_argument("--boxes", type=Path, default=None, help="ground truth JSON (labels and boxes per file name)")
    add_method_option(p)
    p.add_argument("--layer", default=None, help="layer to explain at; default the model's")
    p.add_argument("--steps", type=int, default=20, help="deletion / insertion steps (default 20)")
    p.add_argument("--no-sanity", dest="sanity", action="store_false", help="skip the model-randomization check")
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder (default ./evaluation)")
    p.set_defaults(func=run)


def read_boxes(path: Path, images: list[Path], class_names: tuple[str, ...]) -> list[dict[str, list]]:
    """Per image, {class name: [boxes in image pixels]} from the ground-truth JSON."""
    try:
        truth = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(truth, dict):
        raise InvalidArgument(f"{path}: expected an object keyed by file name, got {type(truth).__name__}")
    missing = [p.name for p in images if p.name not in truth and str(p) not in truth]
    if missing:
        raise InvalidArgument(f"{path} has no entry for {missing}; it lists {sorted(truth)[:10]}")
    per_image = []
    for p in images:
        entry = truth.get(p.name, truth.get(str(p)))
        labels, boxes = (entry or {}).get("labels"), (entry or {}).get("boxes")
        if not isinstance(labels, list) or not isinstance(boxes, list) or len(labels) != len(boxes):
            raise InvalidArgument(f"{path}[{p.name!r}] needs 'labels' and 'boxes' lists of one length, got {entry!r}")
        unknown = sorted(set(labels) - set(class_names))
        if unknown:
            raise InvalidArgument(f"{path}[{p.name!r}]: unknown classes {unknown}; the model's are {list(class_names)}")
        by_class: dict[str, list] = {}
        for label, box in zip(labels, boxes):
            by_class.setdefault(label, []).append(box)
        per_image.append(by_class)
    return per_image


def _scaled(boxes: list, image_shape: tuple[int, ...], size: tuple[int, int]) -> np.ndarray:
    """Boxes from image pixels to the model input's (height, width) ``size``."""
    sy, sx = size[0] / image_shape[0], size[1] / image_shape[1]
    return np.array([[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in boxes], np.float64).reshape(-1, 4)


def road_available() -> bool:
    """Whether ROAD can run: its imputation needs SciPy's sparse solver (the ``eval`` extra)."""
    return importlib.util.find_spec("scipy") is not None


def evaluate_method(folder: Any, method: str, batch: np.ndarray, truth, args, bar) -> dict[str, Any]:
    """Every measure of ``method`` on ``batch`` (preprocessed images), with curves for the plot;
    ``folder``: the model folder's :class:`~camserve.explain.folder.FolderExplainer`."""
    from camserve.evaluation import (
        confidence_change,
        localization_hits,
        perturbation_curve,
        pointing_hits,
        road,
        sanity_check,
    )

    ex, model = folder.explainer, folder.entry.model
    explained = [r[0] for r in ex.explain(batch, methods=(method,))]
    classes = np.array([e.class_index for e in explained])
    heatmaps = np.stack([e.heatmap for e in explained])

    def scores(b: np.ndarray, c: int | np.ndarray) -> np.ndarray:
        return ex.predict(b)[np.arange(len(b)), c]

    out: dict[str, Any] = {"method": method, "deletion": [], "insertion": []}
    road_scores = []
    for image, heat, c in zip(batch, heatmaps, classes):
        for mode in ("deletion", "insertion"):
            x, y = perturbation_curve(functools.partial(scores, c=c), image, heat, mode, steps=args.steps)
            out[mode].append(y)
        if args.road:
            road_scores.append(road(functools.partial(scores, c=c), image, heat).combined)
        bar.update(1)
    out["fractions"] = x
    for mode in ("deletion", "insertion"):
        out[mode] = mean = np.mean(out[mode], axis=0)
        out[f"{mode}_auc"] = float(np.sum((mean[1:] + mean[:-1]) * np.diff(x)) / 2.0)  # trapezoid, as the AUCs
    if args.road:
        out["road"] = float(np.mean(road_scores))
    conf = confidence_change(lambda b: scores(b, classes), batch, list(heatmaps), [e.score for e in explained])
    out["average_drop"], out["increase_in_confidence"] = conf.average_drop, conf.increase_in_confidence
    if truth is not None:
        size = batch.shape[1:3]
        boxes = [_scaled(t.get(ex.class_names[c], []), shape, size) for (t, shape), c in zip(truth, classes)]
        out["localization"] = float(np.mean(localization_hits([e.box for e in explained], boxes)))
        out["pointing"] = float(np.mean(pointing_hits(list(heatmaps), boxes)))
    if args.sanity:

        def explain_fn(m: Any, images: np.ndarray) -> np.ndarray:
            e = ex if m is model else folder.explainer_for(m)
            return np.stack([r[0].heatmap for r in e.explain(images, methods=(method,), targets=classes.tolist())])

        out["sanity"] = sanity_check(model, explain_fn, batch).mean
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The results as an aligned text table, '-' where a measure was not computed."""
    headers = ["method"] + [h for _, h, _ in COLUMNS]
    rows = [[r["method"]] + [f.format(r[k]) if k in r else "-" for k, _, f in COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [headers, *rows]
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def plot_curves(results: list[dict[str, Any]], width: int = 900, height: int = 420) -> np.ndarray:
    """RGB image: mean deletion (left) and insertion (right) curves, score against the fraction
    of pixels replaced, one colour per method, AUC in the legend."""
    canvas = np.full((height, width, 3), 255, np.uint8)
    margin, top, legend = 50, 40, 22 * len(results)
    panel_w = (width - 3 * margin) // 2
    panel_h = height - top - margin - legend
    font = cv2.FONT_HERSHEY_SIMPLEX
    for p, mode in enumerate(("deletion", "insertion")):
        x0, y1 = margin + p * (panel_w + margin), top + panel_h
        cv2.rectangle(canvas, (x0, top), (x0 + panel_w, y1), (0, 0, 0), 1)
        cv2.putText(
            canvas, f"{mode} (score vs fraction replaced)", (x0, top - 12), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA
        )
        for tick in (0.0, 0.5, 1.0):
            tx, ty = x0 + int(tick * panel_w), y1 - int(tick * panel_h)
            cv2.putText(canvas, f"{tick:g}", (tx - 8, y1 + 18), font, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
            cv2.putText(canvas, f"{tick:g}", (x0 - 30, ty + 4), font, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
        for k, r in enumerate(results):
            pts = np.stack([x0 + r["fractions"] * panel_w, y1 - np.clip(r[mode], 0, 1) * panel_h], axis=1)
            colour = COLOURS[k % len(COLOURS)]
            cv2.polylines(canvas, [np.round(pts).astype(np.int32)], False, colour, 2, cv2.LINE_AA)
    for k, r in enumerate(results):
        y = height - legend + 22 * k + 6
        colour = COLOURS[k % len(COLOURS)]
        cv2.line(canvas, (margin, y), (margin + 30, y), colour, 3)
        text = f"{r['method']}: deletion AUC {r['deletion_auc']:.3f}, insertion AUC {r['insertion_auc']:.3f}"
        cv2.putText(canvas, text, (margin + 40, y + 5), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise InvalidArgument(f"--steps must be ≥ 1, got {args.steps}")
    load_tensorflow(log_level(args))
    from camserve.explain.folder import FolderExplainer

    folder = FolderExplainer.load(args.model, args.version, layer=args.layer)
    ex, cfg = folder.explainer, folder.entry.config
    if ex.class_names is None:
        raise InvalidArgument(f"{args.model}: config.toml lists no class_names; evaluate needs them")
    methods = methods_of(args)
    ex.check_methods(methods)
    args.road = road_available()
    if not args.road:
        logging.getLogger("camserve.cli.evaluate").warning(
            "ROAD left out: it needs SciPy for its sparse solve (pip install 'camserve[eval]')"
        )
    rgbs = [imaging.read_image(p) for p in args.images]
    batch = np.stack([imaging.model_input(rgb, cfg) for rgb in rgbs])
    truth = None  # per image: ({class name: boxes in image pixels}, image shape)
    if args.boxes is not None:
        boxes = read_boxes(args.boxes, list(args.images), ex.class_names)
        truth = [(b, rgb.shape) for b, rgb in zip(boxes, rgbs)]
    results = []
    with tqdm(total=len(methods) * len(batch), unit="img", desc="evaluate") as bar:
        for method in methods:
            results.append(evaluate_method(folder, method, batch, truth, args, bar))
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.png").write_bytes(imaging.encode_png(plot_curves(results)))
    numbers = [{k: v for k, v in r.items() if isinstance(v, (str, float))} for r in results]
    (args.out / "evaluation.json").write_text(
        json.dumps({"images": [str(p) for p in args.images], "results": numbers}, indent=2)
    )
    print(f"wrote curves.png and evaluation.json to {args.out}")
    return 0
