"""Every CAM method against an independent reference written here from the papers' formulas.

The references read the layer's activations A and the target logit's gradients dY_c/dA from
a plain ``tf.GradientTape`` over ``keras.Model(inputs, [layer.output, logits.output])`` (the
``logits`` Dense is linear, or a linear twin with the same weights), then compute each map in
float64 numpy. Score-CAM and Ablation-CAM references build their masked inputs / ablated
activations by hand (OpenCV bilinear upsampling, numpy) and run the model's own ``predict``.
Grad-CAM, Grad-CAM++ and Score-CAM are also compared with tf-keras-vis 0.8.7.

Errors are measured relative to the reference map's peak: ``max|ours - ref| / max|ref|``.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from models_for_tests import fc_model, gap_model, images, linear_twin, wide_model

from camserve import Explainer

LAYER = "last_conv"
GRADIENT_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam")


# --------------------------------------------------------------------------- helpers
def relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0)


def weighted(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_k w_k A_k per image: (N, h, w, K) x (N, K) -> (N, h, w)."""
    return np.einsum("nhwk,nk->nhw", a, w)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_matches(ours: np.ndarray, ref: np.ndarray, tol: float, what: str) -> None:
    """Same maps up to ``tol`` of the reference's peak; the reference must not be trivial."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    assert np.abs(ref).max() > 0, f"{what}: the reference map is all zero, the test proves nothing"
    err = rel_err(ours, ref)
    print(f"{what}: max error {err:.1e} of the peak")  # shown by pytest -s, for the record
    assert err <= tol, f"{what}: max error {err:.2e} of the peak > {tol:.0e}"


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(x), np.ravel(y))[0, 1])


def explain_raw(model: keras.Model, x: np.ndarray, methods, targets, **kwargs) -> dict[str, np.ndarray]:
    """{method: raw maps (N, T, h, w)} from ``Explainer(model, **kwargs).explain``, checking
    that the targets came back in order."""
    results = Explainer(model, **kwargs).explain(x, methods=methods, targets=targets)
    out = {}
    for m in methods:
        per_image = [[e for e in r if e.method == m] for r in results]
        for i, es in enumerate(per_image):
            assert [e.class_index for e in es] == list(targets[i])
        out[m] = np.stack([[e.raw for e in es] for es in per_image]).astype(np.float64)
    return out


def tape_pass(logits_model: keras.Model, x: np.ndarray, targets: np.ndarray):
    """A (N, h, w, K), dY/dA (N, T, h, w, K) and logits (N, classes), float64, with one plain
    GradientTape per target column; ``logits_model``'s ``logits`` layer must be linear."""
    assert logits_model.get_layer("logits").activation.__name__ == "linear"
    layers = (logits_model.get_layer(LAYER), logits_model.get_layer("logits"))
    probe = keras.Model(logits_model.inputs, [layer.output for layer in layers])
    xs = tf.constant(x)
    grads = []
    for t in range(targets.shape[1]):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            a, logits = probe(xs, training=False)
            y = tf.reduce_sum(logits * tf.one_hot(targets[:, t], logits.shape[-1]))
        grads.append(tape.gradient(y, a).numpy())
    return a.numpy().astype(np.float64), np.stack(grads, axis=1).astype(np.float64), logits.numpy().astype(np.float64)


# --------------------------------------------------------------------------- reference methods
def ref_gradcam(a, g, score=None):
    """Selvaraju et al. 2017: w_k = mean_ij dY/dA_k."""
    return relu(weighted(a, g.mean(axis=(1, 2))))


def ref_hirescam(a, g, score=None):
    """Draelos & Carin 2020: Σ_k G_k ⊙ A_k."""
    return relu((g * a).sum(axis=-1))


def ref_xgradcam(a, g, score=None):
    """Fu et al. 2020: w_k = Σ_ij G_k A_k / Σ_ij A_k (0 for an all-zero channel)."""
    num, den = (g * a).sum(axis=(1, 2)), a.sum(axis=(1, 2))
    return relu(weighted(a, np.divide(num, den, out=np.zeros_like(num), where=den != 0)))


def ref_layercam(a, g, score=None):
    """Jiang et al. 2021: Σ_k ReLU(G_k) ⊙ A_k."""
    return relu((relu(g) * a).sum(axis=-1))


