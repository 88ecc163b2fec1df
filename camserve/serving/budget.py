"""What a request costs before it is computed: work units, and the size of its answer.

The data plane checks both before anything is queued (issue 9, "bounded by construction"):

- **work units** (:func:`predict_units`, :func:`explain_units`, :func:`dense_units`), about
  one classifier pass over one image or window each: Predict counts its images; Explain
  counts images × targets × methods, where Score-CAM and Ablation-CAM count the layer's
  (selected) channels instead, once per image (they run one masked pass per channel, shared
  by the targets), and SmoothGrad / Integrated Gradients add their copies per target;
  DenseScores counts the windows it scores: per scale, the windows of one pass at the
  network's total stride × the shifted passes (total stride / stride)², which is the number
  of windows at the requested stride; with detection's tight boxes, × (1 + the candidates a
  window can give, each explained on its crop). The :class:`WorkBudget` admits a request
  when its units fit ``max_work_units`` together with those of the requests in progress:
  a request that can never fit is INVALID_ARGUMENT (naming the budget, its cost and what
  to change), one that could fit later is RESOURCE_EXHAUSTED.
- **answer size** (:func:`explain_response_bytes`, :func:`dense_response_bytes`,
  :func:`predict_response_bytes`): an upper estimate of the response message, checked
  against ``max_message_bytes`` (RESOURCE_EXHAUSTED before any compute, instead of an answer
  computed in full and then refused by gRPC).

>>> explain_units(images=2, targets=[1, 1], methods=("gradcam", "scorecam"), channels=64)
130
>>> dense_units((100, 100), window=(32, 32), stride=(1, 1), scales=(1.0,))
4761
>>> b = WorkBudget(100)
>>> with b.reserve(60):
...     b.in_use
60
>>> b.in_use
0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from camserve.errors import InvalidArgument, ResourceExhausted
from camserve.targets import MultiLabelTarget


def per_channel(method: str) -> bool:
    """Whether ``method`` scores one masked input or ablated activation per channel of the
    layer (its cost is by channels): what its registry entry says it reads.

    >>> per_channel("scorecam"), per_channel("gradcam")
    (True, False)
    """
    from camserve.explain.methods import CHANNEL_READS, METHODS

    entry = METHODS.get(method)
    return bool(entry is not None and set(entry.reads) & set(CHANNEL_READS))


def samples(method: str) -> int:
    """Passes per target that ``method`` runs of its own (SmoothGrad's and Integrated
    Gradients' copies of the image); 0 for the rest.

    >>> samples("smoothgrad"), samples("gradcam")
    (16, 0)
    """
    from camserve.explain.methods import METHODS

    entry = METHODS.get(method)
    return entry.samples if entry is not None else 0


def raw_size(methods: Sequence[str], layer_size: tuple[int, int], input_size: tuple[int, int]) -> tuple[int, int]:
    """The largest raw map of ``methods``: the layer's, or the input's for pixel-level methods.

    >>> raw_size(("gradcam", "guidedbackprop"), (7, 7), (224, 224))
    (224, 224)
    """
    from camserve.explain.methods import METHODS

    pixel = any(getattr(METHODS.get(m), "pixel", False) for m in methods)
    return (max(layer_size[0], input_size[0]), max(layer_size[1], input_size[1])) if pixel else layer_size


#: Bytes of a float map's header, a message's framing and field tags (a generous bound).
_MAP_OVERHEAD = 64
_EXPLANATION_OVERHEAD = 96
#: A PNG's own overhead beyond its filtered pixel rows (signature, chunks, zlib blocks).
_PNG_OVERHEAD = 1024


class OverBudget(InvalidArgument):
    """A request whose work alone exceeds ``max_work_units`` (INVALID_ARGUMENT)."""


class BudgetBusy(ResourceExhausted):
    """A request that would fit ``max_work_units`` but not beside the work in progress."""


class ResponseTooLarge(ResourceExhausted):
    """An answer that would exceed the largest message the server sends."""


# ---------------------------------------------------------------------------- work units


def predict_units(images: int) -> int:
    """One unit per image."""
    return images


def target_count(targets: Sequence[object], classes: int) -> int:
    """Targets one image may be explained for: a multi-label target counts every class.

    >>> target_count([0, MultiLabelTarget()], classes=5)
    6
    """
    return sum(classes if isinstance(t, MultiLabelTarget) else 1 for t in targets)


#: Views per image that ``aug_smooth`` explains (:data:`camserve.explain.smoothing.VIEWS`).
AUG_SMOOTH_VIEWS = 6


def explain_units(images: int, targets: Sequence[int], methods: Sequence[str], channels: int, views: int = 1) -> int:
    """``targets``: targets per image (one entry per image, or one for all). Per image:
    targets × Σ (1 + :func:`samples`) over the methods that are not per channel + channels ×
    (per-channel methods); all of it × ``views`` (aug_smooth explains 6 views of each image).

    >>> explain_units(images=1, targets=[2], methods=("gradcam", "smoothgrad"), channels=64)
    36
    >>> explain_units(images=1, targets=[1], methods=("gradcam",), channels=64, views=6)
    6
    """
    channel_methods = sum(1 for m in methods if per_channel(m))
    cheap = sum(1 + samples(m) for m in methods if not per_channel(m))
    if len(targets) == 1 and images != 1:
        targets = list(targets) * images
    return views * sum(t * cheap + channels * channel_methods for t in targets)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) of an image resized by ``scale``, as :func:`camserve.dense.dense_scores` does."""
    h, w = size
    return max(1, round(h * scale)), max(1, round(w * scale))


def windows(size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]) -> int:
    """Windows of ``window`` at ``stride`` in an image of ``size`` (0 when it is smaller)."""
    (h, w), (wh, ww), (sy, sx) = size, window, stride
    if h < wh or w < ww:
        return 0
    return ((h - wh) // sy + 1) * ((w - ww) // sx + 1)


def dense_units(
    size: tuple[int, int],
    *,
    window: tuple[int, int],
    stride: tuple[int, int],
    scales: Sequence[float],
    explained_per_window: int = 0,
) -> int:
    """Windows scored over every scale: at ``stride`` (the shifted passes of shift-and-stitch
    included); with detection's tight boxes, each window also counts the candidates it can give
    (``explained_per_window``: one with class-agnostic NMS, else one per class), each explained
    on its crop.

    >>> dense_units((64, 64), window=(32, 32), stride=(32, 32), scales=(1.0,), explained_per_window=1)
    8
    """
    return (1 + explained_per_window) * sum(windows(scaled_size(size, s), window, stride) for s in scales)


@dataclasses.dataclass(frozen=True)
class Cost:
    """The work of one request and how it was counted (for the error message; a function
    when building the words costs more than the check)."""

    units: int
    counted: str | Callable[[], str]  # e.g. "2 images × 1 target × 1 method"
    change: str  # what the client can change to ask for less

    def describe(self) -> str:
        counted = self.counted if isinstance(self.counted, str) else self.counted()
        return f"{self.units} work units ({counted})"


class WorkBudget:
    """Work units in progress, at most ``limit`` together; :meth:`reserve` admits a request.

    Used on the event loop only (no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def check(self, cost: Cost) -> None:
        """INVALID_ARGUMENT when ``cost`` alone exceeds the limit."""
        if cost.units > self.limit:
            raise OverBudget(
                f"this request needs {cost.describe()}, more than the server's work budget "
                f"max_work_units={self.limit} allows for one request; {cost.change}"
            )

    def reserve(self, cost: Cost | int) -> _Held:
        """Hold ``cost`` units until the returned context ends; OverBudget / BudgetBusy when
        they do not fit."""
        if isinstance(cost, int):
            cost = Cost(cost, f"{cost} units", "ask for less work")
        self.check(cost)
        if self.in_use + cost.units > self.limit:
            raise BudgetBusy(
                f"this request needs {cost.describe()}; {self.in_use} of the server's work budget "
                f"max_work_units={self.limit} are held by requests in progress; retry later"
            )
        self.in_use += cost.units
        return _Held(self, cost.units)


class _Held:
    """Units held in a :class:`WorkBudget`, given back when the ``with`` block ends."""

    __slots__ = ("_budget", "_units")

    def __init__(self, budget: WorkBudget, units: int) -> None:
        self._budget, self._units = budget, units

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._budget.in_use -= self._units
        self._units = 0


# ---------------------------------------------------------------------------- answer sizes


def float_map_bytes(*shape: int) -> int:
    """A float32 map of ``shape`` on the wire (4 bytes a value, plus its header)."""
    n = 1
    for s in shape:
        n *= int(s)
    return 4 * n + _MAP_OVERHEAD


def png_bytes(height: int, width: int, channels: int) -> int:
    """An upper bound of an 8-bit PNG of that size (incompressible pixels: filtered rows + overhead)."""
    return height * (width * channels + 1) + _PNG_OVERHEAD


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What an Explain answer carries besides labels, scores and boxes."""

    raw: bool = False
    heatmap: bool = False
    heatmap_png: bool = False
    overlay: bool = False


def explain_response_bytes(
    *,
    targets: Sequence[int],
    methods: int,
    layer_size: tuple[int, int],
    input_size: tuple[int, int],
    overlay_sizes: Sequence[tuple[int, int]],
    outputs: Outputs,
    label_bytes: int,
) -> int:
    """Upper estimate of an ExplainResponse: per image (``overlay_sizes``: the (height, width)
    each overlay is drawn at), per target and method, the requested maps and overlay.

    >>> explain_response_bytes(targets=[1], methods=1, layer_size=(8, 8), input_size=(32, 32),
    ...                        overlay_sizes=[(32, 32)], outputs=Outputs(heatmap=True), label_bytes=8)
    4536
    """
    n = len(overlay_sizes)
    if len(targets) == 1 and n != 1:
        targets = list(targets) * n
    per_map = _EXPLANATION_OVERHEAD + label_bytes
    if outputs.raw:
        per_map += float_map_bytes(*layer_size)
    if outputs.heatmap:
        per_map += float_map_bytes(*input_size)
    if outputs.heatmap_png:
        per_map += png_bytes(*input_size, 1)
    total = 256
    for t, (h, w) in zip(targets, overlay_sizes):
        each = per_map + (png_bytes(h, w, 3) if outputs.overlay else 0)
        total += 16 + t * methods * each
    return total


#: A DenseDetection message beside its label's text: class index, score, window and tight box
#: (4 packed floats each), scale, and the field tags and lengths.
_DETECTION_BYTES = 64


def dense_response_bytes(
    size: tuple[int, int],
    *,
    window: tuple[int, int],
    stride: tuple[int, int],
    scales: Sequence[float],
    classes: int,
    detections: int = 0,
    label_bytes: int = 0,
) -> int:
    """Upper estimate of a DenseScoresResponse: per scale, the scores (cells × classes) and the
    boxes (cells × 4) as float maps; with detection, at most ``detections`` (the settings'
    ``max_detections``, and never more than one per window and class) of ``label_bytes`` labels.

    >>> plain = dense_response_bytes((64, 64), window=(32, 32), stride=(32, 32), scales=[1.0], classes=3)
    >>> dense_response_bytes((64, 64), window=(32, 32), stride=(32, 32), scales=[1.0], classes=3,
    ...                      detections=100, label_bytes=8) - plain  # 4 windows × 3 classes
    864
    """
    total = 256 + 32 * classes
    cells_in_all = 0
    for s in scales:
        cells = windows(scaled_size(size, s), window, stride)
        cells_in_all += cells
        total += 32 + float_map_bytes(cells, classes) + float_map_bytes(cells, 4)
    return total + min(detections, cells_in_all * classes) * (_DETECTION_BYTES + label_bytes)


def predict_response_bytes(images: int, listed: int, label_bytes: int, classes: int) -> int:
    """Upper estimate of a PredictResponse: the (images, classes) scores map and ``listed``
    classes per image with their labels."""
    return 128 + float_map_bytes(images, classes) + images * (16 + listed * (24 + label_bytes))


def check_response(estimate: int, limit: int, what: str | Callable[[], str], change: str) -> None:
    """ResponseTooLarge (RESOURCE_EXHAUSTED) when ``estimate`` exceeds ``limit`` bytes."""
    if estimate > limit:
        if not isinstance(what, str):
            what = what()
        raise ResponseTooLarge(
            f"the answer ({what}) would be about {estimate} bytes, more than the largest message the "
            f"server sends (max_message_mb={limit / 2**20:g}: {limit} bytes); {change}"
        )
