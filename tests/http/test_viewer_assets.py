"""The web viewer without a browser: its colormaps are OpenCV's, its page obeys a strict
Content-Security-Policy, its routes (page, assets, samples) answer through the real HTTP
application's middlewares, it ships as package data, and the static report embeds its data
so that nothing in it can end the data block."""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import html.parser
import json
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from camserve.explanation import Explanation
from camserve.http.viewer import STATIC, asset_files
from camserve.http.viewer.report import ASSETS_DIR, explanation_json, write_report

REPO = Path(__file__).resolve().parents[2]


def js_tables() -> dict[str, np.ndarray]:
    text = (STATIC / "colormaps.js").read_text()
    body = text[text.index("const HEX = {") : text.index("};")]
    tables = {}
    for name, chunk in re.findall(r"(\w+):\s*((?:\"[0-9a-f]*\"\s*\+?\s*)+),", body):
        hexs = "".join(re.findall(r'"([0-9a-f]*)"', chunk))
        tables[name] = np.frombuffer(bytes.fromhex(hexs), np.uint8).reshape(256, 3)
    return tables


def test_colormap_tables_are_opencvs_lookup_tables():
    tables = js_tables()
    opencv = {
        "jet": cv2.COLORMAP_JET,
        "turbo": cv2.COLORMAP_TURBO,
        "viridis": cv2.COLORMAP_VIRIDIS,
        "inferno": cv2.COLORMAP_INFERNO,
        "magma": cv2.COLORMAP_MAGMA,
    }
    assert set(tables) == set(opencv)
    ramp = np.arange(256, dtype=np.uint8)[:, None]
    for name, cmap in opencv.items():
        expected = cv2.cvtColor(cv2.applyColorMap(ramp, cmap), cv2.COLOR_BGR2RGB).reshape(256, 3)
        np.testing.assert_array_equal(tables[name], expected, err_msg=name)


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.script_text.append(data)


def test_page_needs_no_inline_script_or_style_and_nothing_remote():
    page = _Tags()
    page.feed((STATIC / "index.html").read_text())
    names = {p.name for p in asset_files()}
    for tag, attrs in page.tags:
        assert tag != "style", "inline <style> needs 'unsafe-inline'"
        assert "style" not in attrs, f"style attribute on <{tag}>"
        assert not [a for a in attrs if a.startswith("on")], f"inline handler on <{tag}>: {attrs}"
        for ref in (attrs.get("src"), attrs.get("href")):
            if ref and not ref.startswith("data:"):
                assert ref.startswith(f"{ASSETS_DIR}/") and ref.split("/", 1)[1] in names, ref
    assert not page.script_text, "inline script"
    scripts = [a["src"] for t, a in page.tags if t == "script"]
    assert sorted(s.split("/", 1)[1] for s in scripts) == sorted(n for n in names if n.endswith(".js"))
    for f in asset_files():  # what a strict CSP forbids in scripts, and remote URLs
        text = f.read_text()
        for banned in ("eval(", "new Function", "innerHTML", 'setAttribute("style"', "http://", "https://"):
            assert banned not in text, f"{f.name} uses {banned}"


def test_static_files_ship_as_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["camserve"]
    package = REPO / "camserve"
    for f in STATIC.iterdir():
        rel = f.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"


def run_app(token: str, check) -> None:
    """The real HTTP application (middlewares: headers, errors, auth) with only the viewer's routes."""
    from aiohttp.test_utils import TestClient, TestServer

    from camserve.http.app import HttpContext, make_app
    from camserve.serving.config import ServerConfig

    config = ServerConfig.load(env={}, overrides={"models": str(REPO / "models")})
    ctx = HttpContext(dataplane=SimpleNamespace(config=config), servicer=None, token=token)  # type: ignore[arg-type]

    async def main():
        async with TestClient(TestServer(make_app(ctx, route_modules=("camserve.http.viewer",)))) as client:
            await check(client)

    asyncio.run(main())


