"""The explanation methods: one small function each, registered in :data:`METHODS`.

Every method maps a :class:`LayerPass` (one compiled forward/backward pass of a batch,
seen for one target class per image) to a map of shape (B, h, w) at the layer's
resolution, before the ReLU that :mod:`camserve.explain` applies to all of them.
The pass gives ``activations`` A (B, h, w, K) and, for gradient methods, ``gradients``
dY_c/dA of the target's logit. Score-CAM and Ablation-CAM ask the pass to score masked
inputs or ablated activations (``masked_input_scores``, ``ablated_logits``). Pixel-level
methods (``pixel=True``) return maps at the input's resolution (B, H, W). More families
register into the same table from :mod:`~camserve.explain.methods_activation`,
:mod:`~camserve.explain.methods_gradient` and :mod:`~camserve.explain.methods_pixel`.

New methods are registered with :func:`register`; an :class:`~camserve.explain.Explainer`
sees them at once, also one made before:

>>> @register("gradcam_x2", needs_gradients=True, doc="Twice Grad-CAM.")
... def gradcam_x2(p):
...     return 2.0 * gradcam(p)
>>> list(METHODS)[-2:], METHODS["gradcam_x2"].doc
(['integrated_gradients', 'gradcam_x2'], 'Twice Grad-CAM.')
>>> unregister("gradcam_x2").name
'gradcam_x2'
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, Protocol

import tensorflow as tf

from camserve.errors import InvalidArgument

_EPS = 1e-7


class LayerPass(Protocol):
    """What a method can read from the shared pass (see :class:`camserve.explain.layer_pass.SharedPass`)."""

    activations: tf.Tensor  # (B, h, w, K) float32
    gradients: tf.Tensor  # (B, h, w, K) float32, d logit[target] / d activations
    classes: tf.Tensor  # (B,) int32 target class per image
    logits: tf.Tensor  # (B, classes) pre-activation scores of the unmasked images

    def head_weights(self) -> tf.Tensor: ...  # (K, classes) of a GAP → Dense head
    def selected_channels(self) -> tf.Tensor: ...  # (B, K') channel indices (all, or a cap)
    def masked_input_scores(self) -> tf.Tensor: ...  # (B, K') target probability per mask
    def ablated_logits(self) -> tf.Tensor: ...  # (B, K') target logit, channel k zeroed
    def per_target(self, key: str, compute: Callable[[Any], tf.Tensor]) -> tf.Tensor: ...  # see TargetView


MethodFn = Callable[[LayerPass], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: ``fn(pass) -> (B, h, w)``; ``needs_gradients`` asks the shared
    pass for dY/dA of each target; ``reads`` names the chunked scores it reads
    (``masked_input_scores``, ``ablated_logits``), which the Explainer then computes in graph
    calls of their own, checking for a stop between chunks (a method that reads them without
    saying so still works: they are computed inside its pass, in one go)."""

    name: str
    fn: MethodFn
    needs_gradients: bool = False
    doc: str = ""
    reads: tuple[str, ...] = ()
    pixel: bool = False  # the map is at the input's resolution (B, H, W), not the layer's
    samples: int = 0  # forward/backward passes per target it runs of its own (SmoothGrad, IG)


#: The chunked scores a method may read: per channel (see :mod:`camserve.explain.layer_pass`)
#: and sampled input gradients (one per sampled method, added by :mod:`camserve.explain.pixel`).
CHANNEL_READS = ("masked_input_scores", "ablated_logits")
SAMPLE_READS: list[str] = ["smoothgrad_gradients", "integrated_gradients"]
READS = CHANNEL_READS

#: All methods by their public name, in registration order (the built-ins first).
METHODS: dict[str, Method] = {}
_LOCK = threading.Lock()


class UnknownMethod(InvalidArgument):
    """A method name that is not in :data:`METHODS`."""


