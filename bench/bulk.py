"""Benchmark: ``camserve bulk`` (Ray Data, embedded local Ray) against the in-process Explainer
on the same PNG files and machine, in images per second, with and without Ray's start-up.

    python bench/bulk.py [--images 600] [--repeats 2] [--out bench/results/bulk.md]

The images are shapes scenes (camserve.datasets.shapes, 64 px, seed 0) written as PNG files.
In-process: read, decode, preprocess and explain them with the model folder's Explainer
(:class:`camserve.explain.folder.FolderExplainer`, what ``camserve explain`` runs) in batches of
the bulk job's size, after a warm-up; its rows are not written anywhere. ``camserve bulk``: the
command line in a subprocess with a fresh ``--out`` each run (it also writes the Parquet);
"whole run" counts from the process start (Python, Ray, the actor's TensorFlow, model and
warm-up), "after start-up" counts the images after the first batch came back, over the time
after it (the command's own summary). Runs alternate, medians reported.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table

from camserve import imaging
from camserve.bulk.actors import BulkSettings, model_batch_size
from camserve.datasets.shapes import make_scenes

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "shapes_gap"
METHODS = ("gradcam",)
SUMMARY = re.compile(r"([\d.]+) images/s \(([\d.]+) images/s after ([\d.]+) s of start-up\)")


def write_images(folder: Path, n: int) -> list[Path]:
    paths = []
    for i, scene in enumerate(make_scenes(n, seed=0, size=(64, 64))):
        path = folder / f"scene{i:05d}.png"
        path.write_bytes(imaging.encode_png(scene.image))
        paths.append(path)
    return paths


def in_process(paths: list[Path], batch: int, folder) -> float:
    """Images per second of read + decode + explain in this process."""
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        rgbs = [imaging.read_image(p) for p in paths[i : i + batch]]
        folder.explain_rgbs(rgbs, methods=METHODS)
    return len(paths) / (time.perf_counter() - start)


def bulk(images: Path, out: Path) -> tuple[float, float, float, float]:
    """(whole-run images/s from process start, images/s after start-up, start-up s inside the
    command, wall s of the process) of one ``camserve bulk`` run."""
    cmd = [sys.executable, "-m", "camserve", "bulk", str(images), "--model", str(MODEL), "--out", str(out)]
    cmd += [f"--method={m}" for m in METHODS] + ["--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    found = SUMMARY.search(done.stdout)
    if found is None:
        raise RuntimeError(f"no summary in the output of {' '.join(cmd)}:\n{done.stdout}\n{done.stderr}")
    n = len(list(images.glob("*.png")))
    return n / wall, float(found.group(2)), float(found.group(3)), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bulk.md")
    args = parser.parse_args()

    from camserve.cli import load_tensorflow

    load_tensorflow()
    from camserve.explain.folder import FolderExplainer

    batch = model_batch_size(BulkSettings(model_dir=str(MODEL), out=""))
    with tempfile.TemporaryDirectory() as tmp:
        folder_images = Path(tmp) / "images"
        folder_images.mkdir()
        paths = write_images(folder_images, args.images)
        folder = FolderExplainer.load(MODEL, max_batch_size=batch)
        folder.explainer.warm_up(methods=METHODS)
        local, runs = [], []
        for r in range(args.repeats):
            local.append(in_process(paths, batch, folder))
            runs.append(bulk(folder_images, Path(tmp) / f"out{r}"))
            local.append(in_process(paths, batch, folder))
    ip = statistics.median(local)
    whole, steady, startup, wall = (statistics.median(v) for v in zip(*runs))
    rows = [
        ["in-process FolderExplainer (warm)", f"{ip:.0f}", "1.00", "—"],
        ["`camserve bulk`, after start-up", f"{steady:.0f}", f"{steady / ip:.2f}", f"{startup:.1f} s excluded"],
        ["`camserve bulk`, whole run", f"{whole:.0f}", f"{whole / ip:.2f}", f"{wall:.1f} s in all"],
    ]
    text = "\n".join(
        [
            "# camserve bulk vs the in-process Explainer",
            "",
            f"Machine: {machine()} (shared by other work while measured).",
            f"Images: {args.images} shapes scenes, 64 px PNG; model shapes_gap; methods {', '.join(METHODS)}; "
            f"batch {batch} (from the model); embedded local Ray, one CPU actor with 2 TensorFlow threads.",
            f"Medians of {args.repeats} `camserve bulk` runs and {len(local)} in-process passes, alternating.",
            f"Command: `python bench/bulk.py --images {args.images} --repeats {args.repeats}`",
            "",
            table(["path", "images/s", "ratio to in-process", "start-up"], rows),
            "",
            "Per run (whole-run images/s, after start-up images/s, start-up s, wall s): "
            + "; ".join(f"({a:.0f}, {b:.0f}, {c:.1f}, {d:.1f})" for a, b, c, d in runs),
            "In-process passes (images/s): " + ", ".join(f"{v:.0f}" for v in local),
            "",
        ]
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
