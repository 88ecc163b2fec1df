"""The one module that reads Keras internals: a walker over a model's graph (nested models
included) and re-running a model's graph with hooks on chosen layers.

Every other camserve module goes through this one: :func:`walk` traverses a model once and
gives its layer paths (the explainer's layer lookup), its weighted leaf layers (the sanity
check) and its flattened graph of layer calls with nested models inlined (the FCN
conversion); :func:`run_with_hooks` re-runs the graph with replacements for chosen layers.

Layer paths name nested layers with ``/``: ``"resnet50/conv5_block3_out"`` is the layer
``conv5_block3_out`` of the sub-model ``resnet50``.

>>> path = resolve_layer(model, None)          # doctest: +SKIP
>>> layer_path_name(path)                      # doctest: +SKIP
'resnet50/conv5_block3_out'
"""

from __future__ import annotations

import dataclasses
import difflib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
from keras.src.models.functional import operation_fn as _with_call_context

from camserve.accelerator import check_precision
from camserve.errors import InvalidArgument, NotFound

Layer = Any  # a keras.layers.Layer (Keras objects are typed Any)
LayerPath = tuple[Any, ...]  # outer-most first; all but the last are nested models
Hook = Callable[[Callable], Callable]  # receives the layer's default call, returns a replacement


class UnknownLayer(NotFound):
    """A layer name that does not exist, or is not a 4-D activation."""


class UnsupportedGraph(InvalidArgument):
    """A model whose graph cannot be flattened (subclassed, unbuilt, or a nested model
    called more than once)."""


def _is_model(layer: Any) -> bool:
    return isinstance(layer, keras.Model)


def layer_path_name(path: LayerPath) -> str:
    """``outer/inner`` name of a layer path."""
    return "/".join(layer.name for layer in path)


def _path_key(path: LayerPath) -> tuple[int, ...]:
    return tuple(id(layer) for layer in path)


# --------------------------------------------------------------------------------------------
# The walker.


@dataclasses.dataclass
class Op:
    """One layer call in the flattened graph; tensors are identified by integer keys."""

    layer: Any
    node: Any  # the Keras node of the call (read only here, by :func:`call_op`)
    inputs: list[int]
    outputs: list[int]
    in_shapes: list[tuple]
    out_shapes: list[tuple]
    path: LayerPath  # the nested models that hold the layer, then the layer

    @property
    def name(self) -> str:
        """``outer/inner/layer`` for layers of nested models."""
        return layer_path_name(self.path)

    @property
    def kind(self) -> str:
        """The Keras class the layer is (or derives from), e.g. "Conv2D" for a subclass of it."""
        for cls in type(self.layer).__mro__:
            if cls.__module__.startswith("keras."):
                return cls.__name__
        return type(self.layer).__name__

    def describe(self) -> str:
        return f"'{self.name}' ({self.kind})"


@dataclasses.dataclass
class Graph:
    """A model's layer calls in topological order, nested models inlined."""

    ops: list[Op]
    inputs: list[int]
    outputs: list[int]
    input_shapes: list[tuple]
    output_shapes: list[tuple]
    tensors: dict[tuple[int, ...], list[int]]  # layer path (as ids) -> keys of its outputs

    def producer(self) -> dict[int, Op]:
        return {k: op for op in self.ops for k in op.outputs}

    def outputs_of(self, path: LayerPath) -> list[int]:
        """Keys of the tensors a layer (or a nested model) produces; empty if none."""
        return self.tensors.get(_path_key(path), [])


