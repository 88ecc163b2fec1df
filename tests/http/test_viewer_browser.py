"""The web viewer in headless Chromium (selenium with Debian's chromium and chromium-driver),
against the real serving process (CamServer with its HTTP port) on the bundled shapes_gap.

What the page shows is checked against independent computations in Python: the canvas
pixels against OpenCV's colormap of the API's own heatmap resized with cv2.resize, the hover
value against the same resized heatmap, the arg-max map against numpy's arg-max of the API's
dense scores, the static report against the Explainer run here.

Set CAMSERVE_UPDATE_SCREENSHOT=1 to rewrite docs/viewer.png (the README's screenshot).
"""

from __future__ import annotations

import base64
import os
import shutil

import numpy as np
import pytest
from helpers_serving import RunningServer, local_config
from viewer_page import (
    CHROMEDRIVER,
    CHROMIUM,
    REPO,
    SAMPLES,
    TOKEN,
    Api,
    assert_colors_match,
    canvas_pixels,
    enter_token,
    expected_colors,
    float_map,
    row_selector,
    set_display,
    set_methods,
    upload,
    wait,
    wait_cells,
)

try:
    import selenium  # noqa: F401

    SELENIUM = True
except ImportError:
    SELENIUM = False

pytestmark = [
    pytest.mark.skipif(not SELENIUM, reason="selenium is not installed (pip install -e '.[dev]')"),
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no headless browser: install Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver; .ci/run does it)",
    ),
]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(REPO / "models" / "shapes_gap", root / "shapes_gap")
    with RunningServer(local_config(root, max_batch_size=8, token=TOKEN)) as rs:
        yield Api(f"http://127.0.0.1:{rs.server.http.port}/")


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never download a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield d
    d.quit()


@pytest.fixture
def page(driver, server):
    driver.get(server.url)
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    if not driver.execute_script("return document.querySelectorAll('#methods input').length"):
        enter_token(driver, TOKEN)  # once per browser session: the page keeps it in sessionStorage
    wait(driver, lambda d: d.execute_script("return document.querySelectorAll('#methods input').length > 0"))
    wait(driver, lambda d: d.execute_script("return !document.body.dataset.pending"))  # the first (empty) run
    driver.get_log("browser")  # only this test's messages in the next read
    return driver


# ---------------------------------------------------------------------------- tests


def test_upload_methods_grid_and_pixels_agree_with_the_api(page, server):
    d = page
    set_methods(d, ["gradcam", "cam"])
    upload(d, SAMPLES / "star.png", SAMPLES / "circle.png")
    wait_cells(d, 2, 2)
    headers = d.execute_script(
        "return Array.from(document.querySelectorAll('.header .method-name')).map(e => e.textContent)"
    )
    assert sorted(headers) == ["cam", "gradcam"]  # in the order of the model's method list
    set_display(d, 1.0)  # the overlay alone: the colormap of the heatmap
    for name in ("star.png", "circle.png"):
        for method in ("gradcam", "cam"):
            sel = f'{row_selector(name)} .cell[data-method="{method}"] canvas'
            target = int(d.execute_script("return document.querySelector(arguments[0]).dataset.classIndex", sel))
            heat = server.heatmap((SAMPLES / name).read_bytes(), target, method)
            pixels = canvas_pixels(d, sel)
            assert_colors_match(pixels, expected_colors(heat, *pixels.shape[:2]))
    # the chips list the API's top-k classes with their scores, the best one selected
    top = server.call(
        "Predict",
        {
            "model": {"name": "shapes_gap"},
            "images": [{"encoded": base64.b64encode((SAMPLES / "star.png").read_bytes()).decode()}],
            "topK": 3,
        },
    )["predictions"][0]["top"]
    chips = d.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' .chip'))"
        ".map(c => [Number(c.dataset.classIndex), Number(c.dataset.score), c.classList.contains('selected')])",
        row_selector("star.png"),
    )
    assert [c[0] for c in chips] == [t.get("index", 0) for t in top]
    np.testing.assert_allclose([c[1] for c in chips], [t["score"] for t in top], rtol=1e-5)
    assert [c[2] for c in chips] == [True, False, False]


