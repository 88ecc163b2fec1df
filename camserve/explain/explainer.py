"""The batched explanation engine behind :class:`Explainer`.

One compiled pass per batch computes the layer's activations, the logits and, for every
requested target, the gradient of the target's logit with respect to the activations;
every method in :data:`camserve.explain.methods.METHODS` then reads what it needs from that
pass. Batches are padded to a few bucket sizes so that N = 1 … ``max_batch_size``
reuses a handful of compiled graphs, and nothing is copied to the host before the end.

Graphs are keyed canonically (methods sorted by name, the target count rounded up to a power
of two; results come back in the caller's order and count) and kept under an LRU bound
(``max_graphs``, :mod:`camserve.explain.graphs`). Score-CAM / Ablation-CAM scores that take
more than one chunk are computed chunk by chunk in graph calls of their own, so that a
``checkpoint`` (a server's deadline) can stop them between chunks. ``precision``
(``"mixed_float16"``), ``jit_compile`` (XLA) and ``device`` are the accelerator options;
outputs, raw maps and heatmaps are float32 whatever the precision.

>>> ex = Explainer(model, class_names=["cat", "dog"])                 # doctest: +SKIP
>>> [e.label for e in ex.explain(images, methods=("gradcam", "cam"))[0]]  # doctest: +SKIP
['dog', 'dog']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from camserve import keras_graph as graph
from camserve.accelerator import resolve_device
from camserve.errors import InvalidArgument, NotFound
from camserve.explain import heads, pixel
from camserve.explain import layer_pass as lp
from camserve.explain.graphs import DEFAULT_MAX_GRAPHS, GraphCache, bucket_sizes, width_bucket
from camserve.explain.methods import METHODS, Method, UnknownMethod, weighted_sum
from camserve.explanation import Explanation
from camserve.imaging import heatmap_box

Target = int | str
Targets = Sequence[Target | Sequence[Target]] | None
#: Called between chunks of work; raises to stop it (the server's deadline / shutdown).
Checkpoint = Callable[[], None]


def _no_checkpoint() -> None:
    return None


class UnknownClass(NotFound):
    """A target that names no class of the model."""


def _activation_name(layer: keras.layers.Layer) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


class _Registered:
    """The names in :data:`~camserve.explain.methods.METHODS`, read when asked (on the class
    or an instance), so methods registered later are seen."""

    def __get__(self, obj: object, owner: type | None = None) -> tuple[str, ...]:
        return tuple(METHODS)


class Explainer:
    """Explain a Keras image classifier with the CAM family.

    ``layer``: None (the last 4-D activation before the head) or a name, ``outer/inner`` for
    a layer of a nested model. ``chunk_size``: masked inputs per forward pass for Score-CAM
    and Ablation-CAM. ``max_channels``: score only the highest-variance channels
    (Faster-Score-CAM); None scores all. ``max_graphs``: compiled graphs kept (LRU).
    ``precision``: ``"float32"`` (None) or ``"mixed_float16"`` (the model is cloned with that
    Keras policy, its output layer kept float32). ``jit_compile``: XLA-compile the graphs.
    ``device``: where the graphs run (``"/GPU:0"``, ``"/CPU:0"``, ``"auto"``: the first GPU when
    one is visible; None: TensorFlow's choice).

    >>> ex = Explainer(keras.applications.ResNet50(weights=None))            # doctest: +SKIP
    >>> ex.layer_name                                                        # doctest: +SKIP
    'conv5_block3_out'
    """

    methods = _Registered()

    def __init__(
        self,
        model: keras.Model,
        layer: str | None = None,
        class_names: Sequence[str] | None = None,
        chunk_size: int = 32,
        max_channels: int | None = None,
        max_batch_size: int = 64,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        precision: str | None = None,
        jit_compile: bool = False,
        device: str | None = None,
    ):
        if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.output_shape) != 2:
            raise InvalidArgument(
                f"Explainer needs a classifier with one image input and one (N, classes) output; "
                f"{model.name!r} has {len(model.inputs)} input(s) and output shape(s) {model.output_shape}"
            )
        self.precision = graph.check_precision(precision)
        self.jit_compile = bool(jit_compile)
        self.device = resolve_device(device)
        self.source_model = model
        with self._placement():
            model = graph.cast_model(model, self.precision)
        self.model = model
        self.layer_path = graph.resolve_layer(model, layer)
        self.layer_name = graph.layer_path_name(self.layer_path)
        self._output_layer = graph.output_layer_path(model)[-1]
        self.num_classes = int(model.output_shape[-1])
        if class_names is not None and len(class_names) != self.num_classes:
            raise InvalidArgument(f"{len(class_names)} class names given for a model with {self.num_classes} outputs")
        self.class_names = tuple(class_names) if class_names is not None else None
        if chunk_size < 1:
            raise InvalidArgument(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.chunk_size = chunk_size
        if max_channels is not None and (
            isinstance(max_channels, bool) or not isinstance(max_channels, (int, np.integer)) or max_channels < 1
        ):
            raise InvalidArgument(f"max_channels must be None (all channels) or an integer ≥ 1, got {max_channels!r}")
        self.max_channels = max_channels
        self.buckets = bucket_sizes(max_batch_size)
        self.input_shape = tuple(model.input_shape[1:])
        self.head = graph.head_after(model, self.layer_path)
        self.trace_count = 0  # graphs traced so far: a test checks that buckets stop retracing
        self._cam: heads.GapDense | None | bool = False  # False: not looked for yet
        self._graphs = GraphCache(max_graphs)

    # ----------------------------------------------------------------- public API
    def explain(
        self,
        images: np.ndarray,
        methods: Sequence[str] = ("gradcam",),
        targets: Targets = None,
        top_k: int = 1,
        checkpoint: Checkpoint | None = None,
    ) -> list[list[Explanation]]:
        """Explain a batch of preprocessed images (N, H, W, C).

        ``targets``: None (the ``top_k`` predicted classes) or, per image, a class index, a
        class name or a list of them. Returns, per image, one :class:`Explanation` per
        (target, method), targets outer, methods inner. ``checkpoint``: called before every
        compiled pass; whatever it raises stops the work and propagates (a server's deadline).
        """
        images = self._check_images(images)
        chosen = self._methods(methods)
        canonical = tuple(sorted(chosen, key=lambda m: (m.pixel, m.name)))  # pixel methods last
        order = [(m.name, canonical.index(m)) for m in chosen]  # the caller's order, as graph columns
        reads = tuple(sorted({r for m in canonical for r in m.reads}))
        gradients = any(m.needs_gradients for m in canonical)
        encoded, valid = self._encode_targets(len(images), targets, top_k)
        width = width_bucket(encoded.shape[1], self.num_classes)
        encoded = np.pad(encoded, ((0, 0), (0, width - encoded.shape[1])), constant_values=-1)  # top-1: unused
        results: list[list[Explanation]] = []
        check = checkpoint or _no_checkpoint
        with self._placement():
            for start, batch, n in self._batches(images):
                check()
                batch_targets = tf.constant(self._pad(encoded[start : start + n], len(batch)))
                scored = (
                    lp.scored_inputs(self, batch, batch_targets, n, width, reads, check, gradients)
                    if any(r in lp.SCORED for r in reads)
                    else {}
                ) | pixel.sampled_gradients(self, batch, batch_targets, n, width, reads, check, gradients)
                fn = self._graph(("explain", canonical, width, tuple(sorted(scored))))
                out = fn(batch, batch_targets, scored)
                out = {k: v.numpy() for k, v in out.items()}  # the one copy to the host
                for i in range(n):
                    results.append(self._collect(out, i, order, valid[start + i]))
        return results

    def predict(self, images: np.ndarray, checkpoint: Checkpoint | None = None) -> np.ndarray:
        """The model's outputs (N, classes), batched in the same buckets as :meth:`explain`;
        ``checkpoint()`` before every batch."""
        images = self._check_images(images)
        fn = self._graph(("predict",))
        check = checkpoint or _no_checkpoint
        parts = []
        with self._placement():
            for _, batch, n in self._batches(images):
                check()
                parts.append(fn(batch).numpy()[:n])
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes), np.float32)

    def warm_up(self, methods: Sequence[str] = ("gradcam",), top_k: int = 1, image_shape=None) -> None:
        """Compile every bucket's graph for ``methods`` (and prediction) ahead of traffic."""
        shape = tuple(image_shape or self.input_shape)
        if None in shape:
            raise InvalidArgument(f"warm_up needs a concrete image shape; the model takes {shape}")
        for size in self.buckets:
            zeros = np.zeros((size,) + shape, np.float32)
            self.predict(zeros)
            self.explain(zeros, methods=methods, top_k=top_k)

    # ----------------------------------------------------------------- checks
    def _check_images(self, images) -> np.ndarray:
        try:
            images = np.asarray(images, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"images must be a numeric (N, H, W, C) array: {exc}") from None
        expected = self.input_shape
        if images.ndim != 4 or any(e is not None and e != s for e, s in zip(expected, images.shape[1:])):
            raise InvalidArgument(
                f"images must have shape (N, {', '.join(str(e) if e else '*' for e in expected)}), got {images.shape}"
            )
        if not np.isfinite(images).all():
            raise InvalidArgument("images contain NaN or Inf values; only finite values are allowed")
        return images

    def check_methods(self, methods: Sequence[str]) -> tuple[str, ...]:
        """Validated, de-duplicated method names; raises UnknownMethod, or InvalidArgument
        for ``cam`` without a GAP → Dense head. Servers call it before queueing work."""
        return tuple(m.name for m in self._methods(methods))

    def _methods(self, names: Sequence[str]) -> tuple[Method, ...]:
        """The registered methods of :meth:`check_methods`, read once from the live registry."""
        if isinstance(names, str):
            names = (names,)
        names = tuple(dict.fromkeys(names))
        if not names:
            raise InvalidArgument(f"no method given; allowed: {', '.join(METHODS)}")
        found = []
        for name in names:
            method = METHODS.get(name)
            if method is None:
                raise UnknownMethod(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
            found.append(method)
        if "cam" in names:
            self.cam_head()  # raises with the head it found
        return tuple(found)

    def class_index(self, target: Target) -> int:
        """A class index from an index or a class name; :class:`UnknownClass` otherwise."""
        if isinstance(target, (str, np.str_)):
            if self.class_names and target in self.class_names:
                return self.class_names.index(target)
            allowed = f"one of {list(self.class_names)}" if self.class_names else "an integer index"
            raise UnknownClass(f"unknown class {target!r}; use {allowed}")
        if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)):
            raise InvalidArgument(f"a target must be a class index or name, got {target!r}")
        if not 0 <= int(target) < self.num_classes:
            raise UnknownClass(f"class index {target} out of range; the model has classes 0..{self.num_classes - 1}")
        return int(target)

    def check_top_k(self, top_k: int) -> int:
        """``top_k`` if it is a whole number from 1 to the class count; InvalidArgument otherwise."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= self.num_classes:
            raise InvalidArgument(f"top_k must be between 1 and {self.num_classes} (the class count), got {top_k}")
        return int(top_k)

    def resolve_targets(self, n: int, targets: Targets, top_k: int = 1) -> list[list[int]] | None:
        """Validate a request's targets for ``n`` images: None (the ``top_k`` predicted classes,
        ``top_k`` checked), or class indices per image. ``targets`` may be one class (index or
        name) for all images, one entry for all images, or one entry per image; an entry is a
        class or a list of classes (at most the class count). Servers call this before queueing.

        >>> ex.resolve_targets(2, "dog")            # doctest: +SKIP
        [[1], [1]]
        """
        if targets is None:
            self.check_top_k(top_k)
            return None
        if isinstance(targets, (int, np.integer, str, np.str_)):
            targets = [targets]
        if len(targets) not in (1, n):
            raise InvalidArgument(
                f"{len(targets)} target entries for {n} images: give none (top_k), one for all images, or one per image"
            )
        per_image = []
        for i, entry in enumerate(targets):
            classes: list[Any] = list(entry) if isinstance(entry, (list, tuple, np.ndarray)) else [entry]
            if not classes:
                raise InvalidArgument(f"image {i} has an empty target list; give at least one class")
            if len(classes) > self.num_classes:
                raise InvalidArgument(
                    f"image {i} has {len(classes)} targets; at most {self.num_classes} (the class count)"
                )
            per_image.append([self.class_index(t) for t in classes])
        return per_image * n if len(per_image) == 1 and n != 1 else per_image

    def _encode_targets(self, n: int, targets: Targets, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, T) int32 targets, where t ≥ 0 is a class and -(r + 1) the r-th predicted class,
        and a (N, T) mask of the entries that are real (images may ask for fewer targets)."""
        per_image = self.resolve_targets(n, targets, top_k)
        if per_image is None:
            encoded = np.tile(-np.arange(1, top_k + 1, dtype=np.int32), (n, 1))
            return encoded, np.ones_like(encoded, bool)
        width = max(len(p) for p in per_image)
        encoded = np.zeros((n, width), np.int32)
        valid = np.zeros((n, width), bool)
        for i, p in enumerate(per_image):
            encoded[i, : len(p)] = p
            valid[i, : len(p)] = True
        return encoded, valid

    # ----------------------------------------------------------------- batching
    def _batches(self, images: np.ndarray):
        """(start, padded batch, real count) over chunks of at most the largest bucket."""
        largest = self.buckets[-1]
        for start in range(0, len(images), largest):
            part = images[start : start + largest]
            size = next(b for b in self.buckets if b >= len(part))
            yield start, tf.constant(self._pad(part, size)), len(part)

    @staticmethod
    def _pad(array: np.ndarray, size: int) -> np.ndarray:
        if len(array) == size:
            return array
        pad = np.zeros((size - len(array),) + array.shape[1:], array.dtype)
        return np.concatenate([array, pad])

    @property
    def graph_count(self) -> int:
        """Compiled graphs held now (at most ``max_graphs``)."""
        return len(self._graphs)

    @property
    def max_graphs(self) -> int:
        return self._graphs.max_graphs

    def _placement(self):
        return tf.device(self.device) if self.device else contextlib.nullcontext()

    def _graph(self, key: tuple):
        """The compiled graph of ``key`` (LRU-cached): ("predict",), ("prepare", width),
        ("chunk", read) or ("explain", methods, width, scored names); keyed by the Method
        objects, so a method replaced in the registry recompiles."""
        return self._graphs.get(key, lambda: tf.function(self._graph_fn(key), jit_compile=self.jit_compile))

    def _graph_fn(self, key: tuple) -> Callable:
        kind = key[0]
        if kind == "predict":
            return self._predict_graph
        if kind == "prepare":
            return self._traced(lambda images, targets: lp.prepare_pass(self, images, targets, key[1]))
        if kind == "chunk":
            chunk, size = lp.SCORED[key[1]][0], self.chunk_size
            return self._traced(lambda *args: lp.chunk_group(chunk, self, size, *args))
        _, methods, width, _ = key
        return lambda images, targets, scored: self._explain_graph(images, targets, methods, width, scored)

    def _traced(self, fn: Callable) -> Callable:
        def traced(*args):
            self.trace_count += 1
            return fn(*args)

        return traced

    # ----------------------------------------------------------------- the model, re-run with hooks
    def _forward(self, images, on_activations=None, replace_activations=None, need_activations=True, hooks=None):
        """(activations, logits, outputs) of one pass. ``replace_activations(a)`` substitutes
        the layer's output (Ablation-CAM); ``on_activations(a)`` sees it (the tape's watch);
        ``hooks``: more layer hooks (guided backprop's gates)."""
        captured: dict[str, tf.Tensor] = {}
        out_layer = self._output_layer

        def layer_hook(call):
            def hooked(*args, **kwargs):
                a = call(*args, **kwargs) if replace_activations is None else replace_activations()
                if on_activations is not None:
                    on_activations(a)
                captured["activations"] = a
                return a

            return hooked

        def logits_hook(call):
            act = _activation_name(out_layer)

            def hooked(x, *args, **kwargs):
                # Gradients must see the pre-activation score even behind softmax/sigmoid.
                if isinstance(out_layer, keras.layers.Dense) and act != "linear":
                    kernel = tf.convert_to_tensor(out_layer.kernel)
                    logits = tf.matmul(tf.cast(x, kernel.dtype), kernel)  # mixed precision: float16 in
                    if out_layer.use_bias:
                        logits = logits + tf.cast(out_layer.bias, kernel.dtype)
                    captured["outputs"] = out_layer.activation(logits)
                    return logits
                if isinstance(out_layer, (keras.layers.Softmax, keras.layers.Activation)):
                    captured["outputs"] = call(x, *args, **kwargs)
                    return x
                return call(x, *args, **kwargs)

            return hooked

        hooks = {**(hooks or {}), id(out_layer): logits_hook}
        if need_activations:
            hooks[id(self.layer_path[-1])] = layer_hook
        logits = graph.run_with_hooks(self.model, images, hooks)
        logits = tf.cast(logits, tf.float32)
        outputs = tf.cast(captured.get("outputs", logits), tf.float32)
        activations = captured.get("activations")
        return activations, logits, outputs

    def _probabilities(self, logits: tf.Tensor) -> tf.Tensor:
        """Class probabilities for Score-CAM: sigmoid for a single logit or a sigmoid head,
        softmax otherwise (never softmax over one logit: that is 1 for every mask)."""
        if self.num_classes == 1 or _activation_name(self._output_layer) == "sigmoid":
            return tf.sigmoid(logits)
        return tf.nn.softmax(logits)

    def _predict_graph(self, images):
        self.trace_count += 1
        return self._forward(images, need_activations=False)[2]

    def _explain_graph(self, images, targets, methods: tuple[Method, ...], width: int, scored: dict):
        self.trace_count += 1
        need_gradients = any(m.needs_gradients for m in methods)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            if all(name in scored for name in lp.FORWARD):  # the prepare pass's forward pass, no gradients
                activations, logits, outputs = (scored[name] for name in lp.FORWARD)
            else:
                watch = tape.watch if need_gradients else None
                activations, logits, outputs = self._forward(images, on_activations=watch)
            classes = lp.target_classes(logits, targets, width)
            target_logits = [tf.reduce_sum(tf.gather(logits, classes[:, t], batch_dims=1)) for t in range(width)]
        shared = lp.SharedPass(self, images, activations, logits, classes, scored)
        maps = []
        for t in range(width):
            gradients = tape.gradient(target_logits[t], activations) if need_gradients else None
            view = shared.for_target(t, gradients)
            maps.append([tf.nn.relu(m.fn(view)) for m in methods])
        raw, pixel_raw = pixel.split_maps(maps, methods, activations)  # (B, T, M, h, w); pixel maps apart
        b, h, w = tf.shape(raw)[0], tf.shape(raw)[3], tf.shape(raw)[4]
        size = tf.shape(images)[1:3]
        up = tf.image.resize(tf.reshape(raw, (-1, h, w, 1)), size, method="bilinear")[..., 0]
        peak = tf.reduce_max(up, axis=(1, 2), keepdims=True)
        heat = tf.where(peak > 0.0, up / tf.where(peak > 0.0, peak, 1.0), 0.0)
        heat, extra = pixel.pixel_heatmaps(tf.reshape(heat, (b, width, raw.shape[2], size[0], size[1])), pixel_raw)
        return {"outputs": outputs, "classes": classes, "raw": raw, "heatmap": heat, **extra}

    # ----------------------------------------------------------------- CAM head
    def cam_head(self) -> tuple[Any, list, Any]:
        """(GAP, BatchNorms between, Dense) after the layer; InvalidArgument naming the head
        found when it is not GlobalAveragePooling2D → (BatchNorm/Dropout)* → Dense (the one
        head finder, :mod:`camserve.explain.heads`, as for FCN class maps)."""
        if self._cam is False:
            self._cam = self._find_cam_head()
        if not isinstance(self._cam, heads.GapDense):
            raise InvalidArgument(
                f"'cam' needs a GlobalAveragePooling2D → Dense head after layer {self.layer_name!r} "
                f"(BatchNormalization/Dropout between allowed); found {graph.describe_layers(self.head)}. "
                "Use gradcam (equal to CAM up to scale on GAP heads) or another method."
            )
        return self._cam.pool.layer, [op.layer for op in self._cam.norms], self._cam.dense.layer

    def _find_cam_head(self) -> heads.GapDense | None:
        """The GAP → Dense head reading the layer's output and giving the logits, or None."""
        try:
            model_graph = graph.walk(self.model).graph(strict=False)
            head = heads.find_head(model_graph)
            parts = heads.gap_dense(head, needs="'cam'")
        except (graph.UnsupportedGraph, heads.UnsupportedHead):
            return None
        # The logits are the Dense's output: nothing may follow it but the model's output
        # softmax / activation layer, whose input the logits hook returns.
        after = parts.after
        if len(after) > 1 or (
            after and (after[0].layer is not self._output_layer or after[0].kind not in ("Softmax", "Activation"))
        ):
            return None
        return parts if head.follows(model_graph, self.layer_path) else None

    def cam_weights(self) -> tf.Tensor:
        """(K, classes) Dense kernel with the BatchNorm scales between GAP and Dense folded in."""
        _, norms, dense = self.cam_head()
        return heads.fold_batchnorm(dense.kernel, norms)

    # ----------------------------------------------------------------- results
    def _collect(self, out: dict[str, np.ndarray], i: int, order, valid: np.ndarray) -> list[Explanation]:
        """Image ``i``'s explanations: its real targets, each with the methods in the caller's
        ``order`` ((name, graph column) pairs)."""
        found = []
        for t in np.flatnonzero(valid):
            c = int(out["classes"][i, t])
            label = self.class_names[c] if self.class_names else str(c)
            for method, m in order:
                heat = out["heatmap"][i, t, m]
                found.append(
                    Explanation(
                        method=method,
                        class_index=c,
                        label=label,
                        score=float(out["outputs"][i, c]),
                        raw=pixel.raw_map(out, i, t, m),
                        heatmap=heat,
                        box=heatmap_box(heat),
                    )
                )
        return found


__all__ = ["Explainer", "Explanation", "UnknownClass", "UnknownMethod", "bucket_sizes", "weighted_sum"]
