"""The layers an :class:`~camserve.explain.Explainer` reads (its *sites*): convolutional
(N, h, w, C) outputs, or token (N, T, C) outputs of vision transformers, reshaped to a grid.

A token layer's first ``k`` tokens (class / register tokens) are dropped and the other
T − k are laid out row by row on an h × w grid. The grid is the patch embedding's: the last
4-D layer before the tokens whose h × w is T − k (non-square images too); without one, the
smallest k in 0..:data:`MAX_PREFIX` for which T − k is a square. ``prefix_tokens`` fixes k.

The automatic choice (``layer=None``) is the last 4-D activation before the head, unless
token layers come after it (a transformer): then the last block's normalised tokens, i.e. the
last LayerNormalization with token output that feeds an attention layer (its tokens still get
gradients when the head reads only the class token), else the last such LayerNormalization,
else the last token layer.

>>> infer_grid(197), infer_grid(16), infer_grid(20, prefix_tokens=4)
((1, 14, 14), (0, 4, 4), (4, 4, 4))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from camserve import keras_graph as graph
from camserve.errors import InvalidArgument

#: Prefix tokens tried when ``prefix_tokens`` is not given (class + up to 4 register tokens).
MAX_PREFIX = 5


def infer_grid(tokens: int, prefix_tokens: int | None = None) -> tuple[int, int, int] | None:
    """(k, h, w) for ``tokens`` tokens: ``prefix_tokens`` dropped (None: the smallest k ≤
    :data:`MAX_PREFIX` leaving a square), h = w; None when no square is left.

    >>> infer_grid(10), infer_grid(33), infer_grid(7, prefix_tokens=3)
    ((1, 3, 3), None, (3, 2, 2))
    """
    choices = range(MAX_PREFIX + 1) if prefix_tokens is None else (prefix_tokens,)
    for k in choices:
        side = math.isqrt(max(tokens - k, 0))
        if tokens - k > 0 and side * side == tokens - k:
            return k, side, side
    return None


@dataclasses.dataclass(frozen=True)
class Site:
    """One layer read by the pass: ``prefix`` None for a 4-D layer, else the tokens dropped
    before the remaining ones are laid on ``grid`` (h, w)."""

    path: Any  # keras_graph.LayerPath
    prefix: int | None = None
    grid: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return graph.layer_path_name(self.path)

    @property
    def layer(self) -> Any:
        return self.path[-1]

    def to_grid(self, a: tf.Tensor) -> tf.Tensor:
        """The layer's output as (B, h, w, C) (tokens: prefix dropped, laid row by row)."""
        if self.prefix is None or self.grid is None:
            return a
        h, w = self.grid
        return tf.reshape(a[:, self.prefix :, :], (tf.shape(a)[0], h, w, a.shape[-1]))

    def to_layer(self, grid: tf.Tensor, original: tf.Tensor) -> tf.Tensor:
        """The layer's output with its grid part replaced by ``grid`` (B, h, w, C); the prefix
        tokens are taken from ``original`` (Ablation-CAM's ablated activations)."""
        if self.prefix is None or self.grid is None:
            return grid
        tokens = tf.reshape(grid, (tf.shape(grid)[0], -1, grid.shape[-1]))
        return tf.concat([tf.cast(original[:, : self.prefix, :], tokens.dtype), tokens], axis=1)


def _output_shape(layer: Any) -> tuple | None:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def token_layers(model: keras.Model) -> list[Any]:
    """Layer paths whose output is (N, T, C) with a known T, in model order."""
    return [
        p
        for p in graph.iter_layer_paths(model)
        if not isinstance(p[-1], keras.layers.InputLayer)
        and not isinstance(p[-1], keras.Model)
        and (s := _output_shape(p[-1])) is not None
        and len(s) == 3
        and s[1] is not None
    ]


def gridded_token_layers(model: keras.Model, prefix_tokens: int | None = None) -> list[Any]:
    """The token layers that lie on a grid (the patch embedding's, or a square) once
    ``prefix_tokens`` tokens are dropped (None: some count in 0..:data:`MAX_PREFIX`): the
    token layers that can be explained."""
    return [p for p in token_layers(model) if grid_of(model, p, prefix_tokens) is not None]


