"""An :class:`~camserve.explain.Explainer` built from a model folder of the repository, and
decoded RGB images explained with it: what ``camserve explain`` and ``camserve bulk`` share.

>>> folder = FolderExplainer.load("models/shapes_gap")                         # doctest: +SKIP
>>> folder.explain_rgbs([imaging.read_image("samples/star.png")])[0][0].label  # doctest: +SKIP
'star'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from camserve import imaging
from camserve.explain.explainer import Explainer
from camserve.explanation import Explanation
from camserve.serving.repository import ModelEntry, load_model_dir


@dataclasses.dataclass
class FolderExplainer:
    """A loaded model folder (``entry``: model, version, ``config.toml``) and its Explainer."""

    entry: ModelEntry
    explainer: Explainer

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        version: int | None = None,
        layer: str | Sequence[str] | None = None,
        max_channels: int | None = None,
        max_batch_size: int = 64,
    ) -> FolderExplainer:
        """Load ``model_dir`` (newest version unless ``version``) and build its Explainer at
        ``layer`` (default: the folder's ``default_layer``, else automatic) with its class names."""
        entry = load_model_dir(model_dir, version)
        cfg = entry.config
        explainer = Explainer(
            entry.model,
            layer=layer or cfg.default_layer,
            class_names=cfg.class_names,
            prefix_tokens=cfg.prefix_tokens,
            max_channels=max_channels,
            max_batch_size=max_batch_size,
        )
        return cls(entry, explainer)

    def explainer_for(self, model: Any) -> Explainer:
        """An Explainer of ``model`` (e.g. a randomised copy of the folder's) at the same layer,
        with the same class names and prefix tokens."""
        ex = self.explainer
        layers = list(ex.layer_names)
        return Explainer(
            model,
            layer=layers if len(layers) > 1 else layers[0],
            class_names=ex.class_names,
            prefix_tokens=self.entry.config.prefix_tokens,
        )

    def explain_rgbs(
        self,
        rgbs: Sequence[np.ndarray],
        methods: Sequence[str] = ("gradcam",),
        targets: Sequence[Any] | None = None,
        top_k: int = 1,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> list[list[Explanation]]:
        """Explain RGB uint8 images of any size (each resized and preprocessed as the folder's
        ``config.toml`` says); ``targets``: the same targets (classes or :mod:`camserve.targets`
        objects) for every image, or None for the ``top_k`` predicted ones; ``aug_smooth`` /
        ``eigen_smooth`` as for :meth:`Explainer.explain`. Per image, targets outer, methods inner (as :meth:`Explainer.explain`)."""
        batch = np.stack([imaging.model_input(rgb, self.entry.config) for rgb in rgbs])
        return self.explainer.explain(
            batch,
            methods=methods,
            targets=[list(targets)] * len(rgbs) if targets else None,
            top_k=top_k,
            aug_smooth=aug_smooth,
            eigen_smooth=eigen_smooth,
        )
