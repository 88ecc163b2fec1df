"""Pixel-level methods (issue 12) against independent TensorFlow computations on the model:

- guided backprop: a clone of the model whose ReLUs are a ``tf.custom_gradient`` guided ReLU
  (gradient dy · [x > 0] · [dy > 0]) written here, differentiated with a plain GradientTape
  (camserve instead gates the ReLU outputs through its layer hooks, without a clone);
- Guided Grad-CAM: that times Grad-CAM (numpy, from a tape over the layer) upsampled by OpenCV;
- SmoothGrad / Integrated Gradients: an eager loop over the copies, one tape each, with the
  documented noise draws and path points, against camserve's chunked graph calls (chunk 5, so
  chunks straddle images and the last one is padded).
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from camserve import Explainer
from camserve.errors import InvalidArgument
from camserve.explain import pixel

LAYER = "last_conv"
SIZE = 16
TARGETS = [[0, 2], [1, 3], [3, 0]]


def relu_model(seed: int = 4) -> keras.Model:
    """Every kind of ReLU: a ReLU layer, Conv2D(activation="relu"), Activation("relu")."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(6, 3, padding="same")(inp)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name=LAYER)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(10)(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dense(4, name="logits")(x)
    return keras.Model(inp, keras.layers.Activation("softmax")(x), name="relus")


@tf.custom_gradient
def guided_relu(x):
    def grad(dy):
        return dy * tf.cast(x > 0, dy.dtype) * tf.cast(dy > 0, dy.dtype)

    return tf.nn.relu(x), grad


def guided_clone(model: keras.Model) -> keras.Model:
    """The model up to its logits with every ReLU replaced by :func:`guided_relu`."""

    def swap(layer):
        if isinstance(layer, keras.layers.ReLU):
            return keras.layers.Activation(guided_relu, name=layer.name)
        new = layer.__class__.from_config(layer.get_config())
        if getattr(getattr(new, "activation", None), "__name__", "") == "relu":
            new.activation = guided_relu
        return new

    clone = keras.models.clone_model(model, clone_function=swap)
    clone.set_weights(model.get_weights())
    return keras.Model(clone.inputs[0], clone.get_layer("logits").output)


def logits_of(model: keras.Model) -> keras.Model:
    return keras.Model(model.inputs[0], model.get_layer("logits").output)


def input_gradient(logits_model, x: np.ndarray, classes) -> np.ndarray:
    xs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xs)
        y = tf.reduce_sum(tf.gather(logits_model(xs), classes, batch_dims=1))
    return tape.gradient(y, xs).numpy().astype(np.float64)


def saliency(g: np.ndarray) -> np.ndarray:
    return np.abs(g).max(axis=-1)


@pytest.fixture(scope="module")
def setup():
    model = relu_model()
    x = np.random.default_rng(7).random((3, SIZE, SIZE, 3), dtype=np.float32)
    return model, x


def ours(model, x, methods, chunk_size=32, **kwargs) -> dict[str, np.ndarray]:
    results = Explainer(model, layer=LAYER, chunk_size=chunk_size).explain(
        x, methods=methods, targets=TARGETS, **kwargs
    )
    out = {}
    for m in methods:
        per_image = [[e for e in r if e.method == m] for r in results]
        for es, t in zip(per_image, TARGETS):
            assert [e.class_index for e in es] == t
        out[m] = np.stack([[e.raw for e in es] for es in per_image]).astype(np.float64)
    return out


def assert_close(got, ref, tol, what):
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.abs(ref).max() > 0, f"{what}: the reference is all zero"
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= tol, f"{what}: max error {err:.2e} of the peak > {tol:.0e}"


def per_target(fn) -> np.ndarray:
    return np.stack([fn(np.array([t[c] for t in TARGETS])) for c in range(2)], axis=1)


