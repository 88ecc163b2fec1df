"""Detections from dense scores: the windows a class wins, non-maximum suppression (per class
or across classes and scales), and image-sized score / arg-max maps.

A model may have a background class (``background=`` its index): windows it wins are not
detections, and the arg-max map keeps it as its own class.

>>> nms(np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]), np.array([0.9, 0.8, 0.7]), 0.5)
[0, 2]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from camserve.errors import InvalidArgument

if TYPE_CHECKING:
    from camserve.dense.scores import DenseResult, DenseScores

__all__ = ["NMS_MODES", "Candidates", "Detection", "candidates", "detections", "nms", "score_map", "suppress"]

#: "per_class": boxes of different classes never suppress each other (multi-label heads);
#: "agnostic": one box per place whatever its class (single-label softmax heads).
NMS_MODES = ("per_class", "agnostic")

Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Detection:
    """A window whose class score passed the threshold and survived NMS.

    ``box``: the window (x0, y0, x1, y1) in image pixels (it may reach past the image when the
    scores were computed with a margin); ``tight_box``: the box around the object itself inside
    that window (from the class's CAM), or None when not computed or the CAM was empty.
    """

    class_index: int
    label: str
    score: float
    box: Box
    scale: float
    tight_box: Box | None = None


@dataclasses.dataclass
class Candidates:
    """Windows that passed the threshold, one row per (window, class): ``classes``, ``scores``,
    ``boxes`` (K, 4) in image pixels, ``levels`` (index into the result's scales) and
    ``cells`` (K, 2) grid positions (i, j) in their level."""

    classes: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    levels: np.ndarray
    cells: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray | list[int]) -> Candidates:
        """The candidates at ``index``, in that order."""
        i = np.asarray(index, np.int64)
        return Candidates(self.classes[i], self.scores[i], self.boxes[i], self.levels[i], self.cells[i])

    def detection(
        self,
        k: int,
        results: DenseResult | Sequence[DenseScores],
        class_names: Sequence[str] | None,
        tight_box: Box | None = None,
    ) -> Detection:
        """Candidate ``k`` as a :class:`Detection` (its label from ``class_names``, else its index)."""
        c = int(self.classes[k])
        x0, y0, x1, y1 = (float(v) for v in self.boxes[k])
        label = class_names[c] if class_names is not None else str(c)
        scale = float(results[int(self.levels[k])].scale)
        return Detection(c, label, float(self.scores[k]), (x0, y0, x1, y1), scale, tight_box)


def _check_mode(mode: str) -> None:
    if mode not in NMS_MODES:
        raise InvalidArgument(f"unknown nms mode {mode!r}; allowed: {', '.join(NMS_MODES)}")


def candidates(
    results: DenseResult | Sequence[DenseScores],
    threshold: float = 0.5,
    classes: Sequence[int] | None = None,
    background: int | None = None,
    one_per_window: bool = False,
) -> Candidates:
    """Every (window, class) whose score is ≥ ``threshold``, over all scales; ``classes``
    restricts the classes (None: all but ``background``); ``one_per_window`` keeps only each
    window's best such class (single-label heads).

    >>> from camserve.dense.scores import DenseScores
    >>> level = DenseScores(1.0, np.array([[[0.1, 0.7, 0.2]]], np.float32), np.zeros((1, 1, 4), np.float32), (8, 8), (64, 64), (64, 64))
    >>> candidates([level], 0.5, background=1).classes.tolist(), candidates([level], 0.1).classes.tolist()
    ([], [0, 1, 2])
    """
    n_classes = results[0].scores.shape[-1] if len(results) else 0
    if background is not None and not 0 <= background < n_classes:
        raise InvalidArgument(f"background class index {background} out of range; allowed: 0..{n_classes - 1}")
    chosen = [c for c in range(n_classes) if c != background] if classes is None else list(classes)
    for c in chosen:
        if not 0 <= c < n_classes:
            raise InvalidArgument(f"class index {c} out of range; allowed: 0..{n_classes - 1}")
    parts: list[tuple[np.ndarray, ...]] = []
    for n, level in enumerate(results):
        scores = level.scores[..., chosen] if chosen else level.scores[..., :0]
        mask = scores >= threshold
        if one_per_window and chosen:
            best = np.argmax(scores, axis=-1)
            mask &= np.arange(len(chosen)) == best[..., None]
        i, j, col = np.nonzero(mask)
        cls = np.asarray(chosen, np.int64)[col] if chosen else col
        parts.append(
            (np.asarray(cls), scores[i, j, col], level.boxes[i, j], np.full(len(i), n), np.stack([i, j], axis=1))
        )
    if not parts:
        return Candidates(*(np.zeros(0, np.int64),) * 2, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros((0, 2)))
    cls, sc, bx, lv, cells = (np.concatenate(p) for p in zip(*parts))
    return Candidates(cls.astype(np.int64), sc.astype(np.float64), bx.astype(np.float64), lv, cells.astype(np.int64))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, points: np.ndarray | None = None) -> list[int]:
    """Greedy non-maximum suppression; indices kept, best first. With ``points`` (K, 2) or
    (K, M, 2) (x, y), a kept box also suppresses the boxes with a point inside it (a window
    whose centre lies in an object already found looks at that object).

    >>> nms(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0.7, 0.9]), 0.5)
    [1, 0]
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        ix0 = np.maximum(boxes[i, 0], boxes[rest, 0])
        iy0 = np.maximum(boxes[i, 1], boxes[rest, 1])
        ix1 = np.minimum(boxes[i, 2], boxes[rest, 2])
        iy1 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
        union = area[i] + area[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        survive = iou <= iou_threshold
        if points is not None:
            pts = points.reshape(len(boxes), -1, 2)[rest]
            px, py = pts[..., 0], pts[..., 1]
            inside = (px >= boxes[i, 0]) & (px < boxes[i, 2]) & (py >= boxes[i, 1]) & (py < boxes[i, 3])
            survive &= ~inside.any(axis=1)
        order = rest[survive]
    return keep


def suppress(
    classes: np.ndarray,
    scores: np.ndarray,
    boxes: np.ndarray,
    iou_threshold: float,
    mode: str,
    points: np.ndarray | None = None,
) -> list[int]:
    """NMS of scored boxes, across classes (``mode="agnostic"``) or within each class
    (``"per_class"``); indices kept, best first; ``points`` as for :func:`nms`.

    >>> b = np.array([[0, 0, 10, 10], [1, 1, 10, 10]])
    >>> suppress(np.array([0, 1]), np.array([0.9, 0.8]), b, 0.5, "agnostic"), suppress(np.array([0, 1]), np.array([0.9, 0.8]), b, 0.5, "per_class")
    ([0], [0, 1])
    """
    _check_mode(mode)
    if mode == "agnostic":
        return nms(boxes, scores, iou_threshold, points)
    keep: list[int] = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        keep.extend(
            int(idx[k]) for k in nms(boxes[idx], scores[idx], iou_threshold, None if points is None else points[idx])
        )
    return sorted(keep, key=lambda k: (-float(scores[k]), k))


def detections(
    results: DenseResult | Sequence[DenseScores],
    threshold: float = 0.5,
    iou_threshold: float = 0.3,
    class_names: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    max_detections: int = 100,
    nms_mode: str = "per_class",
    background: int | None = None,
) -> list[Detection]:
    """Windows whose class score is ≥ ``threshold``, after NMS over all scales (per class, or
    across classes with ``nms_mode="agnostic"``: then each window proposes only its best
    class); best first. ``classes`` restricts the classes considered; ``background`` (a class
    index) is never detected. Tight boxes need the model: :func:`camserve.dense.detect`.

    >>> [d.label for d in detections(dense_scores(model, image), 0.9, class_names=names)]  # doctest: +SKIP
    ['star', 'circle']
    """
    _check_mode(nms_mode)
    if not len(results):
        return []
    n_classes = results[0].scores.shape[-1]
    if class_names is not None and len(class_names) != n_classes:
        raise InvalidArgument(f"{len(class_names)} class names for {n_classes} classes")
    found = candidates(results, threshold, classes, background, one_per_window=nms_mode == "agnostic")
    keep = suppress(found.classes, found.scores, found.boxes, iou_threshold, nms_mode)
    return [found.detection(k, results, class_names) for k in keep[:max_detections]]


def score_map(
    results: DenseResult | Sequence[DenseScores], image_shape: Sequence[int], class_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Image-sized maps: each pixel takes the score of the window whose centre is nearest,
    the maximum over scales. Returns (score, class) maps of shape (H, W): for ``class_index``
    that class's score, else the best class's score and index (the arg-max class map; a
    background class stays its own class there).

    >>> score, cls = score_map(dense_scores(model, image), image.shape)   # doctest: +SKIP
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    if class_index is not None and len(results):
        n_classes = results[0].scores.shape[-1]
        if not 0 <= class_index < n_classes:
            raise InvalidArgument(f"class index {class_index} out of range; allowed: 0..{n_classes - 1}")
    best = np.full((h, w), -np.inf, np.float32)
    best_cls = np.zeros((h, w), np.int64)
    for r in results:
        cy = (r.boxes[:, 0, 1] + r.boxes[:, 0, 3]) / 2.0
        cx = (r.boxes[0, :, 0] + r.boxes[0, :, 2]) / 2.0
        rows = _nearest(cy, np.arange(h) + 0.5)
        cols = _nearest(cx, np.arange(w) + 0.5)
        if class_index is None:
            cell_cls = np.argmax(r.scores, axis=-1)
            cell_score = np.take_along_axis(r.scores, cell_cls[..., None], -1)[..., 0]
        else:
            cell_cls = np.full(r.scores.shape[:2], class_index)
            cell_score = r.scores[..., class_index]
        s = cell_score[rows][:, cols]
        better = s > best
        best = np.where(better, s, best)
        best_cls = np.where(better, cell_cls[rows][:, cols], best_cls)
    return best, best_cls


def _nearest(centres: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centres`` for each of ``points``."""
    if len(centres) == 1:
        return np.zeros(len(points), np.int64)
    mids = (centres[1:] + centres[:-1]) / 2.0
    return np.searchsorted(mids, points, side="right")
