"""Average drop and increase in confidence (Chattopadhay et al. 2018, the Grad-CAM++ paper).

The image is multiplied by its explanation map (a heatmap in [0, 1], element-wise over the
channels) and scored again. With Y_c the class score of the image and O_c that of the
explanation-masked image, over N images:

- average drop (%) = 100 / N · Σ max(0, Y_c − O_c) / Y_c  (lower is better);
- increase in confidence (%) = 100 / N · #{O_c > Y_c}  (higher is better).

Scores are the class probabilities (the papers' setting), read from ``score_fn``.

>>> average_drop([0.8, 0.5], [0.4, 0.6]), increase_in_confidence([0.8, 0.5], [0.4, 0.6])
(25.0, 50.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from camserve.errors import InvalidArgument
from camserve.evaluation.localization import ScoreFn, check_heatmap

Scores = Sequence[float] | np.ndarray


def _pair(original: Scores, masked: Scores) -> tuple[np.ndarray, np.ndarray]:
    y, o = np.asarray(original, np.float64), np.asarray(masked, np.float64)
    if y.ndim != 1 or y.shape != o.shape or y.size == 0:
        raise InvalidArgument(
            f"original and masked scores must be two 1-D arrays of one equal length ≥ 1, got {y.shape} and {o.shape}"
        )
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(o))):
        raise InvalidArgument("scores must be finite (no NaN/Inf)")
    if np.any(y <= 0):
        raise InvalidArgument("original scores must be > 0 (class probabilities) for the relative drop")
    return y, o


def average_drop(original: Scores, masked: Scores) -> float:
    """100 / N · Σ max(0, Y − O) / Y, in percent; lower is better.

    >>> average_drop([0.5], [0.25])
    50.0
    """
    y, o = _pair(original, masked)
    return float(100.0 * np.mean(np.maximum(0.0, y - o) / y))


def increase_in_confidence(original: Scores, masked: Scores) -> float:
    """100 / N · #{O > Y}, in percent; higher is better.

    >>> increase_in_confidence([0.5, 0.5], [0.6, 0.5])
    50.0
    """
    y, o = _pair(original, masked)
    return float(100.0 * np.mean(o > y))


def explanation_masked(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The image times its explanation map (H, W) in [0, 1], over every channel.

    >>> explanation_masked(np.ones((1, 2, 3)), np.array([[0.0, 0.5]]))[0, :, 0].tolist()
    [0.0, 0.5]
    """
    img = np.asarray(image)
    hm = check_heatmap(heatmap, "heatmap")
    if img.ndim != 3 or img.shape[:2] != hm.shape:
        raise InvalidArgument(f"image (H, W, C) and heatmap (H, W) must agree, got {img.shape} and {hm.shape}")
    if hm.min() < 0 or hm.max() > 1:
        raise InvalidArgument(f"heatmap values must lie in [0, 1], got [{hm.min()}, {hm.max()}]")
    return (img * hm[..., None]).astype(img.dtype if np.issubdtype(img.dtype, np.floating) else np.float32)


@dataclasses.dataclass(frozen=True)
class ConfidenceResult:
    """Scores of the images and of their explanation-masked copies, and the two measures (%)."""

    original: np.ndarray
    masked: np.ndarray
    average_drop: float
    increase_in_confidence: float


def confidence_change(
    score_fn: ScoreFn, images: np.ndarray, heatmaps: Sequence[np.ndarray], original: Scores | None = None
) -> ConfidenceResult:
    """Average drop and increase in confidence of ``heatmaps`` (one per image) with
    ``score_fn(batch (N, H, W, C)) -> (N,)`` the target class's probability; ``original``: the
    images' scores when already known (else scored here).

    >>> f = lambda b: b.mean(axis=(1, 2, 3))
    >>> r = confidence_change(f, np.ones((2, 1, 2, 1)), [np.array([[1.0, 0.0]]), np.ones((1, 2))])
    >>> r.average_drop, r.increase_in_confidence
    (25.0, 0.0)
    """
    imgs = np.asarray(images)
    if imgs.ndim != 4 or len(imgs) != len(heatmaps):
        raise InvalidArgument(
            f"images must be (N, H, W, C) with one heatmap each; got {imgs.shape} and {len(heatmaps)} heatmaps"
        )
    masked_images = np.stack([explanation_masked(img, hm) for img, hm in zip(imgs, heatmaps)])
    y = np.asarray(score_fn(imgs) if original is None else original, np.float64)
    o = np.asarray(score_fn(masked_images), np.float64)
    return ConfidenceResult(y, o, average_drop(y, o), increase_in_confidence(y, o))
