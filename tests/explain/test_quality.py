"""Explanation quality on the bundled shapes_gap model, with fresh scenes from an unseen seed."""

import numpy as np
import pytest

from camserve import Explainer, evaluation
from camserve.datasets.shapes import make_dataset
from camserve.serving.repository import load_model_dir

UNSEEN_SEED = 987_654  # neither the training nor the recorded evaluation seeds


@pytest.fixture(scope="module")
def shapes_gap(repo_root):
    return load_model_dir(repo_root / "models/shapes_gap")


@pytest.fixture(scope="module")
def scenes(shapes_gap):
    raw, labels, boxes = make_dataset(120, seed=UNSEEN_SEED, size=shapes_gap.config.input_size)
    return (raw / 255.0).astype(np.float32), labels, boxes


def test_cam_boxes_localize_the_shapes(shapes_gap, scenes):
    images, labels, boxes = scenes
    ex = Explainer(shapes_gap.model, class_names=shapes_gap.config.class_names)
    results = ex.explain(images, methods=("cam", "gradcam"), targets=list(labels))
    cam_boxes = [r[0].box for r in results]
    accuracy = evaluation.localization_accuracy(cam_boxes, boxes)
    assert accuracy >= 0.85, accuracy  # config.toml records the figure on 2000 scenes
    pointing = evaluation.pointing_game(np.stack([r[1].heatmap for r in results]), boxes)
    assert pointing >= 0.9, pointing
    # the predicted class is right on single-shape scenes
    predicted = ex.predict(images).argmax(axis=1)
    assert (predicted == labels).mean() >= 0.9


def test_deletion_removes_evidence_faster_than_an_inverted_map(shapes_gap, scenes):
    images, labels, _ = scenes
    ex = Explainer(shapes_gap.model)
    worse = 0
    for image, label in zip(images[:6], labels[:6]):
        heat = ex.explain(image[None], methods=("gradcam",), targets=[int(label)])[0][0].heatmap

        def score(batch, label=label):
            return ex.predict(batch)[:, label]

        good = evaluation.deletion_auc(score, image, heat, steps=16)
        bad = evaluation.deletion_auc(score, image, 1.0 - heat, steps=16)
        worse += good < bad
    assert worse >= 5


def test_randomizing_the_model_changes_the_maps(shapes_gap, scenes):
    images, labels, _ = scenes
    targets = [int(c) for c in labels[:12]]

    def gradcam(model, batch):
        return np.stack([r[0].heatmap for r in Explainer(model).explain(batch, methods=("gradcam",), targets=targets)])

    same = evaluation.sanity_check(shapes_gap.model, gradcam, images[:12], layers_to_randomize=0)
    assert same.mean > 0.999
    randomized = evaluation.sanity_check(shapes_gap.model, gradcam, images[:12], layers_to_randomize=2, seed=1)
    assert randomized.mean < 0.5, randomized.correlations
