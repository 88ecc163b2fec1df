"""Rank correlation and the model-randomization sanity check (Adebayo et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from camserve.errors import InvalidArgument

if TYPE_CHECKING:
    import keras

from camserve.evaluation.localization import ExplainFn

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