def ref_gradcam_plus_plus(a, g, score):
    """Chattopadhay et al. 2018 with the exponential score, as tf-keras-vis writes it: the
    derivatives of exp(Y) are exp(Y)·G^n, alphas are normalised per channel. Keeps exp(Y),
    so it is exp(score) times the library's map."""
    e = np.exp(score)[:, None, None, None]
    d1 = e * g
    d2, d3 = d1 * g, d1 * g * g
    denom = 2.0 * d2 + d3 * a.sum(axis=(1, 2), keepdims=True)
    alphas = np.divide(d2, denom, out=np.zeros_like(d2), where=d2 != 0)
    norm = alphas.sum(axis=(1, 2), keepdims=True)
    alphas = np.divide(alphas, norm, out=np.zeros_like(alphas), where=norm != 0)
    return relu(weighted(a, (relu(d1) * alphas).sum(axis=(1, 2))))


REFERENCES = {
    "gradcam": ref_gradcam,
    "gradcam++": ref_gradcam_plus_plus,
    "hirescam": ref_hirescam,
    "xgradcam": ref_xgradcam,
    "layercam": ref_layercam,
}


def ref_eigencam(a):
    """Muhammad & Yeasin 2020: projection of the spatially centred (hw, K) matrix on its first
    principal component, sign chosen to correlate positively with Σ_k A_k."""
    n, h, w, k = a.shape
    maps = []
    for img in a:
        flat = img.reshape(h * w, k)
        centred = flat - flat.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = centred @ vt[0]
        if correlation(proj, flat.sum(axis=1)) < 0:
            proj = -proj
        maps.append(relu(proj).reshape(h, w))
    return np.stack(maps)


def top_std_channels(a: np.ndarray, cap: int | None) -> np.ndarray:
    """(N, K') channel indices: all, or the ``cap`` with the largest spatial std."""
    n, k = a.shape[0], a.shape[-1]
    if cap is None:
        return np.tile(np.arange(k), (n, 1))
    return np.argsort(-a.std(axis=(1, 2)), axis=1)[:, :cap]


