"""Dense sliding-window class scores: one FCN pass, shift-and-stitch, or batched crops.

>>> result = dense_scores(model, image, stride=16, scales=(1.0, 0.5))    # doctest: +SKIP
>>> result.exact, result[0].scores.shape, result[0].boxes[0, 1]          # doctest: +SKIP
(True, (11, 11, 5), array([16., 0., 80., 64.], dtype=float32))
>>> detections(result, threshold=0.9)[0].label                           # doctest: +SKIP
'circle'

``image`` is one preprocessed float32 (H, W, C) array in the model's input space. Cell (i, j)
of a scale's grid scores the window at (j·sx, i·sy) of the classifier's input size in the
resized image; ``boxes`` give that window in pixels of the original ``image``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow as tf

from camserve import keras_graph
from camserve.accelerator import check_precision, resolve_device
from camserve.dense.detections import Detection, detections, nms, score_map
from camserve.dense.fcn import FullyConvolutional, to_fully_convolutional
from camserve.dense.receptive_field import analyze
from camserve.errors import InvalidArgument

__all__ = [
    "MAX_BATCH_PIXELS",
    "MODES",
    "DenseResult",
    "DenseScores",
    "Detection",
    "dense_scores",
    "detections",
    "nms",
    "score_map",
]

MODES = ("fcn", "crops")

#: Input pixels one forward pass may take (shifted copies or crops × their pixels): the
#: batches of a fine stride are cut to it, so memory stays bounded whatever the stride.
MAX_BATCH_PIXELS = 1 << 21

_FCN_LOCK = threading.Lock()
# Model → {logits: its conversion}. The cached conversions keep no reference to the model
# (``source`` is set on the copy handed out), so dropping the model frees its entry.
_FCN_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[bool, str], FullyConvolutional]] = weakref.WeakKeyDictionary()


def _square(strides: tuple[int, int]) -> int:
    if strides[0] != strides[1]:
        raise InvalidArgument(f"the stride is not square: {strides} (sy, sx); use .strides")
    return strides[0]


@dataclasses.dataclass
class DenseScores:
    """Scores of every window at one scale.

    ``scores`` (gh, gw, classes) float32; ``boxes`` (gh, gw, 4) float32 (x0, y0, x1, y1), x1/y1
    exclusive, in pixels of the original image; ``strides`` (sy, sx) and ``window`` (h, w) in
    pixels of the image resized by ``scale`` (``image_size``), which had ``margin`` zeros
    added on every side (cell (i, j) starts at (j·sx − margin, i·sy − margin) there).
    """

    scale: float
    scores: np.ndarray
    boxes: np.ndarray
    strides: tuple[int, int]
    window: tuple[int, int]
    image_size: tuple[int, int]
    margin: int = 0

    @property
    def stride(self) -> int:
        """The stride when it is the same along y and x (ValueError otherwise)."""
        return _square(self.strides)


@dataclasses.dataclass
class DenseResult:
    """What :func:`dense_scores` returns: one :class:`DenseScores` per scale (iterate or index
    it like a list), the stride used, ``exact`` (the scores equal the classifier on each crop;
    always True for ``mode="crops"``) and the mode.
    """

    scales: list[DenseScores]
    strides: tuple[int, int]
    exact: bool
    mode: str
    window: tuple[int, int]

    @property
    def stride(self) -> int:
        """The stride when it is the same along y and x (ValueError otherwise)."""
        return _square(self.strides)

    def __iter__(self) -> Iterator[DenseScores]:
        return iter(self.scales)

    def __len__(self) -> int:
        return len(self.scales)

    def __getitem__(self, i: int) -> DenseScores:
        return self.scales[i]


def _as_fcn(model: Any, logits: bool, precision: str = "float32") -> FullyConvolutional:
    if isinstance(model, FullyConvolutional):
        if model.head != "window":
            raise InvalidArgument("dense_scores needs a window model; got a class-map model (head='classmap')")
        if model.logits != logits:
            raise InvalidArgument(
                f"the given FullyConvolutional has logits={model.logits} but logits={logits} was asked"
            )
        return model
    with _FCN_LOCK:  # the server calls this from worker threads
        per_model = _FCN_CACHE.setdefault(model, {})
        key = (logits, precision)
        if key not in per_model:
            computing = keras_graph.cast_model(model, precision)
            per_model[key] = dataclasses.replace(
                to_fully_convolutional(computing, head="window", logits=logits), source=None
            )
        return dataclasses.replace(per_model[key], source=model)


def _stride_pair(stride: int | Sequence[int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if stride is None:
        return default
    pair = (stride, stride) if isinstance(stride, (int, np.integer)) else tuple(stride)
    if len(pair) != 2 or any(int(s) != s or s < 1 for s in pair):
        raise InvalidArgument(f"stride must be a positive integer or a pair of them; got {stride!r}")
    return (int(pair[0]), int(pair[1]))


def _input_size(model: Any) -> tuple[int, int]:
    shape = model.input_shape
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise InvalidArgument(
            f"model input {shape} has no fixed (H, W); mode='crops' needs the classifier's window size"
        )
    return (int(shape[1]), int(shape[2]))


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    out = cv2.resize(image, size, interpolation=interp)
    return out.reshape(size[1], size[0], image.shape[2])


def _grid_boxes(
    grid: tuple[int, int],
    stride: tuple[int, int],
    window: tuple[int, int],
    to_original: tuple[float, float],
    margin: int = 0,
) -> np.ndarray:
    ys = np.arange(grid[0], dtype=np.float64) * stride[0] - margin
    xs = np.arange(grid[1], dtype=np.float64) * stride[1] - margin
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    fy, fx = to_original
    boxes = np.stack([x0 * fx, y0 * fy, (x0 + window[1]) * fx, (y0 + window[0]) * fy], axis=-1)
    return boxes.astype(np.float32)


def _batch_count(item_pixels: int, batch_size: int, max_pixels: int) -> int:
    """How many items of ``item_pixels`` input pixels one forward pass takes: at most
    ``batch_size`` and ``max_pixels`` in all (one at least)."""
    return max(1, min(batch_size, max_pixels // max(1, item_pixels)))


def _no_checkpoint() -> None:
    return None


def _fcn_scores(
    fcn: FullyConvolutional,
    image: np.ndarray,
    stride: tuple[int, int],
    batch_size: int,
    max_pixels: int = MAX_BATCH_PIXELS,
    checkpoint: Callable[[], None] = _no_checkpoint,
) -> np.ndarray:
    """Shift-and-stitch: one FCN pass per shift (a·sy, b·sx), interleaved into the fine grid.

    Equal-sized shifted copies share forward passes of at most ``batch_size`` copies and
    ``max_pixels`` input pixels; a copy is cut from the image only when its batch runs, and
    ``checkpoint()`` is called before each pass."""
    total = fcn.stride
    for s, t, axis in zip(stride, total, ("y", "x")):
        if t % s:
            allowed = [d for d in range(1, t + 1) if t % d == 0]
            raise InvalidArgument(
                f"stride {s} along {axis} does not divide the total stride {t}; allowed in mode='fcn': "
                f"{allowed} (mode='crops' takes any stride)"
            )
    fy, fx = total[0] // stride[0], total[1] // stride[1]
    h, w = image.shape[:2]
    win = fcn.window
    grid = ((h - win[0]) // stride[0] + 1, (w - win[1]) // stride[1] + 1)
    out: np.ndarray | None = None
    # Group the shifts by the size of their copy so equal-sized ones share a batch; a group
    # holds (a, b, y0, x0, ny, nx) only, the pixels are cut per batch.
    groups: dict[tuple[int, int], list[tuple[int, int, int, int, int, int]]] = {}
    for a in range(fy):
        for b in range(fx):
            ny = (h - a * stride[0] - win[0]) // total[0] + 1
            nx = (w - b * stride[1] - win[1]) // total[1] + 1
            if ny <= 0 or nx <= 0:  # no window starts at this shift
                continue
            size = ((ny - 1) * total[0] + win[0], (nx - 1) * total[1] + win[1])
            groups.setdefault(size, []).append((a, b, a * stride[0], b * stride[1], ny, nx))
    for (ch, cw), shifts in groups.items():
        step = _batch_count(ch * cw, batch_size, max_pixels)
        for k in range(0, len(shifts), step):
            part = shifts[k : k + step]
            checkpoint()
            batch = np.stack([image[y0 : y0 + ch, x0 : x0 + cw] for _, _, y0, x0, _, _ in part])
            preds = np.asarray(fcn.model.predict_on_batch(batch))
            del batch
            for (a, b, _, _, ny, nx), pred in zip(part, preds):
                if pred.shape[0] < ny or pred.shape[1] < nx:
                    raise RuntimeError(
                        f"FCN grid {pred.shape[:2]} is smaller than the {ny}x{nx} windows of a {ch}x{cw} input"
                    )
                if out is None:
                    out = np.zeros(grid + (pred.shape[-1],), np.float32)
                out[a::fy, b::fx] = pred[:ny, :nx]
    assert out is not None
    return out


def _crop_scores(
    model: Any,
    image: np.ndarray,
    stride: tuple[int, int],
    window: tuple[int, int],
    batch_size: int,
    max_pixels: int = MAX_BATCH_PIXELS,
    checkpoint: Callable[[], None] = _no_checkpoint,
) -> np.ndarray:
    """The reference: every window cropped and classified, in batches of at most
    ``batch_size`` crops and ``max_pixels`` pixels (cut per batch: memory stays bounded);
    ``checkpoint()`` before each batch."""
    h, w = image.shape[:2]
    grid = ((h - window[0]) // stride[0] + 1, (w - window[1]) // stride[1] + 1)
    origins = [(i * stride[0], j * stride[1]) for i in range(grid[0]) for j in range(grid[1])]
    step = _batch_count(window[0] * window[1], batch_size, max_pixels)
    outs = []
    for k in range(0, len(origins), step):
        checkpoint()
        batch = np.stack([image[y : y + window[0], x : x + window[1]] for y, x in origins[k : k + step]])
        outs.append(np.asarray(model.predict_on_batch(batch)))
    scores = np.concatenate(outs)
    return scores.reshape(grid + scores.shape[1:]).astype(np.float32)


def dense_scores(
    model: Any,
    image: np.ndarray,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] = (1.0,),
    mode: str = "fcn",
    batch_size: int = 32,
    logits: bool = False,
    pad: bool = False,
    checkpoint: Callable[[], None] | None = None,
    max_batch_pixels: int = MAX_BATCH_PIXELS,
    precision: str | None = None,
    device: str | None = None,
    margin: int = 0,
) -> DenseResult:
    """Class scores of every window of the classifier's input size, one level per scale.

    ``model``: a Keras classifier (converted once and cached) or a window
    :class:`~camserve.dense.fcn.FullyConvolutional`. ``stride=None``: the total stride; a divisor
    of it uses shift-and-stitch. ``mode="crops"`` classifies batched crops (any stride, exact
    for padded backbones too). ``logits=True`` scores before the final activation (fcn mode
    only). An image smaller than the window at some scale raises ValueError unless
    ``pad=True``, which zero-pads it at the bottom/right up to the window.

    Shifted copies (fcn) and crops are run in batches of at most ``batch_size`` items and
    ``max_batch_pixels`` input pixels, so a fine stride costs time, not memory.
    ``checkpoint``: called before every forward pass (each batch of each scale); whatever it
    raises stops the computation and propagates (a server's deadline). ``precision``
    (``"mixed_float16"``) runs a mixed-precision clone of a Keras classifier (its output layer
    and the scores stay float32); ``device`` (``"/GPU:0"``, ``"auto"``) is where passes run.
    ``margin``: zeros added on every side of each resized image first, so that windows reach
    that far past the border (objects at the border can be centred in a window); boxes are
    still in pixels of ``image`` (negative or past its size there).

    >>> [level.scores.shape for level in dense_scores(model, np.zeros((96, 96, 3), np.float32))]  # doctest: +SKIP
    [(9, 9, 5)]
    """
    if mode not in MODES:
        raise InvalidArgument(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    try:
        image = np.asarray(image, np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"image must be one numeric (H, W, C) array: {exc}") from None
    if image.ndim != 3:
        raise InvalidArgument(f"image must be one (H, W, C) array; got shape {image.shape}")
    if not scales or any(not np.isfinite(s) or s <= 0 for s in scales):
        raise InvalidArgument(f"scales must be positive numbers; got {tuple(scales)!r}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be ≥ 1; got {batch_size}")
    if max_batch_pixels < 1:
        raise InvalidArgument(f"max_batch_pixels must be ≥ 1; got {max_batch_pixels}")
    if int(margin) != margin or margin < 0:
        raise InvalidArgument(f"margin must be a non-negative integer; got {margin!r}")
    check = checkpoint or _no_checkpoint
    precision = check_precision(precision)
    with tf.device(placed) if (placed := resolve_device(device)) else contextlib.nullcontext():
        return _dense_scores(
            model, image, stride, scales, mode, batch_size, logits, pad, check, max_batch_pixels, precision, int(margin)
        )


def _dense_scores(
    model: Any,
    image: np.ndarray,
    stride: int | Sequence[int] | None,
    scales: Sequence[float],
    mode: str,
    batch_size: int,
    logits: bool,
    pad: bool,
    check: Callable[[], None],
    max_batch_pixels: int,
    precision: str,
    margin: int = 0,
) -> DenseResult:
    if mode == "crops" and logits:
        raise InvalidArgument("logits=True needs mode='fcn' (crops run the classifier as it is)")
    fcn: FullyConvolutional | None = None
    if mode == "fcn":
        fcn = _as_fcn(model, logits, precision)
        window, default_stride, exact = fcn.window, fcn.stride, fcn.exact
    else:
        classifier = keras_graph.cast_model(model.source if isinstance(model, FullyConvolutional) else model, precision)
        window = _input_size(classifier)
        exact = True
        if isinstance(model, FullyConvolutional):
            default_stride = model.stride
        elif stride is None:
            default_stride = analyze(classifier).stride
        else:
            default_stride = (1, 1)  # not used: the stride is given
    step = _stride_pair(stride, default_stride)
    h0, w0 = image.shape[:2]
    levels = []
    for scale in scales:
        scaled = _resize(image, float(scale))
        sh, sw = scaled.shape[:2]
        if margin:
            scaled = np.pad(scaled, ((margin, margin), (margin, margin), (0, 0)))
        ph, pw = scaled.shape[:2]
        if ph < window[0] or pw < window[1]:
            if not pad:
                raise InvalidArgument(
                    f"image {h0}x{w0} at scale {scale} is {sh}x{sw}"
                    + (f" ({ph}x{pw} with the margin)" if margin else "")
                    + f", smaller than the {window[0]}x{window[1]} window; use larger scales or pad=True"
                )
            scaled = np.pad(scaled, ((0, max(0, window[0] - ph)), (0, max(0, window[1] - pw)), (0, 0)))
        if fcn is not None:
            scores = _fcn_scores(fcn, scaled, step, batch_size, max_batch_pixels, check)
        else:
            scores = _crop_scores(classifier, scaled, step, window, batch_size, max_batch_pixels, check)
        boxes = _grid_boxes(scores.shape[:2], step, window, (h0 / sh, w0 / sw), margin)
        levels.append(DenseScores(float(scale), scores, boxes, step, window, (sh, sw), margin))
    return DenseResult(scales=levels, strides=step, exact=exact, mode=mode, window=window)
