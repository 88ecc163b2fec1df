"""camserve: explain Keras image classifiers, in-process or over gRPC.

>>> from camserve import Explainer                       # doctest: +SKIP
>>> ex = Explainer(model)                                # doctest: +SKIP
>>> ex.explain(images, methods=("gradcam",))[0][0].box   # doctest: +SKIP
(12, 8, 40, 37)
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Explainer", "Explanation", "__version__"]


def __getattr__(name: str):
    # Lazy so that `camserve.imaging`, the CLI's --help and the client do not import TensorFlow.
    if name == "Explainer":
        from camserve.explain import Explainer

        return Explainer
    if name == "Explanation":
        from camserve.explanation import Explanation

        return Explanation
    raise AttributeError(f"module 'camserve' has no attribute {name!r}")
