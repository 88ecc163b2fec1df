"""camserve.evaluation.detection against hand-computed values and a naive reference (every
precision-recall point enumerated, AP as the VOC sum written out)."""

from __future__ import annotations

import numpy as np
import pytest

from camserve import evaluation
from camserve.errors import InvalidArgument
from camserve.evaluation.detection import (
    average_precision,
    box_containment,
    detection_metrics,
    match_detections,
    window_and_tight_report,
)


def test_reexported_from_the_package() -> None:
    assert evaluation.detection_metrics is detection_metrics and evaluation.box_containment is box_containment


def test_containment_by_hand() -> None:
    assert box_containment((0, 0, 64, 64), (10, 10, 30, 30)) == 1.0
    assert box_containment((0, 0, 20, 64), (10, 10, 30, 30)) == pytest.approx(0.5)
    assert box_containment((40, 40, 64, 64), (10, 10, 30, 30)) == 0.0


def _naive_ap(scores, hits, n_objects) -> float:
    order = sorted(range(len(scores)), key=lambda k: -scores[k])
    points = []
    tp = 0
    for rank, k in enumerate(order, 1):
        tp += hits[k]
        points.append((tp / n_objects, tp / rank))
    total, previous_recall = 0.0, 0.0
    for r, _ in points:
        if r > previous_recall:
            total += (r - previous_recall) * max(p for rr, p in points if rr >= r)
            previous_recall = r
    return total


def test_average_precision_matches_the_naive_sum() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 15))
        scores = rng.random(n).tolist()
        hits = (rng.random(n) < 0.6).tolist()
        objects = sum(hits) + int(rng.integers(0, 3))
        if objects == 0:
            continue
        assert average_precision(scores, hits, objects) == pytest.approx(_naive_ap(scores, hits, objects))


def test_matching_takes_the_best_score_first_and_each_object_once() -> None:
    truth = [("a", (0, 0, 10, 10)), ("b", (20, 20, 30, 30))]
    found = [
        ("a", 0.5, (0, 0, 10, 10)),  # exact, but lower score
        ("a", 0.9, (1, 0, 10, 10)),  # IoU 0.9: takes the object first
        ("b", 0.8, (0, 0, 10, 10)),  # wrong class for that place
        ("b", 0.7, (21, 21, 30, 30)),
    ]
    assert match_detections(found, truth) == [-1, 0, -1, 1]
    m = detection_metrics([found], [truth])
    assert (m.precision, m.recall, m.true_positives, m.detections, m.objects) == (0.5, 1.0, 2, 4, 2)
    # class a: ranks 0.9 (hit), 0.5 (miss) -> AP 1; class b: 0.8 miss, 0.7 hit -> AP 0.5
    assert m.per_class_ap == {"a": 1.0, "b": 0.5} and m.average_precision == 0.75


def test_report_compares_tight_boxes_and_windows() -> None:
    from types import SimpleNamespace as D

    truth = [[("a", (10, 10, 30, 30)), ("b", (100, 100, 120, 120))]]
    found = [
        [
            D(label="a", score=0.9, box=(0, 0, 64, 64), tight_box=(10, 10, 30, 30)),
            D(label="b", score=0.8, box=(60, 60, 124, 124), tight_box=None),
        ]
    ]
    r = window_and_tight_report(found, truth)
    assert r["windows"]["precision"] == 1.0 and r["windows"]["recall"] == 1.0
    # b has no tight box: its window counts, IoU 400 / 4096 < 0.5
    assert r["tight_boxes"]["recall"] == 0.5 and r["tight_iou_share"] == 0.5
    assert r["mean_tight_iou"] == pytest.approx((1.0 + 400 / 4096) / 2, abs=1e-4)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(InvalidArgument, match="unknown match 'area'"):
        detection_metrics([[]], [[]], match="area")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="2 images of detections but 1"):
        detection_metrics([[], []], [[]])
