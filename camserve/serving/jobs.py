"""Typed batch keys and jobs: what the data plane hands to the generic
:class:`~camserve.serving.batching.Batcher`.

A *key* holds everything that must be equal for requests to share one computation (model
version, operation, input shape and the parameters that change the graph); requests with
equal keys are merged. A *job* is one request's share of a batch: its images (uint8 pixels
at the model's input size, preprocessed for the whole batch at once in the explainer's
graph, or float32 inputs already preprocessed), its deadline and whether its caller is gone
(``abandoned``): compute stops between chunks when every job of a batch is past its
deadline or abandoned. Every key names its ``operation`` ("predict", "explain", "dense"),
the label of the batch metrics.

>>> key = PredictKey("gap", 2, (32, 32, 3))
>>> key.operation, key == PredictKey("gap", 2, (32, 32, 3)), key == PredictKey("gap", 1, (32, 32, 3))
('predict', True, False)
>>> ExplainKey("gap", 2, "last_conv", ("gradcam",), (32, 32, 3), top_k=None).operation
'explain'
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from camserve.explain import Explainer
    from camserve.serving.runtime import ModelRuntime


@dataclasses.dataclass(frozen=True)
class PredictKey:
    """Class scores of ``shape`` inputs of one model version."""

    operation: ClassVar[str] = "predict"
    model: str
    version: int
    shape: tuple[int, ...]  # one preprocessed input (H, W, C)


@dataclasses.dataclass(frozen=True)
class ExplainKey:
    """Explanations by ``methods`` (sorted: requests asking for the same methods in another
    order share the batch) at ``layer``; ``top_k`` predicted classes per image, or
    ``top_k=None`` when every request names its classes (targets)."""

    operation: ClassVar[str] = "explain"
    model: str
    version: int
    layer: str  # the resolved layer name (several: joined by ",")
    methods: tuple[str, ...]
    shape: tuple[int, ...]
    top_k: int | None
    aug_smooth: bool = False
    eigen_smooth: bool = False


@dataclasses.dataclass(frozen=True)
class DenseKey:
    """Dense sliding-window scores of one image; ``stride=None``: the network's total stride."""

    operation: ClassVar[str] = "dense"
    model: str
    version: int
    shape: tuple[int, ...]  # the whole preprocessed image (H, W, C)
    stride: int | None
    scales: tuple[float, ...]
    mode: str


BatchKey = PredictKey | ExplainKey | DenseKey


class _Lifetime:
    """A job's deadline (a ``time.monotonic()`` instant, None: none) and whether its caller
    stopped waiting (cancelled, or its deadline passed)."""

    deadline: float | None
    abandoned: bool

    def expired(self, now: float) -> bool:
        return self.abandoned or (self.deadline is not None and self.deadline <= now)


@dataclasses.dataclass(eq=False)
class PredictJob(_Lifetime):
    """One Predict request: ``images`` (n, H, W, C): uint8 pixels at the model's input size
    or float32 preprocessed inputs."""

    runtime: ModelRuntime
    explainer: Explainer
    images: np.ndarray
    deadline: float | None = None
    abandoned: bool = False


@dataclasses.dataclass(eq=False)
class ExplainJob(_Lifetime):
    """One Explain request: ``images`` (n, H, W, C) as for :class:`PredictJob`, per image the
    class indices to explain (None: the key's ``top_k`` predicted classes), and the methods in
    the order the request named them (None: the key's order)."""

    runtime: ModelRuntime
    explainer: Explainer
    images: np.ndarray
    targets: list[list[Any]] | None  # class indices or camserve.targets objects
    deadline: float | None = None
    abandoned: bool = False
    methods: tuple[str, ...] | None = None


@dataclasses.dataclass(eq=False)
class DenseJob(_Lifetime):
    """One DenseScores request: one preprocessed (H, W, C) image of any size; with
    ``detection`` (camserve.dense.DetectionSettings) its objects too, tight boxes from the
    explainer of ``tight_runtime``."""

    runtime: ModelRuntime
    image: np.ndarray
    deadline: float | None = None
    abandoned: bool = False
    detection: Any = None
    tight_runtime: ModelRuntime | None = None


Job = PredictJob | ExplainJob | DenseJob


def split(values: Any, jobs: list[PredictJob] | list[ExplainJob]) -> list[Any]:
    """Results of a merged batch (one per image) cut back into one slice per job.

    >>> class J: images = np.zeros((2, 1))
    >>> split([1, 2, 3, 4], [J(), J()])
    [[1, 2], [3, 4]]
    """
    out, start = [], 0
    for job in jobs:
        n = len(job.images)
        out.append(values[start : start + n])
        start += n
    return out