def test_guided_backprop_and_guided_gradcam(setup):
    model, x = setup
    got = ours(model, x, ("guidedbackprop", "guided_gradcam"))
    guided = guided_clone(model)
    ref_gb = per_target(lambda classes: saliency(input_gradient(guided, x, classes)))
    plain = per_target(lambda classes: saliency(input_gradient(logits_of(model), x, classes)))
    assert np.abs(ref_gb - plain).max() > 1e-3 * np.abs(ref_gb).max(), "guiding must change the gradient"
    assert_close(got["guidedbackprop"], ref_gb, 1e-4, "guidedbackprop")

    probe = keras.Model(model.inputs[0], [model.get_layer(LAYER).output, model.get_layer("logits").output])

    def gradcam(classes):
        xs = tf.constant(x)
        with tf.GradientTape() as tape:
            a, logits = probe(xs)
            y = tf.reduce_sum(tf.gather(logits, classes, batch_dims=1))
        g, a = tape.gradient(y, a).numpy().astype(np.float64), a.numpy().astype(np.float64)
        cams = np.maximum(np.einsum("nhwk,nk->nhw", a, g.mean(axis=(1, 2))), 0.0)
        return np.stack([cv2.resize(c, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) for c in cams])

    assert_close(got["guided_gradcam"], ref_gb * per_target(gradcam), 1e-4, "guided_gradcam")


def noisy_copies(x: np.ndarray, level: float):
    """SmoothGrad's copy s of the images, written out: + level × (max − min of each image) ×
    the stateless normal draw of seed (SEED, s)."""
    spread = (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))[:, None, None, None]

    def noisy(images, s):
        noise = tf.random.stateless_normal(images.shape[1:], seed=tf.constant([pixel.SEED, s], tf.int32)).numpy()
        return images + level * spread * noise[None]

    return noisy


def sampled_reference(model, x, copies, finish, count=16) -> np.ndarray:
    logits = logits_of(model)

    def one_target(classes):
        total = np.zeros(x.shape, np.float64)
        for s in range(count):
            total += input_gradient(logits, copies(x, s).astype(np.float32), classes)
        return finish(total / count)

    return per_target(one_target)


def test_smoothgrad(setup):
    model, x = setup
    ref = sampled_reference(model, x, noisy_copies(x, 0.15), saliency)
    assert_close(ours(model, x, ("smoothgrad",), chunk_size=5)["smoothgrad"], ref, 1e-4, "smoothgrad")


def test_integrated_gradients(setup):
    model, x = setup
    ref = sampled_reference(
        model, x, lambda images, s: (s + 0.5) / 16 * images, lambda g: np.maximum((g * x).sum(-1), 0)
    )
    assert_close(ours(model, x, ("integrated_gradients",), chunk_size=5)["integrated_gradients"], ref, 1e-4, "IG")


def test_sampled_methods_check_between_chunks(setup):
    """One checkpoint before the batch, then one before each chunk call: 3 images × 16 copies
    in chunks of 8 → 6 calls; stopping in the middle propagates."""
    model, x = setup
    ex = Explainer(model, layer=LAYER, chunk_size=8)
    calls = []
    ex.explain(x, methods=("integrated_gradients",), targets=TARGETS, checkpoint=lambda: calls.append(1))
    assert len(calls) == 1 + 6
    sampled = [k for k in ex._graphs.keys() if k[0] == "sampled"]
    assert [(k[1], k[-1]) for k in sampled] == [("integrated_gradients", 8)]  # calls of chunk_size copies each

    class Stop(Exception):
        pass

    def stop_at_third():
        calls.append(1)
        if len(calls) > 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        ex.explain(x, methods=("smoothgrad",), targets=TARGETS, checkpoint=stop_at_third)


