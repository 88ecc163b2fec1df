"""``camserve explain``: overlay PNGs and a JSON of scores, labels and boxes for images.

camserve explain samples/*.png --model models/shapes_gap --method gradcam --method cam --out out/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
        help="class name or index to explain (repeatable; replaces --top-k)",
    )
    p.add_argument(
        "--layer", default=None, help="layer to explain at (outer/inner for nested models); default automatic"
    )
    p.add_argument("--max-channels", type=int, default=None, help="Score-CAM / Ablation-CAM channel cap")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--html",
        action="store_true",
        help="also write explanations.html: the web viewer as a static report (opens from file://)",
    )
    p.set_defaults(func=run)


def parse_targets(raw: list[str] | None) -> list[int | str] | None:
    """``--target`` values: class indices as int, class names as given; None when there are none."""
    if not raw:
        return None
    return [int(t) if t.lstrip("-").isdigit() else t for t in raw]


def run(args: argparse.Namespace) -> int:
    methods = tuple(args.methods or ("gradcam",))
    targets = parse_targets(args.targets)
    explained_layer = args.layer or ""
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
                layer=args.layer,
            )
    else:
        load_tensorflow(log_level(args))
        from camserve.explain.folder import FolderExplainer

        folder = FolderExplainer.load(args.model, args.version, layer=args.layer, max_channels=args.max_channels)
        explained_layer = folder.explainer.layer_name

        def explain_batch(rgbs):
            return folder.explain_rgbs(rgbs, methods=methods, targets=targets, top_k=args.top_k)

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
