"""aug_smooth against the hand-made average of the six views explained separately;
eigen_smooth against a numpy SVD of the weighted activations."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from camserve.explain import Explainer

IMAGES = np.random.default_rng(5).random((2, 16, 16, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(6)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="feat")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="head")(x))


def views(x: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """The six views written out: (view, flipped)."""
    return [((x[:, :, ::-1] if flip else x) * scale, flip) for flip in (False, True) for scale in (1.0, 1.1, 0.9)]


@pytest.mark.parametrize("methods", [("gradcam",), ("gradcam++", "scorecam")])
def test_aug_smooth_is_the_average_of_the_six_views(model, methods):
    ex = Explainer(model, layer="feat")
    predicted = model.predict(IMAGES, verbose=0).argmax(axis=1)
    smoothed = ex.explain(IMAGES, methods=methods, aug_smooth=True)  # targets: each image's predicted class
    for m, method in enumerate(methods):
        raws, heats = [], []
        for view, flipped in views(IMAGES):
            out = ex.explain(view.astype(np.float32), methods=(method,), targets=list(predicted))
            raw = np.stack([o[0].raw for o in out])
            heat = np.stack([o[0].heatmap for o in out])
            raws.append(raw[:, :, ::-1] if flipped else raw)
            heats.append(heat[:, :, ::-1] if flipped else heat)
        raw, heat = np.mean(raws, axis=0), np.mean(heats, axis=0)
        heat = heat / heat.max(axis=(1, 2), keepdims=True)
        for i in range(len(IMAGES)):
            e = smoothed[i][m]
            assert e.class_index == predicted[i]
            np.testing.assert_allclose(e.raw, raw[i], rtol=1e-4, atol=1e-5 * raw[i].max())
            np.testing.assert_allclose(e.heatmap, heat[i], atol=1e-5)
        assert not np.allclose(raws[0], raws[3], atol=1e-3 * np.max(raws[0]))  # the flip matters


def test_eigen_smooth_is_the_first_component_of_the_weighted_activations(model):
    ex = Explainer(model, layer="feat")
    targets = [1, 2]
    got = np.stack([o[0].raw for o in ex.explain(IMAGES, targets=targets, eigen_smooth=True)])
    feat, head = model.get_layer("feat"), model.get_layer("head")
    first = keras.Model(model.inputs, feat.output)
    rest = keras.Model(feat.output, head.input)
    a = tf.constant(first(IMAGES))
    with tf.GradientTape() as tape:
        tape.watch(a)
        logits = tf.matmul(rest(a), head.kernel) + head.bias
        total = tf.reduce_sum(tf.gather(logits, targets, batch_dims=1))
    g = tape.gradient(total, a).numpy().astype(np.float64)
    a = a.numpy().astype(np.float64)
    for i in range(len(IMAGES)):
        weighted = a[i] * g[i].mean(axis=(0, 1))  # Grad-CAM's weights × activations
        flat = weighted.reshape(-1, weighted.shape[-1])
        centred = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = centred @ vt[0]
        plain = flat.sum(axis=1)
        if projection @ (plain - plain.mean()) < 0:
            projection = -projection
        want = np.maximum(projection.reshape(weighted.shape[:2]), 0.0)
        assert want.max() > 0
        np.testing.assert_allclose(got[i], want, rtol=1e-3, atol=1e-4 * want.max())
        plain_map = np.maximum(plain.reshape(weighted.shape[:2]), 0.0)
        assert not np.allclose(want / want.max(), plain_map / max(plain_map.max(), 1e-12), atol=1e-3)


def test_pixel_methods_are_smoothed_by_views_not_by_components(model):
    """eigen_smooth leaves pixel-level maps as they are; aug_smooth averages their views."""
    ex = Explainer(model, layer="feat")
    plain = ex.explain(IMAGES[:1], methods=("guidedbackprop",), targets=[1])[0][0]
    eigen = ex.explain(IMAGES[:1], methods=("guidedbackprop",), targets=[1], eigen_smooth=True)[0][0]
    np.testing.assert_allclose(eigen.raw, plain.raw, rtol=1e-5, atol=1e-7)
    smoothed = ex.explain(IMAGES[:1], methods=("guidedbackprop",), targets=[1], aug_smooth=True)[0][0]
    raws = []
    for view, flipped in views(IMAGES[:1]):
        raw = ex.explain(view.astype(np.float32), methods=("guidedbackprop",), targets=[1])[0][0].raw
        raws.append(raw[:, ::-1] if flipped else raw)
    np.testing.assert_allclose(smoothed.raw, np.mean(raws, axis=0), rtol=1e-4, atol=1e-5 * np.max(raws))