def test_routes_page_assets_and_samples_without_the_token():
    async def check(client):
        r = await client.get("/")
        assert r.status == 200 and r.content_type == "text/html"
        assert await r.read() == (STATIC / "index.html").read_bytes()
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "Access-Control-Allow-Origin" not in r.headers
        for f in asset_files():
            r = await client.get(f"/{ASSETS_DIR}/{f.name}")
            assert r.status == 200 and await r.read() == f.read_bytes()
            assert r.content_type == {".js": "text/javascript", ".css": "text/css"}[f.suffix]
        r = await client.get(f"/{ASSETS_DIR}/nope.js")
        assert r.status == 404 and "viewer.js" in (await r.json())["error"]["message"]
        listing = (await (await client.get("/viewer/samples")).json())["samples"]
        on_disk = sorted(p.name for p in (REPO / "samples").glob("*.png"))
        assert [s["name"] for s in listing] == on_disk
        r = await client.get("/" + listing[0]["url"])
        assert await r.read() == (REPO / "samples" / listing[0]["name"]).read_bytes()
        for bad in ("ground_truth.json", "..%2Fpyproject.toml", "nope.png"):
            r = await client.get(f"/viewer/samples/{bad}")
            assert r.status == 404, bad
            assert "circle.png" in (await r.json())["error"]["message"]

    run_app("s3cret", check)


def test_static_report_embeds_the_data_where_nothing_can_end_the_block(tmp_path):
    heat = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    evil = "</script><script>alert(1)</script><!--"
    e = Explanation("gradcam", 2, evil, 0.25, np.zeros((1, 1), np.float32), heat, (1, 0, 3, 2))
    image = {"name": "a.png", "src": "data:image/png;base64,", "height": 3, "width": 4, "explanations": []}
    image["explanations"] = [explanation_json(e)]
    page = write_report(tmp_path, [image], model="m", layer="last_conv", methods=["gradcam"])
    text = page.read_text()
    assert text.count("</script>") == len(re.findall(r"<script\b", text))
    block = re.search(r'<script type="application/json" id="camserve-report">(.*?)</script>', text, re.S)
    data = json.loads(block.group(1))
    assert data["images"][0]["explanations"][0]["label"] == evil
    m = data["images"][0]["explanations"][0]["heatmap"]
    decoded = np.frombuffer(base64.b64decode(m["data"]), "<f4").reshape([int(n) for n in m["shape"]])
    np.testing.assert_array_equal(decoded, heat)
    assert data["images"][0]["explanations"][0]["box"] == {"x0": 1, "y0": 0, "x1": 3, "y1": 2}
    assert sorted(p.name for p in (tmp_path / ASSETS_DIR).iterdir()) == sorted(p.name for p in asset_files())


def test_explain_html_embeds_what_explanations_json_reports(tmp_path):
    from camserve.cli import main
    from camserve.explanation import image_box

    names = ["circle.png", "three_shapes.png"]
    argv = ["explain", *(str(REPO / "samples" / n) for n in names), "--model", str(REPO / "models" / "shapes_gap")]
    assert (
        main([*argv, "--method", "gradcam", "--method", "cam", "--top-k", "2", "--html", "--out", str(tmp_path)]) == 0
    )
    report = json.loads((tmp_path / "explanations.json").read_text())
    text = (tmp_path / "explanations.html").read_text()
    block = re.search(r'<script type="application/json" id="camserve-report">(.*?)</script>', text, re.S)
    data = json.loads(block.group(1))
    assert data["model"] == "shapes_gap" and data["methods"] == ["gradcam", "cam"]
    assert data["layer"] == "last_conv"  # the folder's default_layer (config.toml)
    assert [i["name"] for i in data["images"]] == names
    for entry, image in zip(report, data["images"]):
        assert (image["height"], image["width"]) == (entry["height"], entry["width"])
        assert image["src"] == "data:image/png;base64," + base64.b64encode(Path(entry["image"]).read_bytes()).decode()
        assert len(image["explanations"]) == len(entry["explanations"]) == 4
        for listed, embedded in zip(entry["explanations"], image["explanations"]):
            assert (listed["method"], listed["class_index"], listed["label"]) == (
                embedded["method"],
                embedded["classIndex"],
                embedded["label"],
            )
            assert abs(listed["score"] - embedded["score"]) < 1e-6
            heat = np.frombuffer(base64.b64decode(embedded["heatmap"]["data"]), "<f4")
            heat = heat.reshape([int(n) for n in embedded["heatmap"]["shape"]])
            assert heat.min() >= 0 and heat.max() <= 1
            box = embedded.get("box")
            as_tuple = tuple(box[k] for k in ("x0", "y0", "x1", "y1")) if box else None
            assert image_box(as_tuple, heat.shape, (entry["height"], entry["width"])) == listed["box"]
