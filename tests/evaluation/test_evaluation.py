"""camserve.evaluation against hand-computed values and independent (naive / scipy) computations."""

from __future__ import annotations

import doctest
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
import pytest
import scipy.stats

from camserve import evaluation
from camserve.evaluation import (
    blurred_baseline,
    box_iou,
    deletion_auc,
    insertion_auc,
    localization_accuracy,
    localization_hits,
    perturbation_curve,
    pointing_game,
    pointing_hits,
    randomized_copy,
    rankdata,
    sanity_check,
    spearman,
)


def test_docstring_examples() -> None:
    assert doctest.testmod(evaluation, raise_on_error=False).failed == 0


# --------------------------------------------------------------------------- IoU


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),
        ((0, 0, 2, 2), (1, 0, 3, 2), 2 / 6),  # half overlap: 2 px of 4 + 4 - 2
        ((0, 0, 4, 4), (1, 1, 3, 3), 4 / 16),  # contained
        ((0, 0, 4, 4), (2, 2, 6, 6), 4 / 28),
        ((0, 0, 2, 2), (2, 0, 4, 2), 0.0),  # touching edges share no pixel (x1 exclusive)
        ((0, 0, 2, 2), (5, 5, 7, 7), 0.0),
        ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # empty boxes
        ((1, 1, 1, 5), (0, 0, 4, 4), 0.0),  # zero-width box
    ],
)
def test_box_iou_hand_computed(a, b, expected) -> None:
    assert box_iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert box_iou(b, a) == pytest.approx(expected, abs=1e-12)


def test_box_iou_matches_pixel_counting() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        boxes = []
        for _ in range(2):
            x0, x1 = sorted(rng.integers(0, 12, 2))
            y0, y1 = sorted(rng.integers(0, 12, 2))
            boxes.append((int(x0), int(y0), int(x1), int(y1)))
        masks = []
        for x0, y0, x1, y1 in boxes:
            m = np.zeros((12, 12), bool)
            m[y0:y1, x0:x1] = True
            masks.append(m)
        union = np.sum(masks[0] | masks[1])
        expected = np.sum(masks[0] & masks[1]) / union if union else 0.0
        assert box_iou(*boxes) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bad", [(0, 0, 2), (2, 0, 1, 1), (0, 3, 1, 1), (0, 0, float("nan"), 1)])
def test_box_iou_rejects_bad_boxes(bad) -> None:
    with pytest.raises(ValueError, match="box a"):
        box_iou(bad, (0, 0, 1, 1))


# --------------------------------------------------------------------------- localization


def test_localization_constructed_boxes() -> None:
    truth = (10, 10, 20, 20)
    preds = [
        (10, 10, 20, 20),  # exact: hit
        None,  # no box: miss
        (15, 10, 25, 20),  # IoU 50/150 = 1/3: miss
        (10, 10, 20, 15),  # IoU 50/100 = 0.5 exactly: hit (>=)
    ]
    assert localization_hits(preds, [truth] * 4).tolist() == [True, False, False, True]
    assert localization_accuracy(preds, [truth] * 4) == 0.5
    assert localization_accuracy(preds, [truth] * 4, threshold=0.3) == 0.75
    assert localization_accuracy(preds, [truth] * 4, threshold=0.51) == 0.25


def test_localization_several_ground_truth_boxes() -> None:
    pred = (0, 0, 10, 10)
    far, near = (50, 50, 60, 60), (0, 0, 10, 8)  # IoU with near = 0.8
    assert localization_hits([pred], [[far, near]]).tolist() == [True]
    assert localization_hits([pred], [np.array([far, near])]).tolist() == [True]
    assert localization_hits([pred], [[far]]).tolist() == [False]
    assert localization_hits([pred], [[]]).tolist() == [False]  # no box of the class: miss
    assert localization_accuracy([pred, pred], [[far, near], far]) == 0.5


def test_localization_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        localization_accuracy([(0, 0, 1, 1)], [])
    with pytest.raises(ValueError, match="empty"):
        localization_accuracy([], [])
    with pytest.raises(ValueError, match=r"true_boxes\[0\]"):
        localization_accuracy([(0, 0, 1, 1)], [[(0, 0, 1)]])
    with pytest.raises(ValueError, match="threshold"):
        localization_accuracy([(0, 0, 1, 1)], [(0, 0, 1, 1)], threshold=1.5)


