"""What the Open Inference Protocol tests (REST, gRPC, tritonclient) share: the reference
Keras model and in-process Explainer of the test repository's ``gap`` model (version 2, the
one served when a request names no version), and the model inputs made from RGB pixels as
the repository's config says (resize to :data:`SIZE`, scale to 0..1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from camserve.imaging import preprocess, resize

#: The input size of the test repository's models (helpers_serving.make_repository).
SIZE = 32


def gap_reference(repo_root: Path) -> tuple[Any, Any]:
    """(model, Explainer) of ``gap`` version 2, loaded from the repository's own file."""
    import keras
    from helpers_serving import CLASSES

    from camserve.explain import Explainer

    model = keras.models.load_model(repo_root / "gap" / "2" / "model.keras", safe_mode=True)
    return model, Explainer(model, class_names=CLASSES)


def model_inputs(pixels: np.ndarray) -> np.ndarray:
    """The float32 model inputs ``[N, SIZE, SIZE, 3]`` for RGB ``pixels`` ``[N, H, W, 3]``."""
    return np.stack([preprocess(resize(p, (SIZE, SIZE)), "scale_0_1") for p in pixels])
