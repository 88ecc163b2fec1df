"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy
for Attribution Methods").

Removing pixels by setting them to a constant leaks the removal mask's shape into the model's
answer; ROAD instead fills the removed pixels by **noisy linear imputation**: each removed
pixel becomes the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct, 1/12 for the
4 diagonal ones; neighbours outside the image are left out and the weights renormalised), which
for a region of removed pixels is one sparse linear system per image, solved for all channels
at once; then Gaussian noise (σ = ``noise``, absolute) is added to the filled values.

Curves: at each percentile p the p % pixels with the highest (MoRF, most relevant first) or
lowest (LeRF, least relevant first) heatmap values are removed and imputed, and the image is
scored. A good explanation makes the MoRF scores fall fast and the LeRF scores stay high; the
combined score ``(mean LeRF − mean MoRF) / 2`` (as pytorch-grad-cam's ``ROADCombined``) is
higher for better explanations. Here p is the fraction removed, the paper's x-axis;
pytorch-grad-cam's percentile p removes the pixels at or above the p-th percentile (100 − p %),
so over the symmetric default percentiles the averages agree.

Needs SciPy (``pip install camserve[eval]``) for the sparse solve.

>>> img = np.zeros((3, 3, 1)); img[1, 1] = 5.0
>>> removed = np.zeros((3, 3), bool); removed[1, 1] = True
>>> float(noisy_linear_imputation(img, removed, noise=0.0)[1, 1, 0])   # the mean of its zero neighbours
0.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from camserve.errors import InvalidArgument
from camserve.evaluation.localization import ScoreFn, check_heatmap

#: Neighbour offsets (dy, dx) and their weights in the imputation.
NEIGHBOURS: tuple[tuple[tuple[int, int], float], ...] = tuple(
    ((dy, dx), 1 / 6 if dy == 0 or dx == 0 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
)
#: ROAD's default percentiles of removed pixels.
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _sparse():
    try:
        from scipy.sparse import csr_matrix
        from scipy.sparse.linalg import spsolve
    except ImportError:  # pragma: no cover - scipy is in the eval and dev extras
        raise InvalidArgument("ROAD needs SciPy for its sparse solve: pip install 'camserve[eval]'") from None
    return csr_matrix, spsolve


def noisy_linear_imputation(
    image: np.ndarray, removed: np.ndarray, noise: float = 0.01, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``image`` (H, W, C) with the pixels where ``removed`` (H, W) is true filled by ROAD's
    noisy linear imputation (see the module doc); float64 out, the kept pixels unchanged.

    >>> ramp = np.arange(16, dtype=float).reshape(4, 4, 1)     # linear: reproduced exactly
    >>> hole = np.zeros((4, 4), bool); hole[1:3, 1:3] = True
    >>> np.allclose(noisy_linear_imputation(ramp, hole, noise=0.0), ramp)
    True
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.size == 0:
        raise InvalidArgument(f"image must be a non-empty (H, W, C) array, got shape {img.shape}")
    mask = np.asarray(removed, dtype=bool)
    if mask.shape != img.shape[:2]:
        raise InvalidArgument(f"removed must be (H, W) = {img.shape[:2]}, got {mask.shape}")
    if not noise >= 0:
        raise InvalidArgument(f"noise must be >= 0, got {noise}")
    out = img.copy()
    if not mask.any():
        return out
    if mask.all():
        raise InvalidArgument("every pixel is removed: nothing is left to impute from")
    h, w, c = img.shape
    ys, xs = np.nonzero(mask)
    unknown = -np.ones((h, w), np.int64)
    unknown[ys, xs] = np.arange(len(ys))
    rows, cols, vals = [np.arange(len(ys))], [np.arange(len(ys))], []
    diagonal = np.zeros(len(ys))
    rhs = np.zeros((len(ys), c))
    for (dy, dx), weight in NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diagonal[inside] += weight
        idx = np.flatnonzero(inside)
        neighbour = unknown[ny[idx], nx[idx]]
        known = neighbour < 0
        rhs[idx[known]] += weight * img[ny[idx[known]], nx[idx[known]]]
        rows.append(idx[~known])
        cols.append(neighbour[~known])
        vals.append(np.full((~known).sum(), -weight))
    csr_matrix, spsolve = _sparse()
    system = csr_matrix((np.concatenate([diagonal, *vals]), (np.concatenate(rows), np.concatenate(cols))))
    solved = np.asarray(spsolve(system.tocsc(), rhs)).reshape(len(ys), c)
    if noise > 0:
        solved = solved + noise * (rng or np.random.default_rng(0)).standard_normal(solved.shape)
    out[ys, xs] = solved
    return out


def removal_order(heatmap: np.ndarray, order: str) -> np.ndarray:
    """(H, W) rank of every pixel in the removal order: ``"morf"`` highest heatmap value first,
    ``"lerf"`` lowest first (ties: row-major order).

    >>> removal_order(np.array([[0.1, 0.9], [0.5, 0.5]]), "morf").tolist()
    [[3, 0], [1, 2]]
    """
    if order not in ("morf", "lerf"):
        raise InvalidArgument(f"order must be 'morf' or 'lerf', got {order!r}")
    hm = check_heatmap(heatmap, "heatmap").astype(np.float64)
    key = -hm.ravel() if order == "morf" else hm.ravel()
    ranked = np.argsort(key, kind="stable")
    rank = np.empty(hm.size, np.int64)
    rank[ranked] = np.arange(hm.size)
    return rank.reshape(hm.shape)


def road_curve(
    score_fn: ScoreFn,
    image: np.ndarray,
    heatmap: np.ndarray,
    order: str = "morf",
    percentiles: Sequence[float] = PERCENTILES,
    noise: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(fractions removed, scores): at each percentile p, the round(p/100 · H·W) first pixels of
    :func:`removal_order` are imputed (:func:`noisy_linear_imputation`, noise seeded by
    ``seed`` and the step) and the images scored in one ``score_fn(batch) -> (B,)`` call.

    >>> f = lambda b: b[:, 0, 0, 0]                       # the top-left pixel's value
    >>> hm = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> road_curve(f, np.eye(2)[..., None], hm, "morf", percentiles=(25,), noise=0.0)[1].tolist()
    [0.2]

    (the removed top-left pixel: (1/12 · 1) / (1/6 + 1/6 + 1/12) from its three neighbours)
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise InvalidArgument(f"image must be (H, W, C), got shape {img.shape}")
    rank = removal_order(heatmap, order)
    if rank.shape != img.shape[:2]:
        raise InvalidArgument(f"heatmap shape {rank.shape} must equal the image's (H, W) = {img.shape[:2]}")
    ps = np.asarray(percentiles, dtype=np.float64)
    if ps.ndim != 1 or ps.size == 0 or np.any(ps <= 0) or np.any(ps >= 100):
        raise InvalidArgument(f"percentiles must be numbers strictly between 0 and 100, got {list(percentiles)}")
    counts = np.round(ps / 100.0 * rank.size).astype(np.int64)
    batch = np.stack(
        [
            noisy_linear_imputation(img, rank < k, noise, np.random.default_rng([seed, step]))
            for step, k in enumerate(counts)
        ]
    ).astype(img.dtype if np.issubdtype(img.dtype, np.floating) else np.float32)
    scores = np.asarray(score_fn(batch), dtype=np.float64)
    if scores.shape != (len(counts),):
        raise InvalidArgument(f"score_fn must return one score per image, shape ({len(counts)},); got {scores.shape}")
    return counts / rank.size, scores


@dataclasses.dataclass(frozen=True)
class RoadResult:
    """ROAD curves of one image (fractions removed, MoRF and LeRF scores) and the combined
    score (mean LeRF − mean MoRF) / 2: higher is better."""

    fractions: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray

    @property
    def combined(self) -> float:
        return float((self.lerf.mean() - self.morf.mean()) / 2.0)


def road(
    score_fn: ScoreFn,
    image: np.ndarray,
    heatmap: np.ndarray,
    percentiles: Sequence[float] = PERCENTILES,
    noise: float = 0.01,
    seed: int = 0,
) -> RoadResult:
    """Both ROAD curves of one image (see :func:`road_curve`).

    >>> f = lambda b: b[:, 0, 0, 0]
    >>> r = road(f, np.eye(2)[..., None], np.array([[1.0, 0.0], [0.0, 0.0]]), percentiles=(25,), noise=0.0)
    >>> r.morf.tolist(), r.lerf.tolist(), r.combined
    ([0.2], [1.0], 0.4)
    """
    fractions, morf = road_curve(score_fn, image, heatmap, "morf", percentiles, noise, seed)
    _, lerf = road_curve(score_fn, image, heatmap, "lerf", percentiles, noise, seed)
    return RoadResult(fractions, morf, lerf)
