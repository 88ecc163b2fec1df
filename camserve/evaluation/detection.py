"""Detection metrics: precision, recall and AP@0.5 of scored boxes against ground-truth boxes.

A detection is ``(label, score, box)``, a ground-truth object ``(label, box)``; boxes are
``(x0, y0, x1, y1)`` with x1, y1 exclusive. A detection is true when it is matched to an
object of its class not matched before (detections are taken best score first, within an
image): by IoU (``match="iou"``, the usual rule for tight boxes) or by containment
(``match="containment"``: the box holds at least ``threshold`` of the object's area, the rule
for sliding windows, which are larger than the objects they find).

>>> truth = [[("star", (10, 10, 30, 30))]]
>>> found = [[("star", 0.9, (12, 10, 30, 31)), ("circle", 0.8, (12, 10, 30, 31))]]
>>> m = detection_metrics(found, truth)
>>> m.precision, m.recall, m.average_precision
(0.5, 1.0, 1.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np

from camserve.errors import InvalidArgument
from camserve.evaluation.localization import Box, box_iou

__all__ = [
    "DetectionMetrics",
    "Found",
    "Truth",
    "average_precision",
    "box_containment",
    "detection_metrics",
    "match_detections",
    "window_and_tight_report",
]

#: A detection: (label, score, box).
Found = tuple[Hashable, float, Box]
#: A ground-truth object: (label, box).
Truth = tuple[Hashable, Box]
Match = Literal["iou", "containment"]
MATCHES = ("iou", "containment")


def box_containment(window: Box, obj: Box) -> float:
    """The share of ``obj``'s area inside ``window`` (0 for an empty object).

    >>> box_containment((0, 0, 64, 64), (50, 10, 70, 30))   # 14 of 20 columns inside
    0.7
    """
    box_iou(window, obj)  # validates both boxes
    area = (obj[2] - obj[0]) * (obj[3] - obj[1])
    if area <= 0:
        return 0.0
    w = max(0.0, min(window[2], obj[2]) - max(window[0], obj[0]))
    h = max(0.0, min(window[3], obj[3]) - max(window[1], obj[1]))
    return float(w * h / area)


def _threshold(match: str, threshold: float | None) -> float:
    """``threshold``, or ``match``'s default (0.5 for IoU, 0.8 for containment)."""
    if match not in MATCHES:
        raise InvalidArgument(f"unknown match {match!r}; allowed: {', '.join(MATCHES)}")
    limit = (0.5 if match == "iou" else 0.8) if threshold is None else float(threshold)
    if not 0.0 < limit <= 1.0:
        raise InvalidArgument(f"threshold must be in (0, 1], got {threshold}")
    return limit


def match_detections(
    found: Sequence[Found], truth: Sequence[Truth], match: Match = "iou", threshold: float | None = None
) -> list[int]:
    """For each detection of one image, the index of the object it matches, or -1.

    Detections are taken best score first; each takes the not yet matched object of its
    class with the largest IoU (or containment) at least ``threshold`` (default 0.5 for IoU,
    0.8 for containment). Ties between scores keep the given order.

    >>> match_detections([("a", 0.9, (0, 0, 10, 10)), ("a", 0.8, (0, 0, 10, 10))], [("a", (0, 0, 10, 9))])
    [0, -1]
    """
    limit = _threshold(match, threshold)
    measure = box_iou if match == "iou" else box_containment
    taken = [False] * len(truth)
    out = [-1] * len(found)
    for i in sorted(range(len(found)), key=lambda k: -float(found[k][1])):
        label, _, box = found[i]
        best, best_value = -1, limit
        for j, (t_label, t_box) in enumerate(truth):
            if taken[j] or t_label != label:
                continue
            value = measure(box, t_box)
            if value >= best_value and (best < 0 or value > best_value):
                best, best_value = j, value
        if best >= 0:
            taken[best] = True
            out[i] = best
    return out


def average_precision(scores: Sequence[float], true: Sequence[bool], n_objects: int) -> float:
    """Area under the precision-recall curve of a ranked list (all-point interpolation, as in
    PASCAL VOC 2010+): precision made monotone from the right, summed over recall steps.

    >>> average_precision([0.9, 0.8, 0.7], [True, False, True], 2)   # 1 x 1/2 + 2/3 x 1/2
    0.8333333333333333
    """
    if n_objects <= 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.asarray(true, bool)[order]
    if not hits.size:
        return 0.0
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_objects
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(envelope * steps))


