"""Targets other than a class logit, each against an independent computation: Grad-CAM with
the target's scalar differentiated by a plain ``tf.GradientTape`` over the model cut at the
layer (``first`` up to the layer, ``rest`` from it to the outputs, both Keras models)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from camserve.errors import InvalidArgument
from camserve.explain import Explainer
from camserve.targets import (
    ClassTarget,
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
    UnknownClass,
)

RNG = np.random.default_rng(7)
IMAGES = RNG.random((3, 16, 16, 3), dtype=np.float32)


def conv_body(inp):
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    return keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="feat")(x)


def head_model(units: int, activation: str | None, name: str = "head") -> keras.Model:
    """conv → conv ("feat") → GAP → Dense(units) (+ a separate activation layer)."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(conv_body(inp))
    x = keras.layers.Dense(units, name=name)(x)
    if activation:
        x = keras.layers.Activation(activation)(x)
    return keras.Model(inp, x)


def cut(model: keras.Model, end: str | None = None):
    """(first, rest): the model up to "feat" and from "feat" to ``end``'s output (the model's
    output when None)."""
    feat = model.get_layer("feat").output
    out = model.get_layer(end).output if end else model.outputs[0]
    return keras.Model(model.inputs, feat), keras.Model(feat, out)


def hand_gradcam(model, scalar, end=None, images=IMAGES) -> np.ndarray:
    """Grad-CAM of ``scalar(rest output) -> (N,)`` by a plain GradientTape."""
    first, rest = cut(model, end)
    a = tf.constant(first(images))
    with tf.GradientTape() as tape:
        tape.watch(a)
        total = tf.reduce_sum(scalar(rest(a)))
    g = tape.gradient(total, a).numpy()
    return np.maximum(np.einsum("nhwk,nk->nhw", a.numpy(), g.mean(axis=(1, 2))), 0.0)


def raws(results, t: int = 0) -> np.ndarray:
    return np.stack([per_image[t].raw for per_image in results])


def assert_close(got, want):
    assert want.max() > 0, "the reference is all zero: the test proves nothing"
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * want.max())


def test_class_probability_differentiates_the_softmax():
    model = head_model(4, "softmax")
    got = raws(Explainer(model).explain(IMAGES, targets=ClassTarget(2, probability=True)))
    want = hand_gradcam(model, lambda p: p[:, 2])  # the model's own softmax output
    assert_close(got, want)
    by_logit = hand_gradcam(model, lambda z: z[:, 2], end="head")
    assert not np.allclose(want / want.max(), by_logit / by_logit.max(), atol=1e-3)


def test_class_target_default_is_the_logit_and_names_work():
    model = head_model(3, "softmax")
    ex = Explainer(model, class_names=["a", "b", "c"])
    got = ex.explain(IMAGES, targets=ClassTarget("b"))
    assert [r[0].label for r in got] == ["b"] * 3
    assert_close(raws(got), hand_gradcam(model, lambda z: z[:, 1], end="head"))
    with pytest.raises(UnknownClass, match="unknown class 'z'"):
        ex.explain(IMAGES, targets=ClassTarget("z"))


@pytest.mark.parametrize("sign", [1, -1])
def test_regression_target_is_the_signed_output(sign):
    model = head_model(2, None)
    results = Explainer(model).explain(IMAGES, targets=RegressionTarget(1, sign=sign))
    assert_close(raws(results), hand_gradcam(model, lambda y: sign * y[:, 1]))
    outputs = model.predict(IMAGES, verbose=0)
    np.testing.assert_allclose([r[0].score for r in results], outputs[:, 1], rtol=1e-5)


def test_multi_label_explains_every_class_over_the_threshold():
    model = head_model(5, "sigmoid")
    probs = model.predict(IMAGES, verbose=0)
    threshold = float(np.median(probs))
    ex = Explainer(model)
    results = ex.explain(IMAGES, targets=MultiLabelTarget(threshold))
    for i, per_image in enumerate(results):
        wanted = [c for c in np.argsort(-probs[i], kind="stable") if probs[i, c] >= threshold]
        assert [e.class_index for e in per_image] == wanted
        for e in per_image:
            want = hand_gradcam(model, lambda z, c=e.class_index: z[:, c], end="head", images=IMAGES[i : i + 1])[0]
            if want.max() > 0:
                assert_close(e.raw, want)
            np.testing.assert_allclose(e.score, probs[i, e.class_index], rtol=1e-5)


