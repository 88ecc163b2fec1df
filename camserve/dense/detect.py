"""Object detection with a sliding-window classifier: dense scores over a scale pyramid,
candidate windows, a tight box around the object inside each window from the class's CAM,
and NMS; driven by the model's ``[dense]`` settings in ``config.toml``.

``config.toml`` (every key optional)::

    background_class = "background"   # a class that is never detected
    [dense]
    threshold = 0.5          # class score a window needs
    iou = 0.3                # NMS overlap
    nms = "auto"             # "agnostic" (across classes and scales), "per_class", "auto":
                             # agnostic for softmax heads, per class otherwise
    scales = [1.2, 0.8]      # the pyramid
    stride = 8               # omit: the network's total stride
    margin = 32              # zeros around each resized image (objects at the border)
    tight_boxes = true
    tight_box_model = "shapes_gap" # omit: the model itself; else a model of the same repository
                                   # whose CAM finds the objects (classes matched by name)
    tight_box_method = "cam"       # any camserve method: "cam" for GAP heads, else e.g. "gradcam"
    tight_box_layer = "last_conv"  # omit: that model's default layer
    tight_box_threshold = 0.2      # the CAM paper's rule: 20 % of the map's peak
    min_object_fraction = 0.25     # omit: 0; a tight box whose longer side is below this share
                                   # of its window is a speck, not an object of that scale
    max_object_fraction = 0.7      # omit: no limit; a tight box wider or taller than this share
                                   # of its window is an object too large for that scale
                                   # (left to a smaller scale of the pyramid)
    max_detections = 100

>>> s = DetectionSettings.from_mapping({"threshold": 0.6, "scales": [1.0, 0.5]})
>>> s.threshold, s.scales, s.nms
(0.6, (1.0, 0.5), 'auto')
>>> s.with_overrides(iou=0.5, threshold=None).iou
0.5
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camserve import imaging
from camserve.dense.detections import NMS_MODES, Box, Candidates, Detection, candidates, suppress
from camserve.dense.scores import DenseResult, _resize, dense_scores
from camserve.errors import InvalidArgument

__all__ = ["DetectionResult", "DetectionSettings", "detect", "is_softmax", "tight_boxes"]

_FIELDS = (
    "threshold",
    "iou",
    "nms",
    "scales",
    "stride",
    "margin",
    "tight_boxes",
    "tight_box_model",
    "tight_box_method",
    "tight_box_layer",
    "tight_box_threshold",
    "min_object_fraction",
    "max_object_fraction",
    "max_detections",
)


@dataclasses.dataclass(frozen=True)
class DetectionSettings:
    """How :func:`detect` finds objects (see the module docstring for each key)."""

    threshold: float = 0.5
    iou: float = 0.3
    nms: str = "auto"
    scales: tuple[float, ...] = (1.0,)
    stride: int | None = None
    margin: int = 0
    tight_boxes: bool = True
    tight_box_model: str | None = None
    tight_box_method: str = "gradcam"
    tight_box_layer: str | None = None
    tight_box_threshold: float = 0.2
    min_object_fraction: float = 0.0
    max_object_fraction: float | None = None
    max_detections: int = 100
    background_class: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (0.0 <= self.threshold <= 1.0 or not np.isfinite(self.threshold), "threshold", "a number in [0, 1]"),
            (0.0 < self.iou <= 1.0, "iou", "a number in (0, 1]"),
            (self.nms in (*NMS_MODES, "auto"), "nms", f"one of {', '.join((*NMS_MODES, 'auto'))}"),
            (bool(self.scales) and all(np.isfinite(s) and s > 0 for s in self.scales), "scales", "positive numbers"),
            (self.stride is None or self.stride >= 1, "stride", "a positive integer"),
            (self.margin >= 0, "margin", "a non-negative integer"),
            (0.0 < self.tight_box_threshold < 1.0, "tight_box_threshold", "a number in (0, 1)"),
            (0.0 <= self.min_object_fraction < 1.0, "min_object_fraction", "a number in [0, 1)"),
            (self.max_object_fraction is None or self.max_object_fraction > 0, "max_object_fraction", "a number > 0"),
            (self.max_detections >= 1, "max_detections", "a positive integer"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise InvalidArgument(f"dense setting {name} = {getattr(self, name)!r} is not allowed; use {allowed}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], background_class: str | None = None) -> DetectionSettings:
        """Settings from a ``[dense]`` table; unknown keys are an error naming the allowed ones."""
        unknown = sorted(set(table) - set(_FIELDS))
        if unknown:
            raise InvalidArgument(f"unknown [dense] setting(s) {unknown}; allowed: {', '.join(_FIELDS)}")
        try:
            values = {k: _coerce(k, v) for k, v in table.items()}
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"bad [dense] setting: {e}") from None
        return cls(**values, background_class=background_class)

    @classmethod
    def from_config(cls, config: Any) -> DetectionSettings:
        """Settings of a model from its :class:`~camserve.serving.repository.ModelConfig`
        (``background_class`` and the ``[dense]`` table, both optional); the background class
        must be one of the class names."""
        extra = getattr(config, "extra", {}) or {}
        background = extra.get("background_class")
        if background is not None and background not in config.class_names:
            raise InvalidArgument(
                f"background_class {background!r} is not a class of model {config.name!r}; "
                f"allowed: {', '.join(config.class_names)}"
            )
        table = extra.get("dense", {})
        if not isinstance(table, Mapping):
            raise InvalidArgument(f"model {config.name!r}: [dense] must be a table")
        return cls.from_mapping(table, background_class=background)

    def with_overrides(self, **overrides: Any) -> DetectionSettings:
        """A copy with the given keys replaced; keys given as None (or 0 / empty for a wire
        request's unset fields, see :func:`camserve.wire`) keep the configured value."""
        unknown = sorted(set(overrides) - set(_FIELDS))
        if unknown:
            raise InvalidArgument(f"unknown dense setting(s) {unknown}; allowed: {', '.join(_FIELDS)}")
        given = {k: _coerce(k, v) for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given)

    def background_index(self, class_names: Sequence[str]) -> int | None:
        """Index of the background class in ``class_names`` (None when there is none).

        >>> DetectionSettings(background_class="bg").background_index(["a", "bg"])
        1
        """
        if self.background_class is None:
            return None
        if self.background_class not in class_names:
            raise InvalidArgument(f"background class {self.background_class!r} not in {list(class_names)}")
        return list(class_names).index(self.background_class)


def _coerce(key: str, value: Any) -> Any:
    if key == "scales":
        return tuple(float(v) for v in value)
    if key in ("stride", "margin", "max_detections"):
        if int(value) != value:
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if key in ("threshold", "iou", "tight_box_threshold", "min_object_fraction", "max_object_fraction"):
        return float(value)
    if key == "tight_boxes":
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"tight_boxes must be true or false, got {value!r}")
        return bool(value)
    return str(value)


