"""The classifier head of a model, found once for the CAM path and the FCN conversion.

:func:`find_head` walks back from the model's output over the flattened graph
(:mod:`camserve.keras_graph`) through head layers (Dense, BatchNormalization, activations and
the :data:`PASSTHROUGH` layers) to the ``Flatten`` or global pooling that starts the head.
:func:`gap_dense` reads a head as ``GlobalAveragePooling2D → (BatchNormalization or
pass-through)* → Dense → (activation or pass-through)*``: the head of CAM (Zhou et al. 2016)
and of FCN class maps, with the BatchNormalization scales folded into the Dense kernel
(:func:`fold_batchnorm`) and their shifts into the bias (:meth:`GapDense.bias`), which is exact
because global average pooling and BatchNormalization at inference are both affine:

    logits = W^T BN(mean_ij A) + b = mean_ij (s ⊙ W)^T A + (W^T t + b),  BN(x) = s ⊙ x + t

>>> head = find_head(keras_graph.walk(model).graph())     # doctest: +SKIP
>>> head.describe()                                        # doctest: +SKIP
"'gap' (GlobalAveragePooling2D) → 'bn' (BatchNormalization) → 'logits' (Dense)"
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from camserve.errors import InvalidArgument
from camserve.keras_graph import Graph, LayerPath, Op

# Layer vocabulary, by Keras class name (a subclass counts as its Keras base, see Op.kind).

#: Layers that are the identity at inference time: skipped wherever a head is read.
PASSTHROUGH = frozenset(
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
#: Activation layers a head may hold (elementwise, or along the last axis for Softmax).
ACTIVATIONS = frozenset({"Activation", "ReLU", "LeakyReLU", "ELU", "Softmax"})
#: What may follow the Flatten or global pooling that starts a head.
HEAD_LAYERS = frozenset({"Dense", "BatchNormalization"}) | PASSTHROUGH | ACTIVATIONS
GLOBAL_POOL = frozenset({"GlobalAveragePooling2D", "GlobalMaxPooling2D"})
#: Layers with a spatial window (kernel, stride, padding).
WINDOWED = frozenset({"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"})
#: Layers and graph operations that act on each position separately (or merge same-size maps).
POINTWISE = (
    PASSTHROUGH
    | ACTIVATIONS
    | frozenset(
        {
            # layers
            "PReLU",
            "Rescaling",
            "Normalization",
            "BatchNormalization",
            "LayerNormalization",
            "UnitNormalization",
            "GroupNormalization",
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
)


class UnsupportedHead(InvalidArgument):
    """A model whose classifier head is not one this reader handles; the message names the
    layer at fault."""


def is_passthrough(op: Op) -> bool:
    """A :data:`PASSTHROUGH` layer, or an ``Activation`` whose activation is linear."""
    if op.kind in PASSTHROUGH:
        return True
    activation = getattr(getattr(op.layer, "activation", None), "__name__", None)
    return op.kind == "Activation" and activation == "linear"


def check_channels_last(op: Op) -> None:
    fmt = getattr(op.layer, "data_format", None)
    if fmt not in (None, "channels_last"):
        raise UnsupportedHead(f"layer {op.describe()} uses data_format={fmt!r}; only channels_last is supported")


@dataclasses.dataclass
class Head:
    """A classifier head: ``start`` (Flatten / GlobalAveragePooling2D / GlobalMaxPooling2D)
    and the ``chain`` of layers after it, in forward order."""

    start: Op
    chain: list[Op]
    feature_key: int  # the backbone output tensor (input of ``start``)
    feature_shape: tuple  # (N, h, w, c) at the training input size

    def describe(self) -> str:
        return " → ".join(op.describe() for op in [self.start, *self.chain])

    def follows(self, graph: Graph, path: LayerPath) -> bool:
        """Whether the head reads the output of layer ``path`` (through pass-through layers)."""
        targets = set(graph.outputs_of(path))
        producer = graph.producer()
        key = self.feature_key
        while key not in targets:
            op = producer.get(key)
            if op is None or len(op.inputs) != 1 or not is_passthrough(op):
                return False
            key = op.inputs[0]
        return True


def find_head(graph: Graph) -> Head:
    """The head that produces the graph's single output; :class:`UnsupportedHead` naming the
    layer where the walk back from the output stops."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise UnsupportedHead(
            f"model has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
            "a classifier with one image input and one output is required"
        )
    if len(graph.input_shapes[0]) != 4:
        raise UnsupportedHead(f"model input has shape {graph.input_shapes[0]}; an image input (N, H, W, C) is required")
    producer = graph.producer()
    chain: list[Op] = []
    k = graph.outputs[0]
    while True:
        op = producer.get(k)
        if op is None:
            raise UnsupportedHead(
                "no Flatten, GlobalAveragePooling2D or GlobalMaxPooling2D found between the input "
                "and the output: nothing to convert"
            )
        kind = op.kind
        if len(op.inputs) != 1:
            raise UnsupportedHead(
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
            and producer[op.inputs[0]].kind in GLOBAL_POOL
        )
        if kind in GLOBAL_POOL or (kind == "Flatten" and not flatten_of_pooled):
            if len(in_shape) != 4:
                source = producer.get(op.inputs[0])
                origin = f" from {source.describe()}" if source is not None else ""
                raise UnsupportedHead(
                    f"cannot convert head layer {op.describe()}: it gets shape {in_shape}{origin}; "
                    "Flatten or global pooling of (N, h, w, c) features expected"
                )
            check_channels_last(op)
            chain.reverse()
            return Head(start=op, chain=chain, feature_key=op.inputs[0], feature_shape=in_shape)
        if kind in HEAD_LAYERS or flatten_of_pooled:
            if kind == "Dense" and len(in_shape) not in (2, 4):
                raise UnsupportedHead(f"head layer {op.describe()} gets shape {in_shape}")
            if kind in ("BatchNormalization", "Softmax"):
                axis = op.layer.axis
                if axis not in (-1, len(in_shape) - 1):
                    raise UnsupportedHead(
                        f"cannot convert head layer {op.describe()}: it works on axis {axis}, "
                        "only the last axis is allowed"
                    )
            chain.append(op)
            k = op.inputs[0]
            continue
        allowed = "Dense, Dropout, BatchNormalization and activation layers"
        if kind in WINDOWED or kind in POINTWISE:
            raise UnsupportedHead(
                f"no classifier head: layer {op.describe()} feeds the output without a Flatten or "
                f"global pooling; a convertible head is Flatten/GlobalAveragePooling2D/"
                f"GlobalMaxPooling2D followed by {allowed}"
            )
        raise UnsupportedHead(
            f"cannot convert head layer {op.describe()}: after Flatten or global pooling only {allowed} are allowed"
        )


