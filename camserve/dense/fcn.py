"""Classifier heads turned into convolutions, and receptive-field analysis.

A Dense layer after ``Flatten`` of an ``h×w×c`` volume is an ``h×w`` convolution with no
padding; every later Dense is a ``1×1`` convolution. A ``GlobalAveragePooling2D → Dense`` head
becomes either per-location class maps (the Dense as a ``1×1`` convolution before the pooling,
CAM) or a window model (the global pool replaced by a ``k×k`` average pool with stride 1).
The result is a :class:`FullyConvolutional` that accepts any input at least as large as the
training size and outputs one score vector per window position, at the total stride.

One FCN pass equals the classifier on every crop only when no layer before the head pads;
:func:`analyze` says whether that holds (``exact``) and why not.

>>> fcn = to_fully_convolutional(model)                        # doctest: +SKIP
>>> fcn.stride, fcn.window, fcn.exact                          # doctest: +SKIP
((32, 32), (224, 224), False)
>>> fcn.model.predict_on_batch(x384).shape                     # doctest: +SKIP
(1, 6, 6, 1000)

Backbone layers are reused (their weights are shared with the source model, not copied);
head layers are rebuilt with their weights copied exactly. Nested models (a
``keras.applications`` backbone inside a Sequential or functional model) are inlined.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from camserve.errors import InvalidArgument

__all__ = [
    "ConversionError",
    "FullyConvolutional",
    "ReceptiveField",
    "HEADS",
    "analyze",
    "layer_flops",
    "to_fully_convolutional",
]

HEADS = ("window", "classmap")


class ConversionError(InvalidArgument):
    """A model (or one of its layers) that cannot be made fully convolutional."""


# --------------------------------------------------------------------------------------------
# A flat view of a (possibly nested) Keras model graph.


@dataclasses.dataclass
class _Op:
    """One layer call in the flattened graph; tensors are identified by integer keys."""

    layer: Any
    node: Any  # keras Node: its ``arguments`` rebuild the call on new tensors
    inputs: list[int]
    outputs: list[int]
    in_shapes: list[tuple]
    out_shapes: list[tuple]
    path: str  # "outer/inner/layer" for layers of nested models

    @property
    def kind(self) -> str:
        """The Keras class the layer is (or derives from), e.g. "Conv2D" for a subclass of it."""
        for cls in type(self.layer).__mro__:
            if cls.__module__.startswith("keras."):
                return cls.__name__
        return type(self.layer).__name__

    def describe(self) -> str:
        return f"'{self.path}' ({self.kind})"


@dataclasses.dataclass
class _Graph:
    ops: list[_Op]
    inputs: list[int]
    outputs: list[int]
    input_shapes: list[tuple]
    output_shapes: list[tuple]

    def producer(self) -> dict[int, _Op]:
        return {k: op for op in self.ops for k in op.outputs}


def _is_model(obj: Any) -> bool:
    import keras

    return isinstance(obj, keras.Model)


def _graph_of(model: Any) -> Any:
    """The Functional object holding ``model``'s nodes (a Sequential wraps one)."""
    import keras

    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise ConversionError(f"Sequential model '{model.name}' is not built: give it an Input or build it first")
        return functional
    if not hasattr(model, "_nodes_by_depth"):
        raise ConversionError(
            f"model '{model.name}' ({type(model).__name__}) is a subclassed model; only Sequential "
            "and functional models (nested ones included) can be converted"
        )
    return model


