"""Pixel-level methods (they register into :data:`camserve.explain.methods.METHODS` with
``pixel=True``): maps at the input's resolution from gradients with respect to the image,
computed by :mod:`camserve.explain.pixel`. Gradients become a map by the largest absolute
value over the colour channels (Simonyan et al. 2014); Integrated Gradients' attributions are
summed over the channels (its completeness: they add up to the score's change).

>>> from camserve.explain.methods import METHODS
>>> [(m, METHODS[m].samples) for m in ("smoothgrad", "integrated_gradients")]
[('smoothgrad', 16), ('integrated_gradients', 16)]
"""

from __future__ import annotations

import tensorflow as tf

from camserve.explain import pixel
from camserve.explain.methods import LayerPass, gradcam, register


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


@register("smoothgrad", pixel=True, reads=("smoothgrad_gradients",), samples=pixel.SMOOTHGRAD_SAMPLES)
def smoothgrad(p: LayerPass) -> tf.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the input gradient averaged over 16 noisy copies
    (noise 15 % of the image's range), chunked."""
    read = "smoothgrad_gradients"
    return saliency(p.per_target(read, pixel.all_samples(read)))


@register("integrated_gradients", pixel=True, reads=("integrated_gradients",), samples=pixel.IG_STEPS)
def integrated_gradients(p: LayerPass) -> tf.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017): (x − 0) × the mean gradient at 16
    points of the straight path from a zero baseline, summed over channels, chunked."""
    read = "integrated_gradients"
    return tf.reduce_sum(p.per_target(read, pixel.all_samples(read)), axis=-1)
