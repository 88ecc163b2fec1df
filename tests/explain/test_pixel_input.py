"""Explainer(preprocessing=...): uint8 pixels preprocessed inside the compiled graphs give what
the float path gives on camserve.imaging.model_input of the same pixels, for every
preprocessing, a one-channel model, chunked (Score-CAM) and sampled (SmoothGrad) reads; pixel
batches are checked by shape and compiled at warm-up."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from models_for_tests import gap_model

from camserve.errors import InvalidArgument
from camserve.explain import Explainer
from camserve.imaging import PREPROCESSORS, model_input

SIZE = 24


def _spec(preprocessing: str, channels: int = 3):
    from types import SimpleNamespace

    return SimpleNamespace(input_size=(SIZE, SIZE), channels=channels, preprocessing=preprocessing)


def _pixels(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _floats(pixels: np.ndarray, spec) -> np.ndarray:
    return np.stack([model_input(p, spec) for p in pixels])


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return gap_model(classes=5, size=SIZE)


@pytest.mark.parametrize("preprocessing", sorted(PREPROCESSORS))
def test_pixels_give_the_float_paths_scores_and_maps(model, preprocessing) -> None:
    ex = Explainer(model, preprocessing=preprocessing)
    pixels = _pixels()
    floats = _floats(pixels, _spec(preprocessing))
    scale = max(1.0, float(np.abs(ex.predict(floats)).max()))
    np.testing.assert_allclose(ex.predict(pixels), ex.predict(floats), rtol=1e-4, atol=1e-5 * scale)
    got = ex.explain(pixels, methods=("gradcam", "layercam"), top_k=2)
    want = ex.explain(floats, methods=("gradcam", "layercam"), top_k=2)
    for g_image, w_image in zip(got, want):
        assert [(e.method, e.class_index) for e in g_image] == [(e.method, e.class_index) for e in w_image]
        for g, w in zip(g_image, w_image):
            np.testing.assert_allclose(g.heatmap, w.heatmap, atol=1e-4)
            np.testing.assert_allclose(g.raw, w.raw, rtol=1e-4, atol=1e-4 * max(1e-6, float(w.raw.max())))


def test_one_channel_models_average_the_preprocessed_colours() -> None:
    keras.utils.set_random_seed(3)
    inp = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inp)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    ex = Explainer(keras.Model(inp, out), preprocessing="scale_-1_1")
    pixels = _pixels(2, seed=1)
    floats = _floats(pixels, _spec("scale_-1_1", channels=1))
    assert floats.shape == (2, SIZE, SIZE, 1)
    np.testing.assert_allclose(ex.predict(pixels), ex.predict(floats), rtol=1e-5, atol=1e-7)
    with pytest.raises(InvalidArgument, match=r"uint8 pixels must have shape \(N, 24, 24, 3\), got \(2, 24, 24, 1\)"):
        ex.predict(pixels[..., :1])


@pytest.mark.parametrize("method", ["scorecam", "smoothgrad"])
def test_chunked_and_sampled_reads_take_pixels_too(model, method) -> None:
    ex = Explainer(model, preprocessing="torch", chunk_size=8)
    pixels = _pixels(2, seed=2)
    floats = _floats(pixels, _spec("torch"))
    (g,) = ex.explain(pixels[:1], methods=(method,), targets=[[1]])[0]
    (w,) = ex.explain(floats[:1], methods=(method,), targets=[[1]])[0]
    np.testing.assert_allclose(g.heatmap, w.heatmap, atol=1e-4)  # SmoothGrad's noise is seeded: equal too
    np.testing.assert_allclose(g.raw, w.raw, rtol=1e-4, atol=1e-4 * float(w.raw.max()))


def test_pixels_without_preprocessing_are_plain_numbers(model) -> None:
    ex = Explainer(model)
    pixels = _pixels(2)
    np.testing.assert_allclose(ex.predict(pixels), ex.predict(pixels.astype(np.float32)), rtol=1e-6)


def test_warm_up_compiles_the_pixel_and_the_float_graphs(model) -> None:
    ex = Explainer(model, preprocessing="scale_0_1", max_batch_size=4)
    ex.warm_up(methods=("gradcam",))
    traced = ex.trace_count
    for n in (1, 2, 3, 4):
        for images in (_pixels(n), _floats(_pixels(n), _spec("scale_0_1"))):
            ex.predict(images)
            ex.explain(images, methods=("gradcam",))
    assert ex.trace_count == traced


def test_unknown_preprocessing_is_refused_naming_the_allowed(model) -> None:
    with pytest.raises(InvalidArgument, match=r"unknown preprocessing 'bgr'; allowed: \['caffe', 'none'"):
        Explainer(model, preprocessing="bgr")