def _flatten_graph(model: Any) -> _Graph:
    """Inline nested models into one topologically ordered list of layer calls."""
    alias: dict[int, int] = {}
    seen: set[int] = set()
    ops: list[_Op] = []

    def key(t: Any) -> int:
        k = id(t)
        while k in alias:
            k = alias[k]
        return k

    def visit(m: Any, prefix: str) -> None:
        if id(m) in seen:
            raise ConversionError(f"model '{m.name}' is called more than once; shared nested models are not supported")
        seen.add(id(m))
        g = _graph_of(m)
        for depth in sorted(g._nodes_by_depth, reverse=True):
            for node in g._nodes_by_depth[depth]:
                op = node.operation
                if not op or node.is_input:
                    continue
                if _is_model(op):
                    inner = _graph_of(op)
                    if len(inner.inputs) != len(node.input_tensors):
                        raise ConversionError(
                            f"nested model '{prefix}{op.name}' takes {len(inner.inputs)} inputs but "
                            f"is called with {len(node.input_tensors)}"
                        )
                    for t_in, t_out in zip(inner.inputs, node.input_tensors):
                        alias[id(t_in)] = key(t_out)
                    visit(op, f"{prefix}{op.name}/")
                    for t_out, t_in in zip(node.outputs, inner.outputs):
                        alias[id(t_out)] = key(t_in)
                    continue
                ops.append(
                    _Op(
                        layer=op,
                        node=node,
                        inputs=[key(t) for t in node.input_tensors],
                        outputs=[id(t) for t in node.outputs],
                        in_shapes=[tuple(t.shape) for t in node.input_tensors],
                        out_shapes=[tuple(t.shape) for t in node.outputs],
                        path=f"{prefix}{op.name}",
                    )
                )

    g = _graph_of(model)
    visit(model, "")
    return _Graph(
        ops=ops,
        inputs=[key(t) for t in g.inputs],
        outputs=[key(t) for t in g.outputs],
        input_shapes=[tuple(t.shape) for t in g.inputs],
        output_shapes=[tuple(t.shape) for t in g.outputs],
    )


def _call(op: _Op, values: dict[int, Any], fn: Callable[..., Any] | None = None) -> None:
    """Re-run ``op`` on new tensors (``values`` keyed like ``op.inputs``), with ``fn`` in place
    of the layer if given; record its outputs in ``values``."""
    import keras

    lookup = {id(t): values[k] for t, k in zip(op.node.input_tensors, op.inputs)}
    args, kwargs = op.node.arguments.fill_in(lookup)
    out = (fn or op.layer)(*args, **kwargs)
    flat = keras.tree.flatten(out)
    for k, v in zip(op.outputs, flat):
        values[k] = v


# --------------------------------------------------------------------------------------------
# Receptive-field analysis.

_POINTWISE = frozenset(
    {
        # layers
        "Activation",
        "ReLU",
        "LeakyReLU",
        "ELU",
        "PReLU",
        "Softmax",
        "Rescaling",
        "Normalization",
        "BatchNormalization",
        "LayerNormalization",
        "UnitNormalization",
        "GroupNormalization",
        "Dropout",
        "SpatialDropout2D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "Identity",
        "ActivityRegularization",
        "Add",
        "Subtract",
        "Multiply",
        "Average",
        "Maximum",
        "Minimum",
        "Concatenate",
        "InputLayer",
        # keras.ops operations that appear as graph nodes
        "Divide",
        "TrueDivide",
        "Power",
        "Relu",
        "Relu6",
        "Sigmoid",
        "HardSigmoid",
        "Tanh",
        "Silu",
        "Swish",
        "HardSilu",
        "HardSwish",
        "Gelu",
        "Elu",
        "Selu",
        "Softplus",
        "Exp",
        "Log",
        "Sqrt",
        "Abs",
        "Negative",
        "Square",
        "Clip",
        "Cast",
    }
)
_WINDOWED = frozenset({"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"})
_GLOBAL_POOL = frozenset({"GlobalAveragePooling2D", "GlobalMaxPooling2D"})
_DROP = frozenset(
    {
        "Dropout",
        "SpatialDropout2D",
        "GaussianNoise",
        "GaussianDropout",
        "AlphaDropout",
        "Identity",
        "ActivityRegularization",
    }
)
_ACTIVATIONS = frozenset({"Activation", "ReLU", "LeakyReLU", "ELU", "Softmax"})
_HEAD_OK = frozenset({"Dense", "BatchNormalization"}) | _DROP | _ACTIVATIONS


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


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _spatial(shape: tuple) -> tuple | None:
    return tuple(shape[1:3]) if len(shape) == 4 else None


