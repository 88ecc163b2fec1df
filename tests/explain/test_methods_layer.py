"""The layer-resolution methods added for issue 12 (pytorch-grad-cam's definitions) against
references written here: activations A and gradients dY_c/dA from a plain ``tf.GradientTape``
over the model's own layers, the maps in float64 numpy. Finer-CAM's gradient comes from a tape
over the head model with the comparison classes picked in numpy; Shapley-CAM's Hessian-vector
product from the full Hessian (``tape.jacobian`` of the gradient) times A.

The model has a linear ``last_conv`` (negative activations, so element-wise ReLU differs from
LayerCAM) and a smooth head (tanh, GELU: a non-zero Hessian).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from camserve import Explainer

LAYER = "last_conv"
TARGETS = np.array([[0, 2], [1, 3], [4, 0]])


def smooth_model(classes: int = 5, size: int = 16, seed: int = 3) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(5, 3, padding="same", name=LAYER)(x)
    x = keras.layers.Activation("tanh")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(12, activation="gelu")(x)
    x = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, keras.layers.Activation("softmax")(x), name="smooth")


@pytest.fixture(scope="module")
def setup():
    model = smooth_model()
    x = np.random.default_rng(5).random((3, 16, 16, 3), dtype=np.float32)
    layer, logits = model.get_layer(LAYER), model.get_layer("logits")
    probe = keras.Model(model.inputs[0], layer.output)
    head = keras.Model(layer.output, logits.output)
    a = tf.constant(probe(x))
    return model, x, head, a


def ours(model, x, method: str) -> np.ndarray:
    """Raw maps (N, T, h, w) of ``method`` for TARGETS."""
    results = Explainer(model, layer=LAYER).explain(x, methods=(method,), targets=TARGETS.tolist())
    for r, t in zip(results, TARGETS):
        assert [e.class_index for e in r] == list(t)
    return np.stack([[e.raw for e in r] for r in results]).astype(np.float64)


def gradients(head, a, score) -> np.ndarray:
    """(N, T, h, w, K) d score(logits, classes) / dA per target column."""
    out = []
    for t in range(TARGETS.shape[1]):
        with tf.GradientTape() as tape:
            tape.watch(a)
            y = tf.reduce_sum(score(head(a), TARGETS[:, t]))
        out.append(tape.gradient(y, a).numpy())
    return np.stack(out, axis=1).astype(np.float64)


def logit(logits, classes):
    return tf.gather(logits, classes, batch_dims=1)


def relu(z):
    return np.maximum(z, 0.0)


def assert_close(got: np.ndarray, ref: np.ndarray, tol: float, what: str) -> None:
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.abs(ref).max() > 0, f"{what}: the reference is all zero, the test proves nothing"
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= tol, f"{what}: max error {err:.2e} of the peak > {tol:.0e}"


def oriented(projection: np.ndarray, centred: np.ndarray) -> np.ndarray:
    """The projection's sign that correlates positively with Σ_k of the centred maps."""
    return projection if np.dot(projection, centred.sum(axis=1)) >= 0 else -projection


def ref_pca(x: np.ndarray) -> np.ndarray:
    """(h, w, K) -> (h, w): projection on the first principal component (numpy SVD)."""
    h, w, k = x.shape
    centred = x.reshape(h * w, k) - x.reshape(h * w, k).mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return oriented(centred @ vt[0], centred).reshape(h, w)


def ref_kpca(x: np.ndarray) -> np.ndarray:
    """(h, w, K) -> (h, w): scikit-learn's KernelPCA(1, kernel="sigmoid") written out: gamma 1/K,
    coef0 1, kernel centred, top eigenvector × √eigenvalue."""
    h, w, k = x.shape
    centred = x.reshape(h * w, k) - x.reshape(h * w, k).mean(axis=0)
    gram = np.tanh(centred @ centred.T / k + 1.0)
    ones = np.full_like(gram, 1.0 / len(gram))
    gram = gram - ones @ gram - gram @ ones + ones @ gram @ ones
    values, vectors = np.linalg.eigh(gram)
    return oriented(vectors[:, -1] * np.sqrt(max(values[-1], 0.0)), centred).reshape(h, w)


def test_gradcam_elementwise(setup):
    model, x, head, a = setup
    g, a64 = gradients(head, a, logit), a.numpy().astype(np.float64)[:, None]
    ref = relu(relu(g * a64).sum(axis=-1))
    assert_close(ours(model, x, "gradcamelementwise"), ref, 1e-4, "gradcamelementwise")
    layercam = relu((relu(g) * a64).sum(axis=-1))
    assert np.abs(ref - layercam).max() > 1e-3 * np.abs(ref).max()  # negative A: a different map


