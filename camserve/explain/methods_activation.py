"""Class-agnostic methods on the activations alone (they register into
:data:`camserve.explain.methods.METHODS`): KPCA-CAM and FEM.

>>> from camserve.explain.methods import METHODS
>>> METHODS["fem"].needs_gradients, METHODS["kpcacam"].pixel
(False, False)
"""

from __future__ import annotations

import tensorflow as tf

from camserve.explain.methods import LayerPass, orient, register, weighted_sum

#: FEM's k-sigma rule (pytorch-grad-cam's default).
FEM_K = 2.0


def kernel_first_component(x: tf.Tensor) -> tf.Tensor:
    """(B, h, w, K) -> (B, h, w): kernel PCA's first component of the centred maps, as
    scikit-learn's ``KernelPCA(n_components=1, kernel="sigmoid")`` computes it (k(x, y) =
    tanh(<x, y> / K + 1), the kernel matrix centred, its top eigenvector times √eigenvalue),
    the sign fixed as Eigen-CAM's (positive correlation with Σ_k of the centred maps)."""
    b, h, w, k = tf.unstack(tf.shape(x))
    flat = tf.reshape(tf.cast(x, tf.float64), (b, h * w, k))  # float64: a flat map's kernel is exactly flat
    centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
    gram = tf.tanh(tf.matmul(centred, centred, transpose_b=True) / tf.cast(k, tf.float64) + 1.0)
    row = tf.reduce_mean(gram, axis=2, keepdims=True)
    col = tf.reduce_mean(gram, axis=1, keepdims=True)
    gram = gram - row - col + tf.reduce_mean(gram, axis=(1, 2), keepdims=True)
    values, vectors = tf.linalg.eigh(gram)  # ascending
    top_value = values[:, -1:]
    top_value = tf.where(top_value > 1e-10 * tf.cast(h * w, tf.float64), top_value, 0.0)  # rounding, not signal
    top = tf.cast(vectors[:, :, -1] * tf.sqrt(top_value), x.dtype)
    centred = tf.cast(centred, x.dtype)
    return tf.reshape(orient(top, tf.reduce_sum(centred, axis=-1)), (b, h, w))


@register("kpcacam")
def kpcacam(p: LayerPass) -> tf.Tensor:
    """KPCA-CAM (Karmani et al. 2024): Eigen-CAM with kernel PCA (sigmoid kernel) in place of PCA."""
    return kernel_first_component(p.activations)


@register("fem")
def fem(p: LayerPass) -> tf.Tensor:
    """FEM (Fuad et al. 2020): w_k = the fraction of positions where A_k exceeds its spatial
    mean + 2 standard deviations; the map is Σ_k w_k A_k (class-agnostic)."""
    a = p.activations
    threshold = tf.reduce_mean(a, axis=(1, 2), keepdims=True) + FEM_K * tf.math.reduce_std(
        a, axis=(1, 2), keepdims=True
    )
    weights = tf.reduce_mean(tf.cast(a > threshold, a.dtype), axis=(1, 2))
    return weighted_sum(a, weights)
