"""Detection figures of a bundled sliding-window model on generated multi-shape scenes, as
``camserve dense`` finds objects with the model's ``[dense]`` settings.

>>> figures = dense_detection_figures("models/shapes_fc", n_scenes=30)   # doctest: +SKIP
>>> figures["windows"]["precision"] >= 0.9                              # doctest: +SKIP
True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from camserve.datasets import shapes

__all__ = [
    "DETECTION_SEED",
    "dense_detection_figures",
    "load_detector",
    "recorded_detection_metrics",
    "scene_detections",
]

#: Scenes for the recorded figures; train-bundled uses 1000 * seed + 0..4 and + 500..504.
DETECTION_SEED = 130_013


def load_detector(model_dir: str | Path) -> tuple[Any, Any, Any]:
    """(model entry, DetectionSettings, Explainer for the tight boxes or None) of a model folder;
    a ``tight_box_model`` is loaded from the same repository.

    >>> entry, settings, explainer = load_detector("models/shapes_fc")   # doctest: +SKIP
    """
    from camserve.dense.detect import DetectionSettings, tight_box_explainer
    from camserve.serving.repository import load_model_dir

    entry = load_model_dir(model_dir)
    settings = DetectionSettings.from_config(entry.config)
    return entry, settings, tight_box_explainer(model_dir, entry, settings)


def scene_detections(entry: Any, settings: Any, explainer: Any, scenes: Sequence[shapes.Scene]) -> list[list[Any]]:
    """The detections of each scene (RGB uint8) with ``settings``."""
    from camserve import imaging
    from camserve.dense.detect import detect

    names = list(entry.config.class_names)
    return [
        detect(entry.model, imaging.model_input(s.image, entry.config, False), settings, names, explainer).detections
        for s in scenes
    ]


def dense_detection_figures(
    model_dir: str | Path,
    n_scenes: int = 30,
    seed: int = DETECTION_SEED,
    shape_size: tuple[float, float] = shapes.DEFAULT_SHAPE_SIZE,
    size: int = 256,
    n_shapes: int = 4,
) -> dict[str, Any]:
    """Windows by containment, tight boxes by IoU (see
    :func:`camserve.evaluation.detection.window_and_tight_report`) on ``n_scenes`` scenes of
    ``size`` px with ``n_shapes`` shapes of ``shape_size`` px."""
    from camserve.evaluation.detection import window_and_tight_report

    entry, settings, explainer = load_detector(model_dir)
    scenes = shapes.make_scenes(n_scenes, seed, (size, size), n_shapes=n_shapes, shape_size=shape_size)
    found = scene_detections(entry, settings, explainer, scenes)
    truth = [[(shapes.CLASS_NAMES[label], box) for label, box in zip(s.labels, s.boxes)] for s in scenes]
    return window_and_tight_report(found, truth)


def recorded_detection_metrics(folder: Path, n_scenes: int = 30) -> dict[str, Any]:
    """Flat ``[metrics]`` keys of :func:`~camserve.datasets.detection_figures.dense_detection_figures`
    on 256 px four-shape scenes of the generator's default sizes and of 15-60 px."""
    out: dict[str, Any] = {}
    for suffix, size in (("", shapes.DEFAULT_SHAPE_SIZE), ("_15_60px", (15, 60))):
        r = dense_detection_figures(folder, n_scenes, shape_size=size)
        w, t = r["windows"], r["tight_boxes"]
        out.update(
            {
                f"detection_precision{suffix}": w["precision"],
                f"detection_recall{suffix}": w["recall"],
                f"detection_ap{suffix}": w["ap"],
                f"tight_box_ap50{suffix}": t["ap50"],
                f"tight_iou_0_5_share{suffix}": r["tight_iou_share"],
                f"mean_tight_iou{suffix}": r["mean_tight_iou"],
                f"mean_window_iou{suffix}": r["mean_window_iou"],
            }
        )
    out["detection_scenes"] = (
        f"{n_scenes} x 256 px, 4 shapes, seed {DETECTION_SEED} (windows by containment >= 0.8, tight boxes by IoU)"
    )
    return out
