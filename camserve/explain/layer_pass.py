"""What one compiled pass of the :class:`~camserve.explain.Explainer` shares between targets
and methods: the :class:`~camserve.explain.methods.LayerPass` a method reads.

:class:`SharedPass` holds the activations and logits of a batch and gives, once for all
targets, what Score-CAM and Ablation-CAM need (masked-input scores, ablated logits): either
given to the pass already (``scored``: the Explainer computed them chunk by chunk in graph
calls of their own, checking its ``checkpoint`` between chunks) or computed inside the pass in
chunks of ``chunk_size`` (one ``tf.map_fn``); :class:`TargetView` is that pass as one target
sees it. :data:`SCORED` names what can be computed chunk by chunk, with the function that
scores one chunk of (image, channel) pairs; :func:`scored_inputs` drives those graph calls.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from camserve.explain import passes

if TYPE_CHECKING:
    from camserve.explain.explainer import Explainer


def select_channels(activations: tf.Tensor, cap: int | None) -> tf.Tensor:
    """(B, K') channel indices: all K, or the ``cap`` of the highest spatial spread
    (Faster-Score-CAM)."""
    b, k = activations.shape[0], activations.shape[-1]
    if cap is None or cap >= k:
        return tf.tile(tf.range(k)[None, :], (b, 1))
    spread = tf.math.reduce_std(activations, axis=(1, 2))
    return tf.math.top_k(spread, k=cap).indices


def explained_scores(
    ex: Explainer, classes, logits, outputs, scorer=None, rows=None, probability: bool = False
) -> tf.Tensor:
    """(S, T) what the targets of S inputs explain: the class logit (``probability``: the
    class probability) of class targets, ``scorer``'s values for any other target (the pass's
    :mod:`camserve.targets` scalars). ``rows`` (S,): each input's row of ``classes`` (B, T)
    (None: row i for input i)."""
    if scorer is not None:
        return scorer(classes, logits, outputs, rows, probability)
    values = ex._probabilities(logits) if probability else logits
    return tf.gather(values, classes if rows is None else tf.gather(classes, rows), batch_dims=1)


def masked_input_chunk(
    ex: Explainer, images, activations, classes, image_index, channel, site: int = 0, scorer=None
) -> tf.Tensor:
    """Score-CAM for one chunk of (image, channel) pairs: the target probabilities (S, T) of
    the images masked by the upsampled, min-max normalised channel (of site ``site``);
    ``scorer``: the targets' values for targets other than class logits."""
    a = tf.transpose(activations, (0, 3, 1, 2))  # (B, K, h, w)
    maps = tf.gather_nd(a, tf.stack([image_index, channel], axis=1))[..., None]
    maps = tf.image.resize(maps, tf.shape(images)[1:3], method="bilinear")
    low = tf.reduce_min(maps, axis=(1, 2, 3), keepdims=True)
    high = tf.reduce_max(maps, axis=(1, 2, 3), keepdims=True)
    masks = (maps - low) / tf.maximum(high - low, 1e-7)
    masked = tf.gather(images, image_index) * tf.cast(masks, images.dtype)
    _, logits, outputs = passes.forward(ex, masked, need_activations=False)
    return explained_scores(ex, classes, logits, outputs, scorer, image_index, probability=True)


def ablated_chunk(
    ex: Explainer, images, activations, classes, image_index, channel, site: int = 0, scorer=None
) -> tf.Tensor:
    """Ablation-CAM for one chunk of (image, channel) pairs: the target logits (S, T) with
    the channel of the layer (site ``site``) zeroed; ``scorer`` as for :func:`masked_input_chunk`."""
    a = tf.gather(activations, image_index)
    keep = 1.0 - tf.one_hot(channel, a.shape[-1], dtype=a.dtype)
    ablated = a * keep[:, None, None, :]
    # The ablated activations replace the layer's output (tokens: its grid part).
    _, logits, outputs = passes.forward(ex, tf.gather(images, image_index), replace={site: lambda raw: ablated})
    return explained_scores(ex, classes, logits, outputs, scorer, image_index)


ChunkFn = Callable[..., tf.Tensor]


def target_classes(logits: tf.Tensor, targets: tf.Tensor, width: int) -> tf.Tensor:
    """(B, T) classes: a target ≥ 0 is a class, -(r + 1) the r-th predicted class."""
    ranked = tf.math.top_k(logits, k=width).indices
    return tf.where(targets >= 0, targets, tf.gather(ranked, tf.maximum(-targets - 1, 0), batch_dims=1))


