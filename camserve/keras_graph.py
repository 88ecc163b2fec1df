"""Model-graph surgery shared by the explainers: layer lookup through nested models,
head analysis, and re-running a model's graph with hooks on chosen layers.

Layer paths name nested layers with ``/``: ``"resnet50/conv5_block3_out"`` is the layer
``conv5_block3_out`` of the sub-model ``resnet50``.

>>> path = resolve_layer(model, None)          # doctest: +SKIP
>>> layer_path_name(path)                      # doctest: +SKIP
'resnet50/conv5_block3_out'
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence

import keras
from keras.src.models.functional import operation_fn as _with_call_context

from camserve.errors import NotFound

Layer = keras.layers.Layer
LayerPath = tuple[Layer, ...]  # outer-most first; all but the last are nested models
Hook = Callable[[Callable], Callable]  # receives the layer's default call, returns a replacement

#: Layers that do not change what a head computes at inference time.
PASSTHROUGH_LAYERS = (keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise)


class UnknownLayer(NotFound):
    """A layer name that does not exist, or is not a 4-D activation."""


def _is_model(layer: Layer) -> bool:
    return isinstance(layer, keras.Model)


def _output_rank(layer: Layer) -> int | None:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called several times
        return None


def iter_layer_paths(model: keras.Model, prefix: LayerPath = ()) -> Iterator[LayerPath]:
    """Every layer in graph order, descending into nested models (which come right
    after their own layers)."""
    for layer in model.layers:
        if _is_model(layer):
            yield from iter_layer_paths(layer, prefix + (layer,))
        yield prefix + (layer,)


def layer_path_name(path: LayerPath) -> str:
    """``outer/inner`` name of a layer path."""
    return "/".join(layer.name for layer in path)


def candidate_layers(model: keras.Model) -> list[LayerPath]:
    """Layers whose output is a 4-D activation (N, h, w, C): the ones a CAM can use."""
    return [
        p
        for p in iter_layer_paths(model)
        if not isinstance(p[-1], keras.layers.InputLayer) and _output_rank(p[-1]) == 4
    ]


def resolve_layer(model: keras.Model, name: str | None = None) -> LayerPath:
    """The layer path for ``name`` (``outer/inner`` for nested layers), or the last 4-D
    activation before the head when ``name`` is None.

    Raises :class:`UnknownLayer` listing the valid candidates.
    """
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
    close = difflib.get_close_matches(name, names, n=3)
    shown = names[-12:]
    raise UnknownLayer(
        f"unknown layer {name!r}"
        + (f" (did you mean {', '.join(map(repr, close))}?)" if close else "")
        + f"; layers with a 4-D output ({len(names)}), last ones: {', '.join(shown)}"
    )


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
    """The leaf layers that follow ``path`` in graph order: the model's head when ``path``
    is the last 4-D activation."""
    flat = [p for p in iter_layer_paths(model) if not _is_model(p[-1])]
    target = path if not _is_model(path[-1]) else None
    if target is None:  # a nested model as the layer: its head starts after its last leaf
        inside = [p for p in flat if p[: len(path)] == path]
        target = inside[-1]
    index = flat.index(target)
    return [p[-1] for p in flat[index + 1 :]]


def _functional(model: keras.Model):
    if isinstance(model, keras.Sequential):
        if model._functional is None:  # built without an Input: give it one
            model.build(model.input_shape)
        return model._functional
    return model


def run_with_hooks(model: keras.Model, inputs, hooks: dict[int, Hook], training: bool = False):
    """Run ``model`` on ``inputs`` like ``model(inputs)``, except that a layer whose
    ``id`` is in ``hooks`` is called through ``hooks[id](default_call)``. Nested models
    holding a hooked layer are re-run the same way, so hooks reach any depth.

    >>> out = run_with_hooks(model, x, {id(layer): lambda call: lambda *a, **k: 2 * call(*a, **k)})  # doctest: +SKIP
    """
    expand = {id(p[i]) for p in iter_layer_paths(model) if id(p[-1]) in hooks for i in range(len(p) - 1)}

    def run(m: keras.Model, x):
        def op_fn(op):
            call = _with_call_context(op, training=training)
            if id(op) in hooks:
                return hooks[id(op)](call)
            if id(op) in expand:
                return lambda *args, **kwargs: run(op, args[0])
            return call

        return _functional(m)._run_through_graph(x, operation_fn=op_fn)

    return run(model, inputs)


def describe_layers(layers: Sequence[Layer]) -> str:
    """``GlobalAveragePooling2D → Dense`` style summary of a head."""
    return " → ".join(type(layer).__name__ for layer in layers) or "(nothing)"