@dataclasses.dataclass(frozen=True)
class DetectionMetrics:
    """Detection figures over a set of images.

    ``precision`` = true / all detections (1.0 with no detections); ``recall`` = matched / all
    objects; ``average_precision``: the mean over classes with objects of each class's AP
    (all-point interpolated); ``per_class_ap`` by label; ``matches`` per image, per detection
    (the object index or -1) so that callers can follow up on true detections.
    """

    precision: float
    recall: float
    average_precision: float
    true_positives: int
    detections: int
    objects: int
    match: str
    threshold: float
    per_class_ap: dict[Hashable, float]
    matches: list[list[int]]

    def as_dict(self) -> dict[str, float | int | str]:
        """The scalar figures, rounded to 4 places, for JSON or TOML.

        >>> detection_metrics([[]], [[("a", (0, 0, 1, 1))]]).as_dict()["recall"]
        0.0
        """
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "ap50" if self.match == "iou" and self.threshold == 0.5 else "ap": round(self.average_precision, 4),
            "true_positives": self.true_positives,
            "detections": self.detections,
            "objects": self.objects,
            "match": f"{self.match} >= {self.threshold}",
        }


def detection_metrics(
    found: Sequence[Sequence[Found]],
    truth: Sequence[Sequence[Truth]],
    match: Match = "iou",
    threshold: float | None = None,
) -> DetectionMetrics:
    """Precision, recall and AP of the detections of several images against their objects
    (``found[i]`` and ``truth[i]`` belong to image i); see :func:`match_detections` for
    ``match`` and ``threshold``. AP@0.5 is ``match="iou"`` with the default threshold.

    >>> m = detection_metrics([[("a", 0.9, (0, 0, 64, 64))]], [[("a", (10, 10, 30, 30))]], match="containment")
    >>> m.precision, m.recall
    (1.0, 1.0)
    """
    if len(found) != len(truth):
        raise InvalidArgument(f"{len(found)} images of detections but {len(truth)} of ground truth")
    limit = _threshold(match, threshold)
    matches = [match_detections(f, t, match, limit) for f, t in zip(found, truth)]
    ranked: dict[Hashable, list[tuple[float, bool]]] = {}
    counts: dict[Hashable, int] = {}
    for f, t, m in zip(found, truth, matches):
        for (label, score, _), j in zip(f, m):
            ranked.setdefault(label, []).append((float(score), j >= 0))
        for label, _ in t:
            counts[label] = counts.get(label, 0) + 1
    per_class = {
        label: average_precision([s for s, _ in ranked.get(label, [])], [h for _, h in ranked.get(label, [])], n)
        for label, n in counts.items()
    }
    n_found = sum(len(f) for f in found)
    n_true = sum(j >= 0 for m in matches for j in m)
    n_objects = sum(counts.values())
    return DetectionMetrics(
        precision=n_true / n_found if n_found else 1.0,
        recall=n_true / n_objects if n_objects else 1.0,
        average_precision=float(np.mean(list(per_class.values()))) if per_class else float("nan"),
        true_positives=n_true,
        detections=n_found,
        objects=n_objects,
        match=match,
        threshold=limit,
        per_class_ap=per_class,
        matches=matches,
    )


def window_and_tight_report(
    found: Sequence[Sequence[Any]],
    truth: Sequence[Sequence[Truth]],
    containment: float = 0.8,
    iou: float = 0.5,
) -> dict[str, Any]:
    """The figures of sliding-window detections that carry a window and a tight box (objects
    with ``label``, ``score``, ``box`` and ``tight_box``, e.g. :class:`camserve.dense.Detection`;
    a missing tight box counts as its window): the windows by containment, the tight boxes by
    IoU (AP@0.5), and, over the true window detections, the share whose tight box has IoU ≥
    ``iou`` with its object and the mean IoU of tight boxes and of windows.

    >>> from types import SimpleNamespace as D
    >>> r = window_and_tight_report([[D(label="a", score=0.9, box=(0, 0, 64, 64), tight_box=(9, 10, 30, 30))]], [[("a", (10, 10, 30, 30))]])
    >>> r["windows"]["precision"], r["tight_boxes"]["ap50"], r["tight_iou_share"], r["mean_window_iou"]
    (1.0, 1.0, 1.0, 0.0977)
    """
    windows = detection_metrics(
        [[(d.label, d.score, d.box) for d in f] for f in found], truth, "containment", containment
    )
    tight = detection_metrics([[(d.label, d.score, d.tight_box or d.box) for d in f] for f in found], truth, "iou", iou)
    ious_tight, ious_window = [], []
    for f, t, m in zip(found, truth, windows.matches):
        for d, j in zip(f, m):
            if j >= 0:
                ious_tight.append(box_iou(d.tight_box or d.box, t[j][1]))
                ious_window.append(box_iou(d.box, t[j][1]))

    def mean(v: list[float]) -> float:
        return round(float(np.mean(v)), 4) if v else float("nan")

    return {
        "windows": windows.as_dict(),
        "tight_boxes": tight.as_dict(),
        "tight_iou_share": round(float(np.mean(np.asarray(ious_tight) >= iou)), 4) if ious_tight else float("nan"),
        "mean_tight_iou": mean(ious_tight),
        "mean_window_iou": mean(ious_window),
    }