def scorecam_probs(model: keras.Model, x: np.ndarray, a: np.ndarray, channels: np.ndarray, to_prob=None) -> np.ndarray:
    """Wang et al. 2020: (N, K', classes) probabilities of the inputs masked by each selected
    channel, upsampled bilinearly (OpenCV) and min-max normalised. ``model`` outputs
    probabilities (its softmax/sigmoid), or logits that ``to_prob`` turns into them."""
    height, width = x.shape[1:3]
    masked = []
    for i in range(len(x)):
        for k in channels[i]:
            m = cv2.resize(a[i, :, :, k].astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
            m = m.astype(np.float64)
            span = m.max() - m.min()
            m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
            masked.append(x[i] * m[..., None])
    out = model.predict(np.stack(masked).astype(np.float32), batch_size=512, verbose=0).astype(np.float64)
    if to_prob is not None:
        out = to_prob(out)
    return out.reshape(channels.shape + (-1,))


def ref_scorecam(a, probs, channels, classes):
    """Σ over selected channels of P(class | masked input) · A_k."""
    w = np.zeros(a.shape[:1] + a.shape[-1:])
    for i in range(len(a)):
        w[i, channels[i]] = probs[i, :, classes[i]]
    return relu(weighted(a, w))


def head_model(model: keras.Model) -> keras.Model:
    """The layers after ``last_conv`` up to ``logits``, re-applied to a new input (chain models)."""
    names = [layer.name for layer in model.layers]
    inp = keras.Input(model.get_layer(LAYER).output.shape[1:])
    x = inp
    for layer in model.layers[names.index(LAYER) + 1 :]:
        x = layer(x)
        if layer.name == "logits":
            break
    return keras.Model(inp, x)


def ablated_logits(logits_model: keras.Model, a: np.ndarray) -> np.ndarray:
    """(N, K, classes) logits with channel k of A set to zero, through a hand-built head."""
    head = head_model(logits_model)
    n, h, w, k = a.shape
    ablated = np.repeat(a[:, None], k, axis=1)
    for j in range(k):
        ablated[:, j, :, :, j] = 0.0
    out = head.predict(ablated.reshape(n * k, h, w, k).astype(np.float32), batch_size=512, verbose=0)
    return out.reshape(n, k, -1).astype(np.float64)


def ref_ablationcam(a, logits, ablated, classes):
    """Desai & Ramaswamy 2020: w_k = (Y_c − Y_c^k) / |Y_c| with logits."""
    idx = np.arange(len(a))
    y = logits[idx, classes][:, None]
    return relu(weighted(a, (y - ablated[idx, :, classes]) / np.abs(y)))


# --------------------------------------------------------------------------- CAM
def _folded_kernel(model: keras.Model) -> np.ndarray:
    """(K, classes) Dense kernel with a BatchNorm between GAP and Dense folded by hand:
    BN(x) = γ (x − μ)/√(σ² + ε) + β, so logit_c = Σ_k W_kc γ_k/√(σ²_k + ε) · GAP(A)_k + const."""
    kernel = model.get_layer("logits").get_weights()[0].astype(np.float64)
    if "head_bn" in [layer.name for layer in model.layers]:
        bn = model.get_layer("head_bn")
        gamma, _, _, var = (w.astype(np.float64) for w in bn.get_weights())
        kernel = (gamma / np.sqrt(var + bn.epsilon))[:, None] * kernel
    return kernel


CAM_MODELS = {
    "dense_softmax": lambda: gap_model(head="softmax"),
    "dense_linear": lambda: gap_model(head="linear"),
    "dropout_batchnorm": lambda: gap_model(head="softmax", dropout=True, batchnorm=True),
}


@pytest.mark.parametrize("variant", list(CAM_MODELS))
def test_cam_is_the_dense_weighted_sum(variant):
    model = CAM_MODELS[variant]()
    x = images(3, 24, seed=1)
    targets = [[0, 3], [1, 4], [2, 0]]
    ours = explain_raw(model, x, ("cam", "gradcam"), targets)
    a = keras.Model(model.inputs, model.get_layer(LAYER).output).predict(x, verbose=0).astype(np.float64)
    kernel = _folded_kernel(model)
    for t in range(2):
        classes = np.array([row[t] for row in targets])
        ref = relu(weighted(a, kernel[:, classes].T))
        assert_matches(ours["cam"][:, t], ref, 1e-5, f"cam {variant} target {t}")
        # CAM and Grad-CAM agree up to a positive scale, 1/(h·w) on a GAP head
        cam, grad = ours["cam"][:, t], ours["gradcam"][:, t]
        for i in range(len(x)):
            if cam[i].max() == 0:  # every weighted sum negative: both maps vanish after ReLU
                assert grad[i].max() == 0
                continue
            assert correlation(cam[i], grad[i]) >= 0.9999
            scale = float((cam[i] * grad[i]).sum() / (cam[i] * cam[i]).sum())
            assert scale > 0
            assert scale == pytest.approx(1.0 / (a.shape[1] * a.shape[2]), rel=1e-4)
    if variant == "dropout_batchnorm":  # the folding matters: the raw kernel gives other maps
        raw_kernel = model.get_layer("logits").get_weights()[0].astype(np.float64)
        classes = np.array([row[0] for row in targets])
        unfolded = relu(weighted(a, raw_kernel[:, classes].T))
        assert rel_err(ours["cam"][:, 0], unfolded) > 0.1


@pytest.mark.parametrize("head", ["separate", "softmax_layer"])
def test_cam_accepts_a_linear_dense_followed_by_a_softmax_layer(head):
    # GAP → Dense(linear) → Activation("softmax") / keras.layers.Softmax() is a GAP → Dense
    # head whose logits the engine reads (_forward's logits hook returns the softmax layer's
    # input): CAM must accept the trailing softmax layer (a bug once; kept as a regression test).
    model = gap_model(head=head)
    x = images(2, 24, seed=2)
    ours = explain_raw(model, x, ("cam",), [[1], [3]])
    a = keras.Model(model.inputs, model.get_layer(LAYER).output).predict(x, verbose=0).astype(np.float64)
    kernel = model.get_layer("logits").get_weights()[0].astype(np.float64)
    assert_matches(ours["cam"][:, 0], relu(weighted(a, kernel[:, [1, 3]].T)), 1e-5, "cam, separate softmax")


# --------------------------------------------------------------------------- gradient methods
@pytest.mark.parametrize("build", [fc_model, gap_model], ids=["flatten_head", "gap_head"])
def test_gradient_methods_match_a_plain_tape(build):
    model = build(head="separate")  # linear Dense "logits", then Activation("softmax")
    size = model.input_shape[1]
    x = images(3, size, seed=3)
    targets = np.array([[0, 2], [1, 3], [3, 0]])
    ours = explain_raw(model, x, GRADIENT_METHODS + ("eigencam",), targets.tolist())
    a, g, logits = tape_pass(model, x, targets)
    for t in range(targets.shape[1]):
        score = logits[np.arange(len(x)), targets[:, t]]
        for method, ref_fn in REFERENCES.items():
            ref = ref_fn(a, g[:, t], score)
            if method == "gradcam++":  # the library leaves out the positive factor exp(Y_c)
                ref = ref / np.exp(score)[:, None, None]
            assert_matches(ours[method][:, t], ref, 1e-5, f"{method} target {t}")
        assert_matches(ours["eigencam"][:, t], ref_eigencam(a), 1e-5, f"eigencam target {t}")  # class-agnostic
    if build is fc_model:  # the methods really differ on this head, so each comparison bites
        for m1 in GRADIENT_METHODS:
            for m2 in GRADIENT_METHODS:
                if m1 < m2:
                    assert correlation(ours[m1], ours[m2]) < 0.999, (m1, m2)


def test_top_prediction_targets_match_the_tape():
    model = fc_model(head="separate")
    x = images(4, 20, seed=4)
    results = Explainer(model).explain(x, methods=("gradcam",))
    logits = keras.Model(model.inputs, model.get_layer("logits").output).predict(x, verbose=0)
    classes = logits.argmax(axis=1)
    assert [r[0].class_index for r in results] == classes.tolist()
    a, g, _ = tape_pass(model, x, classes[:, None])
    assert_matches(np.stack([r[0].raw for r in results]), ref_gradcam(a, g[:, 0]), 1e-5, "gradcam top-1")


SQUASHED_HEADS = {
    "gap_dense_softmax": lambda: gap_model(head="softmax"),
    "fc_dense_softmax": lambda: fc_model(head="softmax"),
    "gap_dense_sigmoid_one_logit": lambda: gap_model(classes=1, head="sigmoid"),
}


@pytest.mark.parametrize("variant", list(SQUASHED_HEADS))
def test_gradients_are_of_the_logits_behind_a_squashing_dense(variant):
    model = SQUASHED_HEADS[variant]()
    twin = linear_twin(model)  # same weights, linear Dense: the logits
    size = model.input_shape[1]
    x = images(3, size, seed=5)
    n_classes = model.output_shape[-1]
    targets = np.array([[0], [min(1, n_classes - 1)], [min(2, n_classes - 1)]])
    ours = explain_raw(model, x, GRADIENT_METHODS, targets.tolist())
    a, g, logits = tape_pass(twin, x, targets)
    score = logits[np.arange(len(x)), targets[:, 0]]
    for method, ref_fn in REFERENCES.items():
        ref = ref_fn(a, g[:, 0], score)
        if method == "gradcam++":
            ref = ref / np.exp(score)[:, None, None]
        assert_matches(ours[method][:, 0], ref, 1e-5, f"{method} ({variant})")
    # discriminating: the gradient of the model's output (probability) gives another Grad-CAM
    probe = keras.Model(model.inputs, [model.get_layer(LAYER).output, model.output])
    xs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xs)
        acts, probs = probe(xs, training=False)
        y = tf.reduce_sum(probs * tf.one_hot(targets[:, 0], n_classes))
    prob_grad = tape.gradient(y, acts).numpy().astype(np.float64)
    assert rel_err(ours["gradcam"][:, 0], ref_gradcam(a, prob_grad)) > 0.05