@dataclasses.dataclass
class DetectionResult:
    """What :func:`detect` returns: the dense scores it ran on, the detections (best first)
    and the settings used (``nms`` resolved)."""

    scores: DenseResult
    detections: list[Detection]
    settings: DetectionSettings


def is_softmax(model: Any) -> bool:
    """Whether the classifier's output is a softmax (single-label): its last layer is a
    Softmax or has activation softmax.

    >>> is_softmax(keras.applications.VGG16(weights=None))   # doctest: +SKIP
    True
    """
    last = model.layers[-1] if getattr(model, "layers", None) else None
    activation = getattr(last, "activation", None)
    return type(last).__name__ == "Softmax" or getattr(activation, "__name__", "") == "softmax"


#: Candidate windows explained per call for their tight boxes: what the crops and their maps
#: hold in memory at once, however many candidates an image has.
TIGHT_BOX_CHUNK = 256


def resolved_nms(settings: DetectionSettings, model: Any) -> str:
    """The NMS mode that runs: ``"auto"`` is ``"agnostic"`` for a softmax head, else ``"per_class"``.

    >>> resolved_nms(DetectionSettings(nms="per_class"), None)
    'per_class'
    """
    if settings.nms != "auto":
        return settings.nms
    return "agnostic" if is_softmax(model) else "per_class"


def candidates_per_window(settings: DetectionSettings, model: Any, classes: int) -> int:
    """The most candidates one window gives (each is explained for its tight box): one with
    class-agnostic NMS, else one per class but the background.

    >>> candidates_per_window(DetectionSettings(nms="per_class", background_class="bg"), None, 5)
    4
    """
    if resolved_nms(settings, model) == "agnostic":
        return 1
    return max(1, classes - (settings.background_class is not None))


def tight_box_explainer(model_dir: str | Path, entry: Any, settings: DetectionSettings) -> Any:
    """The Explainer whose CAM gives the tight boxes of the model loaded from ``model_dir``
    (``entry``): its own, or the ``tight_box_model``'s of the same repository folder (layer
    ``tight_box_layer``, the source model's class names and ``prefix_tokens``); None when
    tight boxes are off.

    >>> tight_box_explainer("models/shapes_fc", None, DetectionSettings(tight_boxes=False)) is None
    True
    """
    if not settings.tight_boxes:
        return None
    from camserve.explain import Explainer
    from camserve.serving.repository import load_model_dir

    folder = Path(model_dir)
    source = load_model_dir(folder.parent / settings.tight_box_model) if settings.tight_box_model else entry
    cfg = source.config
    return Explainer(
        source.model, layer=settings.tight_box_layer, class_names=cfg.class_names, prefix_tokens=cfg.prefix_tokens
    )