def register(
    name: str,
    *,
    needs_gradients: bool = False,
    replace: bool = False,
    doc: str | None = None,
    reads: tuple[str, ...] = (),
    pixel: bool = False,
    samples: int = 0,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding ``fn(pass) -> (B, h, w)`` to :data:`METHODS` as ``name``.

    ``needs_gradients``: the pass computes dY/dA of each target for it. ``reads``: the chunked
    scores of the pass it reads (:data:`READS`, :data:`SAMPLE_READS`). ``pixel``: the method returns a map at
    the input's resolution (B, H, W); ``samples``: the passes per target it runs. ``doc``:
    defaults to the function's docstring. A name already registered raises InvalidArgument
    unless ``replace=True`` (the method then keeps its place in the registry).
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise InvalidArgument(f"a method name must be a non-empty string without surrounding spaces, got {name!r}")
    reads = tuple(sorted(set(reads)))
    allowed = READS + tuple(SAMPLE_READS)
    unknown = [r for r in reads if r not in allowed]
    if unknown:
        raise InvalidArgument(f"method {name!r} reads unknown scores {unknown}; allowed: {', '.join(allowed)}")

    def add(fn: MethodFn) -> MethodFn:
        if not callable(fn):
            raise InvalidArgument(f"method {name!r} must be a function of the pass, got {fn!r}")
        text = (fn.__doc__ or "") if doc is None else doc
        method = Method(name, fn, needs_gradients, text, reads, pixel=pixel, samples=samples)
        with _LOCK:
            if name in METHODS and not replace:
                raise InvalidArgument(f"method {name!r} is already registered; pass replace=True to replace it")
            METHODS[name] = method
        return fn

    return add


def unregister(name: str) -> Method:
    """Remove method ``name`` from :data:`METHODS` and return it; UnknownMethod if absent."""
    with _LOCK:
        if name not in METHODS:
            raise UnknownMethod(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
        return METHODS.pop(name)


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


@register("cam")
def cam(p: LayerPass) -> tf.Tensor:
    """CAM (Zhou et al. 2016): Σ_k w_k^c A_k with w the GAP → Dense kernel."""
    return weighted_sum(p.activations, tf.gather(tf.transpose(p.head_weights()), p.classes))


@register("gradcam", needs_gradients=True)
def gradcam(p: LayerPass) -> tf.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channel weights = spatial mean of dY_c/dA."""
    return weighted_sum(p.activations, tf.reduce_mean(p.gradients, axis=(1, 2)))


@register("gradcam++", needs_gradients=True)
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


@register("hirescam", needs_gradients=True)
def hirescam(p: LayerPass) -> tf.Tensor:
    """HiResCAM (Draelos & Carin 2020): Σ_k dY_c/dA_k ⊙ A_k, element-wise."""
    return tf.reduce_sum(p.gradients * p.activations, axis=-1)


@register("xgradcam", needs_gradients=True)
def xgradcam(p: LayerPass) -> tf.Tensor:
    """XGrad-CAM (Fu et al. 2020): w_k = Σ_ij G_k A_k / Σ_ij A_k."""
    a = p.activations
    return weighted_sum(a, _spatial_sum(p.gradients * a) / (_spatial_sum(a) + _EPS))


@register("layercam", needs_gradients=True)
def layercam(p: LayerPass) -> tf.Tensor:
    """LayerCAM (Jiang et al. 2021): Σ_k ReLU(dY_c/dA_k) ⊙ A_k."""
    return tf.reduce_sum(tf.nn.relu(p.gradients) * p.activations, axis=-1)


@register("scorecam", reads=("masked_input_scores",))
def scorecam(p: LayerPass) -> tf.Tensor:
    """Score-CAM (Wang et al. 2020): w_k = class probability of the input masked by the
    upsampled, min-max normalised A_k (softmax head; sigmoid for a single-logit head)."""
    return weighted_sum(p.activations, _scatter_channels(p, p.masked_input_scores()))


def first_component(x: tf.Tensor, reference: tf.Tensor | None = None) -> tf.Tensor:
    """(B, h, w, K) -> (B, h, w): the centred maps projected on their first principal component,
    its sign fixed so the map correlates positively with ``reference`` (B, h, w; default
    Σ_k of the maps). Eigen-CAM, Eigen-Grad-CAM and ``eigen_smooth`` share it.

    >>> x = tf.constant([[[[1.0, 2.0]], [[3.0, 6.0]]]])  # (1, 2, 1, 2): one direction, (1, 2)
    >>> [round(float(v), 3) for v in tf.reshape(first_component(x), [-1])]
    [-2.236, 2.236]
    """
    b, h, w, k = tf.unstack(tf.shape(x))
    flat = tf.reshape(x, (b, h * w, k))
    centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
    _, _, v = tf.linalg.svd(centred)
    projection = tf.einsum("bnk,bk->bn", centred, v[:, :, 0])
    ref = tf.reduce_sum(flat, axis=-1) if reference is None else tf.reshape(reference, (b, h * w))
    return tf.reshape(orient(projection, ref), (b, h, w))


def orient(projection: tf.Tensor, reference: tf.Tensor) -> tf.Tensor:
    """(B, N) projections with the sign that correlates positively with ``reference`` (B, N)."""
    sign = tf.where(tf.reduce_sum(projection * reference, axis=1) < 0.0, -1.0, 1.0)
    return projection * sign[:, None]


@register("eigencam")
def eigencam(p: LayerPass) -> tf.Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): the activations projected on their first principal
    component (class-agnostic). The SVD's sign is fixed so the map correlates positively with
    Σ_k A_k."""
    return first_component(p.activations)


@register("ablationcam", reads=("ablated_logits",))
def ablationcam(p: LayerPass) -> tf.Tensor:
    """Ablation-CAM (Desai & Ramaswamy 2020): w_k = (Y_c − Y_c with A_k zeroed) / |Y_c|."""
    y = tf.gather(p.logits, p.classes, batch_dims=1)[:, None]
    drop = (y - p.ablated_logits()) / tf.maximum(tf.abs(y), _EPS)
    return weighted_sum(p.activations, _scatter_channels(p, drop))


# The other families register into the same table (after the built-ins, in this order).
import camserve.explain.methods_activation  # noqa: E402
import camserve.explain.methods_gradient  # noqa: E402
import camserve.explain.methods_pixel  # noqa: E402, F401