# --------------------------------------------------------------------------- Score-CAM
@pytest.mark.parametrize(
    "build, head, cap",
    [(fc_model, "separate", None), (gap_model, "softmax", None), (fc_model, "separate", 4)],
    ids=["flatten_head", "gap_head_softmax_dense", "flatten_head_top4"],
)
def test_scorecam_matches_masked_input_probabilities(build, head, cap):
    model = build(head=head)
    size = model.input_shape[1]
    x = images(3, size, seed=6)
    targets = np.array([[0, 2], [1, 3], [3, 1]])
    ours = explain_raw(model, x, ("scorecam",), targets.tolist(), max_channels=cap, chunk_size=16)
    a, _, _ = tape_pass(linear_twin(model), x, targets[:, :1])
    channels = top_std_channels(a, cap)
    probs = scorecam_probs(model, x, a, channels)  # the model's own softmax output
    for t in range(targets.shape[1]):
        ref = ref_scorecam(a, probs, channels, targets[:, t])
        assert_matches(ours["scorecam"][:, t], ref, 1e-5, f"scorecam t{t}")
    if cap is not None:  # the cap changes the map: all channels give another one
        every = top_std_channels(a, None)
        everything = ref_scorecam(a, scorecam_probs(model, x, a, every), every, targets[:, 0])
        assert rel_err(ours["scorecam"][:, 0], everything) > 0.01


