"""The result type of an explanation, light enough for the client (no TensorFlow).

>>> e = Explanation("gradcam", 1, "square", 0.9, np.zeros((2, 2), np.float32), np.zeros((4, 4), np.float32), None)
>>> e.label, e.box
('square', None)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from camserve.imaging import scale_box


class Explanation(NamedTuple):
    """One heatmap for one (image, target class, method). From :class:`camserve.Explainer`,
    ``raw`` and ``heatmap`` are read-only views of the batch's results (not copied once
    more); ``np.array(e.heatmap)`` gives a copy to change."""

    method: str
    class_index: int
    label: str
    score: float  # the model's own output for the class (a probability for softmax heads)
    raw: np.ndarray  # float32 (h, w) at the layer's resolution, after ReLU, not normalised
    heatmap: np.ndarray  # float32 (H, W) in [0, 1] at the input's resolution
    box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), x1/y1 exclusive; None if all zero


def image_box(
    box: tuple[int, int, int, int] | None, heat_shape: tuple[int, ...], image_shape: tuple[int, ...]
) -> list[int] | None:
    """A heatmap's box (x0, y0, x1, y1 in pixels of the ``heat_shape`` map) in pixels of the
    image of ``image_shape`` (height, width, ...): the pixels that cover it, as the server's
    ``image_box`` (:func:`camserve.imaging.scale_box`); None stays None. ``camserve explain`` and
    ``camserve bulk`` report boxes this way.

    >>> image_box((8, 16, 40, 48), (64, 64), (128, 96, 3))
    [12, 32, 60, 96]
    """
    if box is None:
        return None
    return list(scale_box(box, (heat_shape[0], heat_shape[1]), (image_shape[0], image_shape[1])))
