"""Explanation quality tools: localization accuracy, pointing game, deletion / insertion
AUC and the model-randomization sanity check (Adebayo et al. 2018).

Everything works on numpy inputs. Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1`` and
``y1`` exclusive, as returned by :func:`camserve.imaging.heatmap_box`; heatmaps are (H, W)
arrays, larger values meaning more relevant. One module per family of measures:

- :mod:`~camserve.evaluation.localization`: box IoU, localization accuracy, pointing game;
- :mod:`~camserve.evaluation.perturbation`: deletion / insertion curves;
- :mod:`~camserve.evaluation.sanity`: rank correlation, model-randomization sanity check;
- :mod:`~camserve.evaluation.road`: ROAD, remove and debias (noisy linear imputation, MoRF / LeRF);
- :mod:`~camserve.evaluation.confidence`: average drop / increase in confidence.

>>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))
0.3333333333333333
>>> localization_accuracy([(0, 0, 2, 2), None], [(0, 0, 2, 2), (0, 0, 2, 2)])
0.5
"""

from camserve.evaluation.confidence import (
    ConfidenceResult,
    average_drop,
    confidence_change,
    explanation_masked,
    increase_in_confidence,
)
from camserve.evaluation.detection import (
    DetectionMetrics,
    average_precision,
    box_containment,
    detection_metrics,
    match_detections,
    window_and_tight_report,
)
from camserve.evaluation.localization import (
    Box,
    ExplainFn,
    GroundTruth,
    ScoreFn,
    box_iou,
    localization_accuracy,
    localization_hits,
    pointing_game,
    pointing_hits,
)
from camserve.evaluation.perturbation import (
    CurveOptions,
    blurred_baseline,
    deletion_auc,
    insertion_auc,
    perturbation_curve,
)
from camserve.evaluation.road import RoadResult, noisy_linear_imputation, road, road_curve
from camserve.evaluation.sanity import SanityResult, randomized_copy, rankdata, sanity_check, spearman

__all__ = [
    "ConfidenceResult",
    "RoadResult",
    "average_drop",
    "confidence_change",
    "explanation_masked",
    "increase_in_confidence",
    "noisy_linear_imputation",
    "road",
    "road_curve",
    "Box",
    "CurveOptions",
    "DetectionMetrics",
    "ExplainFn",
    "GroundTruth",
    "SanityResult",
    "ScoreFn",
    "average_precision",
    "blurred_baseline",
    "box_containment",
    "box_iou",
    "deletion_auc",
    "detection_metrics",
    "insertion_auc",
    "localization_accuracy",
    "localization_hits",
    "match_detections",
    "perturbation_curve",
    "pointing_game",
    "pointing_hits",
    "randomized_copy",
    "rankdata",
    "sanity_check",
    "spearman",
    "window_and_tight_report",
]
