"""The web viewer: a static page (HTML, JS, CSS in ``static/``, no build step, nothing from a
CDN) served at ``/`` of the HTTP port, that calls the camserve.v1 RPCs as JSON.

Routes (all public: the page holds no data; the API calls it makes carry the bearer token the
user types in):

- ``GET /`` – the page (the HTTP app's middleware adds the strict Content-Security-Policy to
  every HTML answer; the page has no inline script or style, so it needs no exception);
- ``GET /viewer-assets/{name}`` – its scripts and style sheet;
- ``GET /viewer/samples`` – ``{"samples": [{"name", "url"}]}``, the bundled sample images
  (``samples/`` beside the model repository, else in the working directory), and
  ``GET /viewer/samples/{name}`` – one of them.

:mod:`camserve.http.viewer.report` writes the same page as a static report
(``camserve explain --html``).

>>> sorted(p.name for p in asset_files())[:3]
['api.js', 'colormaps.js', 'dense.js']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from camserve.errors import NotFound

__all__ = ["STATIC", "add_routes", "asset_files", "find_samples"]

#: The folder of the viewer's files, shipped as package data.
STATIC = Path(__file__).with_name("static")

CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def asset_files() -> list[Path]:
    """The viewer's scripts and style sheet (everything in ``static/`` but the page)."""
    return sorted(p for p in STATIC.iterdir() if p.suffix in (".js", ".css"))


def find_samples(models: str | Path | None = None) -> Path | None:
    """The bundled samples folder: ``samples/`` beside the model repository, else in the
    working directory, else beside the source checkout; None when there is none.

    >>> find_samples("/nonexistent/models") is None or find_samples("/nonexistent/models").name == "samples"
    True
    """
    candidates = []
    if models:
        candidates.append(Path(models).resolve().parent / "samples")
    candidates += [Path.cwd() / "samples", Path(__file__).resolve().parents[3] / "samples"]
    return next((c for c in candidates if c.is_dir()), None)


def _sample_names(folder: Path | None) -> list[str]:
    if folder is None:
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def add_routes(app: web.Application, ctx: Any) -> None:
    """Add the viewer's routes to the HTTP application (see the module docstring)."""
    from camserve.http.app import public

    assets = {p.name: (p.read_bytes(), CONTENT_TYPES[p.suffix]) for p in asset_files()}
    page = (STATIC / "index.html").read_bytes()
    config = getattr(ctx, "config", None)
    samples = find_samples(getattr(config, "models", None))

    @public
    async def index(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-cache"})

    @public
    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in assets:
            raise NotFound(f"no viewer file {name!r}; there are {', '.join(sorted(assets))}")
        body, content_type = assets[name]
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})

    @public
    async def sample_list(request: web.Request) -> web.Response:
        names = _sample_names(samples)
        body = {"samples": [{"name": n, "url": f"viewer/samples/{n}"} for n in names]}
        return web.Response(text=json.dumps(body), content_type="application/json")

    @public
    async def sample(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        names = _sample_names(samples)
        if name not in names or samples is None:
            raise NotFound(f"no sample image {name!r}; there are: {', '.join(names) or 'none (no samples/ folder)'}")
        path = samples / name
        return web.Response(body=path.read_bytes(), content_type=CONTENT_TYPES[path.suffix.lower()])

    app.router.add_get("/", index)
    app.router.add_get("/viewer-assets/{name}", asset)
    app.router.add_get("/viewer/samples", sample_list)
    app.router.add_get("/viewer/samples/{name}", sample)