def test_eigengradcam(setup):
    model, x, head, a = setup
    g, a64 = gradients(head, a, logit), a.numpy().astype(np.float64)
    ref = relu(np.stack([[ref_pca(g[i, t] * a64[i]) for t in range(2)] for i in range(3)]))
    assert_close(ours(model, x, "eigengradcam"), ref, 1e-3, "eigengradcam")


def test_kpcacam(setup):
    model, x, _, a = setup
    a64 = a.numpy().astype(np.float64)
    ref = relu(np.stack([[ref_kpca(a64[i])] * 2 for i in range(3)]))
    assert_close(ours(model, x, "kpcacam"), ref, 1e-3, "kpcacam")


def test_fem(setup):
    model, x, _, a = setup
    a64 = a.numpy().astype(np.float64)
    mean, std = a64.mean(axis=(1, 2), keepdims=True), a64.std(axis=(1, 2), keepdims=True)
    weights = (a64 > mean + 2.0 * std).mean(axis=(1, 2))
    assert weights.max() > 0
    ref = relu(np.einsum("nhwk,nk->nhw", a64, weights))
    assert_close(ours(model, x, "fem"), np.stack([ref, ref], axis=1), 1e-4, "fem")


def test_finercam(setup):
    """pytorch-grad-cam's FinerWeightedTarget (3 closest classes by |y_j − y_c|, softmax weights,
    alpha 1) under Grad-CAM's weighting."""
    model, x, head, a = setup
    y = head(a).numpy()

    def finer(logits, classes):
        rows = []
        for i, c in enumerate(classes):
            order = [j for j in np.argsort(np.abs(y[i] - y[i, c]), kind="stable") if j != c][:3]
            p = tf.nn.softmax(logits[i])
            w = tf.gather(p, order)
            rows.append(tf.reduce_sum(w * (logits[i, c] - tf.gather(logits[i], order))) / (tf.reduce_sum(w) + 1e-9))
        return tf.stack(rows)

    g, a64 = gradients(head, a, finer), a.numpy().astype(np.float64)[:, None]
    ref = relu((g.mean(axis=(2, 3), keepdims=True) * a64).sum(axis=-1))
    assert_close(ours(model, x, "finercam"), ref, 1e-4, "finercam")


def test_shapleycam(setup):
    """w_k = mean_ij (G − ½ H·A)_k with H the full Hessian of the target logit in A."""
    model, x, head, a = setup
    g, a64 = gradients(head, a, logit), a.numpy().astype(np.float64)
    n = int(np.prod(a.shape[1:]))
    hvp = np.zeros_like(g)
    for i in range(3):
        ai = a[i : i + 1]
        for t in range(2):
            with tf.GradientTape() as outer:
                outer.watch(ai)
                with tf.GradientTape() as inner:
                    inner.watch(ai)
                    yi = head(ai)[0, TARGETS[i, t]]
                gi = inner.gradient(yi, ai)
            hessian = outer.jacobian(gi, ai).numpy().reshape(n, n).astype(np.float64)
            hvp[i, t] = (hessian @ a64[i].ravel()).reshape(a64.shape[1:])
    assert np.abs(hvp).max() > 1e-3 * np.abs(g).max(), "the head must be curved for the test to mean anything"
    weights = (g - 0.5 * hvp).mean(axis=(2, 3), keepdims=True)
    ref = relu((weights * a64[:, None]).sum(axis=-1))
    assert_close(ours(model, x, "shapleycam"), ref, 1e-4, "shapleycam")


def test_shapleycam_of_a_target_that_is_not_a_class(setup):
    """RegressionTarget(2): the Hessian is that of the softmax output 2, not of a logit."""
    from camserve.targets import RegressionTarget

    model, x, _, a = setup
    head = keras.Model(model.get_layer(LAYER).output, model.output)
    got = Explainer(model, layer=LAYER).explain(x, methods=("shapleycam",), targets=RegressionTarget(2))
    a64, n = a.numpy().astype(np.float64), int(np.prod(a.shape[1:]))
    refs = []
    for i in range(3):
        ai = a[i : i + 1]
        with tf.GradientTape() as outer:
            outer.watch(ai)
            with tf.GradientTape() as inner:
                inner.watch(ai)
                yi = head(ai)[0, 2]
            gi = inner.gradient(yi, ai)
        hvp = (outer.jacobian(gi, ai).numpy().reshape(n, n).astype(np.float64) @ a64[i].ravel()).reshape(a64.shape[1:])
        weights = (gi.numpy()[0].astype(np.float64) - 0.5 * hvp).mean(axis=(0, 1))
        refs.append(relu((a64[i] * weights).sum(axis=-1)))
    assert_close(np.stack([r[0].raw for r in got]).astype(np.float64), np.stack(refs), 1e-4, "shapleycam, regression")