ONE_LOGIT_HEADS = {
    "dense_sigmoid": (lambda: gap_model(classes=1, head="sigmoid"), None),
    "dense_linear": (lambda: gap_model(classes=1, head="linear"), lambda z: 1.0 / (1.0 + np.exp(-z))),
}


@pytest.mark.parametrize("variant", list(ONE_LOGIT_HEADS))
def test_scorecam_on_one_logit_head_uses_sigmoid(variant):
    build, to_prob = ONE_LOGIT_HEADS[variant]
    model = build()
    x = images(3, 24, seed=7)
    targets = np.zeros((3, 1), int)
    ours = explain_raw(model, x, ("scorecam",), targets.tolist())
    a = keras.Model(model.inputs, model.get_layer(LAYER).output).predict(x, verbose=0).astype(np.float64)
    channels = top_std_channels(a, None)
    probs = scorecam_probs(model, x, a, channels, to_prob=to_prob)
    assert probs.max() < 0.99 and probs.std() > 1e-4  # not the all-ones weights of softmax over one logit
    ref = ref_scorecam(a, probs, channels, targets[:, 0])
    assert_matches(ours["scorecam"][:, 0], ref, 1e-5, f"scorecam {variant}")
    # the tf-keras-vis #78 trap (softmax over a single logit: every weight 1) gives another map
    assert rel_err(ours["scorecam"][:, 0], relu(a.sum(axis=-1))) > 0.1


def test_scorecam_with_2048_channels_runs_in_small_chunks():
    model = wide_model(channels=2048)  # last_conv: 2 × 2 × 2048 on an 8 × 8 input
    x = images(1, 8, seed=8)
    targets = np.array([[0, 2]])
    ex = Explainer(model, chunk_size=16)  # 128 chunks of 16 masked inputs: bounded memory
    results = ex.explain(x, methods=("scorecam",), targets=targets.tolist())
    ours = np.stack([[e.raw for e in results[0]]]).astype(np.float64)
    assert ours.shape == (1, 2, 2, 2)
    a, _, _ = tape_pass(model, x, targets[:, :1])
    channels = top_std_channels(a, None)
    probs = scorecam_probs(model, x, a, channels)
    for t in range(2):
        ref = ref_scorecam(a, probs, channels, targets[:, t])
        assert_matches(ours[:, t], ref, 1e-5, f"2048-channel scorecam t{t}")
    # Faster-Score-CAM: only the 100 channels with the largest spatial std
    capped = Explainer(model, chunk_size=16, max_channels=100).explain(x, methods=("scorecam",), targets=[[0]])
    top = top_std_channels(a, 100)
    ref = ref_scorecam(a, scorecam_probs(model, x, a, top), top, targets[:, 0])
    assert_matches(capped[0][0].raw[None].astype(np.float64), ref, 1e-5, "2048-channel scorecam, top 100")


# --------------------------------------------------------------------------- Ablation-CAM
@pytest.mark.parametrize("build", [fc_model, gap_model], ids=["flatten_head", "gap_head"])
def test_ablationcam_matches_hand_ablated_logits(build):
    model = build(head="softmax")  # logits must be used even behind a softmax Dense
    twin = linear_twin(model)
    size = model.input_shape[1]
    x = images(3, size, seed=9)
    targets = np.array([[0, 2], [1, 3], [3, 1]])
    ours = explain_raw(model, x, ("ablationcam",), targets.tolist(), chunk_size=8)
    a, _, logits = tape_pass(twin, x, targets[:, :1])
    head = head_model(twin)
    np.testing.assert_allclose(head.predict(a.astype(np.float32), verbose=0), logits, rtol=1e-5, atol=1e-6)
    ablated = ablated_logits(twin, a)
    for t in range(targets.shape[1]):
        ref = ref_ablationcam(a, logits, ablated, targets[:, t])
        assert_matches(ours["ablationcam"][:, t], ref, 1e-5, f"ablationcam t{t}")