def _check_channels_last(op: _Op) -> None:
    fmt = getattr(op.layer, "data_format", None)
    if fmt not in (None, "channels_last"):
        raise ConversionError(f"layer {op.describe()} uses data_format={fmt!r}; only channels_last is supported")


def _windowed(op: _Op, g: _Geo, reasons: list[str]) -> _Geo:
    layer = op.layer
    if op.kind.endswith("Pooling2D"):
        k = _pair(layer.pool_size)
        s = _pair(layer.strides if layer.strides is not None else layer.pool_size)
        d = (1, 1)
    else:
        k, s, d = _pair(layer.kernel_size), _pair(layer.strides), _pair(layer.dilation_rate)
    keff = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))
    padding = str(layer.padding).lower()
    if padding not in ("valid", "same"):
        raise ConversionError(f"layer {op.describe()} has padding={padding!r}; allowed: valid, same")
    if padding == "same" and max(keff) > 1:
        reasons.append(f"{op.describe()} pads (padding='same', kernel {keff[0]}x{keff[1]})")
    rf = tuple(r + (ke - 1) * j for r, ke, j in zip(g.rf, keff, g.jump))
    jump = tuple(j * si for j, si in zip(g.jump, s))
    return _Geo(jump, rf)  # type: ignore[arg-type]


def _analyze_ops(graph: _Graph, stop: int | None) -> tuple[dict[int, _Geo | None], list[str]]:
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
            _check_channels_last(op)
            if kind in _WINDOWED:
                out = _windowed(op, spatial_in[0], reasons)
            elif kind in _GLOBAL_POOL:
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
                if kind not in _POINTWISE:
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


# --------------------------------------------------------------------------------------------
# Head detection.


@dataclasses.dataclass
class _Head:
    start: _Op  # Flatten / GlobalAveragePooling2D / GlobalMaxPooling2D
    chain: list[_Op]  # the layers after ``start``, in forward order
    feature_key: int  # the backbone output tensor (input of ``start``)
    feature_shape: tuple  # (N, h, w, c) at the training input size


def _find_head(graph: _Graph) -> _Head:
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ConversionError(
            f"model has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
            "a classifier with one image input and one output is required"
        )
    if len(graph.input_shapes[0]) != 4:
        raise ConversionError(f"model input has shape {graph.input_shapes[0]}; an image input (N, H, W, C) is required")
    producer = graph.producer()
    chain: list[_Op] = []
    k = graph.outputs[0]
    while True:
        op = producer.get(k)
        if op is None:
            raise ConversionError(
                "no Flatten, GlobalAveragePooling2D or GlobalMaxPooling2D found between the input "
                "and the output: nothing to convert"
            )
        kind = op.kind
        if len(op.inputs) != 1:
            raise ConversionError(
                f"cannot convert head layer {op.describe()}: it has {len(op.inputs)} inputs; "
                "the head must be a single chain of Dense, Dropout, BatchNormalization and "
                "activation layers after Flatten or global pooling"
            )
        in_shape = op.in_shapes[0]
        flatten_of_pooled = (
            kind == "Flatten"
            and len(in_shape) == 4
            and tuple(in_shape[1:3]) == (1, 1)
            and producer.get(op.inputs[0]) is not None
            and producer[op.inputs[0]].kind in _GLOBAL_POOL
        )
        if kind in _GLOBAL_POOL or (kind == "Flatten" and not flatten_of_pooled):
            if len(in_shape) != 4:
                source = producer.get(op.inputs[0])
                origin = f" from {source.describe()}" if source is not None else ""
                raise ConversionError(
                    f"cannot convert head layer {op.describe()}: it gets shape {in_shape}{origin}; "
                    "Flatten or global pooling of (N, h, w, c) features expected"
                )
            _check_channels_last(op)
            chain.reverse()
            return _Head(start=op, chain=chain, feature_key=op.inputs[0], feature_shape=in_shape)
        if kind in _HEAD_OK or flatten_of_pooled:
            if kind == "Dense" and len(in_shape) not in (2, 4):
                raise ConversionError(f"head layer {op.describe()} gets shape {in_shape}")
            if kind in ("BatchNormalization", "Softmax"):
                axis = op.layer.axis
                if axis not in (-1, len(in_shape) - 1):
                    raise ConversionError(
                        f"cannot convert head layer {op.describe()}: it works on axis {axis}, "
                        "only the last axis is allowed"
                    )
            chain.append(op)
            k = op.inputs[0]
            continue
        allowed = "Dense, Dropout, BatchNormalization and activation layers"
        if kind in _WINDOWED or kind in _POINTWISE:
            raise ConversionError(
                f"no classifier head: layer {op.describe()} feeds the output without a Flatten or "
                f"global pooling; a convertible head is Flatten/GlobalAveragePooling2D/"
                f"GlobalMaxPooling2D followed by {allowed}"
            )
        raise ConversionError(
            f"cannot convert head layer {op.describe()}: after Flatten or global pooling only {allowed} are allowed"
        )


