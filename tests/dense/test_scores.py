"""camserve.dense against independent references: the original classifier on every crop
(``model.predict``), images resized by hand, brute-force NMS properties, ground-truth boxes."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import cv2
import numpy as np
import pytest
from fcn_nets import crops_reference, flatten_net, gap_net, max_rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from camserve.dense import DenseScores, dense_scores, detections, nms, score_map
from camserve.dense.fcn import to_fully_convolutional

RNG = np.random.default_rng(7)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def valid_net():
    return flatten_net("valid")


@pytest.fixture(scope="module")
def padded_net():
    return flatten_net("same")


def _expected_boxes(grid: tuple[int, int], stride: int, window: int) -> np.ndarray:
    i, j = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    return np.stack([j * stride, i * stride, j * stride + window, i * stride + window], -1)


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("stride", [None, 2, 1])
def test_fcn_equals_classifier_on_every_crop_at_total_stride_and_by_shift_and_stitch(valid_net, stride) -> None:
    image = RNG.random((37, 45, 3), dtype=np.float32)
    result = dense_scores(valid_net, image, stride=stride)
    step = stride or 4
    assert result.exact is True and result.stride == step and result.mode == "fcn"
    level = result[0]
    want = crops_reference(valid_net, image, step)
    assert level.scores.shape == want.shape
    assert max_rel_err(level.scores, want) <= 1e-5
    np.testing.assert_array_equal(level.boxes, _expected_boxes(want.shape[:2], step, 20))


def test_gap_window_model_shift_and_stitch_at_stride_1() -> None:
    model = gap_net("valid")
    image = RNG.random((27, 30, 3), dtype=np.float32)
    level = dense_scores(model, image, stride=1)[0]
    assert max_rel_err(level.scores, crops_reference(model, image, 1)) <= 1e-5


def test_padded_net_is_not_exact_and_crops_mode_is_the_reference(padded_net) -> None:
    image = RNG.random((36, 40, 3), dtype=np.float32)
    fcn = dense_scores(padded_net, image)
    assert fcn.exact is False
    want = crops_reference(padded_net, image, 4)
    # Padding makes the single pass differ from the classifier on crops near crop borders.
    assert np.max(np.abs(fcn[0].scores - want)) > 1e-3
    for stride in (4, 3):
        crops = dense_scores(padded_net, image, stride=stride, mode="crops", batch_size=5)
        assert crops.exact is True and crops.mode == "crops"
        assert max_rel_err(crops[0].scores, crops_reference(padded_net, image, stride)) <= 1e-5
        np.testing.assert_array_equal(crops[0].boxes, _expected_boxes(crops[0].scores.shape[:2], stride, 20))


# ------------------------------------------------------------------ scales and sizes


def test_multi_scale_levels_equal_single_scale_on_hand_resized_images(valid_net) -> None:
    image = RNG.random((60, 52, 3), dtype=np.float32)
    result = dense_scores(valid_net, image, scales=(1.0, 0.5, 1.5), stride=2)
    assert [level.scale for level in result] == [1.0, 0.5, 1.5]
    for level, size, interp in (
        (result[1], (26, 30), cv2.INTER_AREA),
        (result[2], (78, 90), cv2.INTER_LINEAR),
    ):
        resized = cv2.resize(image, size, interpolation=interp)
        assert level.image_size == resized.shape[:2]
        assert max_rel_err(level.scores, crops_reference(valid_net, resized, 2)) <= 1e-5
        # Boxes in pixels of the ORIGINAL image.
        fy, fx = 60 / resized.shape[0], 52 / resized.shape[1]
        want = _expected_boxes(level.scores.shape[:2], 2, 20) * np.array([fx, fy, fx, fy])
        np.testing.assert_allclose(level.boxes, want, rtol=1e-6)


def test_image_smaller_than_the_window_raises_or_pads(valid_net) -> None:
    image = RNG.random((30, 24, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"at scale 0.5 is 15x12, smaller than the 20x20 window"):
        dense_scores(valid_net, image, scales=(1.0, 0.5))
    level = dense_scores(valid_net, image[:15], pad=True)[0]
    padded = np.zeros((20, 24, 3), np.float32)
    padded[:15] = image[:15]
    assert level.scores.shape == (1, 2, 5)
    assert max_rel_err(level.scores, crops_reference(valid_net, padded, 4)) <= 1e-5


def test_bad_arguments_say_what_is_allowed(valid_net) -> None:
    image = RNG.random((24, 24, 3), dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"stride 3 along y does not divide the total stride 4; allowed in mode='fcn': \[1, 2, 4\]"
    ):
        dense_scores(valid_net, image, stride=3)
    with pytest.raises(ValueError, match="allowed: fcn, crops"):
        dense_scores(valid_net, image, mode="magic")
    with pytest.raises(ValueError, match="scales must be positive"):
        dense_scores(valid_net, image, scales=(0.0,))
    with pytest.raises(ValueError, match=r"one \(H, W, C\) array"):
        dense_scores(valid_net, image[None])
    with pytest.raises(ValueError, match="logits=True needs mode='fcn'"):
        dense_scores(valid_net, image, mode="crops", logits=True)
    with pytest.raises(ValueError, match="class-map model"):
        dense_scores(to_fully_convolutional(gap_net(), head="classmap"), image)


def test_logits_scores_are_the_pre_softmax_grid(valid_net) -> None:
    image = RNG.random((28, 28, 3), dtype=np.float32)
    logits = dense_scores(valid_net, image, logits=True)[0].scores
    probs = dense_scores(valid_net, image)[0].scores
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(-1, keepdims=True), probs, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ NMS and detections


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


boxes_st = st.lists(
    st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(1, 20), st.integers(1, 20), st.floats(0, 1)),
    min_size=0,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(boxes_st, st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_nms_keeps_a_maximal_non_overlapping_greedy_set(items, thr) -> None:
    boxes = np.array([(x, y, x + w, y + h) for x, y, w, h, _ in items], np.float64).reshape(-1, 4)
    scores = np.array([s for *_, s in items])
    keep = nms(boxes, scores, thr)
    assert len(set(keep)) == len(keep)
    # Kept boxes overlap each other at most `thr`, and come best first.
    for a in range(len(keep)):
        for b in range(a + 1, len(keep)):
            assert _iou(boxes[keep[a]], boxes[keep[b]]) <= thr + 1e-12
            assert scores[keep[a]] >= scores[keep[b]]
    # Every dropped box overlaps a kept box with at least its score by more than `thr`.
    for i in set(range(len(boxes))) - set(keep):
        assert any(_iou(boxes[i], boxes[k]) > thr and scores[k] >= scores[i] for k in keep)


def _level(scores: np.ndarray, stride: int, window: int, scale: float = 1.0) -> DenseScores:
    boxes = _expected_boxes(scores.shape[:2], stride, window).astype(np.float32) / scale
    return DenseScores(scale, scores.astype(np.float32), boxes, (stride, stride), (window, window), (0, 0))


def test_detections_threshold_then_nms_per_class() -> None:
    s = np.zeros((1, 4, 2))
    s[0, :, 0] = [0.9, 0.8, 0.1, 0.7]  # windows 0 and 1 overlap (IoU 0.6), 3 is apart from 0
    s[0, :, 1] = [0.0, 0.95, 0.0, 0.0]  # class 1 on window 1, overlapping class 0's window 0
    dets = detections([_level(s, 4, 10)], threshold=0.5, iou_threshold=0.3, class_names=["a", "b"])
    got = [(d.label, d.score, d.box) for d in dets]
    assert got == [
        ("b", pytest.approx(0.95), (4.0, 0.0, 14.0, 10.0)),
        ("a", pytest.approx(0.9), (0.0, 0.0, 10.0, 10.0)),
        ("a", pytest.approx(0.7), (12.0, 0.0, 22.0, 10.0)),
    ]
    assert detections([_level(s, 4, 10)], threshold=0.99) == []
    with pytest.raises(ValueError, match="2 classes"):
        detections([_level(s, 4, 10)], class_names=["a"])


def test_score_map_takes_the_nearest_window_centre_and_the_max_over_scales() -> None:
    s = np.arange(4, dtype=np.float32).reshape(2, 2, 1)  # windows of 4 at stride 2: centres 2 and 4
    fine = _level(np.concatenate([s, 3 - s], -1), 2, 4)
    score, cls = score_map([fine], (6, 6), class_index=0)
    want = np.repeat(np.repeat(s[..., 0], 3, 0), 3, 1)  # pixels 0..2 → centre 2, 3..5 → centre 4
    np.testing.assert_array_equal(score, want)
    best, best_cls = score_map([fine], (6, 6))
    np.testing.assert_array_equal(best_cls, np.where(want >= 2, 0, 1))
    coarse = _level(np.full((1, 1, 2), [1.5, 0.0]), 2, 6)  # one window over everything
    best, best_cls = score_map([fine, coarse], (6, 6))
    np.testing.assert_array_equal(best, np.maximum(np.maximum(want, 3 - want), 1.5))


# ------------------------------------------------------------------ the bundled shapes_fc model

SHAPES_FC = REPO / "models" / "shapes_fc"


def _interior_scenes(n: int, size: int, seed: int):
    """Scenes of three shapes whose centres are ≥ 32 px from the border, so that a 64 px window
    can be centred on each one (rejection sampling, deterministic)."""
    from camserve.datasets.shapes import make_scene

    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        scene = make_scene(rng, size=(size, size), n_shapes=3)
        if all(32 <= (x0 + x1) / 2 <= size - 32 and 32 <= (y0 + y1) / 2 <= size - 32 for x0, y0, x1, y1 in scene.boxes):
            scenes.append(scene)
    return scenes


def _centre_in_box_of(centre, label: int, scene) -> bool:
    cx, cy = centre
    return any(l == label and x0 <= cx < x1 and y0 <= cy < y1 for l, (x0, y0, x1, y1) in zip(scene.labels, scene.boxes))


@pytest.mark.skipif(
    not (SHAPES_FC / "1" / "model.keras").is_file(), reason="models/shapes_fc/1/model.keras not built yet"
)
def test_shapes_fc_top_windows_cover_the_shapes_in_a_large_scene() -> None:
    """192 px scenes with three shapes, dense scores at stride 8 (shift-and-stitch of the
    exact FCN). Ground truth from the generator. Measured with the bundled model: 30 of 31
    top windows and 36 of 36 centred windows right; the bounds leave room for a retrained model.
    """
    from camserve.imaging import preprocess
    from camserve.serving.repository import load_model_dir

    entry = load_model_dir(SHAPES_FC)
    top_hits = top_total = centred_hits = centred_total = 0
    for scene in _interior_scenes(12, 192, seed=300):
        result = dense_scores(entry.model, preprocess(scene.image, entry.config.preprocessing), stride=8)
        assert result.exact and result.stride == 8
        level = result[0]
        assert level.scores.shape == (17, 17, len(entry.config.class_names))
        centres = (level.boxes[..., :2] + level.boxes[..., 2:]) / 2  # (x, y) of every window
        # The top-scoring window of every class in the scene lies on a shape of that class.
        for c in set(scene.labels):
            i, j = np.unravel_index(np.argmax(level.scores[..., c]), level.scores.shape[:2])
            top_total += 1
            top_hits += _centre_in_box_of(centres[i, j], c, scene)
        # The window centred nearest each shape classifies it.
        for label, (x0, y0, x1, y1) in zip(scene.labels, scene.boxes):
            d = np.abs(centres - np.array([(x0 + x1) / 2, (y0 + y1) / 2])).sum(-1)
            i, j = np.unravel_index(np.argmin(d), d.shape)
            centred_total += 1
            centred_hits += int(np.argmax(level.scores[i, j]) == label)
    assert top_total >= 24 and top_hits / top_total >= 0.85, (top_hits, top_total)
    assert centred_hits / centred_total >= 0.85, (centred_hits, centred_total)
