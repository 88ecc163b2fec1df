"""``camserve explain``: overlay PNGs and a JSON of scores, labels and boxes for images.

camserve explain samples/*.png --model models/shapes_gap --method gradcam --method cam --out out/
camserve explain a.png --model vit/ --layer block10_norm1,block11_norm1 --aug-smooth --target prob:cat --out out/

``--target`` values (see :func:`parse_targets`): a class index or name; ``prob:CLASS`` (its
probability); ``regression:INDEX`` or ``regression:INDEX:-1``; ``multilabel[:THRESHOLD]``;
``segmentation:CLASS:MASK.png`` (non-zero pixels of the mask image, resized to the model's
output); ``similarity:REFERENCE.npy`` (an embedding to compare with).
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
from camserve.explanation import image_box

BATCH = 32


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "explain", "explain images with CAM methods; writes overlays and a JSON")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, WebP)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model folder: <dir>/config.toml and <dir>/<version>/model.keras")
    source.add_argument("--server", help="explain remotely on a camserve server, HOST:PORT")
    p.add_argument("--model-name", help="with --server: the model's name in the server's repository")
    p.add_argument("--version", type=int, default=None, help="model version (default: newest)")
    p.add_argument("--method", dest="methods", action="append", help="method (repeatable); default gradcam")
    p.add_argument("--top-k", type=int, default=1, help="explain the K best classes (default 1)")
    p.add_argument(
        "--target",
        dest="targets",
        action="append",
        help="class name or index to explain, or prob:CLASS, regression:INDEX[:-1], multilabel[:THRESHOLD], "
        "segmentation:CLASS:MASK.png, similarity:REFERENCE.npy (repeatable; replaces --top-k)",
    )
    p.add_argument(
        "--layer",
        dest="layers",
        action="append",
        help="layer to explain at (outer/inner for nested models; token layers of transformers too); several "
        "(repeated or comma-separated) are fused; default automatic",
    )
    p.add_argument("--aug-smooth", action="store_true", help="average 6 augmented views (flips x brightness)")
    p.add_argument("--eigen-smooth", action="store_true", help="first principal component of the weighted activations")
    p.add_argument("--max-channels", type=int, default=None, help="Score-CAM / Ablation-CAM channel cap")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--html",
        action="store_true",
        help="also write explanations.html: the web viewer as a static report (opens from file://)",
    )
    p.set_defaults(func=run)


def parse_target(text: str) -> Any:
    """One ``--target`` value: :func:`camserve.targets.from_text` (a class index or name,
    ``prob:``, ``regression:``, ``multilabel``), or the file forms ``segmentation:CLASS:MASK.png``
    and ``similarity:REFERENCE.npy``.

    >>> parse_target("3"), parse_target("regression:1:-1")
    (3, RegressionTarget(index=1, sign=-1))
    """
    from camserve import targets as tg

    kind, _, rest = text.partition(":")
    try:
        if kind == "segmentation" and rest.count(":") >= 1:
            c, _, path = rest.partition(":")
            mask = imaging.read_image(Path(path)).max(axis=-1) > 0
            return tg.SegmentationTarget(int(c) if c.isdigit() else c, mask.astype(np.float32))
        if kind == "similarity" and rest:
            return tg.SimilarityTarget(np.load(rest))
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"--target {text!r}: {exc}") from None
    return tg.from_text(text)


def parse_targets(raw: list[str] | None) -> list[Any] | None:
    """``--target`` values (:func:`parse_target`); None when there are none."""
    if not raw:
        return None
    return [parse_target(t) for t in raw]


def parse_layers(raw: list[str] | None) -> str | list[str] | None:
    """``--layer`` values: None (automatic), one name, or several (repeated or comma-separated).

    >>> parse_layers(None), parse_layers(["conv"]), parse_layers(["a,b", "c"])
    (None, 'conv', ['a', 'b', 'c'])
    """
    names = [n.strip() for r in raw or () for n in r.split(",") if n.strip()]
    return None if not names else names[0] if len(names) == 1 else names


def fit_masks(targets: list[Any] | None, output_shape: tuple[int, ...]) -> list[Any] | None:
    """Segmentation masks resized (nearest) to a dense model output's (H, W)."""
    from camserve.targets import SegmentationTarget

    if not targets or len(output_shape) != 3:
        return targets
    size = (int(output_shape[1]), int(output_shape[0]))
    return [
        SegmentationTarget(t.class_index, cv2.resize(t.mask, size, interpolation=cv2.INTER_NEAREST))
        if isinstance(t, SegmentationTarget)
        else t
        for t in targets
    ]


def run(args: argparse.Namespace) -> int:
    methods = tuple(args.methods or ("gradcam",))
    targets = parse_targets(args.targets)
    layer = parse_layers(args.layers)
    smoothing = {"aug_smooth": args.aug_smooth, "eigen_smooth": args.eigen_smooth}
    explained_layer = layer if isinstance(layer, str) else ",".join(layer or ())
    if args.html:
        from camserve.http.viewer.report import image_entry, write_report
    if args.server:
        from camserve.client import Client

        client = Client(args.server)
        name = args.model_name or (args.model.name if args.model else None)
        if not name:
            raise InvalidArgument("--server needs --model-name NAME (see `camserve models --server ...`)")

        def explain_batch(rgbs):
            return client.explain(
                rgbs,
                model=name,
                version=args.version,
                methods=methods,
                targets=[targets] * len(rgbs) if targets else None,
                top_k=args.top_k,
                layer=layer,
                **smoothing,
            )
    else:
        load_tensorflow(log_level(args))
        from camserve.explain.folder import FolderExplainer

        folder = FolderExplainer.load(args.model, args.version, layer=layer, max_channels=args.max_channels)
        explained_layer = folder.explainer.layer_name
        targets = fit_masks(targets, folder.explainer.output_shape)

        def explain_batch(rgbs):
            return folder.explain_rgbs(rgbs, methods=methods, targets=targets, top_k=args.top_k, **smoothing)

    args.out.mkdir(parents=True, exist_ok=True)
    report = []
    html_images = []
    with tqdm(total=len(args.images), unit="img", desc="explain") as bar:
        for start in range(0, len(args.images), BATCH):
            paths = args.images[start : start + BATCH]
            rgbs = [imaging.read_image(p) for p in paths]
            for path, rgb, explanations in zip(paths, rgbs, explain_batch(rgbs)):
                entries = []
                for e in explanations:
                    png = args.out / f"{path.stem}.{e.label}.{e.method.replace('+', 'p')}.png"
                    png.write_bytes(imaging.encode_png(imaging.overlay(rgb, e.heatmap, box=e.box)))
                    entries.append(
                        {
                            "method": e.method,
                            "class_index": e.class_index,
                            "label": e.label,
                            "score": round(e.score, 6),
                            "box": image_box(e.box, e.heatmap.shape, rgb.shape),
                            "overlay": png.name,
                        }
                    )
                report.append(
                    {"image": str(path), "height": rgb.shape[0], "width": rgb.shape[1], "explanations": entries}
                )
                if args.html:
                    html_images.append(image_entry(path, rgb.shape[0], rgb.shape[1], explanations))
                bar.update(1)
    (args.out / "explanations.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {sum(len(r['explanations']) for r in report)} overlays and explanations.json to {args.out}")
    if args.html:
        model_name = args.model_name or (args.model.name if args.model else "")
        page = write_report(args.out, html_images, model=model_name, layer=explained_layer, methods=methods)
        print(f"wrote the viewer report {page} (open it in a browser)")
    return 0