def prepare_pass(ex: Explainer, images, targets, width: int) -> dict[str, tf.Tensor]:
    """What the chunked scores need (the body of the Explainer's "prepare" graph): the
    activations, logits, outputs, target classes and the channels scored. An explain pass
    that needs no gradients takes the forward pass from here instead of running it again."""
    grids, logits, outputs = passes.forward(ex, images)
    activations = tf.cast(grids[0], tf.float32)
    return {
        "activations": activations,
        "logits": logits,
        "outputs": outputs,
        "classes": target_classes(logits, targets, width),
        "channels": select_channels(activations, ex.max_channels),
    }


#: The forward pass an explain graph may take from :func:`prepare_pass` (see ``scored``).
FORWARD = ("activations", "logits", "outputs")


def chunk_group(chunk: ChunkFn, ex: Explainer, size: int, images, activations, classes, image_index, channel):
    """``chunk`` over ``len(image_index)`` pairs in chunks of ``size`` (a ``tf.map_fn`` when
    there are several): (pairs, T) scores. The body of the Explainer's "chunk" graphs."""
    if image_index.shape[0] == size:
        return chunk(ex, images, activations, classes, image_index, channel)
    width = classes.shape[1]
    scores = tf.map_fn(
        lambda args: chunk(ex, images, activations, classes, args[0], args[1]),
        (tf.reshape(image_index, (-1, size)), tf.reshape(channel, (-1, size))),
        fn_output_signature=tf.TensorSpec((size, width), tf.float32),
        parallel_iterations=1,
    )
    return tf.reshape(scores, (-1, width))


def _channels_scored(ex: Explainer) -> int | None:
    """K': the channels Score-CAM / Ablation-CAM score (all, or ``max_channels``); None when
    the layer has no single output shape."""
    try:
        k = int(ex.layer_path[-1].output.shape[-1])
    except (AttributeError, ValueError, TypeError):
        return None
    return k if ex.max_channels is None else min(k, int(ex.max_channels))


