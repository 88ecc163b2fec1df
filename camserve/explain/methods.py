"""The explanation methods: one small function each, registered in :data:`METHODS`.

Every method maps a :class:`LayerPass` (one compiled forward/backward pass of a batch,
seen for one target class per image) to a map of shape (B, h, w) at the layer's
resolution, before the ReLU that :mod:`camserve.explain` applies to all of them.
The pass gives ``activations`` A (B, h, w, K) and, for gradient methods, ``gradients``
dY_c/dA of the target's logit. Score-CAM and Ablation-CAM ask the pass to score masked
inputs or ablated activations (``masked_input_scores``, ``ablated_logits``).

>>> sorted(METHODS)[:3]
['ablationcam', 'cam', 'eigencam']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import tensorflow as tf

_EPS = 1e-7


class LayerPass(Protocol):
    """What a method can read from the shared pass (see :class:`camserve.explain._Pass`)."""

    activations: tf.Tensor  # (B, h, w, K) float32
    gradients: tf.Tensor  # (B, h, w, K) float32, d logit[target] / d activations
    classes: tf.Tensor  # (B,) int32 target class per image
    logits: tf.Tensor  # (B, classes) pre-activation scores of the unmasked images

    def head_weights(self) -> tf.Tensor: ...  # (K, classes) of a GAP → Dense head
    def selected_channels(self) -> tf.Tensor: ...  # (B, K') channel indices (all, or a cap)
    def masked_input_scores(self) -> tf.Tensor: ...  # (B, K') target probability per mask
    def ablated_logits(self) -> tf.Tensor: ...  # (B, K') target logit, channel k zeroed


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: ``fn(pass) -> (B, h, w)``; ``needs_gradients`` asks the shared
    pass for dY/dA of each target."""

    name: str
    fn: Callable[[LayerPass], tf.Tensor]
    needs_gradients: bool = False
    doc: str = ""


def weighted_sum(activations: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    """Σ_k w_k A_k per image: (B, h, w, K) x (B, K) -> (B, h, w)."""
    return tf.einsum("bhwk,bk->bhw", activations, weights)


def _spatial_sum(x: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(x, axis=(1, 2))


def _scatter_channels(p: LayerPass, weights: tf.Tensor) -> tf.Tensor:
    """Weights for the selected channels (B, K') placed into (B, K), zeros elsewhere."""
    k = tf.shape(p.activations)[-1]
    channels = p.selected_channels()
    one_hot = tf.one_hot(channels, k, dtype=weights.dtype)  # (B, K', K)
    return tf.einsum("bj,bjk->bk", weights, one_hot)


def cam(p: LayerPass) -> tf.Tensor:
    """CAM (Zhou et al. 2016): Σ_k w_k^c A_k with w the GAP → Dense kernel."""
    return weighted_sum(p.activations, tf.gather(tf.transpose(p.head_weights()), p.classes))


def gradcam(p: LayerPass) -> tf.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of dY_c/dA."""
    return weighted_sum(p.activations, tf.reduce_mean(p.gradients, axis=(1, 2)))


def gradcam_plus_plus(p: LayerPass) -> tf.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) with the exponential-score closed form for the
    higher derivatives and alphas normalised per channel, as in tf-keras-vis. The factor
    exp(Y_c) is a positive per-image scale and is left out (it overflows for large logits)."""
    g, a = p.gradients, p.activations
    g2, g3 = g * g, g * g * g
    denom = 2.0 * g2 + g3 * _spatial_sum(a)[:, None, None, :]
    alphas = g2 / tf.where(g2 == 0.0, tf.ones_like(denom), denom)
    norm = _spatial_sum(alphas)[:, None, None, :]
    alphas = alphas / tf.where(norm == 0.0, tf.ones_like(norm), norm)
    return weighted_sum(a, _spatial_sum(tf.nn.relu(g) * alphas))


def hirescam(p: LayerPass) -> tf.Tensor:
    """HiResCAM (Draelos & Carin 2020): Σ_k dY_c/dA_k ⊙ A_k, element-wise."""
    return tf.reduce_sum(p.gradients * p.activations, axis=-1)


def xgradcam(p: LayerPass) -> tf.Tensor:
    """XGrad-CAM (Fu et al. 2020): w_k = Σ_ij G_k A_k / Σ_ij A_k."""
    a = p.activations
    return weighted_sum(a, _spatial_sum(p.gradients * a) / (_spatial_sum(a) + _EPS))


def layercam(p: LayerPass) -> tf.Tensor:
    """LayerCAM (Jiang et al. 2021): Σ_k ReLU(dY_c/dA_k) ⊙ A_k."""
    return tf.reduce_sum(tf.nn.relu(p.gradients) * p.activations, axis=-1)


def scorecam(p: LayerPass) -> tf.Tensor:
    """Score-CAM (Wang et al. 2020): w_k = class probability of the input masked by the
    upsampled, min-max normalised A_k (softmax head; sigmoid for a single-logit head)."""
    return weighted_sum(p.activations, _scatter_channels(p, p.masked_input_scores()))


def ablationcam(p: LayerPass) -> tf.Tensor:
    """Ablation-CAM (Desai & Ramaswamy 2020): w_k = (Y_c − Y_c with A_k zeroed) / |Y_c|."""
    y = tf.gather(p.logits, p.classes, batch_dims=1)[:, None]
    drop = (y - p.ablated_logits()) / tf.maximum(tf.abs(y), _EPS)
    return weighted_sum(p.activations, _scatter_channels(p, drop))


def eigencam(p: LayerPass) -> tf.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations projected on their first principal
    component (class-agnostic). The SVD's sign is fixed so the map correlates positively with
    Σ_k A_k."""
    a = p.activations
    b, h, w, k = tf.unstack(tf.shape(a))
    flat = tf.reshape(a, (b, h * w, k))
    centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
    _, _, v = tf.linalg.svd(centred)
    projection = tf.einsum("bnk,bk->bn", centred, v[:, :, 0])
    total = tf.reduce_sum(centred, axis=-1)
    sign = tf.where(tf.reduce_sum(projection * total, axis=1) < 0.0, -1.0, 1.0)
    return tf.reshape(projection * sign[:, None], (b, h, w))


#: All methods by their public name.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("cam", cam, doc=cam.__doc__ or ""),
        Method("gradcam", gradcam, needs_gradients=True, doc=gradcam.__doc__ or ""),
        Method("gradcam++", gradcam_plus_plus, needs_gradients=True, doc=gradcam_plus_plus.__doc__ or ""),
        Method("hirescam", hirescam, needs_gradients=True, doc=hirescam.__doc__ or ""),
        Method("xgradcam", xgradcam, needs_gradients=True, doc=xgradcam.__doc__ or ""),
        Method("layercam", layercam, needs_gradients=True, doc=layercam.__doc__ or ""),
        Method("scorecam", scorecam, doc=scorecam.__doc__ or ""),
        Method("eigencam", eigencam, doc=eigencam.__doc__ or ""),
        Method("ablationcam", ablationcam, doc=ablationcam.__doc__ or ""),
    )
}
