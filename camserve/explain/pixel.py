"""The machinery of pixel-level methods: gradients of a target with respect to the input image.

- **Guided backpropagation** (Springenberg et al. 2015): the model re-run with every ReLU
  output passed through :func:`guided_gate`, an identity whose gradient keeps only the positive
  part of what flows back; behind the ReLU's own gate (input > 0) that is guided backprop's
  rule. Keras layers with a ``relu`` activation (Conv2D, Dense, Activation) and ``ReLU`` layers
  are gated (:func:`relu_layers`), through the explainer's layer hooks: no model is cloned.
- **Sampled input gradients** (SmoothGrad, Smilkov et al. 2017; Integrated Gradients,
  Sundararajan et al. 2017): the mean input gradient over ``samples`` perturbed copies of
  each image (:data:`SAMPLING`), computed in graph calls of ``chunk_size`` copies each with the
  explain call's ``checkpoint`` between them and the sum kept on the device, so the sample
  count fits in bounded memory (:func:`sampled_gradients`). SmoothGrad's copy ``s`` adds
  noise ``level × (max − min of the image) × N(0, 1)`` drawn by
  ``tf.random.stateless_normal(image shape, seed=(SEED, s))``; Integrated Gradients' copy ``s``
  is ``baseline + (s + ½) / steps × (image − baseline)`` (midpoint Riemann sum), baseline 0 in
  the model's input space, and the mean gradient is multiplied by (image − baseline). Other
  counts, noise levels and baselines: :func:`camserve.explain.methods_pixel.register_sampled`.

Maps at the input's resolution leave the explain graph beside the layer-resolution ones
(:func:`split_maps`, :func:`pixel_heatmaps`, :func:`raw_map`).

>>> round(float(guided_gate(tf.constant(2.0))), 1), SAMPLING["integrated_gradients"].samples
(2.0, 16)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from camserve import keras_graph as graph
from camserve.errors import InvalidArgument
from camserve.explain import layer_pass as lp

if TYPE_CHECKING:
    from camserve.explain.explainer import Explainer
    from camserve.explain.methods import Method

#: What guided backpropagation computes once per pass: (B, T, H, W, C) input gradients.
GUIDED = "guided_gradients"
#: Seed of SmoothGrad's noise (copy ``s`` of every image uses the seed (SEED, s)).
SEED = 1234
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_NOISE = 0.15  # of the image's value range (Smilkov et al.: 10–20 %)
IG_STEPS = 16
IG_BASELINE = 0.0


@tf.custom_gradient
def guided_gate(y: tf.Tensor) -> tuple[tf.Tensor, Callable]:
    """Identity forward; backward lets only the positive part of the incoming gradient through."""

    def grad(dy: tf.Tensor) -> tf.Tensor:
        return tf.nn.relu(dy)

    return tf.identity(y), grad


def _is_relu(layer: Any) -> bool:
    if isinstance(layer, keras.layers.ReLU):
        return True
    return getattr(getattr(layer, "activation", None), "__name__", "") in ("relu", "relu6")


def relu_layers(model: keras.Model) -> list[Any]:
    """The layers of ``model`` (nested models included) whose output is a ReLU's."""
    return [p[-1] for p in graph.iter_layer_paths(model) if not isinstance(p[-1], keras.Model) and _is_relu(p[-1])]


def guided_hooks(ex: Explainer) -> dict[int, graph.Hook]:
    """Layer hooks (for :meth:`Explainer._forward`) gating every ReLU output with :func:`guided_gate`."""

    def gate(call: Callable) -> Callable:
        return lambda *args, **kwargs: guided_gate(call(*args, **kwargs))

    return {id(layer): gate for layer in relu_layers(ex.model)}


def input_gradients(ex: Explainer, inputs, classes, weight=None, hooks=None, scorer=None, rows=None) -> list[tf.Tensor]:
    """Per target column t of ``classes`` (B, T): d Σ_s weight_s · score_s / d inputs, (S, H, W, C),
    score_s the target's :func:`~camserve.explain.layer_pass.explained_scores` of input s
    (``rows`` (S,): each input's row of ``classes``; None: row s)."""
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        tape.watch(inputs)
        _, logits, outputs = ex._forward(inputs, need_activations=False, hooks=hooks)
        values = lp.explained_scores(ex, classes, logits, outputs, scorer, rows)
        ys = [tf.reduce_sum(values[:, t] if weight is None else values[:, t] * weight) for t in range(classes.shape[1])]
    return [tape.gradient(y, inputs) for y in ys]


