"""The viewer as a static report (``camserve explain --html``): the same page and scripts as at
``/`` of the HTTP port, with the explanations embedded in the page, so it opens from
``file://`` (where the browser allows no fetch). It runs in the viewer's static mode: the
image x method grid, chips switching between the explained classes, opacity, colormap, boxes
and hover values; no model choice and no dense tab (they need a server).

The data is a ``<script type="application/json" id="camserve-report">`` block (not executed, so
a Content-Security-Policy without inline scripts still holds) in the shape of the JSON API:
explanations as the protobuf JSON mapping of ``camserve.v1.Explanation`` (heatmaps as base64
little-endian float32), images as ``data:`` URLs (a ``file://`` image would taint the canvas).

>>> explanation_json(Explanation("cam", 1, "square", 0.5, np.zeros((1, 1)), np.ones((1, 2)), (0, 0, 2, 1)))
{'method': 'cam', 'classIndex': 1, 'label': 'square', 'score': 0.5, 'heatmap': {'shape': ['1', '2'], 'data': 'AACAPwAAgD8='}, 'box': {'x0': 0, 'y0': 0, 'x1': 2, 'y1': 1}}
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camserve.explanation import Explanation
from camserve.http.viewer import CONTENT_TYPES, STATIC, asset_files

__all__ = ["ASSETS_DIR", "MARKER", "explanation_json", "image_entry", "write_report"]

#: The folder next to the report that holds the viewer's scripts and style sheet.
ASSETS_DIR = "viewer-assets"
#: The comment in ``index.html`` that the report's data replaces.
MARKER = "<!-- camserve-report -->"


def explanation_json(e: Explanation) -> dict[str, Any]:
    """One explanation as the JSON API writes it (``heatmap`` as a FloatMap, ``box``)."""
    heat = np.ascontiguousarray(e.heatmap, dtype="<f4")
    out: dict[str, Any] = {
        "method": e.method,
        "classIndex": int(e.class_index),
        "label": e.label,
        "score": float(e.score),
        "heatmap": {"shape": [str(n) for n in heat.shape], "data": base64.b64encode(heat.tobytes()).decode()},
    }
    if e.box is not None:
        out["box"] = dict(zip(("x0", "y0", "x1", "y1"), (int(v) for v in e.box)))
    return out


def image_entry(path: Path, height: int, width: int, explanations: Iterable[Explanation]) -> dict[str, Any]:
    """One image of the report: its name, the file as a ``data:`` URL, its size and explanations.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "x.png"; _ = f.write_bytes(b"\\x89PNG")
    >>> image_entry(f, 1, 2, [])["src"]
    'data:image/png;base64,iVBORw=='
    """
    content_type = CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
    src = f"data:{content_type};base64,{base64.b64encode(path.read_bytes()).decode()}"
    return {
        "name": path.name,
        "src": src,
        "height": int(height),
        "width": int(width),
        "explanations": [explanation_json(e) for e in explanations],
    }


def _embed(data: dict[str, Any]) -> str:
    # "<" escaped so that no "</script>" (or "<!--") inside the data can end the block.
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="camserve-report">{text}</script>'


def write_report(
    out: Path,
    images: Sequence[dict[str, Any]],
    model: str = "",
    layer: str = "",
    methods: Sequence[str] = (),
    name: str = "explanations.html",
) -> Path:
    """Write ``out/<name>`` (the page with the data embedded) and ``out/viewer-assets/``
    (the viewer's scripts and style sheet); returns the page's path. ``images`` are
    :func:`image_entry` dicts."""
    page = (STATIC / "index.html").read_text()
    if MARKER not in page:
        raise RuntimeError(f"the viewer's index.html lost its {MARKER} marker")
    data = {"model": model, "layer": layer, "methods": list(methods), "images": list(images)}
    out.mkdir(parents=True, exist_ok=True)
    assets = out / ASSETS_DIR
    assets.mkdir(exist_ok=True)
    for f in asset_files():
        shutil.copyfile(f, assets / f.name)
    path = out / name
    path.write_text(page.replace(MARKER, _embed(data)))
    return path
