"""What one compiled pass of the :class:`~camserve.explain.Explainer` shares between targets
and methods: the :class:`~camserve.explain.methods.LayerPass` a method reads.

:class:`SharedPass` holds the activations and logits of a batch and computes, once for all
targets, what Score-CAM and Ablation-CAM need (masked-input scores, ablated logits) in chunks
of ``chunk_size``; :class:`TargetView` is that pass as one target sees it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import tensorflow as tf

if TYPE_CHECKING:
    from camserve.explain.explainer import Explainer


class SharedPass:
    """What one compiled pass shares between targets and methods. The masked-input and
    ablation scores are computed once for all targets, in chunks of ``chunk_size``."""

    def __init__(self, ex: Explainer, images, activations, logits, classes):
        self.ex, self.images, self.logits, self.classes_all = ex, images, logits, classes
        self.activations = tf.cast(activations, tf.float32)
        self._cache: dict[str, tf.Tensor] = {}

    def for_target(self, t: int, gradients) -> TargetView:
        grads = None if gradients is None else tf.cast(gradients, tf.float32)
        return TargetView(self, t, grads)

    def cached(self, key: str, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def selected_channels(self) -> tf.Tensor:
        def compute():
            a = self.activations
            b, k = a.shape[0], a.shape[-1]
            cap = self.ex.max_channels
            if cap is None or cap >= k:
                return tf.tile(tf.range(k)[None, :], (b, 1))
            spread = tf.math.reduce_std(a, axis=(1, 2))
            return tf.math.top_k(spread, k=cap).indices

        return self.cached("channels", compute)

    def _chunked(self, per_chunk) -> tf.Tensor:
        """Run ``per_chunk(image_index, channel)`` -> (S, T) over every (image, selected
        channel) pair in chunks of ``chunk_size``; (B, K', T) out."""
        channels = self.selected_channels()
        b, k_sel = channels.shape
        total = b * k_sel
        size = min(self.ex.chunk_size, total)  # never pad a small job up to a full chunk
        n_chunks = -(-total // size)
        flat = tf.minimum(tf.range(n_chunks * size), total - 1)
        image_index = flat // k_sel
        channel = tf.gather(tf.reshape(channels, (-1,)), flat)
        scores = tf.map_fn(
            lambda args: per_chunk(args[0], args[1]),
            (tf.reshape(image_index, (n_chunks, size)), tf.reshape(channel, (n_chunks, size))),
            fn_output_signature=tf.TensorSpec((size, self.classes_all.shape[1]), tf.float32),
            parallel_iterations=1,
        )
        return tf.reshape(tf.reshape(scores, (-1, self.classes_all.shape[1]))[:total], (b, k_sel, -1))

    def _target_columns(self, values, image_index) -> tf.Tensor:
        return tf.gather(values, tf.gather(self.classes_all, image_index), batch_dims=1)

    def masked_input_scores(self) -> tf.Tensor:
        def per_chunk(image_index, channel):
            a = tf.transpose(self.activations, (0, 3, 1, 2))  # (B, K, h, w)
            maps = tf.gather_nd(a, tf.stack([image_index, channel], axis=1))[..., None]
            maps = tf.image.resize(maps, tf.shape(self.images)[1:3], method="bilinear")
            low = tf.reduce_min(maps, axis=(1, 2, 3), keepdims=True)
            high = tf.reduce_max(maps, axis=(1, 2, 3), keepdims=True)
            masks = (maps - low) / tf.maximum(high - low, 1e-7)
            masked = tf.gather(self.images, image_index) * tf.cast(masks, self.images.dtype)
            _, logits, _ = self.ex._forward(masked, need_activations=False)
            return self._target_columns(self.ex._probabilities(logits), image_index)

        return self.cached("scorecam", lambda: self._chunked(per_chunk))

    def ablated_logits(self) -> tf.Tensor:
        def per_chunk(image_index, channel):
            a = tf.gather(self.activations, image_index)
            keep = 1.0 - tf.one_hot(channel, a.shape[-1], dtype=a.dtype)
            ablated = a * keep[:, None, None, :]
            # The ablated activations replace the layer's output; what feeds the layer is unused.
            _, logits, _ = self.ex._forward(tf.gather(self.images, image_index), replace_activations=lambda: ablated)
            return self._target_columns(logits, image_index)

        return self.cached("ablation", lambda: self._chunked(per_chunk))


class TargetView:
    """The pass as one target sees it (the :class:`camserve.explain.methods.LayerPass` protocol)."""

    def __init__(self, shared: SharedPass, t: int, gradients):
        self._shared, self._t = shared, t
        self.activations = shared.activations
        self.gradients = gradients
        self.logits = shared.logits
        self.classes = shared.classes_all[:, t]

    def head_weights(self) -> tf.Tensor:
        return self._shared.cached("cam_weights", self._shared.ex.cam_weights)

    def selected_channels(self) -> tf.Tensor:
        return self._shared.selected_channels()

    def masked_input_scores(self) -> tf.Tensor:
        return self._shared.masked_input_scores()[:, :, self._t]

    def ablated_logits(self) -> tf.Tensor:
        return self._shared.ablated_logits()[:, :, self._t]
