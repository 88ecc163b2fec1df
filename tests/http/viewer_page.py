"""What the viewer's browser tests (test_viewer_browser.py) use besides their fixtures: the
HTTP JSON API called from Python (:class:`Api`, independent of the page), and selenium steps
and pixel checks on the page."""

from __future__ import annotations

import base64
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)

WAIT_S = 120  # generous: a loaded CI machine runs Score-CAM on 3 images in the screenshot test
TOKEN = "viewer-test-token"  # the server needs it on the API (one auth for gRPC and HTTP)


class Api:
    """The HTTP JSON API called from Python (what the page calls, independently)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.url}camserve.v1.CamService/{method}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def error(self, method: str, body: dict) -> tuple[int, dict]:
        try:
            self.call(method, body)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        raise AssertionError("the call succeeded")

    def error_without_token(self, method: str) -> tuple[int, dict]:
        req = urllib.request.Request(
            f"{self.url}camserve.v1.CamService/{method}", data=b"{}", headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(req, timeout=60)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        raise AssertionError("the call succeeded without the token")

    def heatmap(
        self, image: bytes, class_index: int, method: str, layer: str = "", what: str = "heatmap"
    ) -> np.ndarray:
        """The API's heatmap (or ``what="raw"``: raw map) of one image, class and method."""
        r = self.call(
            "Explain",
            {
                "model": {"name": "shapes_gap"},
                "images": [{"encoded": base64.b64encode(image).decode()}],
                "methods": [method],
                "targets": [{"targets": [{"index": class_index}]}],
                "returnHeatmap": True,
                "returnRaw": True,
                "layer": layer,
            },
        )
        return float_map(r["images"][0]["explanations"][0][what])


def float_map(m: dict) -> np.ndarray:
    shape = [int(n) for n in m["shape"]]
    return np.frombuffer(base64.b64decode(m["data"]), "<f4").reshape(shape)


def enter_token(d, token: str) -> None:
    field = d.find_element("id", "token")
    field.clear()
    field.send_keys(token)
    d.find_element("id", "topk").click()  # leaving the field commits it ("change")


def wait(driver, condition, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def set_methods(d, methods: list[str]) -> None:
    """Click the method check boxes so that exactly ``methods`` are checked."""
    for box in d.find_elements("css selector", "#methods input"):
        if box.is_selected() != (box.get_attribute("value") in methods):
            box.click()
    wait(d, lambda d: d.execute_script("return !document.body.dataset.pending"))


def upload(d, *paths: Path) -> None:
    d.find_element("id", "files").send_keys("\n".join(str(p) for p in paths))


def wait_cells(d, images: int, methods: int) -> None:
    """Wait until the grid holds images x methods canvases and nothing is in flight or scheduled."""
    settled = (
        "return document.querySelectorAll('.image-row canvas.overlay').length === arguments[0]"
        " && !document.querySelector('.busy') && !document.body.dataset.pending"
    )
    wait(d, lambda d: d.execute_script(settled, images * methods))


def set_display(d, opacity: float, show_box: bool = False) -> None:
    d.execute_script(
        "const o = document.getElementById('opacity'); o.value = arguments[0];"
        "o.dispatchEvent(new Event('input'));"
        "const b = document.getElementById('boxes'); if (b.checked !== arguments[1]) b.click();",
        str(opacity),
        show_box,
    )


def canvas_pixels(d, selector: str) -> np.ndarray:
    """RGBA pixels of the first canvas matching ``selector``, read with getImageData."""
    w, h, data = d.execute_script(
        "const c = document.querySelector(arguments[0]);"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return [c.width, c.height, Array.from(px)];",
        selector,
    )
    return np.asarray(data, np.uint8).reshape(h, w, 4)


def expected_colors(heatmap: np.ndarray, h: int, w: int) -> np.ndarray:
    """OpenCV's JET colormap of the heatmap resized to (h, w), as camserve.imaging.colorize."""
    import cv2

    resized = cv2.resize(heatmap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    gray = np.clip(resized * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def assert_colors_match(pixels: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(pixels[..., :3].astype(int) - expected.astype(int))
    # A value on the edge of two colormap entries may land on either (float rounding): JET
    # steps by 4 per entry, so a few pixels may differ by a step; none by more than two.
    assert np.mean(diff) < 1.0, f"mean difference {np.mean(diff):.2f}"
    assert np.percentile(diff, 99) <= 8 and diff.max() <= 12, f"max difference {diff.max()}"


def row_selector(name: str) -> str:
    return f'.image-row[data-image="{name}"]'
