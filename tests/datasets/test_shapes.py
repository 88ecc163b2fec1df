"""The shapes scene generator: determinism, exact boxes, class and count coverage, sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from camserve.datasets import shapes
from camserve.imaging import read_image


def _changed_box(image: np.ndarray, background: np.ndarray, region=None):
    """Tight box of the pixels that differ from a plain background, optionally within a region."""
    diff = np.any(image != background, axis=-1)
    if region is not None:
        x0, y0, x1, y1 = region
        keep = np.zeros_like(diff)
        keep[y0:y1, x0:x1] = True
        diff &= keep
    ys, xs = np.nonzero(diff)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def test_dataset_is_deterministic_for_a_seed() -> None:
    a = shapes.make_dataset(12, seed=7)
    b = shapes.make_dataset(12, seed=7)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    c = shapes.make_dataset(12, seed=8)
    assert not np.array_equal(a[0], c[0])


def test_dataset_shapes_dtypes_and_all_classes() -> None:
    x, y, b = shapes.make_dataset(120, seed=1)
    assert x.shape == (120, 64, 64, 3) and x.dtype == np.uint8
    assert y.shape == (120,) and b.shape == (120, 4)
    assert set(y.tolist()) == set(range(len(shapes.CLASS_NAMES)))
    assert np.all((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] <= 64) & (b[:, 3] <= 64))
    assert np.all((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (200, 120)])
def test_image_size(size: tuple[int, int]) -> None:
    scene = shapes.make_scene(np.random.default_rng(0), size=size, shape_size=(16, 30))
    assert scene.image.shape == (*size, 3) and scene.image.dtype == np.uint8


def test_one_to_three_shapes_with_disjoint_boxes() -> None:
    scenes = shapes.make_scenes(60, seed=3)  # default: one to three shapes
    counts = [len(s.labels) for s in scenes]
    assert set(counts) == {1, 2, 3}
    for s in scenes:
        assert len(s.boxes) == len(s.labels)
        for i, a in enumerate(s.boxes):
            for b in s.boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_boxes_tightly_enclose_the_drawn_pixels() -> None:
    # On a plain background every pixel a shape changed differs from the background colour,
    # so the box of the changed pixels inside each ground-truth box must equal that box,
    # and nothing outside the boxes may have changed.
    for s in shapes.make_scenes(40, seed=11, size=(72, 72), n_shapes=(1, 3), clutter=False):
        bg = s.image[0, 0]
        assert np.all(np.any(s.image != bg, axis=-1).sum() > 0)
        outside = np.any(s.image != bg, axis=-1)
        for box in s.boxes:
            assert _changed_box(s.image, bg, box) == tuple(box)
            x0, y0, x1, y1 = box
            outside[y0:y1, x0:x1] = False
        assert not outside.any()


def test_single_shape_box_matches_changed_pixels() -> None:
    x, _, b = shapes.make_dataset(30, seed=5, clutter=False)
    for img, box in zip(x, b):
        assert _changed_box(img, img[0, 0]) == tuple(box)


def test_coverage_geometry_against_hand_computed_boxes() -> None:
    # An axis-aligned square whose circumscribed diameter is 16*sqrt(2) spans [8, 24) exactly.
    sq = shapes.shape_coverage(shapes.CLASS_NAMES.index("square"), (16.0, 16.0), 16 * math.sqrt(2), 0.0, (32, 32))
    expected = np.zeros((32, 32), np.float32)
    expected[8:24, 8:24] = 1.0
    np.testing.assert_allclose(sq, expected, atol=1e-6)
    # A circle of diameter 20 centred at (16, 16) reaches [6, 26) along both axes; its
    # area is pi * 10^2.
    circ = shapes.shape_coverage(shapes.CLASS_NAMES.index("circle"), (16.0, 16.0), 20.0, 0.0, (32, 32))
    ys, xs = np.nonzero(circ)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (6, 6, 26, 26)
    assert abs(circ.sum() - math.pi * 100) < 0.02 * math.pi * 100


def test_classes_restrict_and_centre_jitter() -> None:
    scenes = shapes.make_scenes(20, seed=2, n_shapes=1, classes=["star", 4], centre_jitter=2.0)
    assert {n for s in scenes for n in s.names} <= {"star", "cross"}
    for s in scenes:
        x0, y0, x1, y1 = s.boxes[0]
        assert abs((x0 + x1) / 2 - 32) <= 2 + 2 and abs((y0 + y1) / 2 - 32) <= 2 + 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"size": (4, 4)}, "size"),
        ({"classes": ["hexagon"]}, "hexagon"),
        ({"n_shapes": 0}, "n_shapes"),
        ({"shape_size": (10, 100)}, "shape_size"),
        ({"n_shapes": 9, "shape_size": (30, 40)}, "cannot place"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shapes.make_scene(np.random.default_rng(0), **kwargs)


def test_make_dataset_refuses_several_shapes() -> None:
    with pytest.raises(ValueError, match="make_scenes"):
        shapes.make_dataset(2, seed=0, n_shapes=2)


def test_windows_are_deterministic_and_labelled_by_the_centred_shape() -> None:
    x, y = shapes.make_windows(200, seed=4, n_shapes=1, clutter=False, jitter=4.0, min_offset=12.0)
    x2, y2 = shapes.make_windows(200, seed=4, n_shapes=1, clutter=False, jitter=4.0, min_offset=12.0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.shape == (200, 64, 64, 3) and set(y.tolist()) == {-1, 0, 1, 2, 3, 4}
    for img, label in zip(x, y):
        changed = np.any(img != img[0, 0], axis=-1) if not np.any(img[0, 0] != img[-1, -1]) else None
        if changed is None or not changed.any():
            continue  # a corner is covered by a shape, or the window is empty
        x0, y0, x1, y1 = _changed_box(img, img[0, 0])
        offset = np.abs(np.array([(x0 + x1) / 2, (y0 + y1) / 2]) - 32)
        whole = x0 > 0 and y0 > 0 and x1 < 64 and y1 < 64
        if label >= 0:
            assert whole and offset.max() <= 4.5, (label, (x0, y0, x1, y1))
        elif whole:
            assert offset.max() >= 12, (x0, y0, x1, y1)


def test_write_samples(tmp_path) -> None:
    paths = shapes.write_samples(tmp_path, seed=0)
    assert len(paths) == 6
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    for p in paths:
        img = read_image(p)
        assert img.shape == (64, 64, 3)
        entry = truth[p.name]
        assert len(entry["labels"]) == len(entry["boxes"])
    assert truth["three_shapes.png"]["labels"].__len__() == 3
    assert [truth[f"{c}.png"]["labels"] for c in shapes.CLASS_NAMES] == [[c] for c in shapes.CLASS_NAMES]


def test_windows_past_the_border_are_zero_filled_only_with_a_margin() -> None:
    def black_edges(x: np.ndarray) -> int:
        rows = np.all(x == 0, axis=(2, 3))  # (N, H): whole rows of zeros
        cols = np.all(x == 0, axis=(1, 3))
        return int(np.sum(rows[:, [0, -1]].any(1) | cols[:, [0, -1]].any(1)))

    plain, _ = shapes.make_windows(120, seed=8)
    padded, labels = shapes.make_windows(120, seed=8, margin=32)
    assert black_edges(plain) == 0 and black_edges(padded) >= 10
    assert set(labels.tolist()) >= {-1} and (labels >= 0).any()
