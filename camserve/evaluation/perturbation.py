"""Deletion / insertion curves and their AUC (Petsiuk et al. 2018)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypedDict, Unpack

import cv2
import numpy as np

from camserve.errors import InvalidArgument

if TYPE_CHECKING:
    pass

from camserve.evaluation.localization import ScoreFn, check_heatmap

# --------------------------------------------------------------------------- deletion / insertion


def blurred_baseline(image: np.ndarray, ksize: int = 11, sigma: float = 5.0) -> np.ndarray:
    """The image under a Gaussian blur: the insertion baseline of RISE (Petsiuk et al. 2018,
    11x11 kernel, sigma 5).

    >>> blurred_baseline(np.ones((8, 8, 3), np.float32)).max()
    np.float32(1.0)
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise InvalidArgument(f"image must be (H, W, C), got shape {img.shape}")
    if ksize < 1 or ksize % 2 == 0:
        raise InvalidArgument(f"ksize must be a positive odd number, got {ksize}")
    channels = [cv2.GaussianBlur(img[..., c], (ksize, ksize), sigma) for c in range(img.shape[-1])]
    return np.stack(channels, axis=-1)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def perturbation_curve(
    score_fn: ScoreFn,
    image: np.ndarray,
    heatmap: np.ndarray,
    mode: Literal["deletion", "insertion"],
    steps: int = 100,
    baseline: float | np.ndarray | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """The deletion or insertion curve of RISE (Petsiuk et al. 2018).

    Pixels are ranked by descending heatmap value (ties: row-major order). At step
    i = 0..steps the first ``n_i = i * H*W // steps`` ranked pixels are replaced, all
    channels at once: by ``baseline`` (deletion, starting from the image), or by the image
    (insertion, starting from ``baseline``). ``baseline`` is a scalar or an array that
    broadcasts to the image; None means zeros for deletion and :func:`blurred_baseline` for
    insertion. The steps+1 images are scored ``batch_size`` at a time by
    ``score_fn(batch (B, H, W, C)) -> (B,)`` scores of the target class.

    Returns (fractions n_i / (H*W) from 0 to 1, scores), both float64 of length steps+1.

    >>> f = lambda b: b[:, 0].mean(axis=(1, 2))           # mean of the top row
    >>> hm = np.zeros((2, 2)); hm[0] = 1.0
    >>> perturbation_curve(f, np.ones((2, 2, 1)), hm, "deletion", steps=2)[1].tolist()
    [1.0, 0.0, 0.0]
    """
    if mode not in ("deletion", "insertion"):
        raise InvalidArgument(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    img = np.asarray(image)
    if img.ndim != 3 or img.size == 0:
        raise InvalidArgument(f"image must be a non-empty (H, W, C) array, got shape {img.shape}")
    hm = check_heatmap(heatmap, "heatmap")
    h, w = img.shape[:2]
    if hm.shape != (h, w):
        raise InvalidArgument(f"heatmap shape {hm.shape} must equal the image's (H, W) = {(h, w)}; resize it first")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= h * w:
        raise InvalidArgument(f"steps must be an integer in 1..H*W = 1..{h * w}, got {steps!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
    dtype = img.dtype if np.issubdtype(img.dtype, np.floating) else np.dtype(np.float32)
    if baseline is None:
        baseline = blurred_baseline(img) if mode == "insertion" else 0.0
    try:
        base = np.broadcast_to(np.asarray(baseline, dtype=dtype), img.shape)
    except ValueError:
        raise InvalidArgument(
            f"baseline of shape {np.shape(baseline)} does not broadcast to the image's shape {img.shape}"
        ) from None
    start, end = (img.astype(dtype), base) if mode == "deletion" else (base, img.astype(dtype))

    order = np.argsort(-hm.ravel().astype(np.float64), kind="stable")  # stable: row-major ties
    rank = np.empty(h * w, dtype=np.int64)
    rank[order] = np.arange(h * w)
    rank = rank.reshape(h, w)
    counts = np.arange(steps + 1, dtype=np.int64) * (h * w) // steps

    scores = np.empty(steps + 1, dtype=np.float64)
    for lo in range(0, steps + 1, batch_size):
        n = counts[lo : lo + batch_size]
        replaced = (rank[None] < n[:, None, None])[..., None]
        batch = np.where(replaced, end[None], start[None])
        out = np.asarray(score_fn(batch), dtype=np.float64)
        if out.shape != (len(n),):
            raise InvalidArgument(f"score_fn must return one score per image, shape ({len(n)},); got {out.shape}")
        scores[lo : lo + len(n)] = out
    return counts / (h * w), scores


class CurveOptions(TypedDict, total=False):
    """Options of :func:`perturbation_curve` that the AUC functions pass on."""

    steps: int
    baseline: float | np.ndarray | None
    batch_size: int


def deletion_auc(score_fn: ScoreFn, image: np.ndarray, heatmap: np.ndarray, **options: Unpack[CurveOptions]) -> float:
    """Area under the deletion curve (trapezoid, x in [0, 1]); lower is better.
    ``baseline`` defaults to zeros. See :func:`perturbation_curve`.

    >>> f = lambda b: b[:, 0].mean(axis=(1, 2))
    >>> hm = np.zeros((2, 2)); hm[0] = 1.0
    >>> deletion_auc(f, np.ones((2, 2, 1)), hm, steps=2)   # scores 1, 0, 0
    0.25
    """
    return _trapezoid(*perturbation_curve(score_fn, image, heatmap, "deletion", **options))


def insertion_auc(score_fn: ScoreFn, image: np.ndarray, heatmap: np.ndarray, **options: Unpack[CurveOptions]) -> float:
    """Area under the insertion curve (trapezoid, x in [0, 1]); higher is better.
    ``baseline`` defaults to :func:`blurred_baseline` of the image. See :func:`perturbation_curve`.

    >>> f = lambda b: b[:, 0].mean(axis=(1, 2))
    >>> hm = np.zeros((2, 2)); hm[0] = 1.0
    >>> insertion_auc(f, np.ones((2, 2, 1)), hm, steps=2, baseline=0.0)   # scores 0, 1, 1
    0.75
    """
    return _trapezoid(*perturbation_curve(score_fn, image, heatmap, "insertion", **options))
