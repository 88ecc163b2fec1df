"""Dense sliding-window scores: classifier heads turned into convolutions
(:mod:`camserve.dense.fcn`), the backbone's receptive field (:mod:`camserve.dense.receptive_field`)
and the score grids, detections and maps built on them (:mod:`camserve.dense.scores`)."""

from camserve.dense.fcn import FullyConvolutional, layer_flops, to_fully_convolutional
from camserve.dense.receptive_field import ConversionError, ReceptiveField, analyze
from camserve.dense.scores import DenseResult, DenseScores, Detection, dense_scores, detections, nms, score_map

__all__ = [
    "ConversionError",
    "DenseResult",
    "DenseScores",
    "Detection",
    "FullyConvolutional",
    "ReceptiveField",
    "analyze",
    "dense_scores",
    "detections",
    "layer_flops",
    "nms",
    "score_map",
    "to_fully_convolutional",
]