# --------------------------------------------------------------------------------------------
# Public API.


def analyze(model: Any) -> ReceptiveField:
    """Receptive field of the backbone (everything before the classifier head).

    >>> rf = analyze(keras.applications.VGG16(weights=None))   # doctest: +SKIP
    >>> rf.stride, rf.exact                                     # doctest: +SKIP
    ((32, 32), False)
    """
    graph = _flatten_graph(model)
    head = _find_head(graph)
    geo, reasons = _analyze_ops(graph, head.feature_key)
    return _field(geo[head.feature_key], reasons, (1, 1))


def _field(g: _Geo | None, reasons: list[str], head_kernel: tuple[int, int]) -> ReceptiveField:
    if g is None:
        raise ConversionError("the backbone output is not spatial (it was pooled globally before the head)")
    rf = tuple(r + (k - 1) * j for r, k, j in zip(g.rf, head_kernel, g.jump))
    size = None if any(math.isinf(r) for r in rf) else (int(rf[0]), int(rf[1]))
    return ReceptiveField(stride=g.jump, size=size, exact=not reasons, reasons=tuple(reasons))


@dataclasses.dataclass
class FullyConvolutional:
    """A classifier turned into a fully convolutional network.

    ``model``: Keras model from (N, H, W, C) of any size ≥ ``window`` to (N, gh, gw, classes).
    ``head``: "window" (cell (i, j) scores the window at (i·stride, j·stride) of size
    ``window``) or "classmap" (per-location class scores at the feature resolution, bias
    excluded, no activation: their spatial mean plus ``bias`` is the logits).
    ``exact``: a window-model pass equals the classifier on every crop (see ``reasons``).
    ``logits``: the final activation (e.g. softmax) was removed.
    """

    model: Any
    head: str
    window: tuple[int, int]
    stride: tuple[int, int]
    receptive_field: tuple[int, int] | None
    exact: bool
    reasons: tuple[str, ...]
    logits: bool
    feature_size: tuple[int, int]
    bias: np.ndarray | None = None
    source: Any = None

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Number of complete windows along each axis for an input of this size.

        >>> fcn.grid_shape(384, 384)   # doctest: +SKIP
        (6, 6)
        """
        if self.head != "window":
            raise InvalidArgument("grid_shape is defined for window models; this is a class-map model")
        return tuple(  # type: ignore[return-value]
            (n - w) // s + 1 if n >= w else 0 for n, w, s in zip((height, width), self.window, self.stride)
        )


def to_fully_convolutional(
    model: Any,
    head: str = "window",
    logits: bool = False,
    input_size: tuple[int, int] | None = None,
) -> FullyConvolutional:
    """Turn a Flatten→Dense… or GlobalPooling→Dense… classifier into a fully convolutional model.

    ``head="window"`` (any supported head) scores every window of the training size;
    ``head="classmap"`` (GlobalAveragePooling2D → Dense only) gives CAM class maps.
    ``logits=True`` drops the final activation (softmax scores across the grid's channels
    otherwise). ``input_size`` (h, w) is needed only when the model input has no fixed size.

    >>> fcn = to_fully_convolutional(keras.applications.VGG16(weights=None))  # doctest: +SKIP
    >>> fcn.model.predict_on_batch(np.zeros((1, 384, 384, 3))).shape           # doctest: +SKIP
    (1, 6, 6, 1000)
    """
    import keras

    if head not in HEADS:
        raise InvalidArgument(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
    graph = _flatten_graph(model)
    found = _find_head(graph)
    geo, reasons = _analyze_ops(graph, found.feature_key)
    window, feature_size = _training_sizes(model, graph, found, input_size)

    in_shape = graph.input_shapes[0]
    channels = in_shape[3]
    src_input = model.inputs[0] if getattr(model, "inputs", None) else None
    new_input = keras.Input(
        shape=(None, None, channels), dtype=getattr(src_input, "dtype", "float32"), name=f"{model.name}_fcn_input"
    )
    values: dict[int, Any] = {graph.inputs[0]: new_input}
    head_ops = {id(found.start)} | {id(op) for op in found.chain}
    for op in graph.ops:
        if id(op) in head_ops or any(k not in values for k in op.inputs):
            continue
        _call(op, values, None)
        if found.feature_key in values:
            break
    features = values[found.feature_key]

    if head == "classmap":
        out, bias = _classmap_head(found, features)
        field = _field(geo[found.feature_key], reasons, (1, 1))
    else:
        out = _window_head(found, features, feature_size, logits)
        bias = None
        field = _field(geo[found.feature_key], reasons, feature_size)
    fcn_model = keras.Model(new_input, out, name=f"{model.name}_fcn")
    return FullyConvolutional(
        model=fcn_model,
        head=head,
        window=window,
        stride=field.stride,
        receptive_field=field.size,
        exact=field.exact,
        reasons=field.reasons,
        logits=logits or head == "classmap",
        feature_size=feature_size,
        bias=bias,
        source=model,
    )


def _training_sizes(
    model: Any, graph: _Graph, found: _Head, input_size: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window (H, W) of the classifier input, feature size (h, w) at that input)."""
    shape = graph.input_shapes[0]
    fixed = None if shape[1] is None or shape[2] is None else (int(shape[1]), int(shape[2]))
    window = fixed or (None if input_size is None else _pair(input_size))
    if window is None:
        raise ConversionError(
            f"model '{model.name}' has input shape {shape} with no fixed size; pass input_size=(h, w), "
            "the size it was trained on"
        )
    if fixed and input_size is not None and _pair(input_size) != fixed:
        raise ConversionError(f"input_size {tuple(input_size)} differs from the model's input size {fixed}")
    fshape = found.feature_shape
    if fshape[1] is not None and fshape[2] is not None:
        return window, (int(fshape[1]), int(fshape[2]))
    # Free-size backbone: measure the features at the training size.
    import keras

    probe = keras.Input(shape=(window[0], window[1], shape[3]))
    values: dict[int, Any] = {graph.inputs[0]: probe}
    for op in graph.ops:
        if op is found.start:
            break
        if all(k in values for k in op.inputs):
            _call(op, values, None)
    fs = values[found.feature_key].shape
    return window, (int(fs[1]), int(fs[2]))