def tight_boxes(
    explainer: Any,
    image: np.ndarray,
    scores: DenseResult,
    found: Candidates,
    method: str = "gradcam",
    threshold: float = 0.2,
    checkpoint: Callable[[], None] | None = None,
    targets: Sequence[int | str | None] | None = None,
) -> list[Box | None]:
    """For each candidate window, the box of its class's CAM inside the window (``method`` of
    ``explainer`` on the window crop, the CAM paper's rule: the largest connected region above
    ``threshold`` × the peak), in pixels of ``image``, clipped to it; None for an empty map or a
    box wholly in the margin. ``targets``: the class to explain per candidate (a name for an
    explainer with class names; None: no box), default its class index.

    >>> tight_boxes(Explainer(model, layer="conv2"), image, result, candidates(result))   # doctest: +SKIP
    [(21.0, 30.0, 45.0, 52.0)]
    """
    if not len(found):
        return []
    h0, w0 = image.shape[:2]
    padded = {}  # each level's resized image with its margin, and room for the last window
    for k in (int(v) for v in np.unique(found.levels)):
        level, m = scores[k], scores[k].margin
        padded[k] = np.pad(_resize(image, level.scale), ((m, m + level.window[0]), (m, m + level.window[1]), (0, 0)))

    def window_at(n: int) -> tuple[np.ndarray, int, int]:
        """Candidate ``n``'s crop and its top-left corner (y, x) in its level's resized image."""
        level = scores[int(found.levels[n])]
        y, x = int(found.cells[n, 0]) * level.strides[0], int(found.cells[n, 1]) * level.strides[1]
        crop = padded[int(found.levels[n])][y : y + level.window[0], x : x + level.window[1]]
        return crop, y - level.margin, x - level.margin

    wanted = [int(c) for c in found.classes] if targets is None else list(targets)
    todo = [n for n, t in enumerate(wanted) if t is not None]
    out: list[Box | None] = [None] * len(found)
    for c0 in range(0, len(todo), TIGHT_BOX_CHUNK):  # memory: one chunk of crops and maps
        rows = todo[c0 : c0 + TIGHT_BOX_CHUNK]
        windows = [window_at(n) for n in rows]
        crops = np.stack([crop for crop, _, _ in windows]).astype(np.float32)
        explained = explainer.explain(
            crops, methods=(method,), targets=[[wanted[n]] for n in rows], checkpoint=checkpoint
        )
        for n, (_, oy, ox), per_crop in zip(rows, windows, explained):
            box = imaging.heatmap_box(per_crop[0].heatmap, threshold)
            if box is None:
                continue
            level = scores[int(found.levels[n])]
            fy, fx = h0 / level.image_size[0], w0 / level.image_size[1]
            x0, y0 = max((ox + box[0]) * fx, 0.0), max((oy + box[1]) * fy, 0.0)
            x1, y1 = min((ox + box[2]) * fx, float(w0)), min((oy + box[3]) * fy, float(h0))
            out[n] = (float(x0), float(y0), float(x1), float(y1)) if x1 > x0 and y1 > y0 else None
    return out