@dataclasses.dataclass
class GapDense:
    """A head read as GAP → (BatchNorm)* → Dense → (activations)*, pass-through layers left out.

    ``after``: the activation layers after the Dense (the logits are the Dense's output)."""

    pool: Op
    norms: list[Op]
    dense: Op
    after: list[Op]

    def kernel(self) -> tf.Tensor:
        """(K, classes) float32 Dense kernel with the BatchNorm scales folded in."""
        return fold_batchnorm(self.dense.layer.kernel, [bn.layer for bn in self.norms])

    def bias(self) -> np.ndarray:
        """(classes,) float32 bias that makes ``mean_ij(A @ kernel) + bias`` the logits: the
        Dense bias plus the kernel applied to the BatchNorm shifts."""
        dense = self.dense.layer
        bias = _numpy(dense.bias) if dense.use_bias else np.zeros(int(dense.units), np.float32)
        if not self.norms:
            return bias.astype(np.float32)
        kernel = _numpy(dense.kernel).astype(np.float64)
        shift = np.zeros(kernel.shape[0])
        for bn in (op.layer for op in self.norms):
            scale, offset = _batchnorm_affine(bn)
            shift = scale * shift + offset
        return (shift @ kernel + bias.astype(np.float64)).astype(np.float32)


def gap_dense(head: Head, needs: str = "class maps") -> GapDense:
    """``head`` as a GAP → Dense head; :class:`UnsupportedHead` naming the layer that does not
    fit (``needs`` starts the message: what needs such a head)."""
    start = head.start
    if start.kind != "GlobalAveragePooling2D":
        raise UnsupportedHead(
            f"{needs} need a GlobalAveragePooling2D → Dense head; {start.describe()} starts this head"
        )
    dense_ops = [op for op in head.chain if op.kind == "Dense"]
    if len(dense_ops) != 1:
        raise UnsupportedHead(f"{needs} need exactly one Dense after {start.describe()}; found {len(dense_ops)}")
    dense = dense_ops[0]
    position = head.chain.index(dense)
    norms: list[Op] = []
    after: list[Op] = []
    for i, op in enumerate(head.chain):
        if op is dense or is_passthrough(op) or op.kind == "Flatten":
            continue
        if i < position and op.kind == "BatchNormalization":
            norms.append(op)
        elif i > position and op.kind in ACTIVATIONS:
            after.append(op)
        else:
            raise UnsupportedHead(
                f"{needs}: cannot fold head layer {op.describe()}; only dropout and BatchNormalization may "
                f"sit between {start.describe()} and the Dense, and only activations after it"
            )
    return GapDense(pool=start, norms=norms, dense=dense, after=after)


def _numpy(variable: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable))


def _batchnorm_affine(bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float64, of a BatchNormalization at inference: BN(x) = scale·x + offset."""
    scale = 1.0 / np.sqrt(_numpy(bn.moving_variance).astype(np.float64) + bn.epsilon)
    if bn.gamma is not None:
        scale = scale * _numpy(bn.gamma)
    offset = -scale * _numpy(bn.moving_mean)
    if bn.beta is not None:
        offset = offset + _numpy(bn.beta)
    return scale, offset


def fold_batchnorm(kernel: Any, norms: list[Any]) -> tf.Tensor:
    """(K, classes) float32 ``kernel`` with the scales of the BatchNormalization layers
    ``norms`` (between the pooling and the Dense) folded in."""
    kernel = tf.cast(kernel, tf.float32)
    for bn in norms:
        scale = tf.math.rsqrt(tf.cast(bn.moving_variance, tf.float32) + bn.epsilon)
        if bn.gamma is not None:
            scale = scale * tf.cast(bn.gamma, tf.float32)
        kernel = scale[:, None] * kernel
    return kernel
