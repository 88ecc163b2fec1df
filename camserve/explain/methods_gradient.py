"""Gradient methods beyond the classic ones (they register into
:data:`camserve.explain.methods.METHODS`): Grad-CAM element-wise, Eigen-Grad-CAM, Finer-CAM
and Shapley-CAM, following pytorch-grad-cam's definitions. Finer-CAM and Shapley-CAM need
gradients of other scores than the target's logit (a weighted difference of logits; the
Hessian-vector product): they re-run the head from the layer's activations once per pass
(:func:`head_rerun`; the layers before it are pruned from the graph).

>>> from camserve.explain.methods import METHODS
>>> [METHODS[m].needs_gradients for m in ("gradcamelementwise", "finercam", "shapleycam")]
[True, False, True]
"""

from __future__ import annotations

import tensorflow as tf

from camserve.explain import layer_pass as lp
from camserve.explain import passes
from camserve.explain.methods import LayerPass, first_component, register, weighted_sum

#: Finer-CAM: how many of the most similar classes are compared, and how strongly.
FINER_COMPARED = 3
FINER_ALPHA = 1.0


@register("gradcamelementwise", needs_gradients=True)
def gradcam_elementwise(p: LayerPass) -> tf.Tensor:
    """Grad-CAM element-wise (pytorch-grad-cam): Σ_k ReLU(dY_c/dA_k ⊙ A_k)."""
    return tf.reduce_sum(tf.nn.relu(p.gradients * p.activations), axis=-1)


@register("eigengradcam", needs_gradients=True)
def eigengradcam(p: LayerPass) -> tf.Tensor:
    """Eigen-Grad-CAM (pytorch-grad-cam): the first principal component of dY_c/dA ⊙ A
    (sign as Eigen-CAM's)."""
    return first_component(p.gradients * p.activations)


def head_rerun(shared: lp.SharedPass, a: tf.Tensor, outputs: bool = False):
    """The logits (and with ``outputs`` the outputs too) with the layer's output replaced by
    ``a`` (only the head after it runs)."""
    _, logits, out = passes.forward(shared.ex, shared.images, replace={shared.site: lambda raw: a})
    return (logits, out) if outputs else logits


def finer_score(logits: tf.Tensor, classes: tf.Tensor) -> tf.Tensor:
    """(B,) Finer-CAM's score (pytorch-grad-cam's FinerWeightedTarget): with j over the
    ``FINER_COMPARED`` classes whose logits are closest to the target's y_c and p = softmax(logits),
    Σ_j p_j (y_c − α y_j) / (Σ_j p_j + 1e-9); y_c when the model has a single class."""
    num_classes = logits.shape[-1]
    y = tf.gather(logits, classes, batch_dims=1)
    k = min(FINER_COMPARED, num_classes - 1)
    if k < 1:
        return y
    distance = tf.abs(logits - y[:, None]) + tf.one_hot(classes, num_classes) * 1e30  # never the target itself
    compared = tf.math.top_k(-distance, k=k).indices
    weights = tf.gather(tf.nn.softmax(logits), compared, batch_dims=1)
    others = tf.gather(logits, compared, batch_dims=1)
    return tf.reduce_sum(weights * (y[:, None] - FINER_ALPHA * others), axis=1) / (tf.reduce_sum(weights, 1) + 1e-9)


def _finer_gradients(shared: lp.SharedPass) -> tf.Tensor:
    """(B, T, h, w, K) gradients of every target's Finer-CAM score."""
    a = shared.activations
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(a)
        logits = head_rerun(shared, a)
        ys = [tf.reduce_sum(finer_score(logits, shared.classes_all[:, t])) for t in range(shared.classes_all.shape[1])]
    return tf.stack([tape.gradient(y, a) for y in ys], axis=1)


@register("finercam")
def finercam(p: LayerPass) -> tf.Tensor:
    """Finer-CAM (Zhang et al. 2025): Grad-CAM of the target's logit against its most similar
    classes (see :func:`finer_score`), which brings out what tells them apart."""
    return weighted_sum(p.activations, tf.reduce_mean(p.per_target("finer_gradients", _finer_gradients), axis=(1, 2)))


def _hessian_products(shared: lp.SharedPass) -> tf.Tensor:
    """(B, T, h, w, K) H_c·A per target: the Hessian of the target logit with respect to the
    activations applied to the activations (backward over backward)."""
    a = shared.activations
    width = shared.classes_all.shape[1]
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as outer:
        outer.watch(a)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as inner:
            inner.watch(a)
            logits, outputs = head_rerun(shared, a, outputs=True)
            values = lp.explained_scores(shared.ex, shared.classes_all, logits, outputs, shared.scorer)
            ys = [tf.reduce_sum(values[:, t]) for t in range(width)]
        grads = [inner.gradient(y, a) for y in ys]
    zero = tf.UnconnectedGradients.ZERO
    return tf.stack([outer.gradient(g, a, output_gradients=a, unconnected_gradients=zero) for g in grads], axis=1)


@register("shapleycam", needs_gradients=True)
def shapleycam(p: LayerPass) -> tf.Tensor:
    """Shapley-CAM (Cai 2025): w_k = spatial mean of (dY_c/dA − ½ H_c·A)_k, a second-order
    (Shapley value) correction of Grad-CAM's weights; equal to Grad-CAM where the head is
    piecewise linear in A (ReLU, GAP → Dense)."""
    hvp = p.per_target("hessian_products", _hessian_products)
    return weighted_sum(p.activations, tf.reduce_mean(p.gradients - 0.5 * hvp, axis=(1, 2)))
