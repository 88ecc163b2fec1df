"""Localization: box IoU, localization accuracy, the pointing game.

>>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))
0.3333333333333333
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from camserve.errors import InvalidArgument

if TYPE_CHECKING:
    pass


Box = tuple[float, float, float, float]
#: Ground truth for one image: one box, or every box of the target class, as a sequence
#: of boxes or a (K, 4) array (K may be 0: the image then counts as a miss).
GroundTruth = Box | Sequence[Box] | np.ndarray
ScoreFn = Callable[[np.ndarray], Any]
ExplainFn = Callable[[Any, np.ndarray], Any]


# --------------------------------------------------------------------------- boxes


def _as_box(box: Any, what: str) -> np.ndarray:
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape != (4,) or not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{what} must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    if arr[2] < arr[0] or arr[3] < arr[1]:
        raise InvalidArgument(f"{what} must have x0 <= x1 and y0 <= y1 (x1, y1 exclusive), got {box!r}")
    return arr


def _as_boxes(truth: Any, what: str) -> np.ndarray:
    """One image's ground truth as a (K, 4) array (see :data:`GroundTruth`)."""
    arr = np.asarray(truth, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim == 1:
        return _as_box(arr, what)[None]
    if arr.ndim == 2 and arr.shape[1] == 4:
        return np.stack([_as_box(b, f"{what}[{k}]") for k, b in enumerate(arr)])
    raise InvalidArgument(f"{what} must be one box (x0, y0, x1, y1) or a sequence of boxes, got shape {arr.shape}")


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes with x1, y1 exclusive.

    Two empty boxes have IoU 0.

    >>> box_iou((0, 0, 4, 4), (2, 2, 6, 6))  # 4 / (16 + 16 - 4)
    0.14285714285714285
    """
    p, q = _as_box(a, "box a"), _as_box(b, "box b")
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _check_lengths(n_pred: int, n_true: int, pred_name: str) -> None:
    if n_pred != n_true:
        raise InvalidArgument(f"{pred_name} and true_boxes must have one entry per image, got {n_pred} and {n_true}")
    if n_pred == 0:
        raise InvalidArgument(f"{pred_name} is empty: need at least one image")


def localization_hits(
    pred_boxes: Sequence[Box | None], true_boxes: Sequence[GroundTruth], threshold: float = 0.5
) -> np.ndarray:
    """Per image, whether the predicted box has IoU >= ``threshold`` with any ground-truth
    box of the target class. A None prediction (e.g. an all-zero heatmap) is a miss.

    >>> localization_hits([(0, 0, 2, 2)], [[(5, 5, 6, 6), (0, 0, 2, 1)]]).tolist()
    [True]
    """
    if not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"threshold must be in [0, 1], got {threshold}")
    _check_lengths(len(pred_boxes), len(true_boxes), "pred_boxes")
    hits = np.zeros(len(pred_boxes), dtype=bool)
    for i, (pred, truth) in enumerate(zip(pred_boxes, true_boxes)):
        gts = _as_boxes(truth, f"true_boxes[{i}]")
        if pred is None:
            continue
        _as_box(pred, f"pred_boxes[{i}]")
        hits[i] = any(box_iou(pred, tuple(g)) >= threshold for g in gts)
    return hits


def localization_accuracy(
    pred_boxes: Sequence[Box | None], true_boxes: Sequence[GroundTruth], threshold: float = 0.5
) -> float:
    """Fraction of images whose predicted box hits a ground-truth box
    (see :func:`localization_hits`): the CAM paper's localization accuracy.

    ``pred_boxes[i]`` is a box or None; ``true_boxes[i]`` is one box or all boxes of the
    target class in image i.

    >>> localization_accuracy([(0, 0, 4, 4), (0, 0, 4, 4)], [(0, 0, 4, 3), (0, 0, 1, 1)])
    0.5
    """
    return float(np.mean(localization_hits(pred_boxes, true_boxes, threshold)))


# --------------------------------------------------------------------------- pointing game


def check_heatmap(heatmap: Any, what: str) -> np.ndarray:
    hm = np.asarray(heatmap)
    if hm.ndim != 2 or hm.size == 0:
        raise InvalidArgument(f"{what} must be a non-empty (H, W) array, got shape {hm.shape}")
    if not np.issubdtype(hm.dtype, np.number) or not np.all(np.isfinite(hm)):
        raise InvalidArgument(f"{what} must hold finite numbers (no NaN/Inf)")
    return hm


def _box_distance(y: np.ndarray, x: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Euclidean distance from pixels (y, x) to the nearest pixel of each box, shape
    (len(y), K). A box covers the pixels x0 <= x < x1, y0 <= y < y1; inside means 0."""
    lo = np.ceil(boxes[:, :2])[None]  # first covered pixel (x, y)
    hi = np.ceil(boxes[:, 2:])[None] - 1  # last covered pixel (x, y); < lo for an empty box
    point = np.stack([x, y], axis=-1)[:, None].astype(np.float64)
    gap = np.maximum(np.maximum(lo - point, point - hi), 0.0)
    return np.hypot(gap[..., 0], gap[..., 1])


def pointing_hits(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    true_boxes: Sequence[GroundTruth],
    tolerance: float = 0,
    ties: Literal["first", "all", "any"] = "first",
) -> np.ndarray:
    """Per image, whether the heatmap's maximum falls on a ground-truth box of the target class
    (Zhang et al. 2016), i.e. within ``tolerance`` pixels (Euclidean, to the nearest box pixel;
    the paper used 15) of any box.

    Several pixels sharing the maximum: ``"first"`` takes the first in row-major order (as
    ``np.argmax``), ``"all"`` needs every one of them to hit (a flat map hits only if the box
    covers it), ``"any"`` needs one.

    >>> hm = np.zeros((4, 4)); hm[1, 2] = 1.0
    >>> pointing_hits([hm], [(2, 1, 3, 2)]).tolist(), pointing_hits([hm], [(0, 0, 2, 2)], tolerance=1).tolist()
    ([True], [True])
    """
    if tolerance < 0:
        raise InvalidArgument(f"tolerance must be >= 0 pixels, got {tolerance}")
    if ties not in ("first", "all", "any"):
        raise InvalidArgument(f"ties must be 'first', 'all' or 'any', got {ties!r}")
    _check_lengths(len(heatmaps), len(true_boxes), "heatmaps")
    hits = np.zeros(len(heatmaps), dtype=bool)
    for i, (heatmap, truth) in enumerate(zip(heatmaps, true_boxes)):
        hm = check_heatmap(heatmap, f"heatmaps[{i}]")
        gts = _as_boxes(truth, f"true_boxes[{i}]")
        if len(gts) == 0:
            continue
        if ties == "first":
            y, x = np.unravel_index(np.argmax(hm), hm.shape)
            ys, xs = np.array([y]), np.array([x])
        else:
            ys, xs = np.nonzero(hm == hm.max())
        near = (_box_distance(ys, xs, gts) <= tolerance).any(axis=1)
        hits[i] = bool(near.all() if ties == "all" else near.any())
    return hits


def pointing_game(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    true_boxes: Sequence[GroundTruth],
    tolerance: float = 0,
    ties: Literal["first", "all", "any"] = "first",
) -> float:
    """Pointing-game accuracy: the fraction of :func:`pointing_hits`.

    >>> hm = np.zeros((4, 4)); hm[3, 3] = 1.0
    >>> pointing_game([hm, hm], [(0, 0, 4, 4), (0, 0, 2, 2)])
    0.5
    """
    return float(np.mean(pointing_hits(heatmaps, true_boxes, tolerance, ties)))
