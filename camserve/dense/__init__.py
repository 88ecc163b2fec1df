"""Dense sliding-window scores: classifier heads turned into convolutions
(:mod:`camserve.dense.fcn`) and the score grids, detections and maps built on them
(:mod:`camserve.dense.scores`).

>>> from camserve.dense import dense_scores, to_fully_convolutional   # doctest: +SKIP
"""

from camserve.dense.fcn import ConversionError, FullyConvolutional, analyze, layer_flops, to_fully_convolutional
from camserve.dense.scores import DenseResult, DenseScores, Detection, dense_scores, detections, nms, score_map

__all__ = [
    "ConversionError",
    "DenseResult",
    "DenseScores",
    "Detection",
    "FullyConvolutional",
    "analyze",
    "dense_scores",
    "detections",
    "layer_flops",
    "nms",
    "score_map",
    "to_fully_convolutional",
]