def test_pixel_and_layer_methods_in_one_call_keep_the_callers_order(setup):
    """Pixel maps come at the input's resolution, layer maps at the layer's, in the order asked."""
    model, x = setup
    ex = Explainer(model, layer=LAYER)
    both = ex.explain(x[:2], methods=("guidedbackprop", "gradcam", "smoothgrad"), targets=0)
    alone = ex.explain(x[:2], methods=("gradcam",), targets=0)
    for r, a in zip(both, alone):
        assert [e.method for e in r] == ["guidedbackprop", "gradcam", "smoothgrad"]
        assert [e.raw.shape for e in r] == [(SIZE, SIZE), (SIZE // 2, SIZE // 2), (SIZE, SIZE)]
        np.testing.assert_allclose(r[1].raw, a[0].raw, rtol=1e-5, atol=1e-7)
        for e in r:
            assert e.heatmap.shape == (SIZE, SIZE) and e.heatmap.max() == (1.0 if e.raw.any() else 0.0)
    assert set(ex.check_methods(("guidedbackprop", "guided_gradcam", "smoothgrad", "integrated_gradients"))) == {
        "guidedbackprop",
        "guided_gradcam",
        "smoothgrad",
        "integrated_gradients",
    }


def test_pixel_methods_follow_targets_that_are_not_classes(setup):
    """A RegressionTarget(1, sign=-1) explains −output[1] (the softmax output, not a logit)."""
    from camserve.targets import RegressionTarget

    model, x = setup
    ex = Explainer(model, layer=LAYER)
    got = ex.explain(x, methods=("guidedbackprop", "integrated_gradients"), targets=RegressionTarget(1, sign=-1))
    probs = keras.Model(model.inputs[0], model.output)

    def gradient(m, inputs):
        xs = tf.constant(inputs)
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = -tf.reduce_sum(m(xs)[:, 1])
        return tape.gradient(y, xs).numpy().astype(np.float64)

    clone = guided_clone(model)
    guided_probs = keras.Model(clone.inputs[0], keras.layers.Activation("softmax")(clone.output))
    assert_close(np.stack([r[0].raw for r in got]), saliency(gradient(guided_probs, x)), 1e-4, "guided, regression")
    mean = sum(gradient(probs, ((s + 0.5) / 16 * x).astype(np.float32)) for s in range(16)) / 16
    assert_close(np.stack([r[1].raw for r in got]), np.maximum((mean * x).sum(-1), 0), 1e-4, "IG, regression")


def test_registered_sampled_methods_use_their_own_counts_noise_and_baseline(setup):
    from camserve.explain.methods import unregister
    from camserve.explain.methods_pixel import register_sampled
    from camserve.serving import budget

    model, x = setup
    register_sampled("smoothgrad_5", "smoothgrad", samples=5, noise=0.3)
    register_sampled("ig_8_half", "integrated_gradients", samples=8, baseline=0.5)
    try:
        assert budget.samples("smoothgrad_5") == 5 and budget.samples("ig_8_half") == 8
        got = ours(model, x, ("smoothgrad_5", "ig_8_half"), chunk_size=6)
        ref = sampled_reference(model, x, noisy_copies(x, 0.3), saliency, count=5)
        assert_close(got["smoothgrad_5"], ref, 1e-4, "smoothgrad, 5 copies")
        ref = sampled_reference(
            model,
            x,
            lambda im, s: 0.5 + (s + 0.5) / 8 * (im - 0.5),
            lambda g: np.maximum((g * (x - 0.5)).sum(-1), 0),
            8,
        )
        assert_close(got["ig_8_half"], ref, 1e-4, "IG, 8 steps from 0.5")
    finally:
        unregister("smoothgrad_5")
        unregister("ig_8_half")
    with pytest.raises(InvalidArgument, match="kind"):
        register_sampled("bad", "rise", samples=4)
    with pytest.raises(InvalidArgument, match="samples"):
        register_sampled("bad", "smoothgrad", samples=0)


def test_smoothgrad_with_aug_smooth_is_chunked_in_graph_and_averages_the_views(setup):
    """With aug_smooth the copies are computed inside the explain graph (a while loop over chunks
    of 5); the map equals the mean of the six views explained one by one (chunked calls of their
    own), the flipped ones flipped back."""
    from camserve.explain import smoothing

    model, x = setup
    views = smoothing.augmented(tf.constant(x[:1])).numpy()
    single = Explainer(model, layer=LAYER)
    per_view = [single.explain(v[None], methods=("smoothgrad",), targets=[1])[0][0].raw for v in views]
    unflipped = [r[:, ::-1] if flip else r for r, (flip, _) in zip(per_view, smoothing.VIEWS)]
    got = Explainer(model, layer=LAYER, chunk_size=5).explain(
        x[:1], methods=("smoothgrad",), targets=[1], aug_smooth=True
    )
    assert_close(got[0][0].raw.astype(np.float64), np.mean(unflipped, axis=0).astype(np.float64), 1e-4, "aug_smooth")