def scored_inputs(ex: Explainer, batch, targets, n: int, width: int, reads, check, gradients: bool) -> dict:
    """The chunked scores ``reads`` of a batch, (B, K', T) each, computed in graph calls of
    their own with ``check()`` before each, when an image scores at least ``SPLIT_CHUNKS``
    chunks of channels (K' ≥ 4 × ``chunk_size``: the extra forward pass and the calls then
    cost little beside the masked passes); {} otherwise (the explain pass computes them in one
    go). Score-CAM calls score one chunk (``chunk_size`` masked inputs, each a whole forward
    pass); Ablation-CAM calls, whose chunks only re-run the head, score ``SCORED[...][1]``
    chunks. Without ``gradients`` the explain pass reuses this forward pass (:data:`FORWARD`)."""
    k = _channels_scored(ex)
    if k is not None and k < SPLIT_CHUNKS * ex.chunk_size:
        return {}
    prep = ex._graph(("prepare", width))(batch, targets)
    channels = prep["channels"].numpy()
    k, total = channels.shape[1], n * channels.shape[1]
    if k < SPLIT_CHUNKS * ex.chunk_size:
        return {}
    scored = {name: prep[name] for name in FORWARD} if not gradients else {}
    for read in (r for r in reads if r in SCORED):  # sampled reads: camserve.explain.pixel
        per_call = ex.chunk_size * SCORED[read][1]
        flat = np.minimum(np.arange(-(-total // per_call) * per_call), total - 1)  # the last call padded
        image_index, channel = (flat // k).astype(np.int32), channels[:n].reshape(-1)[flat].astype(np.int32)
        fn = ex._graph(("chunk", read, SCORED[read][1]))
        parts = []
        for c0 in range(0, len(flat), per_call):
            check()
            ii, ch = tf.constant(image_index[c0 : c0 + per_call]), tf.constant(channel[c0 : c0 + per_call])
            parts.append(fn(batch, prep["activations"], prep["classes"], ii, ch).numpy())
        values = np.zeros((len(batch), k, width), np.float32)  # padded images: zeros, never read
        values[:n] = np.concatenate(parts)[:total].reshape(n, k, width)
        scored[read] = tf.constant(values)
    return scored


#: What a method may read that is scored chunk by chunk (``Method.reads``): its chunk function
#: and how many chunks one graph call scores.
SCORED: dict[str, tuple[ChunkFn, int]] = {
    "masked_input_scores": (masked_input_chunk, 1),
    "ablated_logits": (ablated_chunk, 8),
}
#: Chunks of channels per image from which the scores are computed in calls of their own.
SPLIT_CHUNKS = 4


class SharedPass:
    """What one compiled pass shares between targets and methods. The masked-input and
    ablation scores (B, K', T) are taken from ``scored`` when given, else computed once for
    all targets, in chunks of ``chunk_size``."""

    def __init__(
        self,
        ex: Explainer,
        images,
        activations,
        logits,
        classes,
        scored: dict[str, Any] | None = None,
        site: int = 0,
        scorer=None,
    ):
        self.ex, self.images, self.logits, self.classes_all = ex, images, logits, classes
        self.activations = tf.cast(activations, tf.float32)
        self._cache: dict[str, tf.Tensor] = dict(scored or {})
        self.site, self.scorer = site, scorer

    def for_target(self, t: int, gradients, values=None) -> TargetView:
        """The pass as target ``t`` sees it; ``values`` (B,): the target's scalars when they are
        not class logits (the view's ``logits`` then hold them in the target's column)."""
        grads = None if gradients is None else tf.cast(gradients, tf.float32)
        return TargetView(self, t, grads, values)

    def cached(self, key: str, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def selected_channels(self) -> tf.Tensor:
        return self.cached("channels", lambda: select_channels(self.activations, self.ex.max_channels))

    def _chunked(self, chunk: ChunkFn) -> tf.Tensor:
        """Run ``chunk`` over every (image, selected channel) pair in chunks of ``chunk_size``
        (one ``tf.map_fn``); (B, K', T) out."""
        channels = self.selected_channels()
        b, k_sel = channels.shape
        total = b * k_sel
        size = min(self.ex.chunk_size, total)  # never pad a small job up to a full chunk
        flat = tf.minimum(tf.range(-(-total // size) * size), total - 1)
        image_index, channel = flat // k_sel, tf.gather(tf.reshape(channels, (-1,)), flat)
        bound = functools.partial(chunk, site=self.site, scorer=self.scorer)
        scores = chunk_group(
            bound, self.ex, size, self.images, self.activations, self.classes_all, image_index, channel
        )
        return tf.reshape(scores[:total], (b, k_sel, -1))

    def masked_input_scores(self) -> tf.Tensor:
        return self.cached("masked_input_scores", lambda: self._chunked(masked_input_chunk))

    def ablated_logits(self) -> tf.Tensor:
        return self.cached("ablated_logits", lambda: self._chunked(ablated_chunk))


class TargetView:
    """The pass as one target sees it (the :class:`camserve.explain.methods.LayerPass` protocol)."""

    def __init__(self, shared: SharedPass, t: int, gradients, values=None):
        self._shared, self._t = shared, t
        self.activations = shared.activations
        self.gradients = gradients
        self.logits = shared.logits
        self.classes = shared.classes_all[:, t]
        if values is not None:  # the target's scalar where a method reads "the target's logit"
            if len(self.logits.shape) == 2:
                column = tf.one_hot(self.classes, tf.shape(self.logits)[1]) > 0.0
                self.logits = tf.where(column, values[:, None], self.logits)
            else:
                self.logits, self.classes = values[:, None], tf.zeros_like(self.classes)

    def with_activations(self, activations) -> TargetView:
        """The same view reading ``activations`` instead (eigen-smoothing's linearisation)."""
        view = copy.copy(self)
        view.activations = activations
        return view

    def head_weights(self) -> tf.Tensor:
        return self._shared.cached("cam_weights", self._shared.ex.cam_weights)

    def selected_channels(self) -> tf.Tensor:
        return self._shared.selected_channels()

    def masked_input_scores(self) -> tf.Tensor:
        return self._shared.masked_input_scores()[:, :, self._t]

    def ablated_logits(self) -> tf.Tensor:
        return self._shared.ablated_logits()[:, :, self._t]

    def per_target(self, key: str, compute: Callable[[SharedPass], tf.Tensor]) -> tf.Tensor:
        """``compute(shared pass)``, a (B, T, ...) value for all targets computed once per pass
        (or given in ``scored`` under ``key``), at this target (pixel methods read it)."""
        return self._shared.cached(key, lambda: compute(self._shared))[:, self._t]
