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
from camserve import targets as tg
from camserve.accelerator import resolve_device
from camserve.errors import InvalidArgument
from camserve.explain import heads, passes, pixel, tokens
from camserve.explain import layer_pass as lp
from camserve.explain.graphs import DEFAULT_MAX_GRAPHS, ByShape, GraphCache, bucket_sizes, padded_size, width_bucket
from camserve.explain.host_batches import padded_batch, shareable, to_tensor
from camserve.explain.methods import METHODS, Method, UnknownMethod, weighted_sum
from camserve.explanation import Explanation
from camserve.imaging import PREPROCESSORS, heatmap_box

Target = tg.TargetKind
Targets = Target | Sequence[Target | Sequence[Target]] | None
UnknownClass = tg.UnknownClass
#: Called between chunks of work; raises to stop it (the server's deadline / shutdown).
Checkpoint = Callable[[], None]


def _no_checkpoint() -> None:
    return None


_activation_name = passes._activation_name


class _Registered:
    """The names in :data:`~camserve.explain.methods.METHODS`, read when asked (on the class
    or an instance), so methods registered later are seen."""

    def __get__(self, obj: object, owner: type | None = None) -> tuple[str, ...]:
        return tuple(METHODS)


class Explainer:
    """Explain a Keras image classifier with the CAM family.

    ``layer``: None (the last 4-D activation before the head; for a transformer the last
    block's normalised tokens), a name (``outer/inner`` for a layer of a nested model; a
    token (N, T, C) layer is laid on its grid, ``prefix_tokens`` dropped or inferred: see
    :mod:`camserve.explain.tokens`) or a list of names (maps fused: see
    :mod:`camserve.explain.passes`). ``output``: the output explained, by name, of a
    multi-output model. ``chunk_size``: masked inputs per forward pass for Score-CAM
    and Ablation-CAM. ``max_channels``: score only the highest-variance channels
    (Faster-Score-CAM); None scores all. ``max_graphs``: compiled graphs kept (LRU).
    ``precision``: ``"float32"`` (None) or ``"mixed_float16"`` (the model is cloned with that
    Keras policy, its output layer kept float32). ``jit_compile``: XLA-compile the graphs.
    ``device``: where the graphs run (``"/GPU:0"``, ``"/CPU:0"``, ``"auto"``: the first GPU when
    one is visible; None: TensorFlow's choice).
    ``preprocessing``: a name of :data:`camserve.imaging.PREPROCESSORS`; given, :meth:`explain`
    and :meth:`predict` also take uint8 RGB pixels (N, H, W, 3) at the model's size and turn
    them into model input inside the compiled graphs (what :func:`camserve.imaging.model_input`
    does, on the device: a quarter of the bytes to copy, no host pass over the floats).

    >>> ex = Explainer(keras.applications.ResNet50(weights=None))            # doctest: +SKIP
    >>> ex.layer_name                                                        # doctest: +SKIP
    'conv5_block3_out'
    """

    methods = _Registered()

    def __init__(
        self,
        model: keras.Model,
        layer: str | Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        chunk_size: int = 32,
        max_channels: int | None = None,
        max_batch_size: int = 64,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        precision: str | None = None,
        jit_compile: bool = False,
        device: str | None = None,
        output: str | None = None,
        prefix_tokens: int | None = None,
        preprocessing: str | None = None,
    ):
        if len(model.inputs) != 1:
            raise InvalidArgument(
                f"Explainer needs a model with one image input; {model.name!r} has {len(model.inputs)}"
            )
        model = passes.select_output(model, output)
        if len(model.output_shape) not in (2, 4):
            raise InvalidArgument(
                f"Explainer needs an (N, classes) or a dense (N, H, W, C) output; {model.name!r} has {model.output_shape}"
            )
        self.precision = graph.check_precision(precision)
        self.jit_compile = bool(jit_compile)
        self.device = resolve_device(device)
        self.source_model = model
        with self._placement():
            model = graph.cast_model(model, self.precision)
        self.model = model
        self.sites = tokens.resolve_sites(model, layer, prefix_tokens)
        self.layer_path = self.sites[0].path
        self.layer_names = tuple(site.name for site in self.sites)
        self.layer_name = ",".join(self.layer_names)
        self._output_layer = graph.output_layer_path(model)[-1]
        self.output_shape = tuple(int(d) for d in model.output_shape[1:])
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
        if preprocessing is not None and preprocessing not in PREPROCESSORS:
            raise InvalidArgument(f"unknown preprocessing {preprocessing!r}; allowed: {sorted(PREPROCESSORS)}")
        self.preprocessing = preprocessing
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
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> list[list[Explanation]]:
        """Explain a batch of preprocessed images (N, H, W, C).

        ``targets``: None (the ``top_k`` predicted classes) or, per image, a target (a class
        index or name, or a :mod:`camserve.targets` object) or a list of them. Returns, per
        image, one :class:`Explanation` per (target, method), targets outer, methods inner.
        ``checkpoint``: called before every compiled pass; whatever it raises stops the work
        and propagates (a server's deadline). ``aug_smooth`` / ``eigen_smooth``: see
        :mod:`camserve.explain.smoothing` (six augmented views in the same pass).
        """
        images = self._check_images(images)
        chosen = self._methods(methods)
        canonical = tuple(sorted(chosen, key=lambda m: (m.pixel, m.name)))  # pixel methods last
        order = [(m.name, canonical.index(m)) for m in chosen]  # the caller's order, as graph columns
        reads = tuple(sorted({r for m in canonical for r in m.reads}))
        gradients = any(m.needs_gradients for m in canonical)
        aug, eigen = bool(aug_smooth), bool(eigen_smooth)
        enc = self._encode_targets(images, targets, top_k, checkpoint)
        width = width_bucket(enc.classes.shape[1], self.num_classes)
        spec = self._spec_arrays(enc, width)
        split = enc.plain and not aug and len(self.sites) == 1  # chunked scores in calls of their own
        results: list[list[Explanation]] = []
        check = checkpoint or _no_checkpoint
        with self._placement():
            for start, batch, n in self._batches(images):
                check()
                if batch.dtype == tf.uint8 and split and any(r in lp.SCORED or r in pixel.SAMPLING for r in reads):
                    batch = self._graph(("input",))(batch)  # the chunked passes take model input
                batch_spec = {k: tf.constant(self._pad(v[start : start + n], len(batch))) for k, v in spec.items()}
                batch_targets = batch_spec["targets"]
                scored = {}
                if split and any(r in lp.SCORED for r in reads):
                    scored = lp.scored_inputs(self, batch, batch_targets, n, width, reads, check, gradients)
                if split:
                    scored |= pixel.sampled_gradients(self, batch, batch_targets, n, width, reads, check, gradients)
                key = ("explain", canonical, width, tuple(sorted(scored)), tuple(sorted(spec)), aug, eigen)
                out = self._graph(key)(batch, batch_spec, scored)
                # Views of the results on the host (Tensor.numpy() would copy each once more).
                out = {k: np.asarray(v) for k, v in out.items()}
                for i in range(n):
                    results.append(self._collect(out, i, order, enc.valid[start + i], enc.labels[start + i]))
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
        return np.concatenate(parts) if parts else np.zeros((0,) + self.output_shape, np.float32)

    def warm_up(self, methods: Sequence[str] = ("gradcam",), top_k: int = 1, image_shape=None) -> None:
        """Compile every bucket's graph for ``methods`` (and prediction) ahead of traffic; a
        model with dense outputs (no predicted classes to explain) compiles prediction only.
        Float input, and with ``preprocessing`` uint8 pixels too (what a server mostly feeds)."""
        shape = tuple(image_shape or self.input_shape)
        if None in shape:
            raise InvalidArgument(f"warm_up needs a concrete image shape; the model takes {shape}")
        inputs = [np.zeros((1, *shape), np.float32)]
        if self.preprocessing is not None:
            inputs.append(np.zeros((1, *shape[:2], 3), np.uint8))
        for size in self.buckets:
            for zeros in (np.repeat(x, size, axis=0) for x in inputs):
                self.predict(zeros)
                if len(self.output_shape) == 1:
                    self.explain(zeros, methods=methods, top_k=top_k)

    # ----------------------------------------------------------------- checks
    def _check_images(self, images) -> np.ndarray:
        if self.preprocessing is not None and getattr(images, "dtype", None) == np.uint8:
            return self._check_pixels(np.asarray(images))
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

    def _check_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels at the model's size (always finite: no scan)."""
        h, w = self.input_shape[:2]
        if pixels.ndim != 4 or any(e is not None and e != s for e, s in zip((h, w, 3), pixels.shape[1:])):
            raise InvalidArgument(f"uint8 pixels must have shape (N, {h or '*'}, {w or '*'}, 3), got {pixels.shape}")
        return pixels

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
            if len(self.sites) > 1:
                raise InvalidArgument(f"'cam' reads one layer's GAP → Dense head; {self.layer_name!r} are several")
            self.cam_head()  # raises with the head it found
        return tuple(found)

    def class_index(self, target: Target) -> int:
        """A class index from an index or a class name; :class:`UnknownClass` otherwise."""
        return tg.class_of(target, self.class_names, self.num_classes)

    def check_top_k(self, top_k: int) -> int:
        """``top_k`` if it is a whole number from 1 to the class count; InvalidArgument otherwise."""
        if len(self.output_shape) != 1:
            raise InvalidArgument(
                f"a model with dense {self.output_shape} outputs has no predicted classes: give "
                "SegmentationTarget(class, mask) targets"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= self.num_classes:
            raise InvalidArgument(f"top_k must be between 1 and {self.num_classes} (the class count), got {top_k}")
        return int(top_k)

    def resolve_targets(self, n: int, targets: Targets, top_k: int = 1) -> list[list[Any]] | None:
        """Validate a request's targets for ``n`` images: None (the ``top_k`` predicted classes,
        ``top_k`` checked), or the checked targets per image (a class as its index; target
        objects with their class resolved: :func:`camserve.targets.per_image`). Servers call
        this before queueing.

        >>> ex.resolve_targets(2, "dog")            # doctest: +SKIP
        [[1], [1]]
        """
        if targets is None:
            self.check_top_k(top_k)
            return None
        return tg.per_image(n, targets, self.output_shape, self.class_names)

    def _encode_targets(self, images: np.ndarray, targets: Targets, top_k: int, checkpoint) -> tg.EncodedTargets:
        """The targets as arrays (:func:`camserve.targets.encode`); multi-label targets expanded
        from a prediction of the images."""
        per_image = self.resolve_targets(len(images), targets, top_k)
        if per_image is not None and any(isinstance(t, tg.MultiLabelTarget) for p in per_image for t in p):
            per_image = tg.expand_multi_label(per_image, self.predict(images, checkpoint))
        return tg.encode(per_image, self.output_shape, self.class_names, len(images), top_k)

    @staticmethod
    def _spec_arrays(enc: tg.EncodedTargets, width: int) -> dict[str, np.ndarray]:
        """The arrays a graph takes, padded to ``width`` slots: ``targets`` (classes) alone
        when every target is a class logit, else ``space``, ``dense`` and ``weights`` too."""
        pad = [(0, 0), (0, width - enc.classes.shape[1])]
        spec = {"targets": np.pad(enc.classes, pad, constant_values=-1)}  # padding: the top-1 class, unused
        if not enc.plain:
            spec["space"] = np.pad(enc.space, pad)
            spec["dense"] = np.pad(enc.dense, pad)
            if enc.weights is not None:
                spec["weights"] = np.pad(enc.weights, pad + [(0, 0)])
        return spec

    # ----------------------------------------------------------------- batching
    def _batches(self, images: np.ndarray):
        """(start, padded batch as a tensor, real count) over chunks of at most the largest
        bucket. A chunk that fills its bucket and lies aligned is read in place, the others are
        copied once with their padding (:mod:`~camserve.explain.host_batches`)."""
        largest = self.buckets[-1]
        for start in range(0, len(images), largest):
            part = images[start : start + largest]
            size = padded_size(len(part), self.buckets)
            batch = part if len(part) == size and shareable(part) else padded_batch(part, size)
            yield start, to_tensor(batch), len(part)

    @staticmethod
    def _pad(array: np.ndarray, size: int) -> np.ndarray:
        return array if len(array) == size else padded_batch(array, size)

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
        """The compiled graph of ``key`` (LRU-cached): ("predict",), ("input",), ("prepare", width),
        ("chunk", read) or ("explain", methods, width, scored names); keyed by the Method
        objects, so a method replaced in the registry recompiles."""

        def build():
            graph = tf.function(self._from_pixels(self._graph_fn(key)), jit_compile=self.jit_compile)
            return ByShape(graph) if key[0] in ("predict", "explain") else graph

        return self._graphs.get(key, build)

    def _from_pixels(self, fn: Callable) -> Callable:
        """``fn`` taking uint8 pixels too: preprocessed in the graph (a trace per dtype)."""
        if self.preprocessing is None:
            return fn
        channels, preprocess = self.input_shape[-1], PREPROCESSORS[self.preprocessing]

        def graph(images, *rest):
            if images.dtype == tf.uint8:
                images = preprocess(tf.cast(images, tf.float32))
                images = tf.reduce_mean(images, axis=-1, keepdims=True) if channels == 1 else images
            return fn(images, *rest)

        return graph

    def _graph_fn(self, key: tuple) -> Callable:
        kind = key[0]
        if kind == "predict":
            return self._predict_graph
        if kind == "input":
            return lambda images: images  # uint8 pixels preprocessed by _from_pixels
        if kind == "prepare":
            return self._traced(lambda images, targets: lp.prepare_pass(self, images, targets, key[1]))
        if kind == "chunk":
            chunk, size = lp.SCORED[key[1]][0], self.chunk_size
            return self._traced(lambda *args: lp.chunk_group(chunk, self, size, *args))
        _, methods, width, _, _, aug, eigen = key
        return lambda images, spec, scored: self._explain_graph(images, spec, methods, width, scored, aug, eigen)

    def _traced(self, fn: Callable) -> Callable:
        def traced(*args):
            self.trace_count += 1
            return fn(*args)

        return traced

    # ----------------------------------------------------------------- the model, re-run with hooks
    def _forward(self, images, on_activations=None, replace_activations=None, need_activations=True, hooks=None):
        """(activations, logits, outputs) of one pass (:func:`camserve.explain.passes.forward`),
        the activations the first layer's (B, h, w, C). ``replace_activations()`` substitutes
        them (Ablation-CAM); ``on_activations(a)`` sees them (the tape's watch); ``hooks``:
        more layer hooks (guided backprop's gates)."""
        replace = None if replace_activations is None else {0: lambda raw: replace_activations()}
        grids, logits, outputs = passes.forward(self, images, on_activations, replace, need_activations, hooks)
        return (grids[0] if grids else None), logits, outputs

    def _probabilities(self, logits: tf.Tensor) -> tf.Tensor:
        """Class probabilities for Score-CAM: sigmoid for a single logit or a sigmoid head,
        softmax otherwise (never softmax over one logit: that is 1 for every mask)."""
        if self.num_classes == 1 or _activation_name(self._output_layer) == "sigmoid":
            return tf.sigmoid(logits)
        return tf.nn.softmax(logits)

    def _predict_graph(self, images):
        self.trace_count += 1
        return self._forward(images, need_activations=False)[2]

    def _explain_graph(self, images, spec, methods: tuple[Method, ...], width: int, scored: dict, aug, eigen):
        return passes.explain_pass(self, images, spec, methods, width, scored, aug, eigen)

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
    def _collect(self, out: dict[str, np.ndarray], i: int, order, valid: np.ndarray, labels) -> list[Explanation]:
        """Image ``i``'s explanations: its real targets (``labels``: (class_index, label) per
        target, None for a predicted class), each with the methods in the caller's ``order``
        ((name, graph column) pairs). The score is the model's output for the class, or the
        target's value (segmentation, similarity)."""
        found = []
        for t in np.flatnonzero(valid):
            c, label = labels[t] or tg.label_of(int(out["classes"][i, t]), self.class_names)
            by_class = c >= 0 and len(self.output_shape) == 1
            score = float(out["outputs"][i, c] if by_class else out["values"][i, t])
            for method, m in order:
                heat = out["heatmap"][i, t, m]
                found.append(
                    Explanation(
                        method=method,
                        class_index=c,
                        label=label,
                        score=score,
                        raw=pixel.raw_map(out, i, t, m),
                        heatmap=heat,
                        box=heatmap_box(heat),
                    )
                )
        return found


__all__ = ["Explainer", "Explanation", "UnknownClass", "UnknownMethod", "bucket_sizes", "weighted_sum"]
