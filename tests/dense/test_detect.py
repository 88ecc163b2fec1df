"""Detections: the margin against crops of the zero-padded image, NMS across classes or per
class on hand-made grids, the background class, settings from config.toml, and the bundled
shapes_fc on generated multi-shape scenes (seeds never used in training) against the
generator's ground truth."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fcn_nets import crops_reference, flatten_net, max_rel_err

from camserve.dense import DenseScores, DetectionSettings, dense_scores, detections, nms
from camserve.errors import InvalidArgument

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_margin_scores_equal_the_classifier_on_crops_of_the_padded_image() -> None:
    model = flatten_net("valid")
    image = np.random.default_rng(1).random((30, 34, 3)).astype(np.float32)
    result = dense_scores(model, image, stride=2, margin=6)
    want = crops_reference(model, np.pad(image, ((6, 6), (6, 6), (0, 0))), 2)
    assert result[0].scores.shape == want.shape and max_rel_err(result[0].scores, want) < 1e-5
    np.testing.assert_allclose(result[0].boxes[0, 0], [-6, -6, 14, 14])
    np.testing.assert_allclose(result[0].boxes[1, 2], [-2, -4, 18, 16])


def _level(scores: list[list[list[float]]], stride: int = 8, window: int = 64) -> DenseScores:
    s = np.asarray(scores, np.float32)
    gh, gw = s.shape[:2]
    y0, x0 = np.meshgrid(np.arange(gh) * stride, np.arange(gw) * stride, indexing="ij")
    boxes = np.stack([x0, y0, x0 + window, y0 + window], -1).astype(np.float32)
    return DenseScores(1.0, s, boxes, (stride, stride), (window, window), (gh * stride + window, gw * stride + window))


def test_agnostic_nms_keeps_one_class_per_place_and_background_is_never_detected() -> None:
    # two neighbouring windows (IoU 0.78) fire for different classes; a third cell is background
    level = _level([[[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.0, 0.0, 1.0]]])
    names = ["square", "triangle", "background"]
    per_class = detections([level], 0.5, 0.3, names, nms_mode="per_class", background=2)
    agnostic = detections([level], 0.5, 0.3, names, nms_mode="agnostic", background=2)
    assert [d.label for d in per_class] == ["square", "triangle"]
    assert [(d.label, d.box) for d in agnostic] == [("square", (0.0, 0.0, 64.0, 64.0))]
    assert "background" not in [d.label for d in detections([level], 0.5, 0.3, names, background=2)]
    # without a background class it is a class like any other
    assert "background" in [d.label for d in detections([level], 0.5, 0.3, names)]


def test_settings_from_config_and_overrides() -> None:
    config = SimpleNamespace(
        name="m", class_names=("a", "bg"), extra={"background_class": "bg", "dense": {"iou": 0.4, "scales": [1, 0.5]}}
    )
    s = DetectionSettings.from_config(config)
    assert (s.iou, s.scales, s.background_class, s.background_index(config.class_names)) == (0.4, (1.0, 0.5), "bg", 1)
    assert s.with_overrides(iou=None, threshold=0.7, nms="per_class").threshold == 0.7
    with pytest.raises(InvalidArgument, match="unknown \\[dense\\] setting"):
        DetectionSettings.from_mapping({"treshold": 0.5})
    with pytest.raises(InvalidArgument, match="background_class 'none' is not a class of model 'm'"):
        DetectionSettings.from_config(SimpleNamespace(name="m", class_names=("a",), extra={"background_class": "none"}))
    with pytest.raises(InvalidArgument, match="iou = 0.0 is not allowed"):
        s.with_overrides(iou=0.0)


@pytest.fixture(scope="module")
def detector():
    if not (MODELS / "shapes_fc" / "1" / "model.keras").is_file():
        pytest.skip("models/shapes_fc not built")
    from camserve.datasets.detection_figures import load_detector

    return load_detector(MODELS / "shapes_fc")


def _report(detector, scenes, **overrides):
    from camserve.datasets import shapes
    from camserve.datasets.detection_figures import scene_detections
    from camserve.evaluation.detection import window_and_tight_report

    entry, settings, explainer = detector
    found = scene_detections(entry, settings.with_overrides(**overrides), explainer, scenes)
    truth = [[(shapes.CLASS_NAMES[label], box) for label, box in zip(s.labels, s.boxes)] for s in scenes]
    return window_and_tight_report(found, truth), found


def test_bundled_shapes_fc_finds_the_shapes_of_fresh_scenes(detector) -> None:
    """12 scenes of 256 px with four shapes (48 objects), the config's defaults. Measured on 90
    scenes (bench/results/dense_detections.md): precision 0.98-0.99, recall 0.99, tight IoU ≥ 0.5
    for 99.7 %; the floors leave room for 12 scenes."""
    from camserve.datasets import shapes

    scenes = shapes.make_scenes(12, 515_151, (256, 256), n_shapes=4)
    report, found = _report(detector, scenes)
    w = report["windows"]
    assert w["objects"] == 48 and w["precision"] >= 0.85 and w["recall"] >= 0.9, w
    assert report["tight_iou_share"] >= 0.85
    assert report["mean_tight_iou"] > report["mean_window_iou"] + 0.3
    assert report["tight_boxes"]["ap50"] > 0.85
    assert all(d.label != "background" for f in found for d in f)


def test_pyramid_finds_small_and_large_shapes(detector) -> None:
    """15-60 px shapes: the config's two scales find more of them than scale 1 alone, the
    recall and precision above floors (measured on 90 held-out scenes: recall 0.96, precision 0.97)."""
    from camserve.datasets import shapes

    scenes = shapes.make_scenes(10, 525_252, (256, 256), n_shapes=4, shape_size=(15, 60))
    pyramid, _ = _report(detector, scenes)
    single, _ = _report(detector, scenes, scales=(1.0,))
    assert pyramid["windows"]["recall"] >= 0.9 and pyramid["windows"]["precision"] >= 0.8, pyramid["windows"]
    assert pyramid["windows"]["recall"] >= single["windows"]["recall"]


def test_nms_points_suppress_boxes_looking_at_a_kept_object() -> None:
    # box 1 barely overlaps box 0 (IoU < 0.3) but its point (a window centre) lies inside box 0
    boxes = np.array([[0, 0, 20, 20], [15, 15, 40, 40], [50, 50, 60, 60]], np.float64)
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.3) == [0, 1, 2]
    assert nms(boxes, scores, 0.3, np.array([[10, 10], [18, 18], [55, 55]])) == [0, 2]
    # several points per box: any one inside suppresses
    two = np.array([[[10, 10], [10, 10]], [[30, 30], [19, 2]], [[55, 55], [55, 55]]])
    assert nms(boxes, scores, 0.3, two) == [0, 2]


def test_tight_boxes_are_each_windows_cam_box_in_image_pixels(monkeypatch) -> None:
    """Per candidate (two scales, a margin): the window cut by hand from the resized,
    zero-padded image, explained alone, its CAM box (the CAM paper's 20 % rule) moved to the
    window's place and scaled back to the image; computed in chunks of 3 candidates."""
    import importlib

    import cv2
    import keras

    from camserve import imaging
    from camserve.dense.detections import candidates
    from camserve.explain import Explainer

    detect_module = importlib.import_module("camserve.dense.detect")  # the package exports detect()
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    image = np.random.default_rng(7).random((40, 36, 3), dtype=np.float32)
    result = dense_scores(model, image, stride=8, scales=(1.0, 0.6), mode="crops", margin=4)
    found = candidates(result, threshold=0.0)
    found = found.take(np.linspace(0, len(found) - 1, 8).astype(int))  # both scales, several classes
    assert set(found.levels.tolist()) == {0, 1}
    explainer = Explainer(model, layer="conv")
    monkeypatch.setattr(detect_module, "TIGHT_BOX_CHUNK", 3)
    got = detect_module.tight_boxes(explainer, image, result, found)
    want = []
    for n in range(len(found)):
        level = result[int(found.levels[n])]
        rh, rw = level.image_size
        resized = image if level.scale == 1.0 else cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA)
        padded = np.pad(resized, ((4, 4 + 16), (4, 4 + 16), (0, 0)))
        y, x0 = int(found.cells[n, 0]) * level.strides[0], int(found.cells[n, 1]) * level.strides[1]
        heat = explainer.explain(padded[None, y : y + 16, x0 : x0 + 16], targets=[int(found.classes[n])])[0][0].heatmap
        box = imaging.heatmap_box(heat, 0.2)
        if box is None:
            want.append(None)
            continue
        fy, fx = 40 / rh, 36 / rw
        edges = ((x0 - 4 + box[0]) * fx, (y - 4 + box[1]) * fy, (x0 - 4 + box[2]) * fx, (y - 4 + box[3]) * fy)
        clipped = (max(edges[0], 0.0), max(edges[1], 0.0), min(edges[2], 36.0), min(edges[3], 40.0))
        want.append(clipped if clipped[2] > clipped[0] and clipped[3] > clipped[1] else None)
    assert sum(b is not None for b in want) >= 4
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            np.testing.assert_allclose(g, w, atol=1e-4)
