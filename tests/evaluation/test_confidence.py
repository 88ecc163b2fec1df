"""Average drop / increase in confidence (Chattopadhay et al. 2018) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from camserve.errors import InvalidArgument
from camserve.evaluation import average_drop, confidence_change, explanation_masked, increase_in_confidence


def test_measures_by_hand():
    original, masked = [0.9, 0.4, 0.5, 0.8], [0.45, 0.5, 0.5, 0.2]
    # drops: 0.45/0.9 = 0.5, 0 (rose), 0 (equal), 0.6/0.8 = 0.75 -> mean 0.3125
    assert average_drop(original, masked) == pytest.approx(31.25)
    assert increase_in_confidence(original, masked) == pytest.approx(25.0)  # only the second rose


def test_confidence_change_scores_the_explanation_masked_images():
    rng = np.random.default_rng(0)
    images = rng.random((3, 4, 5, 2))
    heatmaps = [rng.random((4, 5)) for _ in range(3)]
    weights = rng.random((4, 5, 2))

    def score(batch):
        return (batch * weights).sum(axis=(1, 2, 3)) / weights.sum()

    result = confidence_change(score, images, heatmaps)
    y = np.array([(img * weights).sum() / weights.sum() for img in images])
    o = np.array([(img * hm[..., None] * weights).sum() / weights.sum() for img, hm in zip(images, heatmaps)])
    np.testing.assert_allclose(result.original, y)
    np.testing.assert_allclose(result.masked, o)
    assert result.average_drop == pytest.approx(100 * np.mean(np.maximum(0, y - o) / y))
    assert result.increase_in_confidence == pytest.approx(100 * np.mean(o > y))
    np.testing.assert_allclose(explanation_masked(images[0], heatmaps[0]), images[0] * heatmaps[0][..., None])


def test_bad_input_is_refused():
    with pytest.raises(InvalidArgument, match="> 0"):
        average_drop([0.0], [0.1])
    with pytest.raises(InvalidArgument, match="equal length"):
        increase_in_confidence([0.5, 0.4], [0.1])
    with pytest.raises(InvalidArgument, match=r"\[0, 1\]"):
        explanation_masked(np.ones((2, 2, 3)), np.full((2, 2), 2.0))
