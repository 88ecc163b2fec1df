"""DenseScores detections on the ``camserve.v1`` wire, both ways (shared by the client and the
server; re-exported by :mod:`camserve.wire`): the request's detection options and the
response's ``DenseDetection`` messages.

>>> from types import SimpleNamespace as D
>>> d = D(class_index=3, label="star", score=0.9, box=(0.0, 8.0, 64.0, 72.0), tight_box=(20.0, 30.0, 44.0, 52.0), scale=1.0)
>>> detections_from_proto(pb.DenseScoresResponse(detections=[detection_fields(d)]).detections)[0].tight_box
(20.0, 30.0, 44.0, 52.0)
>>> detection_options(pb.DenseScoresRequest(detect=True, iou=0.5))
{'threshold': None, 'iou': 0.5, 'nms': None, 'tight_boxes': None, 'margin': None}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from camserve.errors import InvalidArgument
from camserve.proto import pb  # noqa: F401 - the doctests build messages

__all__ = ["WireDetection", "detection_fields", "detection_options", "detections_from_proto"]

Box = tuple[float, float, float, float]


class WireDetection(NamedTuple):
    """One detection as the client reads it (the fields of :class:`camserve.dense.Detection`):
    ``box`` is the window, ``tight_box`` the box of the class's CAM inside it (None: none)."""

    class_index: int
    label: str
    score: float
    box: Box
    tight_box: Box | None
    scale: float


def detection_fields(d: Any) -> dict[str, Any]:
    """A detection (anything with the fields of :class:`WireDetection`) as DenseDetection fields."""
    return {
        "class_index": int(d.class_index),
        "label": str(d.label),
        "score": float(d.score),
        "box": [float(v) for v in d.box],
        "tight_box": [] if d.tight_box is None else [float(v) for v in d.tight_box],
        "scale": float(d.scale),
    }


def _box(values: Iterable[float], what: str) -> Box | None:
    v = [float(x) for x in values]
    if not v:
        return None
    if len(v) != 4:
        raise InvalidArgument(f"{what} must hold 4 numbers (x0, y0, x1, y1) or none; got {len(v)}")
    return (v[0], v[1], v[2], v[3])


def detections_from_proto(msgs: Iterable[Any]) -> list[WireDetection]:
    """DenseDetection messages as :class:`WireDetection` tuples, in order."""
    out = []
    for m in msgs:
        box = _box(m.box, "DenseDetection.box")
        if box is None:
            raise InvalidArgument("DenseDetection.box is empty; a detection always has its window")
        out.append(
            WireDetection(
                int(m.class_index),
                m.label,
                float(m.score),
                box,
                _box(m.tight_box, "DenseDetection.tight_box"),
                float(m.scale),
            )
        )
    return out


def detection_options(request: Any) -> dict[str, Any] | None:
    """The detection overrides of a DenseScoresRequest (keys of
    :meth:`camserve.dense.DetectionSettings.with_overrides`; None: the model's setting), or None
    when the request does not ask for detections."""
    if not request.detect:
        return None

    def given(field: str) -> Any:
        return getattr(request, field) if request.HasField(field) else None

    return {
        "threshold": given("threshold"),
        "iou": given("iou"),
        "nms": request.nms or None,
        "tight_boxes": given("tight_boxes"),
        "margin": given("margin"),
    }
