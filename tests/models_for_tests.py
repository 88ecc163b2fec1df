"""Tiny seeded Keras models for the tests (the method references, the layer tests).

Every model names its explained layer ``last_conv`` and the Dense that produces the
class scores ``logits``; ``head`` chooses what follows that Dense:

- ``"separate"``: linear Dense, then a separate ``Activation("softmax")`` (the output);
- ``"softmax_layer"``: linear Dense, then a ``keras.layers.Softmax`` layer;
- ``"linear"``: linear Dense as the output (logits out, e.g. for tf-keras-vis Score-CAM);
- ``"softmax"``: ``Dense(activation="softmax")`` (gradients must still be of the logits);
- ``"sigmoid"``: ``Dense(activation="sigmoid")``, used with ``classes=1`` for a binary head.

>>> model = gap_model(head="softmax")
>>> twin = linear_twin(model)  # same weights, logits out
"""

from __future__ import annotations

import keras
import numpy as np

HEADS = ("separate", "softmax_layer", "linear", "softmax", "sigmoid")


def _head(x, classes: int, head: str):
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; allowed: {', '.join(HEADS)}")
    activation = head if head in ("softmax", "sigmoid") else None
    x = keras.layers.Dense(classes, activation=activation, name="logits")(x)
    if head == "separate":
        x = keras.layers.Activation("softmax", name="probs")(x)
    elif head == "softmax_layer":
        x = keras.layers.Softmax(name="probs")(x)
    return x


def gap_model(
    classes: int = 5,
    size: int = 24,
    head: str = "separate",
    batchnorm: bool = False,
    dropout: bool = False,
    seed: int = 0,
) -> keras.Model:
    """conv → pool → conv ``last_conv`` (12 ch, size/2) → GAP → [Dropout] → [BatchNorm] → Dense.

    The BatchNorm gets random, non-trivial gamma/beta/moving statistics (some gammas
    negative) so that folding it into the CAM weights matters.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = keras.layers.Dropout(0.4)(x)
    if batchnorm:
        bn = keras.layers.BatchNormalization(name="head_bn", epsilon=1e-3)
        x = bn(x)
        rng = np.random.default_rng(seed + 100)
        k = bn.gamma.shape[0]
        bn.set_weights(
            [
                rng.normal(0.0, 1.5, k).astype(np.float32),  # gamma, some negative
                rng.normal(0.0, 0.5, k).astype(np.float32),  # beta
                rng.normal(0.1, 0.2, k).astype(np.float32),  # moving mean
                rng.uniform(0.01, 0.5, k).astype(np.float32),  # moving variance
            ]
        )
    return keras.Model(inp, _head(x, classes, head), name=f"gap_{head}")


def fc_model(classes: int = 4, size: int = 20, head: str = "separate", seed: int = 1) -> keras.Model:
    """conv → conv ``last_conv`` (10 ch, valid, stride 2) → Flatten → Dense(relu) → Dense.

    Its gradients vary over space, unlike a GAP head's, so gradient methods differ."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inp)
    x = keras.layers.Conv2D(10, 3, strides=2, activation="relu", name="last_conv")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    return keras.Model(inp, _head(x, classes, head), name=f"fc_{head}")


def wide_model(
    channels: int = 2048, size: int = 8, classes: int = 3, head: str = "separate", seed: int = 2
) -> keras.Model:
    """A ``last_conv`` with many channels at (size/4)² (2048 × 2 × 2 by default) → GAP → Dense:
    ResNet50's channel count on a tiny input, for chunked Score-CAM."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, _head(x, classes, head), name=f"wide_{channels}")


def two_conv_model(
    size: int,
    classes: int,
    seed: int,
    names: tuple[str, str] = ("first_conv", "last_conv"),
    channels: tuple[int, int] = (8, 16),
    output_name: str | None = None,
) -> keras.Model:
    """conv ``names[0]`` → max-pool → conv ``names[1]`` (``channels``, same padding, ReLU) →
    GAP → Dense(softmax): two layers to explain at two resolutions, for the layer tests."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(channels[0], 3, padding="same", activation="relu", name=names[0])(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(channels[1], 3, padding="same", activation="relu", name=names[1])(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes, activation="softmax", name=output_name)(x))


def linear_twin(model: keras.Model) -> keras.Model:
    """The same layers and weights with the output taken at the ``logits`` Dense, whose
    activation is ``linear``: a fresh model (the original is not modified)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    dense = clone.get_layer("logits")
    config = dense.get_config() | {"activation": "linear"}
    linear = keras.layers.Dense.from_config(config)
    # rebuild the graph up to the Dense's input, then the linear Dense with the same weights
    features = keras.Model(clone.inputs, dense.input)
    out = linear(features.output)
    linear.set_weights(dense.get_weights())
    return keras.Model(clone.inputs, out, name=f"{model.name}_logits")


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Seeded random images in [0, 1), float32 (n, size, size, 3)."""
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)