def segmentation_model() -> keras.Model:
    """conv → conv ("feat", 8 × 8) → 1×1 conv to 3 classes → upsampled to 16 × 16 → softmax."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(3, 1, name="class_logits")(conv_body(inp))
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name="seg_logits")(x)
    return keras.Model(inp, keras.layers.Softmax()(x))


def test_segmentation_target_sums_the_class_logit_over_the_mask():
    model = segmentation_model()
    mask = np.zeros((16, 16), np.float32)
    mask[2:9, 5:14] = 1.0
    ex = Explainer(model, layer="feat")
    results = ex.explain(IMAGES, targets=SegmentationTarget(1, mask))
    want = hand_gradcam(model, lambda z: tf.reduce_sum(z[..., 1] * mask, axis=(1, 2)), end="seg_logits")
    assert_close(raws(results), want)
    logits = cut(model, "seg_logits")[1](cut(model)[0](IMAGES)).numpy()
    np.testing.assert_allclose([r[0].score for r in results], (logits[..., 1] * mask).sum(axis=(1, 2)), rtol=1e-4)


def test_segmentation_needs_masks_of_the_output_size_and_dense_models_need_them():
    ex = Explainer(segmentation_model(), layer="feat", max_batch_size=2)
    ex.warm_up()  # prediction only: a dense model has no predicted classes to explain
    with pytest.raises(InvalidArgument, match=r"output's size \(16, 16\)"):
        ex.explain(IMAGES, targets=SegmentationTarget(0, np.ones((8, 8))))
    with pytest.raises(InvalidArgument, match="SegmentationTarget"):
        ex.explain(IMAGES)
    with pytest.raises(InvalidArgument, match="SegmentationTarget"):
        ex.explain(IMAGES, targets=1)


def test_similarity_target_is_the_cosine_to_the_reference():
    model = head_model(6, None, name="embedding")
    reference = RNG.normal(size=6).astype(np.float32)
    results = Explainer(model).explain(IMAGES, targets=SimilarityTarget(reference))

    def cosine(e):
        return tf.reduce_sum(tf.math.l2_normalize(e, axis=1) * (reference / np.linalg.norm(reference)), axis=1)

    assert_close(raws(results), hand_gradcam(model, cosine))
    embeddings = model.predict(IMAGES, verbose=0)
    want = embeddings @ reference / (np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference))
    np.testing.assert_allclose([r[0].score for r in results], want, rtol=1e-4)
    assert {(r[0].class_index, r[0].label) for r in results} == {(-1, "similarity")}


def test_one_output_of_a_multi_output_model():
    keras.utils.set_random_seed(5)
    inp = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(conv_body(inp))
    kinds = keras.layers.Dense(3, activation="softmax", name="kind")(pooled)
    age = keras.layers.Dense(1, name="age")(pooled)
    model = keras.Model(inp, [kinds, age])
    results = Explainer(model, output="age").explain(IMAGES, targets=RegressionTarget(0))
    assert_close(raws(results), hand_gradcam(keras.Model(inp, age), lambda y: y[:, 0]))
    with pytest.raises(InvalidArgument, match=r"no output 'size'; outputs: \['kind', 'age'\]"):
        Explainer(model, output="size")


def test_mixed_targets_in_one_call_equal_separate_calls():
    model = head_model(3, "softmax")
    ex = Explainer(model)
    mixed = [[0, ClassTarget(1, probability=True)], [RegressionTarget(2, sign=-1)], [2]]
    together = ex.explain(IMAGES, methods=("gradcam", "scorecam", "ablationcam"), targets=mixed)
    for i, targets in enumerate(mixed):
        for t, target in enumerate(targets):
            alone = ex.explain(IMAGES[i : i + 1], methods=("gradcam", "scorecam", "ablationcam"), targets=[target])[0]
            for m in range(3):
                np.testing.assert_allclose(together[i][3 * t + m].raw, alone[m].raw, rtol=1e-4, atol=1e-6)


def test_ablationcam_of_a_regression_target_drops_the_output():
    """Ablation-CAM reads the target's own value: (y − y with channel k zeroed) / |y|, with
    y = sign × the output."""
    model = head_model(2, None)
    first, rest = cut(model)
    ex = Explainer(model)
    got, want = [], []
    for i in range(len(IMAGES)):
        a = first(IMAGES[i : i + 1]).numpy()
        y = rest(a).numpy()[0, 0]
        for sign in (1, -1):
            drops = []
            for k in range(a.shape[-1]):
                ablated = a.copy()
                ablated[..., k] = 0.0
                drops.append(sign * (y - rest(ablated).numpy()[0, 0]) / abs(y))
            want.append(np.maximum(np.einsum("hwk,k->hw", a[0], np.array(drops)), 0.0))
            target = RegressionTarget(0, sign=sign)
            got.append(ex.explain(IMAGES[i : i + 1], methods=("ablationcam",), targets=target)[0][0].raw)
    assert_close(np.stack(got), np.stack(want))
