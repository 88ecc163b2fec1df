"""``camserve bulk``: explain a whole image set on Ray Data into ``OUT/explanations.parquet``.

    camserve bulk val/ more/*.png list.parquet --model models/shapes_gap --method gradcam --out out/

An embedded local Ray on this machine's CPUs by default; ``--address`` (or ``RAY_ADDRESS``)
runs the same job on a Ray cluster. Resumable: run it again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import sys

from camserve.cli import add_command
from camserve.cli.options import add_explain_options, add_model_options, explain_choices

_DESCRIPTION = """explain many images on Ray Data (local, or a cluster); writes OUT/explanations.parquet

INPUT: image files, folders (recursively), globs ('**' recursive) or Parquet/CSV tables with a
path column; local paths or URIs pyarrow reads (s3://, gs://, hdfs://...).
OUT/explanations.parquet: one row per (image, target, method): image, method, class_index,
label, score, box (x0, y0, x1, y1 in image pixels), raw (float32 bytes), raw_shape, height,
width, overlay, error. An image that cannot be read gets one row with error set; it stops
nothing. Run again with the same --out to resume: images already there are skipped
(--retry-failed: except those with an error row).
Exit status 0 when every input is in the output (error rows included).
Needs the bulk extra: pip install "camserve[bulk]"."""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "bulk", "explain many images on Ray Data; writes a Parquet dataset", _DESCRIPTION)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs, Parquet/CSV tables")
    add_model_options(p, model_help="model folder (on every worker): <dir>/config.toml, <dir>/<version>/model.keras")
    add_explain_options(p)
    p.add_argument("--out", required=True, help="output folder (local, or a URI pyarrow writes)")
    p.add_argument("--overlays", action="store_true", help="also write PNG overlays to OUT/overlays/")
    p.add_argument("--dense", action="store_true", help="also write 'dense' rows: sliding-window score grids")
    p.add_argument("--path-column", default="path", help="column of image paths in Parquet/CSV inputs (default path)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per actor call (default: the model's max_batch_size)"
    )
    p.add_argument("--cpus-per-actor", type=int, default=2, help="CPUs of each actor without GPUs (default 2)")
    p.add_argument("--min-actors", type=int, default=1, help="actors the pool starts with (default 1)")
    p.add_argument(
        "--max-actors", type=int, default=None, help="largest actor pool (default: one per GPU, else as CPUs allow)"
    )
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="GPUs of each actor (default: 1 when Ray sees GPUs, else 0); set it on clusters that add GPU nodes on demand",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="explain again the images of OUT that got an error row (e.g. files that could not be read then)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camserve.bulk.actors import BulkSettings
    from camserve.bulk.job import run_bulk

    settings = BulkSettings(
        model_dir=str(args.model),
        out=args.out,
        version=args.version,
        batch_size=args.batch_size,
        overlays=args.overlays,
        dense=args.dense,
        **explain_choices(args).as_dict(),
    )
    try:
        summary = run_bulk(
            args.inputs,
            settings,
            address=args.address,
            path_column=args.path_column,
            cpus_per_actor=args.cpus_per_actor,
            max_actors=args.max_actors,
            min_actors=args.min_actors,
            progress=not args.no_progress,
            gpus_per_actor=args.gpus_per_actor,
            retry_failed=args.retry_failed,
        )
    except KeyboardInterrupt:
        print(f"camserve bulk: interrupted; run it again with --out {args.out} to resume", file=sys.stderr)
        return 130
    print(f"camserve bulk: {summary}; wrote {args.out}/explanations.parquet")
    return 1 if summary.missing else 0
