"""Dense sliding-window scores: classifier heads turned into convolutions
(:mod:`camserve.dense.fcn`), the backbone's receptive field (:mod:`camserve.dense.receptive_field`)
and the score grids, detections and maps built on them (:mod:`camserve.dense.scores`)."""

from camserve.dense.detect import DetectionResult, DetectionSettings, detect
from camserve.dense.detections import Detection, detections, nms, score_map
from camserve.dense.fcn import FullyConvolutional, layer_flops, to_fully_convolutional
from camserve.dense.receptive_field import ConversionError, ReceptiveField, analyze
from camserve.dense.scores import DenseResult, DenseScores, dense_scores

__all__ = [
    "ConversionError",
    "DenseResult",
    "DenseScores",
    "Detection",
    "DetectionResult",
    "DetectionSettings",
    "FullyConvolutional",
    "ReceptiveField",
    "analyze",
    "dense_scores",
    "detect",
    "detections",
    "layer_flops",
    "nms",
    "score_map",
    "to_fully_convolutional",
]
