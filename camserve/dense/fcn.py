"""Classifier heads turned into convolutions: fully convolutional networks (FCN).

A Dense layer after ``Flatten`` of an ``h×w×c`` volume is an ``h×w`` convolution with no
padding; every later Dense is a ``1×1`` convolution. A ``GlobalAveragePooling2D → Dense`` head
becomes either per-location class maps (the Dense as a ``1×1`` convolution before the pooling,
CAM) or a window model (the global pool replaced by a ``k×k`` average pool with stride 1).
The result is a :class:`FullyConvolutional` that accepts any input at least as large as the
training size and outputs one score vector per window position, at the total stride.

One FCN pass equals the classifier on every crop only when no layer before the head pads;
:func:`analyze` (:mod:`camserve.dense.receptive_field`) says whether that holds (``exact``) and
why not. The head is the one :mod:`camserve.explain.heads` finds for CAM too.

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
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from camserve import keras_graph
from camserve.dense.receptive_field import (
    ConversionError,
    ReceptiveField,
    analyze,
    analyze_ops,
    classifier_graph,
    converting,
    field_of,
    pair,
)
from camserve.errors import InvalidArgument
from camserve.explain.heads import ACTIVATIONS, Head, UnsupportedHead, gap_dense, is_passthrough
from camserve.keras_graph import Graph, Op

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
    ``head="classmap"`` (GlobalAveragePooling2D → Dense only, BatchNormalization between folded
    in as for CAM) gives CAM class maps.
    ``logits=True`` drops the final activation (softmax scores across the grid's channels
    otherwise). ``input_size`` (h, w) is needed only when the model input has no fixed size.

    >>> fcn = to_fully_convolutional(keras.applications.VGG16(weights=None))  # doctest: +SKIP
    >>> fcn.model.predict_on_batch(np.zeros((1, 384, 384, 3))).shape           # doctest: +SKIP
    (1, 6, 6, 1000)
    """
    if head not in HEADS:
        raise InvalidArgument(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
    graph, found = classifier_graph(model)
    with converting():
        return _convert(model, graph, found, head, logits, input_size)


def _convert(
    model: Any, graph: Graph, found: Head, head: str, logits: bool, input_size: tuple[int, int] | None
) -> FullyConvolutional:
    geo, reasons = analyze_ops(graph, found.feature_key)
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
        keras_graph.call_op(op, values)
        if found.feature_key in values:
            break
    features = values[found.feature_key]

    if head == "classmap":
        out, bias = _classmap_head(found, features)
        field = field_of(geo[found.feature_key], reasons, (1, 1))
    else:
        out = _window_head(found, features, feature_size, logits)
        bias = None
        field = field_of(geo[found.feature_key], reasons, feature_size)
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
    model: Any, graph: Graph, found: Head, input_size: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(window (H, W) of the classifier input, feature size (h, w) at that input)."""
    shape = graph.input_shapes[0]
    fixed = None if shape[1] is None or shape[2] is None else (int(shape[1]), int(shape[2]))
    window = fixed or (None if input_size is None else pair(input_size))
    if window is None:
        raise ConversionError(
            f"model '{model.name}' has input shape {shape} with no fixed size; pass input_size=(h, w), "
            "the size it was trained on"
        )
    if fixed and input_size is not None and pair(input_size) != fixed:
        raise ConversionError(f"input_size {tuple(input_size)} differs from the model's input size {fixed}")
    fshape = found.feature_shape
    if fshape[1] is not None and fshape[2] is not None:
        return window, (int(fshape[1]), int(fshape[2]))
    # Free-size backbone: measure the features at the training size.
    probe = keras.Input(shape=(window[0], window[1], shape[3]))
    values: dict[int, Any] = {graph.inputs[0]: probe}
    for op in graph.ops:
        if op is found.start:
            break
        if all(k in values for k in op.inputs):
            keras_graph.call_op(op, values)
    fs = values[found.feature_key].shape
    return window, (int(fs[1]), int(fs[2]))


def _slice_end(offset: int, kernel: int) -> int | None:
    """End index that leaves ``kernel - 1 - offset`` trailing positions out (None: to the end)."""
    trailing = kernel - 1 - offset
    return -trailing if trailing else None


def _dense_conv_class() -> type:
    """:class:`DenseConv2D`, defined (and registered as serializable) on first use."""
    global _DENSE_CONV
    if _DENSE_CONV is None:

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


def _dense_as_conv(
    dense: Any, kernel_hw: tuple[int, int], channels: int, linear: bool, use_bias: bool = True, kernel: Any = None
) -> Any:
    """A Conv2D computing ``dense`` on an ``kernel_hw × channels`` window; weights copied
    (``kernel`` in place of the Dense's own, if given)."""
    kernel = keras.ops.convert_to_numpy(dense.kernel if kernel is None else kernel)
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
    config = dict(bn.get_config(), axis=-1)
    copy = keras.layers.BatchNormalization.from_config(config)
    copy.build((None, None, None, channels))
    copy.set_weights(bn.get_weights())
    return copy


def _final_activation_index(chain: list[Op]) -> int:
    """Index in ``chain`` of the last Dense; layers after it must be activations/dropout."""
    last = max((i for i, op in enumerate(chain) if op.kind == "Dense"), default=None)
    if last is None:
        raise ConversionError("the head has no Dense layer")
    for op in chain[last + 1 :]:
        if op.kind not in ACTIVATIONS and not is_passthrough(op):
            raise ConversionError(
                f"logits=True: cannot drop the final activation because {op.describe()} follows "
                "the last Dense; only activation and dropout layers may follow it"
            )
    return last


def _window_head(found: Head, x: Any, feature_size: tuple[int, int], logits: bool) -> Any:
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
        if is_passthrough(op) or kind == "Flatten":
            continue
        if logits and i > last_dense and kind in ACTIVATIONS:
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


def _classmap_head(found: Head, x: Any) -> tuple[Any, np.ndarray]:
    """The Dense as a 1×1 convolution on the features (BatchNorm between folded in), and the
    bias that makes the spatial mean of the maps the logits."""
    try:
        parts = gap_dense(found, needs="class maps")
    except UnsupportedHead as exc:
        raise ConversionError(f"{exc} (use head='window')") from exc
    channels = int(found.feature_shape[3])
    kernel = parts.kernel() if parts.norms else None
    conv = _dense_as_conv(parts.dense.layer, (1, 1), channels, linear=True, use_bias=False, kernel=kernel)
    return conv(x), parts.bias()


def layer_flops(model: Any, input_shape: Sequence[int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of the Conv2D / DepthwiseConv2D / SeparableConv2D / Dense
    layers of ``model`` for one input of ``input_shape`` (H, W, C), from the layer shapes.

    >>> layer_flops(keras.applications.VGG16(weights=None), (224, 224, 3)) / 1e9   # doctest: +SKIP
    30.9...
    """
    with converting():
        graph = keras_graph.walk(model).graph()
    probe = keras.Input(shape=tuple(input_shape))
    values: dict[int, Any] = {graph.inputs[0]: probe}
    total = 0
    for op in graph.ops:
        if not all(k in values for k in op.inputs):
            continue
        keras_graph.call_op(op, values)
        out = values[op.outputs[0]].shape
        layer, kind = op.layer, op.kind
        if kind == "Conv2D":
            kh, kw = pair(layer.kernel_size)
            cin = values[op.inputs[0]].shape[-1]
            total += 2 * kh * kw * cin * out[-1] * out[1] * out[2] // layer.groups
        elif kind == "DepthwiseConv2D":
            kh, kw = pair(layer.kernel_size)
            total += 2 * kh * kw * out[-1] * out[1] * out[2]
        elif kind == "SeparableConv2D":
            kh, kw = pair(layer.kernel_size)
            cin = values[op.inputs[0]].shape[-1]
            mid = cin * layer.depth_multiplier
            total += 2 * (kh * kw * mid + mid * out[-1]) * out[1] * out[2]
        elif kind == "Dense":
            positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
            total += 2 * values[op.inputs[0]].shape[-1] * out[-1] * positions
    return int(total)
