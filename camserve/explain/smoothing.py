"""Smoothing of explanations, inside the one compiled pass.

``aug_smooth``: test-time augmentation. Every image is explained as :data:`VIEWS` (horizontal
flip × brightness 1.0 / 1.1 / 0.9: the preprocessed input multiplied), all views batched into
the same pass; the maps of flipped views are flipped back and the views' maps averaged (raw:
the mean of the raw maps; heatmap: the mean of the views' heatmaps, rescaled to a peak of 1).
Targets given as "the r-th predicted class" are the original image's, for every view.

``eigen_smooth``: the map becomes the first principal component of the *weighted
activations* A ⊙ W, W = ∂(Σ map)/∂A the method's own weights (for methods linear in A:
CAM, Grad-CAM, HiResCAM, LayerCAM, Score-CAM, Ablation-CAM this is exactly
pytorch-grad-cam's ``weights × activations``), signed to correlate positively with the
un-smoothed map.

>>> [(flip, scale) for flip, scale in VIEWS][:2]
[(False, 1.0), (False, 1.1)]
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from camserve.explain.methods import first_component

#: (horizontal flip, brightness factor) of each augmented view; the first is the image itself.
VIEWS: tuple[tuple[bool, float], ...] = tuple((flip, scale) for flip in (False, True) for scale in (1.0, 1.1, 0.9))


def augmented(images: tf.Tensor) -> tf.Tensor:
    """(V·B, H, W, C): every view of the batch, view-major (view v of image i at v·B + i).

    >>> x = augmented(tf.constant([[[[1.0], [2.0]]]]))  # one 1 × 2 image
    >>> [[round(float(v), 2) for v in tf.reshape(x[i], [-1])] for i in (0, 1, 3)]
    [[1.0, 2.0], [1.1, 2.2], [2.0, 1.0]]
    """
    views = []
    for flip, scale in VIEWS:
        x = tf.reverse(images, axis=[2]) if flip else images
        views.append(x * tf.cast(scale, images.dtype) if scale != 1.0 else x)
    return tf.concat(views, axis=0)


def tiled(value: tf.Tensor) -> tf.Tensor:
    """A per-image tensor repeated for every view (view-major, as :func:`augmented`)."""
    return tf.tile(value, [len(VIEWS)] + [1] * (len(value.shape) - 1))


def views_mean(maps: tf.Tensor) -> tf.Tensor:
    """(V·B, ..., h, w) → (B, ..., h, w): flipped views flipped back, views averaged.

    >>> maps = augmented(tf.constant([[[[1.0], [2.0]]]]))[..., 0]  # each view as its own map
    >>> [round(float(v), 4) for v in tf.reshape(views_mean(maps), [-1])]  # brightness 1, 1.1, 0.9 average to 1
    [1.0, 2.0]
    """
    v = len(VIEWS)
    per_view = tf.reshape(maps, tf.concat([[v, -1], tf.shape(maps)[1:]], axis=0))
    unflipped = [tf.reverse(per_view[i], axis=[-1]) if flip else per_view[i] for i, (flip, _) in enumerate(VIEWS)]
    return tf.add_n(unflipped) / float(v)


def deaugment(raw: tf.Tensor, heat: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The views' raw maps (V·B, T, M, h, w) and heatmaps (V·B, T, M, H, W) averaged per image."""
    return views_mean(raw), normalise(views_mean(heat))


def normalise(maps: tf.Tensor) -> tf.Tensor:
    """Maps (..., H, W) divided by their peak (all-zero maps stay zero).

    >>> normalise(tf.constant([[[1.0, 4.0]], [[0.0, 0.0]]])).numpy().tolist()
    [[[0.25, 1.0]], [[0.0, 0.0]]]
    """
    peak = tf.reduce_max(maps, axis=(-2, -1), keepdims=True)
    return tf.where(peak > 0.0, maps / tf.where(peak > 0.0, peak, 1.0), 0.0)


def method_map(method: Any, view: Any, eigen: bool) -> tf.Tensor:
    """``method``'s (B, h, w) map of ``view``, eigen-smoothed when ``eigen`` (not pixel-level
    methods: their maps are at the input's resolution, not the activations')."""
    if not eigen or getattr(method, "pixel", False):
        return method.fn(view)
    activations = tf.identity(view.activations)
    with tf.GradientTape() as tape:
        tape.watch(activations)
        plain = method.fn(view.with_activations(activations))
        total = tf.reduce_sum(plain)
    weights = tape.gradient(total, activations)
    if weights is None:  # a map that does not read the activations
        return plain
    return first_component(activations * weights, plain)