# --------------------------------------------------------------------------- pointing game


def _peak(shape: tuple[int, int], y: int, x: int) -> np.ndarray:
    hm = np.zeros(shape, np.float32)
    hm[y, x] = 1.0
    return hm


def test_pointing_game_constructed_heatmaps() -> None:
    box = (4, 2, 8, 6)  # pixels x 4..7, y 2..5
    maps = [
        _peak((10, 10), 2, 4),  # top-left pixel of the box: hit
        _peak((10, 10), 5, 7),  # bottom-right pixel: hit
        _peak((10, 10), 6, 7),  # just below (y1 exclusive): miss
        _peak((10, 10), 3, 8),  # just right (x1 exclusive): miss
        _peak((10, 10), 7, 9),  # diagonal: distance sqrt(2**2 + 2**2)
    ]
    assert pointing_hits(maps, [box] * 5).tolist() == [True, True, False, False, False]
    assert pointing_game(maps, [box] * 5) == pytest.approx(0.4)
    assert pointing_hits(maps, [box] * 5, tolerance=1).tolist() == [True, True, True, True, False]
    assert pointing_hits(maps, [box] * 5, tolerance=2.8).tolist()[-1] is False
    assert pointing_hits(maps, [box] * 5, tolerance=2.83).tolist()[-1] is True
    # several boxes: a hit on any counts; a (N, H, W) array works as well as a list
    assert pointing_hits(np.stack(maps[2:4]), [[box, (7, 6, 8, 7)], [(8, 3, 9, 4)]]).tolist() == [True, True]


def test_pointing_game_tolerance_matches_disk_dilation() -> None:
    """Independent rule: dilate the box mask with a disk of radius ``tolerance``."""
    rng = np.random.default_rng(1)
    for _ in range(100):
        x0, x1 = sorted(rng.choice(16, 2, replace=False))
        y0, y1 = sorted(rng.choice(16, 2, replace=False))
        tol = float(rng.choice([0, 1, 1.5, 2, 3.2]))
        y, x = rng.integers(0, 16, 2)
        yy, xx = np.mgrid[0:16, 0:16]
        inside = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        dist = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
        expected = bool(np.any(inside & (dist <= tol)))
        got = pointing_hits([_peak((16, 16), y, x)], [(x0, y0, x1, y1)], tolerance=tol)[0]
        assert got == expected, (x0, y0, x1, y1, tol, y, x)


def test_pointing_game_ties_are_deterministic() -> None:
    hm = np.zeros((6, 6))
    hm[1, 1] = hm[4, 4] = 1.0  # (1, 1) comes first in row-major order
    near_first, near_second = (0, 0, 3, 3), (3, 3, 6, 6)
    assert pointing_hits([hm, hm], [near_first, near_second]).tolist() == [True, False]
    assert pointing_hits([hm, hm], [near_first, near_second], ties="any").tolist() == [True, True]
    assert pointing_hits([hm, hm], [near_first, near_second], ties="all").tolist() == [False, False]
    assert pointing_hits([hm], [(0, 0, 6, 6)], ties="all").tolist() == [True]
    flat = np.zeros((6, 6))  # every pixel is a maximum
    assert pointing_hits([flat], [near_second]).tolist() == [False]  # first = (0, 0)
    assert pointing_hits([flat], [near_second], ties="all").tolist() == [False]


def test_pointing_game_errors() -> None:
    bad = np.zeros((4, 4))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pointing_game([bad], [(0, 0, 1, 1)])
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        pointing_game([np.zeros(4)], [(0, 0, 1, 1)])
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game([np.zeros((4, 4))], [(0, 0, 1, 1)], tolerance=-1)
    with pytest.raises(ValueError, match="ties"):
        pointing_game([np.zeros((4, 4))], [(0, 0, 1, 1)], ties="last")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- deletion / insertion


def _top_row_mean(batch: np.ndarray) -> np.ndarray:
    """Score of a 4x4 image: mean of its top row (all channels)."""
    return batch[:, 0].mean(axis=(1, 2))


