"""`camserve explain` with the new target forms, layer lists and smoothing flags: its JSON
matches the library's explanations of the same inputs."""

import json

import cv2
import numpy as np
import pytest
from models_for_tests import two_conv_model

from camserve import Explainer, imaging
from camserve.cli import main
from camserve.cli.options import parse_layers, parse_target
from camserve.errors import InvalidArgument
from camserve.explanation import image_box
from camserve.targets import ClassTarget, MultiLabelTarget, RegressionTarget, SegmentationTarget

NAMES = ["a", "b", "c", "d"]


@pytest.fixture()
def model_and_dir(tmp_path):
    model = two_conv_model(32, 4, seed=8)
    d = tmp_path / "repo" / "two"
    (d / "1").mkdir(parents=True)
    model.save(d / "1" / "model.keras")
    (d / "config.toml").write_text(
        'class_names = ["a", "b", "c", "d"]\ninput_size = [32, 32]\npreprocessing = "scale_0_1"\n'
    )
    return model, d


def test_targets_layers_and_smoothing_from_the_command_line(tmp_path, model_and_dir):
    model, model_dir = model_and_dir
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.random.default_rng(2).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    out = tmp_path / "out"
    args = ["explain", str(path), "--model", str(model_dir), "--out", str(out), "--layer", "first_conv,last_conv"]
    args += ["--target", "prob:b", "--target", "regression:2:-1", "--aug-smooth", "--eigen-smooth"]
    assert main(args) == 0
    (entry,) = json.loads((out / "explanations.json").read_text())

    rgb = imaging.read_image(path)
    x = imaging.preprocess(imaging.resize(rgb, (32, 32)), "scale_0_1")[None]
    ex = Explainer(model, layer=["first_conv", "last_conv"], class_names=NAMES)
    targets = [[ClassTarget("b", probability=True), RegressionTarget(2, sign=-1)]]
    expected = ex.explain(x, targets=targets, aug_smooth=True, eigen_smooth=True)[0]
    assert len(entry["explanations"]) == 2
    for e, got in zip(expected, entry["explanations"]):
        assert (got["class_index"], got["label"]) == (e.class_index, e.label)
        assert got["score"] == pytest.approx(e.score, abs=1e-5)
        assert got["box"] == image_box(e.box, e.heatmap.shape, rgb.shape)


def test_target_and_layer_forms(tmp_path):
    mask = tmp_path / "mask.png"
    picture = np.zeros((4, 4, 3), np.uint8)
    picture[1:3, 2:] = 255
    cv2.imwrite(str(mask), picture)
    seg = parse_target(f"segmentation:c:{mask}")
    assert isinstance(seg, SegmentationTarget) and seg.class_index == "c"
    np.testing.assert_array_equal(seg.mask, picture.max(axis=-1) > 0)
    assert parse_target("multilabel:0.3") == MultiLabelTarget(0.3)
    assert parse_target("-1") == -1 and parse_target("prob:2") == ClassTarget(2, probability=True)
    with pytest.raises(InvalidArgument, match="target 'regression:x'"):
        parse_target("regression:x")
    assert parse_layers(["a, b"]) == ["a", "b"]
