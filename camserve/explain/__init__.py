"""The explanation engine: :class:`Explainer` (one compiled pass per batch), the method
registry (:mod:`camserve.explain.methods`: :data:`METHODS`, :func:`register`) and the
classifier-head finder it shares with the FCN conversion (:mod:`camserve.explain.heads`)."""

from camserve.explain.explainer import Explainer, UnknownClass, UnknownMethod, bucket_sizes
from camserve.explain.methods import METHODS, Method, register, unregister

__all__ = [
    "METHODS",
    "Explainer",
    "Method",
    "UnknownClass",
    "UnknownMethod",
    "bucket_sizes",
    "register",
    "unregister",
]