def test_deletion_and_insertion_exact_values() -> None:
    image = np.ones((4, 4, 2), np.float32)
    good = np.zeros((4, 4))
    good[0] = 1.0  # the region the score reads, ranked first
    bad = 1.0 - good  # inverted: the region ranked last
    # steps=4 changes 4 pixels (one row) per step; x = 0, .25, .5, .75, 1.
    # deletion, good: scores 1, 0, 0, 0, 0 -> 0.25 * 1/2 = 0.125
    # deletion, bad : scores 1, 1, 1, 1, 0 -> 0.25 * (3 + 1/2) = 0.875
    assert deletion_auc(_top_row_mean, image, good, steps=4) == pytest.approx(0.125)
    assert deletion_auc(_top_row_mean, image, bad, steps=4) == pytest.approx(0.875)
    x, y = perturbation_curve(_top_row_mean, image, good, "deletion", steps=4)
    assert x.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert y.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # insertion from zeros mirrors it: good 0, 1, 1, 1, 1 -> 0.875; bad 0, 0, 0, 0, 1 -> 0.125
    assert insertion_auc(_top_row_mean, image, good, steps=4, baseline=0.0) == pytest.approx(0.875)
    assert insertion_auc(_top_row_mean, image, bad, steps=4, baseline=0.0) == pytest.approx(0.125)
    # 8 steps (2 pixels each): deletion, good: scores 1, .5, 0, ..., 0 at x = 0, .125, .25, ...
    # trapezoids (1 + .5)/2 * .125 + (.5 + 0)/2 * .125 = 0.09375 + 0.03125 = 0.125
    assert deletion_auc(_top_row_mean, image, good, steps=8) == pytest.approx(0.125)
    # one step: straight line from 1 to 0
    assert deletion_auc(_top_row_mean, image, good, steps=1) == pytest.approx(0.5)


def _naive_curve(score_fn, image, heatmap, start, end, steps):
    """One image and one score_fn call per step, pixels replaced one by one in a Python loop."""
    h, w = heatmap.shape
    order = sorted(range(h * w), key=lambda k: (-heatmap.flat[k], k))
    xs, ys = [], []
    for i in range(steps + 1):
        n = (i * h * w) // steps
        img = start.copy()
        for k in order[:n]:
            img[k // w, k % w] = end[k // w, k % w]
        xs.append(n / (h * w))
        ys.append(float(score_fn(img[None])[0]))
    return np.array(xs), np.array(ys)


@pytest.mark.parametrize("steps", [1, 7, 20, 63])
def test_curves_match_naive_loop_on_linear_score(steps: int) -> None:
    rng = np.random.default_rng(steps)
    image = rng.uniform(0, 1, (9, 7, 3)).astype(np.float32)
    weights = rng.normal(size=(9, 7, 3))
    heatmap = rng.integers(0, 5, (9, 7)).astype(np.float32)  # many ties
    baseline = rng.uniform(0, 1, (9, 7, 3)).astype(np.float32)

    def linear(batch: np.ndarray) -> np.ndarray:
        return np.einsum("bhwc,hwc->b", batch.astype(np.float64), weights)

    for mode, start, end in [("deletion", image, baseline), ("insertion", baseline, image)]:
        x, y = perturbation_curve(linear, image, heatmap, mode, steps=steps, baseline=baseline, batch_size=5)
        nx, ny = _naive_curve(linear, image, heatmap, start, end, steps)
        np.testing.assert_allclose(x, nx, rtol=0, atol=0)
        np.testing.assert_allclose(y, ny, rtol=1e-5, atol=1e-5)
        auc_fn = deletion_auc if mode == "deletion" else insertion_auc
        auc = auc_fn(linear, image, heatmap, steps=steps, baseline=baseline)
        assert auc == pytest.approx(float(np.trapezoid(ny, nx)), rel=1e-5, abs=1e-5)


def test_correct_heatmap_beats_inverted_one() -> None:
    rng = np.random.default_rng(3)
    image = rng.uniform(0.2, 1.0, (16, 16, 3)).astype(np.float32)
    region = np.zeros((16, 16), bool)
    region[3:9, 5:12] = True

    def region_mean(batch: np.ndarray) -> np.ndarray:
        return batch[:, region].mean(axis=(1, 2))

    good = region.astype(np.float32) + rng.uniform(0, 0.1, (16, 16))  # region first, noisy order
    bad = good.max() - good
    assert deletion_auc(region_mean, image, good, steps=32) < deletion_auc(region_mean, image, bad, steps=32)
    assert insertion_auc(region_mean, image, good, steps=32, baseline=0.0) > insertion_auc(
        region_mean, image, bad, steps=32, baseline=0.0
    )
    # the region holds 42 of 256 pixels: with positive pixels the good curve falls monotonically
    # from the full score to 0 at x = 42/256 and stays there, so its area is below that rectangle
    full = float(region_mean(image[None])[0])
    assert deletion_auc(region_mean, image, good, steps=256) < 42 / 256 * full


def test_steps_run_as_batches() -> None:
    calls: list[int] = []

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return _top_row_mean(batch)

    image = np.ones((4, 4, 1), np.float32)
    heatmap = np.arange(16, dtype=np.float32).reshape(4, 4)
    x, y = perturbation_curve(counting, image, heatmap, "deletion", steps=10, batch_size=4)
    assert calls == [4, 4, 3]  # 11 evaluations
    for batch_size in (1, 3, 11, 100):
        x2, y2 = perturbation_curve(_top_row_mean, image, heatmap, "deletion", steps=10, batch_size=batch_size)
        np.testing.assert_array_equal(y, y2)


def test_default_baselines() -> None:
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 1, (12, 12, 3)).astype(np.float32)
    heatmap = rng.uniform(0, 1, (12, 12))

    def total(batch: np.ndarray) -> np.ndarray:
        return batch.sum(axis=(1, 2, 3))

    _, y = perturbation_curve(total, image, heatmap, "deletion", steps=4)
    assert y[-1] == 0.0  # deleted to zeros
    blurred = cv2.GaussianBlur(image, (11, 11), 5.0)  # independent: cv2 on all channels at once
    np.testing.assert_allclose(blurred_baseline(image), blurred, atol=1e-6)
    _, y = perturbation_curve(total, image, heatmap, "insertion", steps=4)
    assert y[0] == pytest.approx(float(blurred.sum()), rel=1e-5)
    assert y[-1] == pytest.approx(float(image.sum()), rel=1e-5)