# --------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("cap", [None, 3], ids=["all_channels", "top3"])
def test_chunk_size_does_not_change_scorecam_or_ablationcam(cap):
    model = fc_model(head="separate")
    x = images(3, 20, seed=10)  # a bucket of 4 images x 10 channels = 40 (or 12) masked runs
    targets = [[0, 1], [2, 3], [1, 0]]
    runs = {
        size: explain_raw(model, x, ("scorecam", "ablationcam"), targets, chunk_size=size, max_channels=cap)
        for size in (1, 7, 64, 5)  # 7 and 5 divide neither 40 nor 12; 64 is larger than both
    }
    # Not bit-identical: a forward pass of 1 masked input and one of 7 sum in other orders
    # (float32 GEMM blocking); observed differences are below 1e-6 of the peak.
    for size in (7, 64, 5):
        for method in ("scorecam", "ablationcam"):
            assert_matches(runs[size][method], runs[1][method], 1e-5, f"{method} chunk {size} vs 1, cap {cap}")


# --------------------------------------------------------------------------- tf-keras-vis 0.8.7
def test_gradcam_and_gradcam_plus_plus_agree_with_tf_keras_vis():
    """tf-keras-vis 0.8.7 runs unchanged on Keras 3 here (its ReplaceToLinear sets the cloned
    output layer's ``activation``, which Keras 3's Dense reads at call time). Maps are compared
    at the layer's resolution (``expand_cam=False``, not normalised)."""
    from tf_keras_vis.gradcam import Gradcam
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    model = fc_model(head="softmax")
    x = images(3, 20, seed=11)
    targets = [0, 2, 3]
    ours = explain_raw(model, x, ("gradcam", "gradcam++"), [[t] for t in targets])
    logits = linear_twin(model).predict(x, verbose=0).astype(np.float64)
    for method, cls in (("gradcam", Gradcam), ("gradcam++", GradcamPlusPlus)):
        vis = cls(model, model_modifier=ReplaceToLinear(), clone=True)
        theirs = np.asarray(
            vis(CategoricalScore(targets), x, penultimate_layer=LAYER, expand_cam=False, normalize_cam=False)
        )
        for i in range(len(x)):
            assert theirs[i].max() > 0
            r = correlation(ours[method][i, 0], theirs[i])
            print(f"{method} vs tf-keras-vis, image {i}: correlation {r:.6f}")
            assert r >= 0.99, method
        # beyond correlation: the same numbers (tf-keras-vis keeps Grad-CAM++'s exp(score))
        scale = np.exp(logits[np.arange(len(x)), targets])[:, None, None] if method == "gradcam++" else 1.0
        assert_matches(ours[method][:, 0], theirs / scale, 1e-5, f"{method} vs tf-keras-vis")
    assert model.get_layer("logits").activation.__name__ == "softmax"  # tf-keras-vis modified a clone


def test_scorecam_agrees_with_tf_keras_vis():
    """Same layer and all channels. tf-keras-vis applies softmax to the model's outputs, so it
    gets the linear twin; it upsamples masks with scipy ``zoom(order=1)`` (corner-aligned)
    where camserve uses half-pixel bilinear resizing, so the maps agree closely, not exactly."""
    from tf_keras_vis.scorecam import Scorecam
    from tf_keras_vis.utils.scores import CategoricalScore

    model = fc_model(head="separate")
    x = images(3, 20, seed=12)
    targets = [0, 2, 3]
    ours = explain_raw(model, x, ("scorecam",), [[t] for t in targets])
    vis = Scorecam(linear_twin(model))
    theirs = np.asarray(
        vis(CategoricalScore(targets), x, penultimate_layer=LAYER, expand_cam=False, normalize_cam=False)
    )
    for i in range(len(x)):
        r = correlation(ours["scorecam"][i, 0], theirs[i])
        print(f"scorecam vs tf-keras-vis, image {i}: correlation {r:.6f}")
        assert r >= 0.999


@pytest.mark.parametrize("cap", [0, -3, 2.5])
def test_a_bad_channel_cap_is_rejected_by_name(cap):
    # Regression test (a bug once): a bad max_channels must be refused by name, not die inside
    # tracing with a ZeroDivisionError (0), a tf.math.top_k ValueError (-3) or a TypeError (2.5).
    from camserve.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="max_channels"):
        Explainer(fc_model(), max_channels=cap).explain(images(1, 20), methods=("scorecam",))
