"""Pixel-level methods (they register into :data:`camserve.explain.methods.METHODS` with
``pixel=True``): maps at the input's resolution from gradients with respect to the image,
computed by :mod:`camserve.explain.pixel`. :func:`register_sampled` adds SmoothGrad /
Integrated Gradients methods with other sample counts, noise or baselines. Gradients become a
map by the largest absolute value over the colour channels (Simonyan et al. 2014); Integrated
Gradients' attributions are summed over the channels (its completeness: they add up to the
score's change).

>>> from camserve.explain.methods import METHODS
>>> [(m, METHODS[m].samples) for m in ("smoothgrad", "integrated_gradients")]
[('smoothgrad', 16), ('integrated_gradients', 16)]
"""

from __future__ import annotations

import tensorflow as tf

from camserve.explain import pixel
from camserve.explain.methods import LayerPass, MethodFn, gradcam, register


def saliency(gradients: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) -> (B, H, W): max over channels of |gradient|."""
    return tf.reduce_max(tf.abs(gradients), axis=-1)


@register("guidedbackprop", pixel=True)
def guidedbackprop(p: LayerPass) -> tf.Tensor:
    """Guided backpropagation (Springenberg et al. 2015): the input gradient with only positive
    gradients passed back through every ReLU."""
    return saliency(p.per_target(pixel.GUIDED, pixel.guided_gradients))


@register("guided_gradcam", needs_gradients=True, pixel=True)
def guided_gradcam(p: LayerPass) -> tf.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop × Grad-CAM (after ReLU)
    upsampled bilinearly to the input."""
    guided = p.per_target(pixel.GUIDED, pixel.guided_gradients)
    cam = tf.image.resize(tf.nn.relu(gradcam(p))[..., None], tf.shape(guided)[1:3], method="bilinear")[..., 0]
    return saliency(guided) * cam


def sampled_map(read: str, kind: str) -> MethodFn:
    """The map of a sampled read: SmoothGrad's saliency of the mean gradient, or Integrated
    Gradients' attributions summed over the channels."""

    def fn(p: LayerPass) -> tf.Tensor:
        value = p.per_target(read, pixel.all_samples(read))
        return saliency(value) if kind == "smoothgrad" else tf.reduce_sum(value, axis=-1)

    return fn


def register_sampled(
    name: str,
    kind: str,
    samples: int,
    noise: float = pixel.SMOOTHGRAD_NOISE,
    baseline: float = pixel.IG_BASELINE,
    replace: bool = False,
    doc: str | None = None,
) -> MethodFn:
    """Register a SmoothGrad (``kind="smoothgrad"``: ``samples`` copies, noise ``noise`` × the
    image's range) or Integrated Gradients (``kind="integrated_gradients"``: ``samples`` path
    points from the constant ``baseline``) method under ``name``: other sample counts than the
    built-ins' 16, computed ``chunk_size`` copies at a time.

    >>> from camserve.explain.methods import METHODS, unregister
    >>> _ = register_sampled("smoothgrad_50", "smoothgrad", samples=50, noise=0.2)
    >>> METHODS["smoothgrad_50"].samples, METHODS["smoothgrad_50"].reads
    (50, ('sampled:smoothgrad_50',))
    >>> _ = unregister("smoothgrad_50")
    """
    read = "smoothgrad_gradients" if name == "smoothgrad" else f"sampled:{name}"
    read = "integrated_gradients" if name == "integrated_gradients" else read
    pixel.add_sampling(read, pixel.Sampling(kind, samples, noise, baseline))
    text = doc or f"{kind} with {samples} copies" + (
        f", noise {noise}" if kind == "smoothgrad" else f", baseline {baseline}"
    )
    return register(name, pixel=True, reads=(read,), samples=samples, replace=replace, doc=text)(
        sampled_map(read, kind)
    )


smoothgrad = register_sampled(
    "smoothgrad",
    "smoothgrad",
    pixel.SMOOTHGRAD_SAMPLES,
    doc="SmoothGrad (Smilkov et al. 2017): the input gradient averaged over 16 noisy copies (noise 15 % of "
    "the image's range), chunked.",
)
integrated_gradients = register_sampled(
    "integrated_gradients",
    "integrated_gradients",
    pixel.IG_STEPS,
    doc="Integrated Gradients (Sundararajan et al. 2017): (x − 0) × the mean gradient at 16 points of the "
    "straight path from a zero baseline, summed over channels, chunked.",
)
