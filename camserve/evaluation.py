"""Explanation quality tools: localization accuracy, pointing game, deletion / insertion
AUC and the model-randomization sanity check (Adebayo et al. 2018).

Everything works on numpy inputs. Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1`` and
``y1`` exclusive, as returned by :func:`camserve.imaging.heatmap_box`; heatmaps are (H, W)
arrays, larger values meaning more relevant.

>>> box_iou((0, 0, 2, 2), (1, 0, 3, 2))
0.3333333333333333
>>> localization_accuracy([(0, 0, 2, 2), None], [(0, 0, 2, 2), (0, 0, 2, 2)])
0.5
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

import cv2
import numpy as np

from camserve.errors import InvalidArgument

if TYPE_CHECKING:
    import keras

Box = tuple[float, float, float, float]
#: Ground truth for one image: one box, or every box of the target class, as a sequence
#: of boxes or a (K, 4) array (K may be 0: the image then counts as a miss).
GroundTruth = Box | Sequence[Box] | np.ndarray
ScoreFn = Callable[[np.ndarray], Any]
ExplainFn = Callable[[Any, np.ndarray], Any]


# --------------------------------------------------------------------------- boxes


def _as_box(box: Any, what: str) -> np.ndarray:
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape != (4,) or not np.all(np.isfinite(arr)):
        raise InvalidArgument(f"{what} must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    if arr[2] < arr[0] or arr[3] < arr[1]:
        raise InvalidArgument(f"{what} must have x0 <= x1 and y0 <= y1 (x1, y1 exclusive), got {box!r}")
    return arr


def _as_boxes(truth: Any, what: str) -> np.ndarray:
    """One image's ground truth as a (K, 4) array (see :data:`GroundTruth`)."""
    arr = np.asarray(truth, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim == 1:
        return _as_box(arr, what)[None]
    if arr.ndim == 2 and arr.shape[1] == 4:
        return np.stack([_as_box(b, f"{what}[{k}]") for k, b in enumerate(arr)])
    raise InvalidArgument(f"{what} must be one box (x0, y0, x1, y1) or a sequence of boxes, got shape {arr.shape}")


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes with x1, y1 exclusive.

    Two empty boxes have IoU 0.

    >>> box_iou((0, 0, 4, 4), (2, 2, 6, 6))  # 4 / (16 + 16 - 4)
    0.14285714285714285
    """
    p, q = _as_box(a, "box a"), _as_box(b, "box b")
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _check_lengths(n_pred: int, n_true: int, pred_name: str) -> None:
    if n_pred != n_true:
        raise InvalidArgument(f"{pred_name} and true_boxes must have one entry per image, got {n_pred} and {n_true}")
    if n_pred == 0:
        raise InvalidArgument(f"{pred_name} is empty: need at least one image")


def localization_hits(
    pred_boxes: Sequence[Box | None], true_boxes: Sequence[GroundTruth], threshold: float = 0.5
) -> np.ndarray:
    """Per image, whether the predicted box has IoU >= ``threshold`` with any ground-truth
    box of the target class. A None prediction (e.g. an all-zero heatmap) is a miss.

    >>> localization_hits([(0, 0, 2, 2)], [[(5, 5, 6, 6), (0, 0, 2, 1)]]).tolist()
    [True]
    """
    if not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"threshold must be in [0, 1], got {threshold}")
    _check_lengths(len(pred_boxes), len(true_boxes), "pred_boxes")
    hits = np.zeros(len(pred_boxes), dtype=bool)
    for i, (pred, truth) in enumerate(zip(pred_boxes, true_boxes)):
        gts = _as_boxes(truth, f"true_boxes[{i}]")
        if pred is None:
            continue
        _as_box(pred, f"pred_boxes[{i}]")
        hits[i] = any(box_iou(pred, tuple(g)) >= threshold for g in gts)
    return hits


def localization_accuracy(
    pred_boxes: Sequence[Box | None], true_boxes: Sequence[GroundTruth], threshold: float = 0.5
) -> float:
    """Fraction of images whose predicted box hits a ground-truth box
    (see :func:`localization_hits`): the CAM paper's localization accuracy.

    ``pred_boxes[i]`` is a box or None; ``true_boxes[i]`` is one box or all boxes of the
    target class in image i.

    >>> localization_accuracy([(0, 0, 4, 4), (0, 0, 4, 4)], [(0, 0, 4, 3), (0, 0, 1, 1)])
    0.5
    """
    return float(np.mean(localization_hits(pred_boxes, true_boxes, threshold)))


# --------------------------------------------------------------------------- pointing game


def _check_heatmap(heatmap: Any, what: str) -> np.ndarray:
    hm = np.asarray(heatmap)
    if hm.ndim != 2 or hm.size == 0:
        raise InvalidArgument(f"{what} must be a non-empty (H, W) array, got shape {hm.shape}")
    if not np.issubdtype(hm.dtype, np.number) or not np.all(np.isfinite(hm)):
        raise InvalidArgument(f"{what} must hold finite numbers (no NaN/Inf)")
    return hm


def _box_distance(y: np.ndarray, x: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Euclidean distance from pixels (y, x) to the nearest pixel of each box, shape
    (len(y), K). A box covers the pixels x0 <= x < x1, y0 <= y < y1; inside means 0."""
    lo = np.ceil(boxes[:, :2])[None]  # first covered pixel (x, y)
    hi = np.ceil(boxes[:, 2:])[None] - 1  # last covered pixel (x, y); < lo for an empty box
    point = np.stack([x, y], axis=-1)[:, None].astype(np.float64)
    gap = np.maximum(np.maximum(lo - point, point - hi), 0.0)
    return np.hypot(gap[..., 0], gap[..., 1])


def pointing_hits(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    true_boxes: Sequence[GroundTruth],
    tolerance: float = 0,
    ties: Literal["first", "all", "any"] = "first",
) -> np.ndarray:
    """Per image, whether the heatmap's maximum falls on a ground-truth box of the target class
    (Zhang et al. 2016), i.e. within ``tolerance`` pixels (Euclidean, to the nearest box pixel;
    the paper used 15) of any box.

    Several pixels sharing the maximum: ``"first"`` takes the first in row-major order (as
    ``np.argmax``), ``"all"`` needs every one of them to hit (a flat map hits only if the box
    covers it), ``"any"`` needs one.

    >>> hm = np.zeros((4, 4)); hm[1, 2] = 1.0
    >>> pointing_hits([hm], [(2, 1, 3, 2)]).tolist(), pointing_hits([hm], [(0, 0, 2, 2)], tolerance=1).tolist()
    ([True], [True])
    """
    if tolerance < 0:
        raise InvalidArgument(f"tolerance must be >= 0 pixels, got {tolerance}")
    if ties not in ("first", "all", "any"):
        raise InvalidArgument(f"ties must be 'first', 'all' or 'any', got {ties!r}")
    _check_lengths(len(heatmaps), len(true_boxes), "heatmaps")
    hits = np.zeros(len(heatmaps), dtype=bool)
    for i, (heatmap, truth) in enumerate(zip(heatmaps, true_boxes)):
        hm = _check_heatmap(heatmap, f"heatmaps[{i}]")
        gts = _as_boxes(truth, f"true_boxes[{i}]")
        if len(gts) == 0:
            continue
        if ties == "first":
            y, x = np.unravel_index(np.argmax(hm), hm.shape)
            ys, xs = np.array([y]), np.array([x])
        else:
            ys, xs = np.nonzero(hm == hm.max())
        near = (_box_distance(ys, xs, gts) <= tolerance).any(axis=1)
        hits[i] = bool(near.all() if ties == "all" else near.any())
    return hits


def pointing_game(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    true_boxes: Sequence[GroundTruth],
    tolerance: float = 0,
    ties: Literal["first", "all", "any"] = "first",
) -> float:
    """Pointing-game accuracy: the fraction of :func:`pointing_hits`.

    >>> hm = np.zeros((4, 4)); hm[3, 3] = 1.0
    >>> pointing_game([hm, hm], [(0, 0, 4, 4), (0, 0, 2, 2)])
    0.5
    """
    return float(np.mean(pointing_hits(heatmaps, true_boxes, tolerance, ties)))


# --------------------------------------------------------------------------- deletion / insertion


def blurred_baseline(image: np.ndarray, ksize: int = 11, sigma: float = 5.0) -> np.ndarray:
    """The image under a Gaussian blur: the insertion baseline of RISE (Petsiuk et al. 2018,
    11x11 kernel, sigma 5).

    >>> blurred_baseline(np.ones((8, 8, 3), np.float32)).max()
    np.float32(1.0)
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise InvalidArgument(f"image must be (H, W, C), got shape {img.shape}")
    if ksize < 1 or ksize % 2 == 0:
        raise InvalidArgument(f"ksize must be a positive odd number, got {ksize}")
    channels = [cv2.GaussianBlur(img[..., c], (ksize, ksize), sigma) for c in range(img.shape[-1])]
    return np.stack(channels, axis=-1)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def perturbation_curve(
    score_fn: ScoreFn,
    image: np.ndarray,
    heatmap: np.ndarray,
    mode: Literal["deletion", "insertion"],
    steps: int = 100,
    baseline: float | np.ndarray | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """The deletion or insertion curve of RISE (Petsiuk et al. 2018).

    Pixels are ranked by descending heatmap value (ties: row-major order). At step
    i = 0..steps the first ``n_i = i * H*W // steps`` ranked pixels are replaced, all
    channels at once: by ``baseline`` (deletion, starting from the image), or by the image
    (insertion, starting from ``baseline``). ``baseline`` is a scalar or an array that
    broadcasts to the image; None means zeros for deletion and :func:`blurred_baseline` for
    insertion. The steps+1 images are scored ``batch_size`` at a time by
    ``score_fn(batch (B, H, W, C)) -> (B,)`` scores of the target class.

    Returns (fractions n_i / (H*W) from 0 to 1, scores), both float64 of length steps+1.

    >>> f = lambda b: b[:, 0].mean(axis=(1, 2))           # mean of the top row
    >>> hm = np.zeros((2, 2)); hm[0] = 1.0
    >>> perturbation_curve(f, np.ones((2, 2, 1)), hm, "deletion", steps=2)[1].tolist()
    [1.0, 0.0, 0.0]
    """
    if mode not in ("deletion", "insertion"):
        raise InvalidArgument(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    img = np.asarray(image)
    if img.ndim != 3 or img.size == 0:
        raise InvalidArgument(f"image must be a non-empty (H, W, C) array, got shape {img.shape}")
    hm = _check_heatmap(heatmap, "heatmap")
    h, w = img.shape[:2]
    if hm.shape != (h, w):
        raise InvalidArgument(f"heatmap shape {hm.shape} must equal the image's (H, W) = {(h, w)}; resize it first")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= h * w:
        raise InvalidArgument(f"steps must be an integer in 1..H*W = 1..{h * w}, got {steps!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
    dtype = img.dtype if np.issubdtype(img.dtype, np.floating) else np.dtype(np.float32)
    if baseline is None:
        baseline = blurred_baseline(img) if mode == "insertion" else 0.0
    try:
        base = np.broadcast_to(np.asarray(baseline, dtype=dtype), img.shape)
    except ValueError:
        raise InvalidArgument(
            f"baseline of shape {np.shape(baseline)} does not broadcast to the image's shape {img.shape}"
        ) from None
    start, end = (img.astype(dtype), base) if mode == "deletion" else (base, img.astype(dtype))

    order = np.argsort(-hm.ravel().astype(np.float64), kind="stable")  # stable: row-major ties
    rank = np.empty(h * w, dtype=np.int64)
    rank[order] = np.arange(h * w)
    rank = rank.reshape(h, w)
    counts = np.arange(steps + 1, dtype=np.int64) * (h * w) // steps

    scores = np.empty(steps + 1, dtype=np.float64)
    for lo in range(0, steps + 1, batch_size):
        n = counts[lo : lo + batch_size]
        replaced = (rank[None] < n[:, None, None])[..., None]
        batch = np.where(replaced, end[None], start[None])
        out = np.asarray(score_fn(batch), dtype=np.float64)
        if out.shape != (len(n),):
            raise InvalidArgument(f"score_fn must return one score per image, shape ({len(n)},); got {out.shape}")
        scores[lo : lo + len(n)] = out
    return counts / (h * w), scores


class CurveOptions(TypedDict, total=False):
    """Options of :func:`perturbation_curve` that the AUC functions pass on."""

    steps: int
    baseline: float | np.ndarray | None
    batch_size: int


def deletion_auc(score_fn: ScoreFn, image: np.ndarray, heatmap: np.ndarray, **options: Unpack[CurveOptions]) -> float:
    """Area under the deletion curve (trapezoid, x in [0, 1]); lower is better.
    ``baseline`` defaults to zeros. See :func:`perturbation_curve`.

    >>> f = lambda b: b[:, 0].mean(axis=(1, 2))
    >>> hm = np.zeros((2, 2)); hm[0] = 1.0
    >>> deletion_auc(f, np.ones((2, 2, 1)), hm, steps=2)   # scores 1, 0, 0
    0.25
    """
    return _trapezoid(*perturbation_curve(score_fn, image, heatmap, "deletion", **options))


def insertion_auc(score_fn: ScoreFn, image: np.ndarray, heatmap: np.ndarray, **options: Unpack[CurveOptions]) -> float:
    """Area under the insertion curve (trapezoid, x in [0, 1]); higher is better.
    ``baseline`` defaults to :func:`blurred_baseline` of the image. See :func:`perturbation_curve`.

    >>> f = lambda b: b[:, 0].mean(axis=(1, 2))
    >>> hm = np.zeros((2, 2)); hm[0] = 1.0
    >>> insertion_auc(f, np.ones((2, 2, 1)), hm, steps=2, baseline=0.0)   # scores 0, 1, 1
    0.75
    """
    return _trapezoid(*perturbation_curve(score_fn, image, heatmap, "insertion", **options))


# --------------------------------------------------------------------------- rank correlation


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given their average rank (scipy's "average").

    >>> rankdata(np.array([10, 30, 20, 20])).tolist()
    [1.0, 4.0, 2.5, 2.5]
    """
    a = np.asarray(x)
    if a.ndim != 1:
        raise InvalidArgument(f"rankdata needs a 1-D array, got shape {a.shape}")
    n = a.size
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    new_group = np.r_[True, sorted_a[1:] != sorted_a[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], n]
    average = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = average[np.cumsum(new_group) - 1]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally sized arrays (flattened): the Pearson
    correlation of their average-tie ranks. NaN when either is constant (as scipy).

    >>> spearman(np.array([1, 2, 3, 4]), np.array([1, 4, 9, 16]))
    1.0
    """
    x, y = np.asarray(a).ravel(), np.asarray(b).ravel()
    if x.shape != y.shape or x.size < 2:
        raise InvalidArgument(f"spearman needs two arrays of the same size >= 2, got {x.size} and {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InvalidArgument("spearman inputs must be finite (no NaN/Inf)")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = np.sqrt(np.dot(rx, rx) * np.dot(ry, ry))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(rx, ry) / denom, -1.0, 1.0))


# --------------------------------------------------------------------------- sanity check


@dataclass(frozen=True)
class SanityResult:
    """Outcome of :func:`sanity_check`.

    ``correlations``: Spearman correlation per image (NaN where a map is constant);
    ``mean``: their mean over the defined ones (NaN if none); ``randomized``: the layers
    re-initialised, as paths ("outer/inner" for nested models), top first.
    """

    correlations: np.ndarray
    mean: float
    randomized: tuple[str, ...]


def _initializer_for(layer: Any, weight_name: str) -> Any:
    candidates = [f"{weight_name}_initializer", f"{weight_name.removesuffix('_kernel')}_initializer"]
    if weight_name == "kernel":
        candidates.append("depthwise_initializer")  # DepthwiseConv2D names its kernel "kernel"
    for attr in candidates:
        init = getattr(layer, attr, None)
        if init is not None and hasattr(init, "get_config"):
            return init
    return None


def _reinitialize(layer: Any, rng: np.random.Generator, reinit: str, normal_stddev: float) -> None:
    import keras

    for var in layer.weights:
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        seed = int(rng.integers(2**31 - 1))
        init = _initializer_for(layer, var.name) if reinit == "initializer" else None
        if init is not None:
            config = init.get_config()
            if "seed" in config:
                init = type(init).from_config({**config, "seed": seed})
            value = keras.ops.convert_to_numpy(init(shape, dtype=str(dtype)))
        else:
            value = np.random.default_rng(seed).normal(0.0, normal_stddev, shape)
        var.assign(value.astype(dtype))


def randomized_copy(
    model: keras.Model,
    layers_to_randomize: int | Sequence[str] = 1,
    seed: int = 0,
    reinit: Literal["initializer", "normal"] = "initializer",
    normal_stddev: float = 0.01,
) -> tuple[keras.Model, tuple[str, ...]]:
    """A copy of ``model`` (``clone_model`` + ``set_weights``) whose top layers are re-initialised;
    the model itself is untouched. Returns (copy, paths of the re-initialised layers).

    ``layers_to_randomize``: n = the last n layers with weights (cascading from the output;
    0 gives an exact copy), or layer paths ("outer/inner" inside nested models).
    ``reinit="initializer"`` draws each weight from its layer's own initializer re-seeded from
    ``seed`` (a weight with no known initializer falls back to the normal);
    ``reinit="normal"`` draws N(0, normal_stddev^2).

    >>> copy, names = randomized_copy(model, 2)   # doctest: +SKIP
    >>> names                                      # doctest: +SKIP
    ('dense', 'conv2d_1')
    """
    import keras

    from camserve.keras_graph import weighted_layers

    if reinit not in ("initializer", "normal"):
        raise InvalidArgument(f"reinit must be 'initializer' or 'normal', got {reinit!r}")
    if not normal_stddev > 0:
        raise InvalidArgument(f"normal_stddev must be > 0, got {normal_stddev}")
    paths = [p for p, _ in weighted_layers(model)]
    if isinstance(layers_to_randomize, (int, np.integer)):
        if not 0 <= layers_to_randomize <= len(paths):
            raise InvalidArgument(
                f"layers_to_randomize must be in 0..{len(paths)} (the model's layers with weights), "
                f"got {layers_to_randomize}"
            )
        chosen = list(range(len(paths) - 1, len(paths) - 1 - int(layers_to_randomize), -1))
    else:
        names = [layers_to_randomize] if isinstance(layers_to_randomize, str) else list(layers_to_randomize)
        unknown = [n for n in names if n not in paths]
        if unknown:
            raise InvalidArgument(f"unknown layer(s) {unknown}; layers with weights are: {paths}")
        chosen = sorted({paths.index(n) for n in names}, reverse=True)
    try:
        copy = keras.models.clone_model(model)
    except Exception as exc:  # subclassed models without get_config/from_config
        raise InvalidArgument(f"cannot copy model {model.name!r} with keras.models.clone_model: {exc}") from exc
    copy.set_weights(model.get_weights())
    copy_layers = [layer for _, layer in weighted_layers(copy)]
    if len(copy_layers) != len(paths):
        raise InvalidArgument(f"the clone of {model.name!r} does not mirror its layers; cannot randomize it")
    rng = np.random.default_rng(seed)
    for index in chosen:
        _reinitialize(copy_layers[index], rng, reinit, normal_stddev)
    return copy, tuple(paths[i] for i in chosen)


def sanity_check(
    model: keras.Model,
    explain_fn: ExplainFn,
    images: np.ndarray,
    layers_to_randomize: int | Sequence[str] = 1,
    seed: int = 0,
    reinit: Literal["initializer", "normal"] = "initializer",
    normal_stddev: float = 0.01,
) -> SanityResult:
    """Model-randomization test (Adebayo et al. 2018): Spearman correlation, per image,
    between ``explain_fn(model, images)`` and ``explain_fn(copy, images)`` where ``copy`` has its
    top layers re-initialised (see :func:`randomized_copy`). An explanation that passes the
    test shows low correlation once layers are randomized. ``explain_fn`` returns maps with a
    leading image axis, e.g. (N, H, W); fix its target classes so both models explain the same
    class (take absolute values inside it to test the absolute-value variant).

    >>> res = sanity_check(model, saliency, images, layers_to_randomize=2)   # doctest: +SKIP
    >>> res.mean < 0.5                                                       # doctest: +SKIP
    True
    """
    imgs = np.asarray(images)
    copy, randomized = randomized_copy(model, layers_to_randomize, seed, reinit, normal_stddev)
    before = np.asarray(explain_fn(model, imgs))
    after = np.asarray(explain_fn(copy, imgs))
    if before.shape != after.shape or before.ndim < 2 or before.shape[0] != len(imgs):
        raise InvalidArgument(
            f"explain_fn must return one map per image, (N={len(imgs)}, H, W), for both models; "
            f"got {before.shape} and {after.shape}"
        )
    corr = np.array([spearman(b, a) for b, a in zip(before, after)], dtype=np.float64)
    defined = corr[~np.isnan(corr)]
    mean = float(defined.mean()) if defined.size else float("nan")
    return SanityResult(correlations=corr, mean=mean, randomized=randomized)