def test_perturbation_errors_name_the_problem() -> None:
    image = np.ones((4, 4, 1), np.float32)
    hm = np.ones((4, 4))
    with pytest.raises(ValueError, match="heatmap shape"):
        deletion_auc(_top_row_mean, image, np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"1\.\.16"):
        deletion_auc(_top_row_mean, image, hm, steps=100)
    with pytest.raises(ValueError, match="one score per image"):
        deletion_auc(lambda b: np.zeros((len(b), 2)), image, hm, steps=4)
    with pytest.raises(ValueError, match="broadcast"):
        deletion_auc(_top_row_mean, image, hm, steps=4, baseline=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        deletion_auc(_top_row_mean, np.ones((4, 4)), hm, steps=4)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(_top_row_mean, image, hm, "erase", steps=4)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Spearman


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_rank_and_spearman_match_scipy() -> None:
    rng = np.random.default_rng(5)
    for size in (2, 3, 10, 257):
        for ties in (False, True):
            a = rng.integers(0, 4, size) if ties else rng.normal(size=size)
            b = rng.integers(0, 4, size) + 0.5 * a if ties else a + rng.normal(size=size)
            np.testing.assert_allclose(rankdata(a), scipy.stats.rankdata(a))
            expected = scipy.stats.spearmanr(a, b).statistic
            if np.isnan(expected):
                assert np.isnan(spearman(a, b))
            else:
                assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    hm = rng.integers(0, 3, (8, 8)).astype(np.float32)
    other = hm + rng.integers(0, 2, (8, 8))
    assert spearman(hm, other) == pytest.approx(scipy.stats.spearmanr(hm.ravel(), other.ravel()).statistic)
    assert spearman(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(5), np.arange(5)))
    with pytest.raises(ValueError, match="same size"):
        spearman(np.ones(3), np.ones(4))


# --------------------------------------------------------------------------- sanity check


@pytest.fixture(scope="module")
def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_a"),
            keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_b"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, name="head"),
        ]
    )
    images = np.random.default_rng(6).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)
    return model, images


