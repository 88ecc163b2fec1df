"""ROAD (camserve.evaluation.road) against hand computations: the imputed value of a lone
pixel is the weighted mean of its neighbours written out here; larger holes against an
independent Gauss–Seidel iteration of the same equations (camserve solves them directly,
sparse); planar images are reproduced exactly; the curves remove the pixels a hand-built
ranking says."""

from __future__ import annotations

import numpy as np
import pytest

from camserve.errors import InvalidArgument
from camserve.evaluation import noisy_linear_imputation, road, road_curve
from camserve.evaluation.road import removal_order

DIRECT, DIAGONAL = 1 / 6, 1 / 12


def neighbours(h, w, y, x):
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if (dy, dx) != (0, 0) and 0 <= y + dy < h and 0 <= x + dx < w:
                yield y + dy, x + dx, DIRECT if dy == 0 or dx == 0 else DIAGONAL


def gauss_seidel(image, removed, sweeps=4000):
    """Each removed pixel set to the weighted mean of its current neighbours, until it settles."""
    out = image.astype(np.float64).copy()
    h, w, _ = out.shape
    out[removed] = out[~removed].mean(axis=0)
    pixels = list(zip(*np.nonzero(removed)))
    for _ in range(sweeps):
        for y, x in pixels:
            near = list(neighbours(h, w, y, x))
            out[y, x] = sum(wt * out[ny, nx] for ny, nx, wt in near) / sum(wt for *_, wt in near)
    return out


@pytest.fixture
def image():
    return np.random.default_rng(0).random((6, 7, 3))


def test_a_lone_pixel_is_the_weighted_mean_of_its_neighbours(image):
    for y, x in [(2, 3), (0, 0), (5, 6), (0, 4)]:  # interior, corners, an edge
        removed = np.zeros(image.shape[:2], bool)
        removed[y, x] = True
        near = list(neighbours(6, 7, y, x))
        expected = sum(wt * image[ny, nx] for ny, nx, wt in near) / sum(wt for *_, wt in near)
        got = noisy_linear_imputation(image, removed, noise=0.0)
        np.testing.assert_allclose(got[y, x], expected, rtol=1e-12)
        np.testing.assert_array_equal(got[~removed], image[~removed])


def test_two_neighbouring_pixels_solve_their_two_equations(image):
    """p = (r_p + q/6) and q = (r_q + p/6), r the known neighbours' weighted sums (interior: Σw = 1)."""
    removed = np.zeros(image.shape[:2], bool)
    removed[2, 2] = removed[2, 3] = True
    r = [sum(wt * image[ny, nx] for ny, nx, wt in neighbours(6, 7, 2, x) if not removed[ny, nx]) for x in (2, 3)]
    a = np.array([[1.0, -DIRECT], [-DIRECT, 1.0]])
    expected = np.linalg.solve(a, np.stack(r))
    got = noisy_linear_imputation(image, removed, noise=0.0)
    np.testing.assert_allclose(got[2, 2:4], expected, rtol=1e-12)


def test_large_holes_match_an_iterative_solution(image):
    removed = np.random.default_rng(1).random(image.shape[:2]) < 0.6
    removed[0, 0] = False
    np.testing.assert_allclose(
        noisy_linear_imputation(image, removed, noise=0.0), gauss_seidel(image, removed), atol=1e-9
    )


def test_planar_images_are_reproduced():
    yy, xx = np.mgrid[0:8, 0:9].astype(np.float64)
    plane = np.stack([2.0 * yy - 0.5 * xx + 3.0, xx], axis=-1)
    removed = np.zeros((8, 9), bool)
    removed[2:6, 1:7] = True
    np.testing.assert_allclose(noisy_linear_imputation(plane, removed, noise=0.0), plane, atol=1e-10)


def test_noise_is_added_to_the_imputed_pixels_only(image):
    removed = np.zeros(image.shape[:2], bool)
    removed[1:4, 2:5] = True
    clean = noisy_linear_imputation(image, removed, noise=0.0)
    noisy = noisy_linear_imputation(image, removed, noise=0.05, rng=np.random.default_rng(3))
    draws = np.random.default_rng(3).standard_normal((removed.sum(), 3))
    np.testing.assert_allclose(noisy[removed], clean[removed] + 0.05 * draws, rtol=1e-12)
    np.testing.assert_array_equal(noisy[~removed], image[~removed])


def test_removal_order_ranks_by_heatmap():
    hm = np.array([[0.2, 0.9, 0.2], [0.5, 0.1, 0.7]])
    assert removal_order(hm, "morf").ravel().tolist() == [3, 0, 4, 2, 5, 1]  # 0.9, 0.7, 0.5, 0.2, 0.2, 0.1
    assert removal_order(hm, "lerf").ravel().tolist() == [1, 5, 2, 3, 0, 4]


def test_curves_remove_the_ranked_pixels_and_score_the_imputed_images(image):
    hm = np.random.default_rng(2).random(image.shape[:2])
    seen = []

    def score(batch):
        seen.append(batch)
        return batch[:, 3, 3, 0]

    fractions, scores = road_curve(score, image, hm, "morf", percentiles=(20, 50), noise=0.0)
    assert fractions.tolist() == [8 / 42, 21 / 42]  # round(0.2 * 42), round(0.5 * 42)
    order = np.argsort(-hm.ravel(), kind="stable")
    for k, batch in zip((8, 21), seen[0]):
        removed = np.zeros(42, bool)
        removed[order[:k]] = True
        np.testing.assert_allclose(batch, gauss_seidel(image, removed.reshape(6, 7)), atol=1e-6)
    np.testing.assert_allclose(scores, seen[0][:, 3, 3, 0])


def test_road_combined_favours_the_relevant_region():
    """The score is the mean of the top-left 3x3 block: a heatmap on that block makes MoRF
    remove it first (the imputation from a zero background drops the score) and LeRF last."""
    img = np.zeros((9, 9, 1))
    img[:3, :3] = 1.0
    hm = np.zeros((9, 9))
    hm[:3, :3] = 1.0

    def score(batch):
        return batch[:, :3, :3, 0].mean(axis=(1, 2))

    good = road(score, img, hm, percentiles=(10, 50), noise=0.0)
    assert good.lerf.tolist() == [1.0, 1.0]  # the block is never among the removed
    assert good.morf[0] < 0.5 and good.morf[1] == pytest.approx(0.0)
    assert good.combined == pytest.approx((good.lerf.mean() - good.morf.mean()) / 2)
    bad = road(score, img, 1.0 - hm, percentiles=(10, 50), noise=0.0)
    assert bad.combined < 0 < good.combined


def test_bad_input_is_refused(image):
    with pytest.raises(InvalidArgument, match="every pixel"):
        noisy_linear_imputation(image, np.ones(image.shape[:2], bool))
    with pytest.raises(InvalidArgument, match="removed must be"):
        noisy_linear_imputation(image, np.ones((2, 2), bool))
    with pytest.raises(InvalidArgument, match="percentiles"):
        road_curve(lambda b: b[:, 0, 0, 0], image, np.ones(image.shape[:2]), percentiles=(0, 50))
    with pytest.raises(InvalidArgument, match="order"):
        removal_order(np.ones((2, 2)), "random")