class Walk:
    """One traversal of a model: :attr:`layer_paths` (every layer in model order, a nested
    model right after its own layers) and, for graph models, the flattened :meth:`graph`."""

    def __init__(self, model: Any):
        self.model = model
        self._ops: list[Op] = []
        self._alias: dict[int, int] = {}
        self._inlined: set[int] = set()
        self._tensors: dict[tuple[int, ...], list[int]] = {}
        self.problem: str | None = None  # why the graph could not be flattened (first reason)
        self.layer_paths: list[LayerPath] = self._visit(model, ())

    def _key(self, t: Any) -> int:
        k = id(t)
        while k in self._alias:
            k = self._alias[k]
        return k

    def _fail(self, message: str) -> None:
        if self.problem is None:
            self.problem = message

    def _add_op(self, layer: Any, node: Any, path: LayerPath) -> None:
        op = Op(
            layer=layer,
            node=node,
            inputs=[self._key(t) for t in node.input_tensors],
            outputs=[id(t) for t in node.outputs],
            in_shapes=[tuple(t.shape) for t in node.input_tensors],
            out_shapes=[tuple(t.shape) for t in node.outputs],
            path=path,
        )
        self._ops.append(op)
        self._tensors.setdefault(_path_key(path), []).extend(op.outputs)

    def _visit(self, m: Any, prefix: LayerPath) -> list[LayerPath]:
        """Layer paths of ``m``; its layer calls are appended to the flattened graph when it
        is a graph model (nested models reached through their calls are inlined)."""
        nested: dict[int, list[LayerPath]] = {}
        functional = _functional_of(m) if self.problem is None else None
        if functional is None:
            self._fail(_not_a_graph(m))
        else:
            self._inlined.add(id(m))
            for node in _nodes(functional):
                op = node.operation
                path = prefix + (op,)
                if not _is_model(op):
                    self._add_op(op, node, path)
                    continue
                inner = _functional_of(op)
                if id(op) in self._inlined:
                    self._fail(f"model '{op.name}' is called more than once; shared nested models are not supported")
                elif inner is None:
                    self._fail(_not_a_graph(op))
                elif len(inner.inputs) != len(node.input_tensors):
                    self._fail(
                        f"nested model '{layer_path_name(path)}' takes {len(inner.inputs)} inputs but "
                        f"is called with {len(node.input_tensors)}"
                    )
                if self.problem is not None or inner is None:  # kept whole, as one opaque call
                    self._add_op(op, node, path)
                    continue
                for t_in, t_out in zip(inner.inputs, node.input_tensors):
                    self._alias[id(t_in)] = self._key(t_out)
                nested[id(op)] = self._visit(op, path)
                for t_out, t_in in zip(node.outputs, inner.outputs):
                    self._alias[id(t_out)] = self._key(t_in)
                self._tensors.setdefault(_path_key(path), []).extend(self._key(t) for t in node.outputs)
        paths: list[LayerPath] = []
        for layer in m.layers:
            if _is_model(layer):
                inside = nested.get(id(layer))
                paths += inside if inside is not None else self._visit(layer, prefix + (layer,))
            paths.append(prefix + (layer,))
        return paths

    def graph(self, strict: bool = True) -> Graph:
        """The flattened graph. ``strict``: raise :class:`UnsupportedGraph` when some part
        could not be inlined (otherwise such nested models stay single opaque calls)."""
        functional = _functional_of(self.model)
        if functional is None or (strict and self.problem is not None):
            raise UnsupportedGraph(self.problem or _not_a_graph(self.model))
        return Graph(
            ops=self._ops,
            inputs=[self._key(t) for t in functional.inputs],
            outputs=[self._key(t) for t in functional.outputs],
            input_shapes=[tuple(t.shape) for t in functional.inputs],
            output_shapes=[tuple(t.shape) for t in functional.outputs],
            tensors=self._tensors,
        )

    def leaves(self) -> list[LayerPath]:
        """Paths of the layers that are not models, in model order."""
        return [p for p in self.layer_paths if not _is_model(p[-1])]

    def weighted_leaves(self) -> list[tuple[str, Any]]:
        """(path name, layer) of every leaf layer with weights, in model order."""
        return [(layer_path_name(p), p[-1]) for p in self.leaves() if p[-1].weights]


def walk(model: Any) -> Walk:
    """Traverse ``model`` once (see :class:`Walk`)."""
    return Walk(model)


