"""Decoding, preprocessing, the CAM box rule, overlays."""

import cv2
import numpy as np
import pytest

from camserve.imaging import ImageError, decode_image, encode_png, heatmap_box, overlay, preprocess, sniff_format


def _rgb(h=12, w=20):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = 200  # red
    img[2:5, 3:9, 2] = 255
    return img


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_lossless_round_trip_keeps_rgb_order(ext):
    img = _rgb()
    ok, buf = cv2.imencode(
        ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []
    )
    assert ok
    out = decode_image(buf.tobytes())
    np.testing.assert_array_equal(out, img)


def test_jpeg_and_grey_decode_to_rgb():
    ok, buf = cv2.imencode(".jpg", np.full((8, 8), 90, np.uint8))
    out = decode_image(buf.tobytes())
    assert out.shape == (8, 8, 3) and abs(int(out.mean()) - 90) <= 2
    assert sniff_format(buf.tobytes()) == "jpeg"


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"hello world, not an image", "not an image"),
        (encode_png(_rgb())[:40], "corrupt or truncated PNG"),
    ],
)
def test_non_images_are_rejected_clearly(data, words):
    with pytest.raises(ImageError, match=words) as info:
        decode_image(data)
    assert isinstance(info.value, ValueError)


def test_preprocessing_modes():
    px = np.array([[[0, 127.5, 255]]], np.float32)
    np.testing.assert_allclose(preprocess(px, "scale_0_1"), [[[0, 0.5, 1]]])
    np.testing.assert_allclose(preprocess(px, "scale_-1_1"), [[[-1, 0, 1]]])
    np.testing.assert_allclose(preprocess(px, "caffe"), [[[255 - 103.939, 127.5 - 116.779, 0 - 123.68]]], rtol=1e-6)
    with pytest.raises(ValueError, match="allowed"):
        preprocess(px, "imagenet")


def test_box_rule_threshold_and_largest_component():
    m = np.zeros((20, 30), np.float32)
    m[2:6, 2:6] = 1.0  # peak, small
    m[10:18, 5:25] = 0.3  # above 20 % of the peak, larger: wins
    m[0:20, 28] = 0.1  # below the threshold: ignored
    assert heatmap_box(m) == (5, 10, 25, 18)
    assert heatmap_box(m, threshold=0.5) == (2, 2, 6, 6)


def test_box_rule_on_empty_and_nan_maps():
    assert heatmap_box(np.zeros((5, 5), np.float32)) is None
    assert heatmap_box(np.full((5, 5), np.nan, np.float32)) is None


def test_overlay_blends_and_draws_box():
    img = np.zeros((10, 10, 3), np.uint8)
    heat = np.zeros((5, 5), np.float32)
    heat[0, 0] = 1.0
    out = overlay(img, heat, alpha=0.5, box=(0, 0, 5, 5))
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[7, 7].sum() > 0  # the colormap's zero (dark blue) is blended in everywhere
    assert out[1, 1, 0] > out[1, 1, 2] and out[7, 7, 2] > out[7, 7, 0]  # hot red corner, cold blue elsewhere
    assert tuple(out[0, 5]) == (255, 255, 255)  # box edge
    assert decode_image(encode_png(out)).shape == (10, 10, 3)


def _box_with_stats(heatmap: np.ndarray, threshold: float = 0.2):
    """The CAM paper's box the way OpenCV's statistics give it (the reference)."""
    import cv2

    peak = float(np.max(heatmap))
    if not np.isfinite(peak) or peak <= 0:
        return None
    mask = (heatmap >= threshold * peak).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(v) for v in stats[best, :4])
    return (x, y, x + w, y + h)


def test_heatmap_box_equals_opencvs_largest_component_statistics() -> None:
    """Random maps with one to many components, ties of equal areas, diagonal touches, and
    smooth CAM-like maps: the box equals the one from OpenCV's component statistics."""
    import cv2

    rng = np.random.default_rng(7)
    maps = [rng.random((s, s)).astype(np.float32) ** 4 for s in (5, 17, 64, 224)]  # many small components
    maps += [cv2.GaussianBlur(rng.random((s, s)).astype(np.float32), (0, 0), s / 12) for s in (14, 64, 224)]
    tie = np.zeros((12, 12), np.float32)
    tie[1:3, 1:3] = 1.0
    tie[8:10, 7:9] = 1.0  # two components of 4 pixels: the first in label order wins
    diagonal = np.eye(9, dtype=np.float32)  # one 8-connected component
    maps += [tie, diagonal, diagonal[::-1].copy()]
    for m in maps:
        for threshold in (0.2, 0.5, 0.9):
            assert heatmap_box(m, threshold) == _box_with_stats(m, threshold)
