"""The accelerator options of the engine (issue 9 item 7), on CPU: mixed precision (the model
computes in float16, outputs and maps stay float32 and agree with float32 within a stated
tolerance), XLA (equal to the plain graphs within float rounding) and device placement."""

from __future__ import annotations

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from camserve import Explainer
from camserve.dense import dense_scores
from camserve.errors import InvalidArgument
from camserve.keras_graph import cast_model

ALL = ("cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam", "ablationcam")

#: mixed_float16 against float32: float16 keeps ~3 decimal digits; maps are compared relative to
#: their peak, scores (probabilities) absolutely. Measured on shapes-like nets: ≤ 4e-3.
HALF_MAP_TOL = 2e-2
HALF_SCORE_TOL = 2e-3
#: XLA against the plain graphs: float rounding only (measured ≤ 7e-6).
XLA_TOL = 1e-4


@pytest.fixture(scope="module")
def bn_model():
    """conv → BN → conv → GAP → Dense(softmax): BatchNorm too must work in half precision."""
    keras.utils.set_random_seed(2)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(5, activation="softmax", name="predictions")(x), name="bn_gap")


def _compare(want, got, map_tol: float, score_tol: float) -> None:
    for row_w, row_g in zip(want, got):
        assert [(e.method, e.class_index) for e in row_w] == [(e.method, e.class_index) for e in row_g]
        for w, g in zip(row_w, row_g):
            assert g.raw.dtype == np.float32 and g.heatmap.dtype == np.float32, g.method
            peak = max(float(np.abs(w.raw).max()), 1e-6)
            assert np.abs(g.raw - w.raw).max() <= map_tol * peak, (g.method, np.abs(g.raw - w.raw).max() / peak)
            assert np.abs(g.heatmap - w.heatmap).max() <= map_tol, g.method
            assert abs(g.score - w.score) <= score_tol, g.method


def test_mixed_float16_computes_in_half_and_answers_in_float32(bn_model, rng_images) -> None:
    plain = Explainer(bn_model, max_batch_size=4)
    half = Explainer(bn_model, max_batch_size=4, precision="mixed_float16")
    assert half.precision == "mixed_float16" and half.source_model is bn_model
    assert half.model is not bn_model
    assert half.model.get_layer("last_conv").compute_dtype == "float16"  # the model really runs in half
    assert half.model.get_layer("predictions").compute_dtype == "float32"  # the output layer kept in float32
    assert bn_model.get_layer("last_conv").compute_dtype == "float32"  # the served model is untouched
    want = plain.explain(rng_images, methods=ALL, top_k=2)
    got = half.explain(rng_images, methods=ALL, top_k=2)
    _compare(want, got, HALF_MAP_TOL, HALF_SCORE_TOL)
    scores = half.predict(rng_images)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, plain.predict(rng_images), atol=HALF_SCORE_TOL)
    assert not np.array_equal(scores, plain.predict(rng_images))  # half precision did change the numbers


def test_xla_graphs_equal_the_plain_ones(bn_model, rng_images) -> None:
    plain = Explainer(bn_model, max_batch_size=4, chunk_size=8)
    xla = Explainer(bn_model, max_batch_size=4, chunk_size=8, jit_compile=True)
    assert xla.jit_compile
    want = plain.explain(rng_images, methods=ALL, top_k=2)
    got = xla.explain(rng_images, methods=ALL, top_k=2)
    _compare(want, got, XLA_TOL, 1e-6)
    np.testing.assert_allclose(xla.predict(rng_images), plain.predict(rng_images), atol=1e-6)


def test_device_placement(gap_model, rng_images) -> None:
    want = Explainer(gap_model).explain(rng_images, methods=("gradcam", "scorecam"))
    on_cpu = Explainer(gap_model, device="/cpu:0")
    assert on_cpu.device == "/CPU:0"
    _compare(want, on_cpu.explain(rng_images, methods=("gradcam", "scorecam")), 1e-5, 1e-7)
    auto = Explainer(gap_model, device="auto")
    assert auto.device == ("/GPU:0" if tf.config.list_physical_devices("GPU") else None)
    with pytest.raises(InvalidArgument, match="device must be auto"):
        Explainer(gap_model, device="tpu")
    with pytest.raises(InvalidArgument, match="GPU"):
        Explainer(gap_model, device=f"/GPU:{len(tf.config.list_physical_devices('GPU')) + 3}")


def test_unknown_precision_is_refused(gap_model) -> None:
    with pytest.raises(InvalidArgument, match="allowed: float32, mixed_float16"):
        Explainer(gap_model, precision="float8")


def test_the_half_precision_clone_is_shared_and_freed_with_its_model(rng_images) -> None:
    keras.utils.set_random_seed(5)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x)))
    first = cast_model(model, "mixed_float16")
    shared = cast_model(model, "mixed_float16") is first and cast_model(model, None) is model
    assert shared  # (computed outside the assert: pytest's rewriting would keep the clone alive)
    for a, b in zip(model.get_weights(), first.get_weights()):
        np.testing.assert_array_equal(a, b)  # weights copied as they are
    clone = weakref.ref(first)
    source = weakref.ref(model)
    del model, first
    gc.collect()  # the model (Keras objects hold cycles), whose cache entry then lets go of the clone
    gc.collect()  # the clone
    assert source() is None and clone() is None


def test_dense_scores_in_mixed_precision_and_on_a_device() -> None:
    from fcn_nets import gap_net

    model = gap_net("valid", seed=3)
    image = np.random.default_rng(3).random((40, 44, 3), dtype=np.float32)
    want = dense_scores(model, image, stride=1)
    half = dense_scores(model, image, stride=1, precision="mixed_float16")
    on_cpu = dense_scores(model, image, stride=1, device="/CPU:0", mode="crops")
    assert half[0].scores.dtype == np.float32
    np.testing.assert_allclose(half[0].scores, want[0].scores, atol=HALF_SCORE_TOL)
    assert not np.array_equal(half[0].scores, want[0].scores)
    np.testing.assert_allclose(on_cpu[0].scores, want[0].scores, atol=1e-5)
    crops_half = dense_scores(model, image, stride=2, precision="mixed_float16", mode="crops")
    np.testing.assert_allclose(crops_half[0].scores, want[0].scores[::2, ::2], atol=HALF_SCORE_TOL)