def _functional_of(model: Any) -> Any:
    """The Functional object holding ``model``'s nodes (a Sequential wraps one), or None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if hasattr(model, "_nodes_by_depth") else None


def _not_a_graph(model: Any) -> str:
    if isinstance(model, keras.Sequential):
        return f"Sequential model '{model.name}' is not built: give it an Input or build it first"
    return (
        f"model '{model.name}' ({type(model).__name__}) is a subclassed model; only Sequential "
        "and functional models (nested ones included) can be converted"
    )


def _nodes(functional: Any) -> Iterator[Any]:
    """The layer-call nodes of a Functional, inputs first (Keras' own execution order)."""
    by_depth = functional._nodes_by_depth
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if node.operation and not node.is_input:
                yield node


def call_op(op: Op, values: dict[int, Any], fn: Callable[..., Any] | None = None) -> None:
    """Re-run ``op`` on new tensors (``values`` keyed like ``op.inputs``), with ``fn`` in place
    of the layer if given; record its outputs in ``values``."""
    lookup = {id(t): values[k] for t, k in zip(op.node.input_tensors, op.inputs)}
    args, kwargs = op.node.arguments.fill_in(lookup)
    out = (fn or op.layer)(*args, **kwargs)
    for k, v in zip(op.outputs, keras.tree.flatten(out)):
        values[k] = v


def weighted_layers(model: Any) -> list[tuple[str, Any]]:
    """(path, layer) of every leaf layer with weights, in model order; nested models are
    flattened and their layers named "outer/inner"."""
    return walk(model).weighted_leaves()


# --------------------------------------------------------------------------------------------
# Layer lookup for the explainer.


def _output_rank(layer: Layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called several times
        return None


def iter_layer_paths(model: keras.Model) -> Iterator[LayerPath]:
    """Every layer in model order, descending into nested models (which come right
    after their own layers)."""
    yield from walk(model).layer_paths


def candidate_layers(model: keras.Model) -> list[LayerPath]:
    """Layers whose output is a 4-D activation (N, h, w, C): the ones a CAM can use."""
    return [
        p
        for p in iter_layer_paths(model)
        if not isinstance(p[-1], keras.layers.InputLayer) and _output_rank(p[-1]) == 4
    ]


#: The longest layer name looked up: longer ones are refused before any search.
MAX_LAYER_NAME = 256
#: Close-match suggestions compare against at most this many layer names.
MAX_SUGGESTION_CANDIDATES = 2000


def check_layer_name(name: str) -> str:
    """``name`` if it can name a layer at all: a string of at most :data:`MAX_LAYER_NAME`
    characters; InvalidArgument naming the limit otherwise (cheap: no model is read)."""
    if not isinstance(name, str):
        raise InvalidArgument(f"a layer name must be a string, got {type(name).__name__}")
    if len(name) > MAX_LAYER_NAME:
        raise InvalidArgument(
            f"layer name of {len(name)} characters is too long: at most {MAX_LAYER_NAME} (starts {name[:40]!r})"
        )
    return name


def _suggestions(name: str, names: Sequence[str]) -> list[str]:
    """Up to three close matches of ``name`` among ``names``, compared whole and by their
    last part (``inner`` of ``outer/inner``). Bounded: ``name`` is at most
    :data:`MAX_LAYER_NAME` characters and at most :data:`MAX_SUGGESTION_CANDIDATES` names
    are compared."""
    pool = [n for n in names if len(n) <= 4 * MAX_LAYER_NAME][-MAX_SUGGESTION_CANDIDATES:]
    leaves = {n.rsplit("/", 1)[-1]: n for n in pool}
    close = difflib.get_close_matches(name, pool, n=3)
    close += [leaves[leaf] for leaf in difflib.get_close_matches(name, list(leaves), n=3) if leaves[leaf] not in close]
    return close[:3]


def resolve_layer(model: keras.Model, name: str | None = None) -> LayerPath:
    """The layer path for ``name`` (``outer/inner`` for nested layers), or the last 4-D
    activation before the head when ``name`` is None.

    A name longer than :data:`MAX_LAYER_NAME` is refused at once (InvalidArgument); an
    exact name is looked up before any search; otherwise :class:`UnknownLayer` lists the
    valid candidates and up to three close matches (a bounded search).
    """
    if name is not None:
        check_layer_name(name)
    candidates = candidate_layers(model)
    if not candidates:
        raise UnknownLayer(f"model {model.name!r} has no layer with a 4-D (N, h, w, C) output")
    if name is None:
        path = candidates[-1]
        while _is_model(path[-1]):  # the nested model's output is its own last 4-D layer's
            inner = [p for p in candidates if p[: len(path)] == path and len(p) > len(path)]
            if not inner or inner[-1][-1].output is not path[-1].output:
                break
            path = inner[-1]
        return path
    by_name = {layer_path_name(p): p for p in candidates}
    if name in by_name:
        return by_name[name]
    names = list(by_name)
    close = _suggestions(name, names)
    shown = names[-12:]
    raise UnknownLayer(
        f"unknown layer {name!r}"
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
        + f"; layers with a 4-D output ({len(names)}), last ones: {', '.join(shown)}"
    )


# --------------------------------------------------------------------------------------------
# Precision: a model cloned under a Keras dtype policy.

_CAST_LOCK = threading.Lock()
_CAST_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def cast_model(model: keras.Model, precision: str | None) -> keras.Model:
    """``model`` computing in ``precision``: the model itself for float32, else a clone (nested
    models included) whose layers use that Keras dtype policy, except the model's output layer,
    kept float32 (softmax / logits), with the weights copied. Cached per model and
    precision; the cache does not keep the model alive.

    >>> half = cast_model(model, "mixed_float16")                # doctest: +SKIP
    >>> half.layers[1].compute_dtype, half.layers[-1].compute_dtype   # doctest: +SKIP
    ('float16', 'float32')
    """
    precision = check_precision(precision)
    if precision == "float32":
        return model
    with _CAST_LOCK:
        per_model = _CAST_CACHE.setdefault(model, {})
        if precision not in per_model:
            per_model[precision] = _clone_with_policy(model, precision)
        return per_model[precision]


def _clone_with_policy(model: keras.Model, policy: str) -> keras.Model:
    keep = {id(layer) for layer in output_layer_path(model)}

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = keras.DTypePolicy("float32" if id(layer) in keep else policy)
        return layer.__class__.from_config(config)

    try:
        copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise UnsupportedGraph(f"model {model.name!r} cannot be cloned for {policy}: {exc}") from exc
    copy.set_weights(model.get_weights())
    return copy


def output_names(model: keras.Model) -> list[str]:
    """The names of a model's outputs (the layers that produce them)."""
    return [t._keras_history.operation.name for t in model.outputs]


def output_layer_path(model: keras.Model) -> LayerPath:
    """The layer that produces the model's (first) output, descending into nested models."""
    if isinstance(model, keras.Sequential):
        last = model.layers[-1]
    else:
        last = model.outputs[0]._keras_history.operation
    if _is_model(last):
        return (last,) + output_layer_path(last)
    return (last,)


def head_after(model: keras.Model, path: LayerPath) -> list[Layer]:
    """The leaf layers that follow ``path`` in model order: the model's head when ``path``
    is the last 4-D activation."""
    flat = walk(model).leaves()
    target = path if not _is_model(path[-1]) else None
    if target is None:  # a nested model as the layer: its head starts after its last leaf
        inside = [p for p in flat if p[: len(path)] == path]
        target = inside[-1]
    index = flat.index(target)
    return [p[-1] for p in flat[index + 1 :]]


def describe_layers(layers: Sequence[Layer]) -> str:
    """``GlobalAveragePooling2D → Dense`` style summary of a head."""
    return " → ".join(type(layer).__name__ for layer in layers) or "(nothing)"


# --------------------------------------------------------------------------------------------
# Running a model with hooks.


def _built_functional(model: keras.Model) -> Any:
    if isinstance(model, keras.Sequential) and _functional_of(model) is None:
        model.build(model.input_shape)  # built without an Input: give it one
    return _functional_of(model)


def run_with_hooks(model: keras.Model, inputs: Any, hooks: dict[int, Hook], training: bool = False) -> Any:
    """Run ``model`` on ``inputs`` like ``model(inputs)``, except that a layer whose
    ``id`` is in ``hooks`` is called through ``hooks[id](default_call)``. Nested models
    holding a hooked layer are re-run the same way, so hooks reach any depth.

    >>> out = run_with_hooks(model, x, {id(layer): lambda call: lambda *a, **k: 2 * call(*a, **k)})  # doctest: +SKIP
    """
    expand = {id(p[i]) for p in iter_layer_paths(model) if id(p[-1]) in hooks for i in range(len(p) - 1)}

    def run(m: keras.Model, x: Any) -> Any:
        def op_fn(op: Any) -> Callable:
            call = _with_call_context(op, training=training)
            if id(op) in hooks:
                return hooks[id(op)](call)
            if id(op) in expand:
                return lambda *args, **kwargs: run(op, args[0])
            return call

        return _built_functional(m)._run_through_graph(x, operation_fn=op_fn)

    return run(model, inputs)