def guided_gradients(shared: lp.SharedPass) -> tf.Tensor:
    """(B, T, H, W, C) guided-backprop gradients of every target (one gated pass)."""
    ex, scorer = shared.ex, shared.scorer
    grads = input_gradients(ex, shared.images, shared.classes_all, hooks=guided_hooks(ex), scorer=scorer)
    return tf.stack(grads, axis=1)


# --------------------------------------------------------------------------- sampled gradients
#: The kinds of sampled input gradients.
KINDS = ("smoothgrad", "integrated_gradients")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A sampled read: ``samples`` copies of each image (``kind`` ``"smoothgrad"``: noisy
    copies, ``noise`` × the image's value range; ``"integrated_gradients"``: points of the path
    from ``baseline``), their mean input gradient, :meth:`finish`-ed."""

    kind: str
    samples: int
    noise: float = SMOOTHGRAD_NOISE
    baseline: float = IG_BASELINE

    def copies(self, images: tf.Tensor, sample: tf.Tensor) -> tf.Tensor:
        """The inputs of copy ``sample`` (S,) of each image (S, H, W, C) (see the module doc)."""
        if self.kind == "integrated_gradients":
            alpha = (tf.cast(sample, tf.float32) + 0.5) / self.samples
            return self.baseline + alpha[:, None, None, None] * (images - self.baseline)
        top, bottom = (
            tf.reduce_max(images, axis=(1, 2, 3), keepdims=True),
            tf.reduce_min(images, axis=(1, 2, 3), keepdims=True),
        )
        shape = tf.shape(images)[1:]
        noise = tf.map_fn(
            lambda s: tf.random.stateless_normal(shape, seed=tf.stack([tf.constant(SEED), s])),
            sample,
            fn_output_signature=tf.float32,
        )
        return images + self.noise * (top - bottom) * noise

    def finish(self, images: tf.Tensor, mean_gradients: tf.Tensor) -> tf.Tensor:
        """(B, T, H, W, C): the mean gradients, times (image − baseline) for Integrated Gradients."""
        if self.kind == "integrated_gradients":
            return mean_gradients * (images - self.baseline)[:, None]
        return mean_gradients


#: Sampled reads by name (:func:`add_sampling`).
SAMPLING: dict[str, Sampling] = {}


def add_sampling(read: str, spec: Sampling) -> str:
    """Make ``read`` a sampled read of ``spec`` (a method then declares ``reads=(read,)``)."""
    if spec.kind not in KINDS:
        raise InvalidArgument(f"a sampled method's kind is one of {', '.join(KINDS)}; got {spec.kind!r}")
    if isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or not 1 <= spec.samples <= 4096:
        raise InvalidArgument(f"samples must be an integer from 1 to 4096, got {spec.samples!r}")
    if not (np.isfinite(spec.noise) and spec.noise >= 0 and np.isfinite(spec.baseline)):
        raise InvalidArgument(f"noise must be finite and ≥ 0, baseline finite; got {spec.noise!r}, {spec.baseline!r}")
    from camserve.explain.methods import SAMPLE_READS

    SAMPLING[read] = spec
    if read not in SAMPLE_READS:
        SAMPLE_READS.append(read)
    return read


SAMPLING.update(
    smoothgrad_gradients=Sampling("smoothgrad", SMOOTHGRAD_SAMPLES),
    integrated_gradients=Sampling("integrated_gradients", IG_STEPS),
)


def sampled_chunk(ex: Explainer, read: str, images, classes, image_index, sample, weight, scorer=None) -> tf.Tensor:
    """One chunk of (image, copy) pairs: the sum over its copies of each image's input
    gradients, (B, T, H, W, C); ``weight`` 0 marks padding pairs."""
    ex.trace_count += 1
    inputs = SAMPLING[read].copies(tf.gather(images, image_index), sample)
    grads = input_gradients(ex, inputs, classes, weight, scorer=scorer, rows=image_index)
    b = tf.shape(images)[0]
    return tf.stack([tf.math.unsorted_segment_sum(g, image_index, b) for g in grads], axis=1)


def all_samples(read: str) -> Callable[[lp.SharedPass], tf.Tensor]:
    """In-graph computation of ``read`` when the explain call did not compute it in calls of
    their own (augmented views, several layers, targets that are not classes): the copies in
    chunks of ``chunk_size`` inside a ``tf.while_loop`` summing on the device, so memory stays
    bounded by one chunk (no checkpoint between the chunks here)."""

    def compute(shared: lp.SharedPass) -> tf.Tensor:
        spec, images, classes = SAMPLING[read], shared.images, shared.classes_all
        scorer, size = shared.scorer, shared.ex.chunk_size
        if images.shape[0] is not None:  # never pad a small job up to a full chunk
            size = min(size, images.shape[0] * spec.samples)
        total = tf.shape(images)[0] * spec.samples
        calls = (total + size - 1) // size

        def body(i, acc):
            flat = i * size + tf.range(size)
            weight = tf.cast(flat < total, tf.float32)
            flat = tf.minimum(flat, total - 1)
            image_index, sample = flat // spec.samples, flat % spec.samples
            return i + 1, acc + sampled_chunk(shared.ex, read, images, classes, image_index, sample, weight, scorer)

        start = tf.zeros(tf.concat([tf.shape(images)[:1], [classes.shape[1]], tf.shape(images)[1:]], axis=0))
        _, summed = tf.while_loop(lambda i, _: i < calls, body, (tf.constant(0), start))
        return spec.finish(images, summed / spec.samples)

    return compute


def _sampled_graph(ex: Explainer, read: str) -> Callable:
    return tf.function(functools.partial(sampled_chunk, ex, read), jit_compile=ex.jit_compile)


def sampled_gradients(ex: Explainer, batch, targets, n: int, width: int, reads, check, gradients: bool) -> dict:
    """The sampled reads among ``reads`` of a batch, computed in graph calls of ``chunk_size``
    (image, copy) pairs each (only the ``n`` real images), ``check()`` before each; the sums
    stay on the device. Without ``gradients`` the explain pass reuses this forward pass."""
    wanted = [r for r in reads if r in SAMPLING]
    if not wanted:
        return {}
    prep = ex._graph(("prepare", width))(batch, targets)
    scored = {} if gradients else {name: prep[name] for name in lp.FORWARD}
    for read in wanted:
        spec = SAMPLING[read]
        total = n * spec.samples
        per_call = min(ex.chunk_size, len(batch) * spec.samples)
        flat = np.arange(-(-total // per_call) * per_call)
        weight = (flat < total).astype(np.float32)
        flat = np.minimum(flat, total - 1)
        image_index, sample = (flat // spec.samples).astype(np.int32), (flat % spec.samples).astype(np.int32)
        fn = ex._graphs.get(("sampled", read, spec, per_call), functools.partial(_sampled_graph, ex, read))
        acc = tf.zeros(())
        for c0 in range(0, len(flat), per_call):
            check()
            acc = acc + fn(
                batch,
                prep["classes"],
                tf.constant(image_index[c0 : c0 + per_call]),
                tf.constant(sample[c0 : c0 + per_call]),
                tf.constant(weight[c0 : c0 + per_call]),
            )
        scored[read] = spec.finish(batch, acc / spec.samples)
    return scored


# --------------------------------------------------------------------------- maps out of the graph
def split_maps(maps: Sequence[Sequence[tf.Tensor]], methods: Sequence[Method], activations) -> tuple:
    """Per target, one map per method (the pixel methods last) -> (layer maps (B, T, M', h, w),
    pixel maps (B, T, P, H, W) or None)."""
    layer = [[m for m, method in zip(per_t, methods) if not method.pixel] for per_t in maps]
    pixel = [[m for m, method in zip(per_t, methods) if method.pixel] for per_t in maps]
    if layer[0]:
        raw = tf.stack([tf.stack(per_t, axis=1) for per_t in layer], axis=1)
    else:
        shape = tf.shape(activations)
        raw = tf.zeros(tf.stack([shape[0], len(maps), 0, shape[1], shape[2]]))
    return raw, (tf.stack([tf.stack(per_t, axis=1) for per_t in pixel], axis=1) if pixel[0] else None)


def pixel_heatmaps(heat: tf.Tensor, pixel_raw) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """The layer methods' heatmaps (B, T, M', H, W) with the pixel maps', each scaled to peak 1,
    appended; and the outputs to add (``pixel_raw``)."""
    from camserve.explain.smoothing import normalise  # smoothing -> methods -> methods_pixel -> pixel

    if pixel_raw is None:
        return heat, {}
    return tf.concat([heat, normalise(pixel_raw)], axis=2), {"pixel_raw": pixel_raw}


def raw_map(out: dict[str, np.ndarray], i: int, t: Any, m: int) -> np.ndarray:
    """The raw map of graph column ``m``: the layer's resolution, or the input's for pixel methods."""
    layer = out["raw"].shape[2]
    return out["raw"][i, t, m] if m < layer else out["pixel_raw"][i, t, m - layer]