def detect(
    model: Any,
    image: np.ndarray,
    settings: DetectionSettings | None = None,
    class_names: Sequence[str] | None = None,
    explainer: Any = None,
    mode: str = "fcn",
    batch_size: int = 32,
    checkpoint: Callable[[], None] | None = None,
    **dense_options: Any,
) -> DetectionResult:
    """Detect objects in one preprocessed (H, W, C) image with a sliding-window classifier.

    Scores every window over ``settings.scales`` (:func:`~camserve.dense.dense_scores`, with
    ``settings.margin``), keeps windows whose best non-background class reaches the threshold
    (every such class with per-class NMS), computes tight boxes (``explainer``: an
    :class:`~camserve.explain.Explainer` of ``model``, or of the ``tight_box_model`` with its
    class names, at ``tight_box_layer``; made here for ``model`` when not given), drops the
    candidates whose CAM is empty, misses the window's centre or spans less than
    ``min_object_fraction`` (more than ``max_object_fraction``) of the window, and runs NMS on
    the tight boxes, a kept box also suppressing candidates whose window or tight-box centre it
    holds (on the windows with ``tight_boxes=False`` or for classes the explainer lacks).
    ``dense_options``: more keywords of ``dense_scores``.

    >>> found = detect(model, image, DetectionSettings.from_config(config), config.class_names)   # doctest: +SKIP
    >>> [(d.label, d.tight_box) for d in found.detections]                                          # doctest: +SKIP
    [('star', (40.0, 12.0, 66.0, 37.0))]
    """
    settings = settings or DetectionSettings()
    settings = dataclasses.replace(settings, nms=resolved_nms(settings, model))
    scores = dense_scores(
        model,
        image,
        stride=settings.stride,
        scales=settings.scales,
        mode=mode,
        batch_size=batch_size,
        checkpoint=checkpoint,
        margin=settings.margin,
        **dense_options,
    )
    n_classes = scores[0].scores.shape[-1]
    if class_names is not None and len(class_names) != n_classes:
        raise InvalidArgument(f"{len(class_names)} class names for {n_classes} classes")
    background = settings.background_index(class_names) if class_names is not None else None
    found = candidates(scores, settings.threshold, background=background, one_per_window=settings.nms == "agnostic")
    tight: list[Box | None] = [None] * len(found)
    boxes = found.boxes.copy()
    if settings.tight_boxes and len(found):
        if explainer is None:
            if settings.tight_box_model:
                raise InvalidArgument(
                    f"tight boxes come from model {settings.tight_box_model!r}: pass explainer=Explainer(that model)"
                )
            from camserve.explain import Explainer

            explainer = Explainer(model, layer=settings.tight_box_layer)
        targets = _targets(found, class_names, getattr(explainer, "class_names", None))
        tight = tight_boxes(
            explainer,
            image,
            scores,
            found,
            settings.tight_box_method,
            settings.tight_box_threshold,
            checkpoint,
            targets,
        )
        explained = np.array([t is not None for t in targets] if targets is not None else [True] * len(found))
        for k, box in enumerate(tight):
            if box is not None:
                boxes[k] = box
    centres = np.stack([found.boxes[:, [0, 2]].mean(1), found.boxes[:, [1, 3]].mean(1)], axis=1)
    points = None
    if settings.tight_boxes and len(found):
        # The classifier scores a window by the object at its centre: a candidate whose CAM is
        # empty, a speck, or whose CAM box misses its window's centre is not centred on an
        # object of its class (dropped), and a kept box suppresses the windows whose centre or
        # CAM box centre lies inside it (they look at the same object).
        has_box = np.array([t is not None for t in tight])
        inside = _holds(boxes, centres) & (has_box | ~explained)
        span = _span(boxes, found.boxes)
        inside &= span >= settings.min_object_fraction  # a speck, not an object of this scale
        if settings.max_object_fraction is not None:  # larger: left to a smaller scale
            inside &= span <= settings.max_object_fraction
        found, boxes, centres = found.take(np.flatnonzero(inside)), boxes[inside], centres[inside]
        tight = [t for t, ok in zip(tight, inside) if ok]
        tight_centres = np.stack([boxes[:, [0, 2]].mean(1), boxes[:, [1, 3]].mean(1)], axis=1)
        points = np.stack([centres, tight_centres], axis=1)
    keep = suppress(found.classes, found.scores, boxes, settings.iou, settings.nms, points)[: settings.max_detections]
    h, w = image.shape[:2]
    dets = [_clipped(found.detection(k, scores, class_names, tight[k]), w, h) for k in keep]
    return DetectionResult(scores, dets, settings)


def _span(inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """The larger of each inner box's width and height as a share of its outer box's."""
    w = (inner[:, 2] - inner[:, 0]) / np.maximum(outer[:, 2] - outer[:, 0], 1e-9)
    h = (inner[:, 3] - inner[:, 1]) / np.maximum(outer[:, 3] - outer[:, 1], 1e-9)
    return np.maximum(w, h)


def _holds(boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether each box (K, 4) holds its point (K, 2)."""
    x, y = points[:, 0], points[:, 1]
    return (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])


def _targets(
    found: Candidates, class_names: Sequence[str] | None, explained_names: Sequence[str] | None
) -> list[int | str | None] | None:
    """What the explainer explains per candidate: its class index, or its class name when the
    explainer has class names (another model's: classes it lacks get no tight box)."""
    if class_names is None or explained_names is None:
        return None
    return [class_names[int(c)] if class_names[int(c)] in explained_names else None for c in found.classes]


def _clipped(d: Detection, width: int, height: int) -> Detection:
    """The detection with its window clipped to the image (a margin lets windows reach past it)."""
    x0, y0, x1, y1 = d.box
    box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    return dataclasses.replace(d, box=box)
