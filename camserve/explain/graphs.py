"""The compiled graphs of an :class:`~camserve.explain.Explainer`, bounded.

A graph is built (a ``tf.function``, traced once per batch bucket) the first time its key is
asked for and kept under a least-recently-used bound: the graph used longest ago is dropped
(and with it its traces) when a new key would make more than ``max_graphs``. Keys are
canonical (:func:`width_bucket`; the Explainer sorts the methods), so requests that differ
only in the order of their methods or in their exact target count share a graph.

>>> cache = GraphCache(max_graphs=2)
>>> for key in ("a", "b", "a", "c"):
...     _ = cache.get(key, lambda: object())
>>> cache.keys(), cache.built
(['a', 'c'], 3)
>>> width_bucket(3, num_classes=10), width_bucket(5, num_classes=6), bucket_sizes(48)
(4, 6, (1, 2, 4, 8, 16, 32, 48))
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from camserve.errors import InvalidArgument

#: Compiled graphs an Explainer keeps by default (each a few MB with its traces).
DEFAULT_MAX_GRAPHS = 32


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes compiled graphs are built for: powers of two up to the maximum.

    >>> bucket_sizes(48)
    (1, 2, 4, 8, 16, 32, 48)
    """
    if max_batch_size < 1:
        raise InvalidArgument(f"max_batch_size must be ≥ 1, got {max_batch_size}")
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return tuple(sizes + [max_batch_size])


def padded_size(n: int, buckets: Sequence[int]) -> int:
    """Images computed for a batch of ``n``: chunks of the largest bucket, the last one padded
    up to the smallest bucket that holds it (as :meth:`Explainer.predict
    <camserve.explain.Explainer.predict>` and ``explain`` run them).

    >>> [padded_size(n, (1, 2, 4, 8, 16)) for n in (0, 3, 5, 16, 21)]
    [0, 4, 8, 16, 24]
    """
    largest = buckets[-1]
    whole, rest = divmod(n, largest)
    return whole * largest + (next(b for b in buckets if b >= rest) if rest else 0)


def width_bucket(width: int, num_classes: int) -> int:
    """The target width a graph is built for: the next power of two, at most the class count."""
    if width < 1:
        raise InvalidArgument(f"a target width is ≥ 1, got {width}")
    return min(1 << (width - 1).bit_length(), max(num_classes, width))


class GraphCache:
    """A thread-safe LRU of built graphs by key; ``built`` counts the builds so far."""

    def __init__(self, max_graphs: int = DEFAULT_MAX_GRAPHS) -> None:
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise InvalidArgument(f"max_graphs must be an integer ≥ 1, got {max_graphs!r}")
        self.max_graphs = max_graphs
        self.built = 0
        self._graphs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The graph of ``key``, built by ``build()`` when absent (the least recently used
        dropped beyond ``max_graphs``)."""
        with self._lock:
            graph = self._graphs.get(key)
            if graph is not None:
                self._graphs.move_to_end(key)
                return graph
            graph = self._graphs[key] = build()
            self.built += 1
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            return graph

    def keys(self) -> list[Hashable]:
        """Keys held, least recently used first."""
        with self._lock:
            return list(self._graphs)

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs


class ByShape:
    """A ``tf.function`` called through its concrete functions, looked up by the shapes and
    dtypes of its tensor arguments (a tensor, then dicts of tensors): the function's own
    dispatch binds and hashes its arguments on every call (about 180 µs of CPU a call on the
    bench machine, against a few µs here). Calls whose arguments are not all tensors go to the
    function. Held by the :class:`GraphCache`, so the traces go when the graph does.

    >>> import tensorflow as tf
    >>> double = ByShape(tf.function(lambda x, extra: x * 2 + extra["b"]))
    >>> int(double(tf.constant([1, 2]), {"b": tf.constant(1)})[1]), len(double.concrete)
    (5, 1)
    """

    __slots__ = ("__weakref__", "concrete", "function")

    def __init__(self, function: Any) -> None:
        self.function = function
        self.concrete: dict[tuple, Any] = {}

    def __call__(self, first: Any, *rest: dict[str, Any]) -> Any:
        try:
            signature = (first.shape, first.dtype) + tuple(
                (name, value.shape, value.dtype) for part in rest for name, value in sorted(part.items())
            )
            hash(signature)
        except (AttributeError, TypeError):  # not tensors: the function's own dispatch
            return self.function(first, *rest)
        concrete = self.concrete.get(signature)
        if concrete is None:
            concrete = self.concrete[signature] = self.function.get_concrete_function(first, *rest)
        return concrete(first, *rest)
