"""What the data plane answers: library results (numpy scores, Explanation lists, a
DenseResult) with the model they came from, and model descriptions. Protocol front ends
convert these (:mod:`camserve.serving.convert` for gRPC)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from camserve.imaging import encode_png, overlay
from camserve.serving.repository import ModelConfig

if TYPE_CHECKING:
    from camserve.dense import DenseResult
    from camserve.explanation import Explanation


def display_pixels(x: np.ndarray) -> np.ndarray:
    """A preprocessed input rescaled to uint8 RGB, as the background of an overlay.

    >>> display_pixels(np.array([[[-1.0], [1.0]]], np.float32))[0].tolist()
    [[0, 0, 0], [255, 255, 255]]
    """
    x = np.asarray(x, np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x[..., :3]
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Images as the batch takes them: ``inputs`` (n, H, W, C), uint8 pixels at the model's
    input size (preprocessed for the whole batch in the explainer's graph) or float32 preprocessed
    inputs; and the pixels as sent (None for preprocessed tensors)."""

    inputs: np.ndarray
    pixels: list[np.ndarray | None]


@dataclasses.dataclass(frozen=True)
class PredictResult:
    model: str
    version: int
    class_names: tuple[str, ...]
    scores: np.ndarray  # (n, classes)


@dataclasses.dataclass(frozen=True)
class ExplainResult:
    """Per image, one Explanation per (target, method), targets outer, methods inner;
    ``answer_bytes``: the upper estimate of the answer's size checked before compute (0:
    none)."""

    model: str
    version: int
    layer: str
    explanations: list[list[Explanation]]
    prepared: Prepared
    answer_bytes: int = 0

    def overlays(self, i: int) -> list[bytes]:
        """PNG overlays of image ``i``'s explanations, drawn on the image as sent (or on its
        preprocessed input rescaled, when a tensor was sent)."""
        pixels = self.prepared.pixels[i]
        background = pixels if pixels is not None else display_pixels(self.prepared.inputs[i])
        return [encode_png(overlay(background, e.heatmap, box=e.box)) for e in self.explanations[i]]


@dataclasses.dataclass(frozen=True)
class DenseScoresResult:
    """A DenseResult; ``answer_bytes`` as for :class:`ExplainResult`."""

    model: str
    version: int
    class_names: tuple[str, ...]
    result: DenseResult
    answer_bytes: int = 0
    #: with detect: the objects found (camserve.dense.Detection), best first; else None
    detections: list[Any] | None = None
    background_class: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What a client may know about a model: versions on disk and ready, why not ready,
    its configuration and, when a version is ready, the newest one's layers and methods."""

    name: str
    versions: list[int]
    available_versions: list[int]
    reason: str
    config: ModelConfig | None
    version: int = 0  # newest ready version (0: none)
    default_layer: str = ""
    target_layers: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return bool(self.available_versions)