def _slice_end(offset: int, kernel: int) -> int | None:
    """End index that leaves ``kernel - 1 - offset`` trailing positions out (None: to the end)."""
    trailing = kernel - 1 - offset
    return -trailing if trailing else None


def _dense_conv_class() -> type:
    """:class:`DenseConv2D`, defined on first use so that importing camserve.dense.fcn stays light."""
    global _DENSE_CONV
    if _DENSE_CONV is None:
        import keras

        @keras.saving.register_keras_serializable(package="camserve")
        class DenseConv2D(keras.layers.Conv2D):
            """A valid, stride-1 Conv2D computed as one matrix product: the kh×kw shifted
            views of the input are concatenated along channels ((u, v, c) order, the kernel's
            own layout) and multiplied by the kernel reshaped to (kh·kw·c, filters). The same
            numbers as Conv2D up to float rounding, several times faster on CPU than
            TensorFlow's direct convolution for the large kernels of Dense layers converted
            after Flatten (e.g. VGG16's fc1, 7×7×512 → 4096), and the same product the
            classifier's Dense computes on each crop.
            """

            def convolution_op(self, inputs: Any, kernel: Any) -> Any:
                kh, kw = self.kernel_size
                views = [
                    inputs[:, u : _slice_end(u, kh), v : _slice_end(v, kw), :] for u in range(kh) for v in range(kw)
                ]
                patches = keras.ops.concatenate(views, axis=-1)
                flat = keras.ops.reshape(kernel, (-1, kernel.shape[-1]))
                return keras.ops.tensordot(patches, flat, axes=1)

        _DENSE_CONV = DenseConv2D
    return _DENSE_CONV