def test_clicking_a_chip_retargets_the_heatmap(page, server):
    d = page
    set_methods(d, ["gradcam"])
    upload(d, SAMPLES / "three_shapes.png")
    wait_cells(d, 1, 1)
    set_display(d, 1.0)
    sel = f"{row_selector('three_shapes.png')} canvas.overlay"
    before = canvas_pixels(d, sel)
    chip = d.find_elements("css selector", f"{row_selector('three_shapes.png')} .chip")[1]
    second = int(chip.get_attribute("data-class-index"))
    chip.click()
    wait(
        d,
        lambda d: (
            d.execute_script("return document.querySelector(arguments[0]).dataset.classIndex", sel) == str(second)
        ),
    )
    after = canvas_pixels(d, sel)
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 5, "the heatmap did not change"
    assert "selected" in d.find_elements("css selector", f"{row_selector('three_shapes.png')} .chip")[1].get_attribute(
        "class"
    )
    heat = server.heatmap((SAMPLES / "three_shapes.png").read_bytes(), second, "gradcam")
    assert_colors_match(after, expected_colors(heat, *after.shape[:2]))


def test_hover_shows_the_heatmap_value_and_the_class_score(page, server):
    import cv2
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    d = page
    set_methods(d, ["gradcam"])
    Select(d.find_element("id", "sample")).select_by_value("square.png")  # a bundled sample, from the server
    d.find_element("id", "add-sample").click()
    wait_cells(d, 1, 1)
    canvas = d.find_element("css selector", f"{row_selector('square.png')} canvas.overlay")
    w, h = int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))
    target = int(canvas.get_attribute("data-class-index"))
    heat = cv2.resize(server.heatmap((SAMPLES / "square.png").read_bytes(), target, "gradcam"), (w, h))
    # offsets from the element's centre (selenium 4); the canvas is drawn at CSS size = pixel size
    x, y = 150, 60
    ActionChains(d).move_to_element_with_offset(canvas, x - w // 2, y - h // 2).perform()
    readout = d.find_element("css selector", f"{row_selector('square.png')} .readout")
    wait(d, lambda d: readout.get_attribute("data-value") is not None)
    py, px = (int(v) for v in readout.get_attribute("data-pixel").split(","))  # the canvas pixel read
    assert abs(py - y) <= 1 and abs(px - x) <= 1
    assert abs(float(readout.get_attribute("data-value")) - heat[py, px]) < 1e-4  # bilinear as cv2.resize
    score = d.execute_script(
        "return document.querySelector(arguments[0] + ' .chip.selected').dataset.score", row_selector("square.png")
    )
    assert f"{float(score):.3f}" in readout.text and "heatmap" in readout.text
    raw = server.heatmap((SAMPLES / "square.png").read_bytes(), target, "gradcam", what="raw")
    ry, rx = py * raw.shape[0] // h, px * raw.shape[1] // w  # the layer cell under the cursor
    assert readout.get_attribute("data-raw-cell") == f"{ry},{rx}"
    np.testing.assert_allclose(float(readout.get_attribute("data-raw")), raw[ry, rx], rtol=1e-6, atol=1e-7)


def test_a_corrupt_file_shows_the_servers_error(page, server, tmp_path):
    d = page
    bad = tmp_path / "corrupt.png"
    bad.write_bytes((SAMPLES / "circle.png").read_bytes()[:60])  # a truncated PNG
    status, body = server.error(
        "Predict",
        {"model": {"name": "shapes_gap"}, "images": [{"encoded": base64.b64encode(bad.read_bytes()).decode()}]},
    )
    assert status == 400
    upload(d, bad)
    error = d.find_element("id", "error")
    wait(d, lambda d: error.is_displayed())
    assert body["error"]["message"] in error.text and "400" in error.text
    row_error = d.find_element("css selector", f"{row_selector('corrupt.png')} .row-error")
    assert body["error"]["message"] in row_error.text


def test_dense_tab_argmax_map_agrees_with_the_api(page, server, tmp_path):
    import cv2
    from selenium.webdriver.support.ui import Select

    d = page
    tiles = [cv2.imread(str(SAMPLES / n)) for n in ("circle.png", "square.png", "star.png", "cross.png")]
    big = tmp_path / "four.png"
    cv2.imwrite(str(big), np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])]))
    upload(d, big)
    wait_cells(d, 1, 1)
    d.find_element("id", "tab-dense").click()
    d.find_element("id", "dense-scales").clear()
    d.find_element("id", "dense-scales").send_keys("1, 0.75")  # a pyramid: 128 px and 96 px
    d.find_element("id", "dense-run").click()  # stride 0: the network's total stride (4 px)
    error = d.find_element("id", "error")
    wait(d, lambda d: len(d.find_elements("css selector", "canvas.dense-class")) > 0 or error.is_displayed())
    assert not error.is_displayed(), error.text
    image = {"encoded": base64.b64encode(big.read_bytes()).decode()}
    r = server.call("DenseScores", {"model": {"name": "shapes_gap"}, "image": image, "scales": [1, 0.75]})
    palette = d.execute_script(
        "return ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd'].map(h => parseInt(h.slice(1), 16))"
    )
    above = set()
    threshold = float(d.find_element("id", "dense-threshold").get_attribute("value"))
    assert len(r["scales"]) == 2
    for level, scale in enumerate(r["scales"]):
        Select(d.find_element("id", "dense-level")).select_by_index(level)
        scores = float_map(scale["scores"])
        gh, gw, classes = scores.shape
        assert len(d.find_elements("css selector", "canvas.dense-class")) == classes == len(r["classNames"])
        expected = np.array([[(p >> 16) & 255, (p >> 8) & 255, p & 255] for p in palette])[scores.argmax(-1)]
        pixels = canvas_pixels(d, "canvas.dense-argmax")
        ch, cw = pixels.shape[:2]
        centres = pixels[((np.arange(gh) + 0.5) * ch / gh).astype(int)][
            :, ((np.arange(gw) + 0.5) * cw / gw).astype(int)
        ]
        np.testing.assert_array_equal(centres[..., :3], expected)
        above |= set(np.unique(scores.argmax(-1)[scores.max(-1) >= threshold]).tolist())
    assert (gh, gw) == (9, 9)  # (96 - 64) / 4 + 1 at scale 0.75
    # detections pool both scales; per-class NMS keeps at least one window of every class above
    shown = {int(e.get_attribute("data-class-index")) for e in d.find_elements("css selector", "#detections li")}
    assert shown == above