def _patch_grid(model: keras.Model, path: Any, tokens: int, prefix_tokens: int | None) -> tuple | None:
    """(k, h, w) from the last 4-D layer before ``path`` with h × w = tokens − k, or None."""
    paths = [tuple(map(id, p)) for p in graph.iter_layer_paths(model)]
    here = paths.index(tuple(map(id, path)))
    choices = range(MAX_PREFIX + 1) if prefix_tokens is None else (prefix_tokens,)
    for p in reversed(graph.candidate_layers(model)):
        shape = _output_shape(p[-1])
        if paths.index(tuple(map(id, p))) >= here or shape is None or None in shape[1:3]:
            continue
        h, w = int(shape[1]), int(shape[2])
        for k in choices:
            if h * w == tokens - k:
                return k, h, w
    return None


def grid_of(model: keras.Model, path: Any, prefix_tokens: int | None = None) -> tuple | None:
    """(k, h, w) of a token layer: the patch embedding's grid, else a square (module doc)."""
    tokens = int(_output_shape(path[-1])[1])  # type: ignore[index]
    return _patch_grid(model, path, tokens, prefix_tokens) or infer_grid(tokens, prefix_tokens)


def token_site(path: Any, prefix_tokens: int | None, model: keras.Model | None = None) -> Site:
    """The site of a token layer; InvalidArgument when its tokens make no grid."""
    tokens = int(_output_shape(path[-1])[1])  # type: ignore[index]
    if prefix_tokens is not None and (
        isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or not 0 <= prefix_tokens < tokens
    ):
        raise InvalidArgument(f"prefix_tokens must be an integer from 0 to {tokens - 1}, got {prefix_tokens!r}")
    found = grid_of(model, path, prefix_tokens) if model is not None else infer_grid(tokens, prefix_tokens)
    if found is None:
        given = f"{prefix_tokens} prefix tokens" if prefix_tokens is not None else f"0..{MAX_PREFIX} prefix tokens"
        raise InvalidArgument(
            f"layer {graph.layer_path_name(path)!r} has {tokens} tokens: dropping {given} leaves no grid "
            "(neither a patch embedding's h × w nor a square); give prefix_tokens= (the class / register tokens before the patch tokens)"
        )
    k, h, w = found
    return Site(path, k, (h, w))


def _feeds_attention(model: keras.Model) -> set[tuple[int, ...]]:
    """Layer paths (as ids) whose output some MultiHeadAttention layer reads."""
    try:
        g = graph.walk(model).graph(strict=False)
    except graph.UnsupportedGraph:
        return set()
    producer = g.producer()
    found = set()
    for op in g.ops:
        if isinstance(op.layer, keras.layers.MultiHeadAttention):
            for key in op.inputs:
                if key in producer:
                    found.add(tuple(id(x) for x in producer[key].path))
    return found


def auto_site(model: keras.Model, prefix_tokens: int | None = None) -> Site:
    """The automatic layer (see the module's docstring)."""
    order = {tuple(id(x) for x in p): i for i, p in enumerate(graph.iter_layer_paths(model))}
    try:
        conv: Any = graph.resolve_layer(model, None)
    except graph.UnknownLayer:
        conv = None
    tokens = gridded_token_layers(model, prefix_tokens)
    if not tokens or (conv is not None and order[tuple(map(id, conv))] > order[tuple(map(id, tokens[-1]))]):
        if conv is None:
            raise graph.UnknownLayer(
                f"model {model.name!r} has no layer with a 4-D (N, h, w, C) output, nor a token (N, T, C) output "
                "that lies on a grid (see prefix_tokens)"
            )
        return Site(conv)
    norms = [p for p in tokens if isinstance(p[-1], keras.layers.LayerNormalization)]
    feeding = _feeds_attention(model)
    before_attention = [p for p in norms if tuple(map(id, p)) in feeding]
    chosen = (before_attention or norms or tokens)[-1]
    return token_site(chosen, prefix_tokens, model)


def resolve_sites(
    model: keras.Model, layer: str | Sequence[str] | None, prefix_tokens: int | None = None
) -> list[Site]:
    """The sites for ``layer``: None (automatic), a name, or several names (fused)."""
    if layer is None:
        return [auto_site(model, prefix_tokens)]
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names:
        raise InvalidArgument("an empty layer list; give a layer name, several, or None (automatic)")
    if len(set(names)) != len(names):
        raise InvalidArgument(f"layer names repeat in {names}; give each layer once")
    return [_named_site(model, name, prefix_tokens) for name in names]


def _named_site(model: keras.Model, name: str, prefix_tokens: int | None) -> Site:
    graph.check_layer_name(name)
    try:
        return Site(graph.resolve_layer(model, name))
    except graph.UnknownLayer as exc:
        for path in token_layers(model):
            if graph.layer_path_name(path) == name:
                return token_site(path, prefix_tokens, model)
        raise graph.UnknownLayer(f"{exc}; token (N, T, C) layers can be named too") from None
