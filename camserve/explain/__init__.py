"""The explanation engine: :class:`Explainer` (one compiled pass per batch) and the method
registry (:mod:`camserve.explain.methods`).

>>> from camserve.explain import Explainer, METHODS   # doctest: +SKIP
"""

from camserve.explain.explainer import Explainer, UnknownClass, UnknownMethod, bucket_sizes
from camserve.explain.methods import METHODS

__all__ = ["METHODS", "Explainer", "UnknownClass", "UnknownMethod", "bucket_sizes"]