def saliency(model, images: np.ndarray) -> np.ndarray:
    """Input-gradient saliency of class 0: max over channels of |d score / d input|."""
    import tensorflow as tf

    x = tf.convert_to_tensor(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = model(x, training=False)[:, 0]
    return np.abs(tape.gradient(score, x).numpy()).max(axis=-1)


def test_sanity_check_identity_and_randomization(tiny_model) -> None:
    model, images = tiny_model
    before = [w.copy() for w in model.get_weights()]

    same = sanity_check(model, saliency, images, layers_to_randomize=0)
    assert same.randomized == ()
    np.testing.assert_allclose(same.correlations, 1.0, atol=1e-9)

    rand = sanity_check(model, saliency, images, layers_to_randomize=3, seed=1)
    assert rand.randomized == ("head", "conv_b", "conv_a")
    assert rand.correlations.shape == (4,)
    assert rand.mean < 0.5  # measured 0.08 (seed 1); 1.0 for the unrandomized copy
    assert sanity_check(model, saliency, images, layers_to_randomize=1, seed=1).mean < 0.5  # measured 0.22
    assert rand.mean == pytest.approx(float(np.mean(rand.correlations)))
    # the reported correlation is the independent scipy one between the two saliency maps
    copy, _ = randomized_copy(model, 3, seed=1)
    a, b = saliency(model, images), saliency(copy, images)
    for i in range(len(images)):
        expected = scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic
        assert rand.correlations[i] == pytest.approx(expected, abs=1e-9)
    # the model itself is untouched
    for w0, w1 in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w0, w1)


def test_randomized_copy_layers_and_initializers(tiny_model) -> None:
    model, _ = tiny_model
    copy, names = randomized_copy(model, 2, seed=3)
    assert names == ("head", "conv_b")
    for layer in model.layers:
        other = copy.get_layer(layer.name)
        for w0, w1 in zip(layer.get_weights(), other.get_weights()):
            if layer.name in names and w0.ndim > 1:
                assert not np.allclose(w0, w1)
            else:
                np.testing.assert_array_equal(w0, w1)  # conv_a untouched; biases are re-drawn as zeros
    # own initializers: glorot_uniform kernel within its bound, zeros bias
    kernel, bias = copy.get_layer("head").get_weights()
    limit = math.sqrt(6.0 / (6 + 3))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).std() > 0.1 * limit
    np.testing.assert_array_equal(bias, 0.0)
    # deterministic in the seed
    again, _ = randomized_copy(model, 2, seed=3)
    other_seed, _ = randomized_copy(model, 2, seed=4)
    np.testing.assert_array_equal(again.get_layer("head").get_weights()[0], kernel)
    assert not np.allclose(other_seed.get_layer("head").get_weights()[0], kernel)
    # by name, and the seeded normal
    normal, names = randomized_copy(model, ["conv_a"], reinit="normal", normal_stddev=0.05)
    assert names == ("conv_a",)
    k = normal.get_layer("conv_a").get_weights()[0]
    assert k.std() == pytest.approx(0.05, rel=0.25)
    head = model.get_layer("head").get_weights()[0]
    np.testing.assert_array_equal(normal.get_layer("head").get_weights()[0], head)


def test_randomized_copy_nested_model() -> None:
    import keras

    keras.utils.set_random_seed(1)
    inner_in = keras.Input((8, 8, 3))
    inner = keras.Model(inner_in, keras.layers.Conv2D(4, 3, name="conv")(inner_in), name="backbone")
    outer = keras.Sequential(
        [keras.Input((8, 8, 3)), inner, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, name="head")]
    )
    copy, names = randomized_copy(outer, ["backbone/conv"], seed=0)
    assert names == ("backbone/conv",)
    conv0 = outer.get_layer("backbone").get_layer("conv").get_weights()[0]
    conv1 = copy.layers[0].layers[-1].get_weights()[0]
    assert not np.allclose(conv0, conv1)
    head = outer.get_layer("head").get_weights()[0]
    np.testing.assert_array_equal(copy.get_layer("head").get_weights()[0], head)
    assert randomized_copy(outer, 2)[1] == ("head", "backbone/conv")


def test_sanity_check_errors(tiny_model) -> None:
    model, images = tiny_model
    with pytest.raises(ValueError, match=r"0\.\.3"):
        sanity_check(model, saliency, images, layers_to_randomize=4)
    with pytest.raises(ValueError, match="conv_a"):
        sanity_check(model, saliency, images, layers_to_randomize=["nope"])
    with pytest.raises(ValueError, match="one map per image"):
        sanity_check(model, lambda m, x: saliency(m, x)[:2], images, layers_to_randomize=1)
