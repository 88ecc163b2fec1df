"""Receptive-field analysis of a classifier's backbone, and the graph and head it is read from.

Per axis (y, x), the stride of the backbone output and the size of the input window each of
its positions sees, followed layer by layer over the flattened graph
(:mod:`camserve.keras_graph`) up to the classifier head (:mod:`camserve.explain.heads`). One
FCN pass over a large input equals the classifier on every crop at the stride only when no
layer before the head pads, crops or pools globally: :func:`analyze` says whether that holds
(``exact``) and why not (``reasons``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from camserve import keras_graph
from camserve.errors import InvalidArgument
from camserve.explain.heads import (
    GLOBAL_POOL,
    POINTWISE,
    WINDOWED,
    Head,
    UnsupportedHead,
    check_channels_last,
    find_head,
)
from camserve.keras_graph import Graph, Op, UnsupportedGraph

__all__ = ["ConversionError", "ReceptiveField", "analyze"]


class ConversionError(InvalidArgument):
    """A model (or one of its layers) that cannot be made fully convolutional."""


@contextlib.contextmanager
def converting() -> Iterator[None]:
    """Raise the graph walker's and the head finder's errors as :class:`ConversionError`."""
    try:
        yield
    except (UnsupportedGraph, UnsupportedHead) as exc:
        raise ConversionError(str(exc)) from exc


def classifier_graph(model: Any) -> tuple[Graph, Head]:
    """The flattened graph of ``model`` (nested models inlined) and its classifier head."""
    with converting():
        graph = keras_graph.walk(model).graph()
        return graph, find_head(graph)


def analyze(model: Any) -> ReceptiveField:
    """Receptive field of the backbone (everything before the classifier head).

    >>> rf = analyze(keras.applications.VGG16(weights=None))   # doctest: +SKIP
    >>> rf.stride, rf.exact                                     # doctest: +SKIP
    ((32, 32), False)
    """
    graph, head = classifier_graph(model)
    with converting():
        geo, reasons = analyze_ops(graph, head.feature_key)
    return field_of(geo[head.feature_key], reasons, (1, 1))


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Geometry of a backbone output (or of an FCN's score grid), per axis (y, x).

    ``stride``: input pixels between neighbouring outputs. ``size``: receptive-field size in
    pixels, None where a layer pools over the whole input. ``exact``: no layer pads, crops,
    pools globally or is unknown, so one pass over a large input equals the network on every
    crop at the stride. ``reasons``: why not exact.
    """

    stride: tuple[int, int]
    size: tuple[int, int] | None
    exact: bool
    reasons: tuple[str, ...] = ()


@dataclasses.dataclass
class _Geo:
    jump: tuple[int, int]
    rf: tuple[float, float]  # math.inf: pools over the whole input


def pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _spatial(shape: tuple) -> tuple | None:
    return tuple(shape[1:3]) if len(shape) == 4 else None


def _windowed(op: Op, g: _Geo, reasons: list[str]) -> _Geo:
    layer = op.layer
    if op.kind.endswith("Pooling2D"):
        k = pair(layer.pool_size)
        s = pair(layer.strides if layer.strides is not None else layer.pool_size)
        d = (1, 1)
    else:
        k, s, d = pair(layer.kernel_size), pair(layer.strides), pair(layer.dilation_rate)
    keff = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))
    padding = str(layer.padding).lower()
    if padding not in ("valid", "same"):
        raise ConversionError(f"layer {op.describe()} has padding={padding!r}; allowed: valid, same")
    if padding == "same" and max(keff) > 1:
        reasons.append(f"{op.describe()} pads (padding='same', kernel {keff[0]}x{keff[1]})")
    rf = tuple(r + (ke - 1) * j for r, ke, j in zip(g.rf, keff, g.jump))
    jump = tuple(j * si for j, si in zip(g.jump, s))
    return _Geo(jump, rf)  # type: ignore[arg-type]


def analyze_ops(graph: Graph, stop: int | None) -> tuple[dict[int, _Geo | None], list[str]]:
    """Geometry of every tensor up to tensor ``stop`` (None: all). ``None`` marks a global
    (non-spatial) tensor."""
    geo: dict[int, _Geo | None] = {k: _Geo((1, 1), (1, 1)) for k in graph.inputs}
    reasons: list[str] = []
    for op in graph.ops:
        if any(k not in geo for k in op.inputs):
            continue
        ins = [geo[k] for k in op.inputs]
        spatial_in = [g for g in ins if g is not None]
        kind = op.kind
        if not spatial_in:  # only global tensors in (a squeeze-excite branch): stays global
            out: _Geo | None = None
        else:
            check_channels_last(op)
            if kind in WINDOWED:
                out = _windowed(op, spatial_in[0], reasons)
            elif kind in GLOBAL_POOL:
                reasons.append(f"{op.describe()} pools over the whole input inside the backbone")
                out = None
            elif kind in ("Flatten", "Reshape"):
                raise ConversionError(
                    f"layer {op.describe()} reshapes spatial features inside the backbone; "
                    "only the head may flatten or pool globally"
                )
            elif kind in ("ZeroPadding2D", "Cropping2D"):
                verb = "pads" if kind == "ZeroPadding2D" else "crops"
                reasons.append(f"{op.describe()} {verb} the input border")
                out = spatial_in[0]
            else:
                sp_in = [_spatial(s) for s in op.in_shapes]
                sp_out = [_spatial(s) for s in op.out_shapes]
                same_size = all(s is not None for s in sp_out) and all(
                    s is None or s == sp_out[0] or s == (1, 1) for s in sp_in
                )
                if kind not in POINTWISE:
                    if not same_size:
                        raise ConversionError(
                            f"cannot follow the receptive field through layer {op.describe()}: "
                            "allowed are convolutions, pooling, padding/cropping and layers that "
                            "keep the spatial size"
                        )
                    reasons.append(f"{op.describe()} is not a known layer; treated as pointwise")
                axis = getattr(op.layer, "axis", -1)
                if kind in (
                    "Concatenate",
                    "Softmax",
                    "LayerNormalization",
                    "BatchNormalization",
                    "Normalization",
                    "UnitNormalization",
                    "GroupNormalization",
                ):
                    axes = axis if isinstance(axis, (list, tuple)) else [axis]
                    if any(a not in (-1, 3) for a in axes):
                        raise ConversionError(
                            f"layer {op.describe()} works on axis {axis}; inside the backbone only "
                            "the channel axis (-1) is allowed"
                        )
                jumps = {g.jump for g in spatial_in}
                if len(jumps) > 1:
                    raise ConversionError(f"layer {op.describe()} merges features at different strides {sorted(jumps)}")
                rf = tuple(max(g.rf[i] for g in spatial_in) for i in range(2))
                if len(spatial_in) < len(ins):
                    reasons.append(f"{op.describe()} mixes in a globally pooled branch")
                    rf = (math.inf, math.inf)
                out = _Geo(spatial_in[0].jump, rf)  # type: ignore[arg-type]
        for k in op.outputs:
            geo[k] = out
        if stop is not None and stop in op.outputs:
            break
    return geo, reasons


def field_of(g: _Geo | None, reasons: list[str], head_kernel: tuple[int, int]) -> ReceptiveField:
    if g is None:
        raise ConversionError("the backbone output is not spatial (it was pooled globally before the head)")
    rf = tuple(r + (k - 1) * j for r, k, j in zip(g.rf, head_kernel, g.jump))
    size = None if any(math.isinf(r) for r in rf) else (int(rf[0]), int(rf[1]))
    return ReceptiveField(stride=g.jump, size=size, exact=not reasons, reasons=tuple(reasons))