def test_static_report_renders_from_file_url(driver, tmp_path):
    from camserve.cli import main
    from camserve.explain.folder import FolderExplainer
    from camserve.imaging import read_image

    driver.get_log("browser")  # only this test's messages in the last read
    out = tmp_path / "report"
    names = ["circle.png", "three_shapes.png"]
    argv = ["explain", *(str(SAMPLES / n) for n in names), "--model", str(REPO / "models" / "shapes_gap")]
    assert main([*argv, "--method", "gradcam", "--method", "cam", "--top-k", "2", "--html", "--out", str(out)]) == 0
    assert (out / "explanations.json").exists()
    d = driver
    d.get((out / "explanations.html").as_uri())
    wait(d, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    wait_cells(d, 2, 2)
    assert d.execute_script("return document.body.classList.contains('static')")
    folder = FolderExplainer.load(REPO / "models" / "shapes_gap")
    rgbs = [read_image(SAMPLES / n) for n in names]
    results = folder.explain_rgbs(rgbs, methods=("gradcam", "cam"), targets=None, top_k=2)
    set_display(d, 1.0)
    for name, explanations in zip(names, results):
        chips = d.find_elements("css selector", f"{row_selector(name)} .chip")
        assert [int(c.get_attribute("data-class-index")) for c in chips] == list(
            dict.fromkeys(e.class_index for e in explanations)
        )
        second = int(chips[1].get_attribute("data-class-index"))
        chips[1].click()  # switches to the second class the report holds
        for e in explanations:
            if e.class_index != second:
                continue
            pixels = canvas_pixels(d, f'{row_selector(name)} .cell[data-method="{e.method}"] canvas')
            assert_colors_match(pixels, expected_colors(e.heatmap, *pixels.shape[:2]))
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_screenshot_for_the_readme(page):
    d = page
    set_methods(d, ["gradcam", "gradcam++", "scorecam"])
    upload(d, *(SAMPLES / n for n in ("three_shapes.png", "star.png", "triangle.png")))
    wait_cells(d, 3, 3)
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # no CSP violation, no script error
    if os.environ.get("CAMSERVE_UPDATE_SCREENSHOT"):
        (REPO / "docs").mkdir(exist_ok=True)
        size = d.get_window_size()
        d.set_window_size(1500, 1200)  # the three rows in full
        d.save_screenshot(str(REPO / "docs" / "viewer.png"))
        d.set_window_size(size["width"], size["height"])


def test_the_token_field_unlocks_a_server_with_a_token(driver, server):
    d = driver
    d.get(server.url)
    d.execute_script("sessionStorage.clear()")
    d.get(server.url)
    wait(d, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    status, body = server.error_without_token("ListModels")
    assert status == 401
    error = d.find_element("id", "error")
    assert error.is_displayed() and "401" in error.text and body["error"]["message"] in error.text
    assert not d.find_elements("css selector", "#methods input")
    d.execute_script("arguments[0].hidden = true; arguments[0].textContent = '';", error)
    enter_token(d, "wrong-token")
    wait(d, lambda d: error.is_displayed())
    assert "401" in error.text and not d.find_elements("css selector", "#methods input")
    enter_token(d, TOKEN)
    wait(d, lambda d: len(d.find_elements("css selector", "#methods input")) > 0)
    assert not error.is_displayed()
    models = [o.get_attribute("value") for o in d.find_elements("css selector", "#model option")]
    assert models == ["shapes_gap"]


def test_choosing_a_layer_explains_at_that_layer(page, server):
    from selenium.webdriver.support.ui import Select

    d = page
    set_methods(d, ["gradcam"])
    upload(d, SAMPLES / "cross.png")
    wait_cells(d, 1, 1)
    row = row_selector("cross.png")
    assert d.find_element("css selector", row).get_attribute("data-layer") == "last_conv"
    layers = [o.get_attribute("value") for o in d.find_elements("css selector", "#layer option")]
    assert "conv3b" in layers and "last_conv" in layers
    Select(d.find_element("id", "layer")).select_by_value("conv3b")
    wait(d, lambda d: d.find_element("css selector", row).get_attribute("data-layer") == "conv3b")
    wait_cells(d, 1, 1)
    set_display(d, 1.0)
    sel = f"{row} canvas.overlay"
    target = int(d.find_element("css selector", sel).get_attribute("data-class-index"))
    pixels = canvas_pixels(d, sel)
    assert_colors_match(
        pixels,
        expected_colors(
            server.heatmap((SAMPLES / "cross.png").read_bytes(), target, "gradcam", "conv3b"), *pixels.shape[:2]
        ),
    )
    default = expected_colors(
        server.heatmap((SAMPLES / "cross.png").read_bytes(), target, "gradcam"), *pixels.shape[:2]
    )
    assert np.abs(pixels[..., :3].astype(int) - default).mean() > 5, "the layer made no difference"


def test_dropping_a_file_explains_it(page):
    d = page
    set_methods(d, ["cam"])
    d.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const dt = new DataTransfer(); dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        base64.b64encode((SAMPLES / "triangle.png").read_bytes()).decode(),
    )
    wait_cells(d, 1, 1)
    chips = d.find_elements("css selector", f"{row_selector('dropped.png')} .chip")
    assert chips and chips[0].text.startswith("triangle")


def test_a_dense_scores_error_shows_the_servers_message(page, server):
    d = page
    upload(d, SAMPLES / "star.png")
    wait_cells(d, 1, 1)
    d.find_element("id", "tab-dense").click()
    d.find_element("id", "dense-stride").clear()
    d.find_element("id", "dense-stride").send_keys("3")  # must divide the network's stride (4)
    d.find_element("id", "dense-run").click()
    image = base64.b64encode((SAMPLES / "star.png").read_bytes()).decode()
    status, body = server.error(
        "DenseScores", {"model": {"name": "shapes_gap"}, "image": {"encoded": image}, "stride": 3, "mode": "fcn"}
    )
    assert status == 400
    error = d.find_element("id", "error")
    wait(d, lambda d: error.is_displayed())
    assert body["error"]["message"] in error.text and "star.png" in error.text
    assert not d.find_elements("css selector", "canvas.dense-class")


def test_choosing_a_target_class_explains_it_for_every_image(page, server):
    from selenium.webdriver.support.ui import Select

    d = page
    set_methods(d, ["gradcam"])
    upload(d, SAMPLES / "circle.png", SAMPLES / "star.png")
    wait_cells(d, 2, 1)
    Select(d.find_element("id", "target")).select_by_visible_text("square")
    wait(
        d,
        lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('.image-row')).every(r => r.dataset.target === '1')"
        ),
    )
    wait_cells(d, 2, 1)
    set_display(d, 1.0)
    for name in ("circle.png", "star.png"):
        sel = f"{row_selector(name)} canvas.overlay"
        assert d.find_element("css selector", sel).get_attribute("data-class-index") == "1"
        pixels = canvas_pixels(d, sel)
        assert_colors_match(
            pixels, expected_colors(server.heatmap((SAMPLES / name).read_bytes(), 1, "gradcam"), *pixels.shape[:2])
        )
