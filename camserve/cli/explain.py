"""``camserve explain``: overlay PNGs and a JSON of scores, labels and boxes for images.

camserve explain samples/*.png --model models/shapes_gap --method gradcam --method cam --out out/
camserve explain a.png --model vit/ --layer block10_norm1,block11_norm1 --aug-smooth --target prob:cat --out out/

``--target`` values (see :func:`camserve.cli.options.parse_target`): a class index or name; ``prob:CLASS`` (its
probability); ``regression:INDEX`` or ``regression:INDEX:-1``; ``multilabel[:THRESHOLD]``;
``segmentation:CLASS:MASK.png`` (non-zero pixels of the mask image, resized to the model's
output); ``similarity:REFERENCE.npy`` (an embedding to compare with).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from camserve import imaging
from camserve.cli import add_command, load_tensorflow, log_level
from camserve.cli.options import add_explain_options, add_model_options, explain_choices, fit_masks
from camserve.errors import InvalidArgument
from camserve.explanation import image_box

BATCH = 32


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "explain", "explain images with CAM methods; writes overlays and a JSON")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, WebP)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="explain remotely on a camserve server, HOST:PORT")
    add_model_options(p, group=source)
    p.add_argument("--model-name", help="with --server: the model's name in the server's repository")
    add_explain_options(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--html",
        action="store_true",
        help="also write explanations.html: the web viewer as a static report (opens from file://)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    choices = explain_choices(args)
    methods, targets, layer = choices.methods, choices.targets, choices.layer
    smoothing: dict[str, Any] = {"aug_smooth": choices.aug_smooth, "eigen_smooth": choices.eigen_smooth}
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
                targets=[list(targets)] * len(rgbs) if targets else None,
                top_k=choices.top_k,
                layer=layer,
                **smoothing,
            )
    else:
        load_tensorflow(log_level(args))
        from camserve.explain.folder import FolderExplainer

        folder = FolderExplainer.load(args.model, args.version, layer=layer, max_channels=choices.max_channels)
        explained_layer = folder.explainer.layer_name
        fitted = fit_masks(targets, folder.explainer.output_shape)

        def explain_batch(rgbs):
            return folder.explain_rgbs(rgbs, methods=methods, targets=fitted, top_k=choices.top_k, **smoothing)

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
