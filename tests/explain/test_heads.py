"""camserve.explain.heads: the one head finder behind CAM (Explainer) and FCN class maps.

References are the models' own outputs (``model.predict``) and features read from sub-models,
with the head algebra written out here in numpy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from fcn_nets import _randomize_batchnorm, flatten_net, gap_net, max_rel_err

from camserve import Explainer
from camserve.dense import ConversionError, to_fully_convolutional
from camserve.errors import InvalidArgument
from camserve.explain import heads
from camserve.keras_graph import walk

RNG = np.random.default_rng(7)


def _head_of(model: keras.Model) -> heads.Head:
    return heads.find_head(walk(model).graph())


def _features(model: keras.Model, x: np.ndarray, layer: str = "last_conv") -> np.ndarray:
    return keras.Model(model.inputs, model.get_layer(layer).output).predict(x, verbose=0).astype(np.float64)


def _gap_head_model(*middle: keras.layers.Layer, after: tuple = (), seed: int = 3) -> keras.Model:
    """conv ``last_conv`` → GAP ``gap`` → *middle → Dense ``logits`` (linear) → *after."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="last_conv")(inp)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    for layer in middle:
        x = layer(x)
    x = keras.layers.Dense(4, name="logits")(x)
    for layer in after:
        x = layer(x)
    model = keras.Model(inp, x)
    for i, layer in enumerate(middle):
        if isinstance(layer, keras.layers.BatchNormalization):
            _randomize_batchnorm(layer, seed + i)
    return model


def test_find_head_walks_back_to_the_flatten_or_the_pooling() -> None:
    head = _head_of(flatten_net("valid"))
    assert head.start.kind == "Flatten" and head.feature_shape == (None, 3, 3, 6)
    assert [op.name for op in head.chain] == ["fc1", "fc1_bn", head.chain[2].name, "predictions"]
    assert head.chain[2].kind == "Dropout"
    assert head.describe().startswith("'flatten' (Flatten) → 'fc1' (Dense) → 'fc1_bn' (BatchNormalization)")
    gap = _head_of(gap_net("valid"))
    assert gap.start.kind == "GlobalAveragePooling2D" and gap.feature_shape == (None, 7, 7, 6)


def test_batchnorms_between_gap_and_dense_fold_exactly_into_kernel_and_bias() -> None:
    bn1, bn2 = keras.layers.BatchNormalization(name="bn1"), keras.layers.BatchNormalization(name="bn2")
    model = _gap_head_model(bn1, keras.layers.Dropout(0.5), bn2)
    parts = heads.gap_dense(_head_of(model))
    assert [op.name for op in parts.norms] == ["bn1", "bn2"] and parts.dense.name == "logits"
    x = RNG.random((4, 16, 16, 3), dtype=np.float32)
    a = _features(model, x)
    kernel, bias = np.asarray(parts.kernel(), np.float64), parts.bias().astype(np.float64)
    # the class maps' spatial mean plus the bias is the model's own output (its logits)
    maps = a @ kernel
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    # the folded kernel by hand: BN(x) = γ (x − μ)/√(σ² + ε) + β, twice
    want = model.get_layer("logits").get_weights()[0].astype(np.float64)
    for bn in (bn2, bn1):
        gamma, _, _, var = (w.astype(np.float64) for w in bn.get_weights())
        want = (gamma / np.sqrt(var + bn.epsilon))[:, None] * want
    np.testing.assert_allclose(kernel, want, rtol=1e-6)
    assert np.abs(bias - model.get_layer("logits").get_weights()[1]).max() > 0.1  # the shifts matter


def test_cam_and_fcn_class_maps_read_the_same_head() -> None:
    model = gap_net("valid", batchnorm=True)
    x = RNG.random((3, 20, 20, 3), dtype=np.float32)
    cmap = to_fully_convolutional(model, head="classmap")
    maps = cmap.model.predict_on_batch(x)
    targets = [[0, 2], [1, 4], [3, 0]]
    results = Explainer(model).explain(x, methods=("cam",), targets=targets)
    peak = np.abs(maps).max()
    nonzero = 0
    for i, row in enumerate(targets):
        for e, c in zip(results[i], row):
            ref = np.maximum(maps[i, ..., c], 0.0)  # CAM's raw map is after the ReLU
            nonzero += bool(ref.max() > 0)
            assert np.abs(e.raw - ref).max() <= 1e-5 * peak, (i, c)
    assert nonzero >= 3  # most maps are not trivially zero


def test_one_pass_through_list_for_both_paths() -> None:
    # GaussianDropout, Identity and a linear Activation are the identity at inference: CAM and
    # class maps both see GAP → Dense (the CAM path used to refuse the first two).
    model = _gap_head_model(
        keras.layers.GaussianDropout(0.2, name="noise"),
        keras.layers.Identity(name="same"),
        keras.layers.Activation("linear", name="lin"),
    )
    parts = heads.gap_dense(_head_of(model))
    assert (parts.norms, parts.dense.name, parts.after) == ([], "logits", [])
    x = RNG.random((2, 16, 16, 3), dtype=np.float32)
    a = _features(model, x)
    kernel = model.get_layer("logits").get_weights()[0].astype(np.float64)
    cams = Explainer(model).explain(x, methods=("cam",), targets=[[1], [3]])
    for i, c in enumerate((1, 3)):
        ref = np.maximum(a[i] @ kernel[:, c], 0.0)
        assert max_rel_err(cams[i][0].raw, ref) <= 1e-5
    maps = to_fully_convolutional(model, head="classmap").model.predict_on_batch(x)
    np.testing.assert_allclose(maps, a @ kernel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build, fcn_words, found",
    [
        (
            lambda: _gap_head_model(after=(keras.layers.BatchNormalization(name="bn_after"),)),
            r"cannot fold head layer 'bn_after' \(BatchNormalization\).*head='window'",
            "GlobalAveragePooling2D → Dense → BatchNormalization",
        ),
        (
            lambda: _gap_head_model(keras.layers.Dense(5, name="hidden")),
            r"exactly one Dense after 'gap' \(GlobalAveragePooling2D\); found 2",
            "GlobalAveragePooling2D → Dense → Dense",
        ),
        (
            lambda: gap_net("valid", pool="max"),
            r"'global_max_pooling2d\w*' \(GlobalMaxPooling2D\) starts this head.*head='window'",
            "GlobalMaxPooling2D → Dropout → Dense",
        ),
    ],
    ids=["bn_after_dense", "two_dense", "max_pool"],
)
def test_heads_neither_path_reads_are_refused_naming_the_head(build, fcn_words: str, found: str) -> None:
    model = build()
    with pytest.raises(ConversionError, match=fcn_words):
        to_fully_convolutional(model, head="classmap")
    ex = Explainer(model)
    with pytest.raises(InvalidArgument, match=f"'cam' needs a GlobalAveragePooling2D → Dense head.*found {found}"):
        ex.check_methods(("gradcam", "cam"))
    assert ex.check_methods(("gradcam",)) == ("gradcam",)


def test_cam_needs_the_head_to_read_the_explained_layer() -> None:
    model = gap_net("valid")
    first_conv = model.layers[1].name
    ex = Explainer(model, layer=first_conv)
    with pytest.raises(InvalidArgument, match=rf"after layer '{first_conv}'.*found MaxPooling2D → Conv2D"):
        ex.check_methods(("cam",))
    assert Explainer(model).check_methods(("cam",)) == ("cam",)
