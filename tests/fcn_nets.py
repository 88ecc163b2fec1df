"""Tiny seeded classifiers for the FCN / dense-score tests, and the independent references.

The references never use camserve.dense.fcn: they crop the image and call the ORIGINAL classifier
with ``model.predict``.
"""

from __future__ import annotations

import keras
import numpy as np


def _randomize_batchnorm(bn: keras.layers.BatchNormalization, seed: int) -> None:
    """Non-trivial gamma / beta / moving statistics, so that a lost BatchNorm shows."""
    rng = np.random.default_rng(seed)
    k = bn.gamma.shape[0]
    bn.set_weights(
        [
            rng.uniform(0.5, 1.5, k).astype("float32") * rng.choice([-1.0, 1.0], k).astype("float32"),
            rng.normal(0, 0.5, k).astype("float32"),
            rng.normal(0, 0.5, k).astype("float32"),
            rng.uniform(0.5, 2.0, k).astype("float32"),
        ]
    )


def flatten_net(padding: str = "valid", size: int = 20, classes: int = 5, seed: int = 0) -> keras.Model:
    """conv3 → pool2 → conv3 → pool2 → Flatten → Dense(relu) → BN → Dropout → Dense(softmax).

    Total stride 4. Valid padding: 20 → 18 → 9 → 7 → 3, so the head sees 3×3×6.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding=padding, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(6, 3, padding=padding, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc1")(x)
    bn = keras.layers.BatchNormalization(name="fc1_bn")
    x = bn(x)
    x = keras.layers.Dropout(0.5)(x)
    out = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name=f"flatten_{padding}")
    _randomize_batchnorm(bn, seed + 1)
    return model


def gap_net(
    padding: str = "valid", pool: str = "avg", size: int = 20, classes: int = 5, seed: int = 0, batchnorm: bool = False
) -> keras.Model:
    """conv3 → pool2 → conv3 (``last_conv``) → Global{Average,Max}Pooling2D → Dropout → [BN] → Dense(softmax).

    Total stride 2; valid padding: 20 → 18 → 9 → 7, so the window pool is 7×7. ``batchnorm``:
    a BatchNormalization ``head_bn`` with random statistics (some scales negative) before the Dense.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding=padding, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(6, 3, padding=padding, activation="relu", name="last_conv")(x)
    x = (keras.layers.GlobalAveragePooling2D if pool == "avg" else keras.layers.GlobalMaxPooling2D)()(x)
    x = keras.layers.Dropout(0.3)(x)
    bn = keras.layers.BatchNormalization(name="head_bn") if batchnorm else None
    if bn is not None:
        x = bn(x)
    out = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name=f"gap_{pool}_{padding}" + ("_bn" if batchnorm else ""))
    if bn is not None:
        _randomize_batchnorm(bn, seed + 1)
    return model


def crops_reference(model: keras.Model, image: np.ndarray, stride: int) -> np.ndarray:
    """The classifier on every window at ``stride``: (gh, gw, classes)."""
    h, w = model.input_shape[1:3]
    gh = (image.shape[0] - h) // stride + 1
    gw = (image.shape[1] - w) // stride + 1
    crops = np.stack(
        [image[i * stride : i * stride + h, j * stride : j * stride + w] for i in range(gh) for j in range(gw)]
    )
    return model.predict(crops, verbose=0).reshape(gh, gw, -1)


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| / max |want| over the whole grid."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