_DENSE_CONV: type | None = None


def _dense_as_conv(dense: Any, kernel_hw: tuple[int, int], channels: int, linear: bool, use_bias: bool = True) -> Any:
    """A Conv2D computing ``dense`` on an ``kernel_hw × channels`` window; weights copied."""
    import keras

    kernel = keras.ops.convert_to_numpy(dense.kernel)
    units = kernel.shape[-1]
    expected = kernel_hw[0] * kernel_hw[1] * channels
    if kernel.shape[0] != expected:
        raise ConversionError(
            f"Dense '{dense.name}' has {kernel.shape[0]} inputs but the features are "
            f"{kernel_hw[0]}x{kernel_hw[1]}x{channels} = {expected}"
        )
    has_bias = use_bias and dense.use_bias
    layer_class = keras.layers.Conv2D if kernel_hw == (1, 1) else _dense_conv_class()
    conv = layer_class(
        units,
        kernel_hw,
        padding="valid",
        activation=None if linear else dense.activation,
        use_bias=has_bias,
        name=dense.name,
        dtype=dense.dtype_policy,
    )
    conv.build((None, None, None, channels))
    weights = [kernel.reshape(kernel_hw[0], kernel_hw[1], channels, units)]
    if has_bias:
        weights.append(keras.ops.convert_to_numpy(dense.bias))
    conv.set_weights(weights)
    return conv


def _copy_batchnorm(bn: Any, channels: int) -> Any:
    import keras

    config = dict(bn.get_config(), axis=-1)
    copy = keras.layers.BatchNormalization.from_config(config)
    copy.build((None, None, None, channels))
    copy.set_weights(bn.get_weights())
    return copy


def _final_activation_index(chain: list[_Op]) -> int:
    """Index in ``chain`` of the last Dense; layers after it must be activations/dropout."""
    last = max((i for i, op in enumerate(chain) if op.kind == "Dense"), default=None)
    if last is None:
        raise ConversionError("the head has no Dense layer")
    for op in chain[last + 1 :]:
        if op.kind not in _ACTIVATIONS and op.kind not in _DROP:
            raise ConversionError(
                f"logits=True: cannot drop the final activation because {op.describe()} follows "
                "the last Dense; only activation and dropout layers may follow it"
            )
    return last


