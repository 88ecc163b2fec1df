"""Several layers fused in one pass: equal to the single-layer explanations computed
separately, each normalised to a peak of 1, resized to the input (OpenCV bilinear here) and
averaged, then rescaled to a peak of 1."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from models_for_tests import two_conv_model

from camserve.errors import InvalidArgument
from camserve.explain import Explainer

IMAGES = np.random.default_rng(11).random((3, 16, 16, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    return two_conv_model(16, 3, seed=2, names=("block1", "block2"), channels=(6, 8))


def peak_one(m: np.ndarray) -> np.ndarray:
    return m / m.max() if m.max() > 0 else m


@pytest.mark.parametrize("method", ["gradcam", "layercam", "scorecam"])
def test_fused_layers_equal_the_average_of_single_layers(model, method):
    targets = [0, 1, 2]
    fused = Explainer(model, layer=["block1", "block2"]).explain(IMAGES, methods=(method,), targets=targets)
    singles = [
        Explainer(model, layer=name).explain(IMAGES, methods=(method,), targets=targets)
        for name in ("block1", "block2")
    ]
    for i in range(len(IMAGES)):
        heats = [s[i][0].heatmap for s in singles]
        np.testing.assert_allclose(fused[i][0].heatmap, peak_one(np.mean(heats, axis=0)), atol=1e-5)
        first = singles[0][i][0].raw
        raws = [cv2.resize(peak_one(s[i][0].raw), first.shape[::-1], interpolation=cv2.INTER_LINEAR) for s in singles]
        np.testing.assert_allclose(fused[i][0].raw, np.mean(raws, axis=0), atol=1e-5)
        assert not np.allclose(heats[0], heats[1], atol=1e-2)  # the layers differ: fusing shows


def test_layer_list_errors(model):
    with pytest.raises(InvalidArgument, match="repeat"):
        Explainer(model, layer=["block1", "block1"])
    with pytest.raises(InvalidArgument, match="empty layer list"):
        Explainer(model, layer=[])
    ex = Explainer(model, layer=["block1", "block2"])
    assert ex.layer_names == ("block1", "block2") and ex.layer_name == "block1,block2"