def _window_head(found: _Head, x: Any, feature_size: tuple[int, int], logits: bool) -> Any:
    import keras

    start = found.start
    channels = int(found.feature_shape[3])
    if start.kind == "GlobalAveragePooling2D":
        x = keras.layers.AveragePooling2D(feature_size, strides=1, padding="valid", name=f"{start.layer.name}_window")(
            x
        )
        kernel_hw = (1, 1)
    elif start.kind == "GlobalMaxPooling2D":
        x = keras.layers.MaxPooling2D(feature_size, strides=1, padding="valid", name=f"{start.layer.name}_window")(x)
        kernel_hw = (1, 1)
    else:  # Flatten: the first Dense sees the whole h×w×c volume
        kernel_hw = feature_size
    last_dense = _final_activation_index(found.chain) if logits else -1
    for i, op in enumerate(found.chain):
        kind = op.kind
        if kind in _DROP or kind == "Flatten":
            continue
        if logits and i > last_dense and kind in _ACTIVATIONS:
            continue
        if kind == "Dense":
            x = _dense_as_conv(op.layer, kernel_hw, channels, linear=logits and i == last_dense)(x)
            channels, kernel_hw = int(op.layer.units), (1, 1)
        elif kernel_hw != (1, 1):
            raise ConversionError(
                f"cannot convert head layer {op.describe()}: between Flatten and the first Dense "
                "only dropout is allowed (it would act on each flattened position separately)"
            )
        elif kind == "BatchNormalization":
            x = _copy_batchnorm(op.layer, channels)(x)
        else:  # activation layers work on the last axis / elementwise: reuse as is
            x = op.layer(x)
    return x


def _classmap_head(found: _Head, x: Any) -> tuple[Any, np.ndarray]:
    import keras

    start = found.start
    if start.kind != "GlobalAveragePooling2D":
        raise ConversionError(
            f"class maps need a GlobalAveragePooling2D → Dense head; {start.describe()} starts this "
            "head (use head='window')"
        )
    dense_ops = [op for op in found.chain if op.kind == "Dense"]
    if len(dense_ops) != 1:
        raise ConversionError(
            f"class maps need exactly one Dense after {start.describe()}; found {len(dense_ops)} (use head='window')"
        )
    for op in found.chain:
        if op.kind in _DROP or op.kind in ("Dense", "Flatten"):
            continue
        if op.kind in _ACTIVATIONS and found.chain.index(op) > found.chain.index(dense_ops[0]):
            continue
        raise ConversionError(
            f"class maps: cannot fold head layer {op.describe()}; only dropout may sit between "
            f"{start.describe()} and the Dense, and only activations after it (use head='window')"
        )
    dense = dense_ops[0].layer
    channels = int(found.feature_shape[3])
    conv = _dense_as_conv(dense, (1, 1), channels, linear=True, use_bias=False)
    bias = (
        keras.ops.convert_to_numpy(dense.bias).astype(np.float32)
        if dense.use_bias
        else np.zeros(int(dense.units), np.float32)
    )
    return conv(x), bias


def layer_flops(model: Any, input_shape: Sequence[int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of the Conv2D / DepthwiseConv2D / SeparableConv2D / Dense
    layers of ``model`` for one input of ``input_shape`` (H, W, C), from the layer shapes.

    >>> layer_flops(keras.applications.VGG16(weights=None), (224, 224, 3)) / 1e9   # doctest: +SKIP
    30.9...
    """
    import keras

    graph = _flatten_graph(model)
    probe = keras.Input(shape=tuple(input_shape))
    values: dict[int, Any] = {graph.inputs[0]: probe}
    total = 0
    for op in graph.ops:
        if not all(k in values for k in op.inputs):
            continue
        _call(op, values, None)
        out = values[op.outputs[0]].shape
        layer, kind = op.layer, op.kind
        if kind == "Conv2D":
            kh, kw = _pair(layer.kernel_size)
            cin = values[op.inputs[0]].shape[-1]
            total += 2 * kh * kw * cin * out[-1] * out[1] * out[2] // layer.groups
        elif kind == "DepthwiseConv2D":
            kh, kw = _pair(layer.kernel_size)
            total += 2 * kh * kw * out[-1] * out[1] * out[2]
        elif kind == "SeparableConv2D":
            kh, kw = _pair(layer.kernel_size)
            cin = values[op.inputs[0]].shape[-1]
            mid = cin * layer.depth_multiplier
            total += 2 * (kh * kw * mid + mid * out[-1]) * out[1] * out[2]
        elif kind == "Dense":
            positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
            total += 2 * values[op.inputs[0]].shape[-1] * out[-1] * positions
    return int(total)
