"""camserve.dense.fcn against independent references: the original classifier on crops
(``model.predict``), hand-computed head algebra, and gradient supports for receptive fields."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from fcn_nets import crops_reference, flatten_net, gap_net, max_rel_err

from camserve.dense.fcn import ConversionError, analyze, layer_flops, to_fully_convolutional

RNG = np.random.default_rng(0)


def _image(h: int, w: int) -> np.ndarray:
    return RNG.random((h, w, 3), dtype=np.float32)


def _grid(fcn, image: np.ndarray) -> np.ndarray:
    gh, gw = fcn.grid_shape(*image.shape[:2])
    return fcn.model.predict_on_batch(image[None])[0, :gh, :gw]


# ------------------------------------------------------------------ Flatten → Dense heads


def test_flatten_head_on_valid_net_equals_classifier_on_every_crop() -> None:
    model = flatten_net("valid")
    fcn = to_fully_convolutional(model)
    assert (fcn.exact, fcn.reasons) == (True, ())
    assert fcn.stride == (4, 4) and fcn.window == (20, 20) and fcn.feature_size == (3, 3)
    image = _image(36, 44)
    assert fcn.grid_shape(36, 44) == (5, 7)
    assert max_rel_err(_grid(fcn, image), crops_reference(model, image, 4)) <= 1e-5
    kinds = [type(layer).__name__ for layer in fcn.model.layers]
    assert "Dropout" not in kinds and "Dense" not in kinds and "Flatten" not in kinds
    assert "BatchNormalization" in kinds
    assert fcn.model.input_shape == (None, None, None, 3)


def test_head_weights_are_copied_exactly() -> None:
    model = flatten_net("valid")
    fcn = to_fully_convolutional(model)
    for name, hw, cin in (("fc1", (3, 3), 6), ("predictions", (1, 1), 8)):
        kernel, bias = model.get_layer(name).get_weights()
        conv = fcn.model.get_layer(name)
        assert isinstance(conv, keras.layers.Conv2D)
        assert conv.kernel_size == hw and conv.padding == "valid"
        ckernel, cbias = conv.get_weights()
        np.testing.assert_array_equal(ckernel, kernel.reshape(*hw, cin, -1))
        np.testing.assert_array_equal(cbias, bias)
    bn_copy = [layer for layer in fcn.model.layers if type(layer).__name__ == "BatchNormalization"][0]
    for a, b in zip(bn_copy.get_weights(), model.get_layer("fc1_bn").get_weights()):
        np.testing.assert_array_equal(a, b)


def test_logits_option_drops_only_the_final_softmax() -> None:
    model = flatten_net("valid")
    images = RNG.random((3, 20, 20, 3), dtype=np.float32)
    # Independent logits: the features entering the last Dense, times its weights.
    penultimate = keras.Model(model.input, model.get_layer("fc1_bn").output).predict(images, verbose=0)
    kernel, bias = model.get_layer("predictions").get_weights()
    want = penultimate @ kernel + bias
    got = to_fully_convolutional(model, logits=True).model.predict_on_batch(images)[:, 0, 0]
    assert max_rel_err(got, want) <= 1e-5
    probs = to_fully_convolutional(model).model.predict_on_batch(images)[:, 0, 0]
    np.testing.assert_allclose(probs, tf.nn.softmax(want).numpy(), rtol=1e-5, atol=1e-7)


def test_padded_net_is_not_exact_and_names_the_padding_layers() -> None:
    model = flatten_net("same")
    fcn = to_fully_convolutional(model)
    assert fcn.exact is False
    assert any("conv2d" in r and "pads" in r for r in fcn.reasons), fcn.reasons
    # At the training size the FCN is the classifier itself (one window, same computation).
    images = RNG.random((2, 20, 20, 3), dtype=np.float32)
    got = fcn.model.predict_on_batch(images)[:, 0, 0]
    assert max_rel_err(got, model.predict(images, verbose=0)) <= 1e-5


# ------------------------------------------------------------------ GAP → Dense heads


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_gap_class_maps_spatial_mean_plus_bias_is_the_logits(padding: str) -> None:
    model = gap_net(padding)
    fcn = to_fully_convolutional(model, head="classmap")
    assert fcn.head == "classmap" and fcn.logits
    images = RNG.random((3, 20, 20, 3), dtype=np.float32)
    maps = fcn.model.predict_on_batch(images)
    features = keras.Model(model.input, model.get_layer("last_conv").output).predict(images, verbose=0)
    assert maps.shape == features.shape[:3] + (5,)
    kernel, bias = model.get_layer("predictions").get_weights()
    np.testing.assert_array_equal(fcn.bias, bias)
    logits = features.mean(axis=(1, 2)) @ kernel + bias  # independent: GAP then Dense, by hand
    assert max_rel_err(maps.mean(axis=(1, 2)) + fcn.bias, logits) <= 1e-5
    np.testing.assert_allclose(
        tf.nn.softmax(maps.mean(axis=(1, 2)) + fcn.bias).numpy(), model.predict(images, verbose=0), rtol=1e-5, atol=1e-7
    )
    # CAM (Zhou et al.): the map is Σ_k w_k^c A_k at every location.
    np.testing.assert_allclose(maps, features @ kernel, rtol=1e-5, atol=1e-6)


def test_gap_class_maps_fold_a_batchnorm_between_gap_and_dense() -> None:
    model = gap_net("valid", batchnorm=True)
    fcn = to_fully_convolutional(model, head="classmap")
    images = RNG.random((3, 20, 20, 3), dtype=np.float32)
    maps = fcn.model.predict_on_batch(images)
    # independent logits: the BatchNorm's own output (a sub-model of the classifier) times the Dense
    normed = keras.Model(model.input, model.get_layer("head_bn").output).predict(images, verbose=0)
    kernel, bias = model.get_layer("predictions").get_weights()
    logits = normed @ kernel + bias
    assert max_rel_err(maps.mean(axis=(1, 2)) + fcn.bias, logits) <= 1e-5
    np.testing.assert_allclose(
        tf.nn.softmax(maps.mean(axis=(1, 2)) + fcn.bias).numpy(), model.predict(images, verbose=0), rtol=1e-5, atol=1e-7
    )
    assert np.abs(fcn.bias - bias).max() > 0.1  # the BatchNorm's shift went into the bias
    # the window model keeps the BatchNorm as a layer and equals the classifier on every crop
    window = to_fully_convolutional(model)
    image = _image(27, 24)
    assert max_rel_err(_grid(window, image), crops_reference(model, image, 2)) <= 1e-5


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_gap_window_model_on_valid_backbone_equals_classifier_on_every_crop(pool: str) -> None:
    model = gap_net("valid", pool)
    fcn = to_fully_convolutional(model)
    assert fcn.exact and fcn.stride == (2, 2) and fcn.feature_size == (7, 7)
    image = _image(31, 26)
    assert max_rel_err(_grid(fcn, image), crops_reference(model, image, 2)) <= 1e-5


# ------------------------------------------------------------------ receptive field


def _support(fn, x: np.ndarray, cell: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first row, first col), (rows, cols) of the input pixels with a nonzero gradient."""
    xt = tf.constant(x[None])
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = fn(xt)
        target = tf.reduce_sum(out[0, cell[0], cell[1]]) if len(out.shape) == 4 else tf.reduce_sum(out)
    g = np.abs(tape.gradient(target, xt).numpy()[0]).sum(-1)
    rows, cols = np.nonzero(g.sum(1))[0], np.nonzero(g.sum(0))[0]
    return (rows[0], cols[0]), (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)


def test_receptive_field_and_stride_match_the_gradient_support() -> None:
    keras.utils.set_random_seed(3)
    inp = keras.Input((24, 24, 2))
    x = keras.layers.Conv2D(3, 3)(inp)  # linear layers: no gradient lost to ReLU
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Conv2D(3, 3, dilation_rate=2, name="dilated")(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    rf = analyze(model)
    backbone = keras.Model(inp, model.layers[-3].output)  # the features the head flattens
    x = RNG.random((24, 24, 2), dtype=np.float32)
    start00, size = _support(backbone, x, (0, 0))
    start01, _ = _support(backbone, x, (0, 1))
    assert rf.size == size and rf.stride == (start01[1] - start00[1],) * 2 and rf.exact
    # The whole head: the grid cell sees what the classifier sees inside its window.
    fcn = to_fully_convolutional(model)
    _, classifier_support = _support(model, x, (0, 0))
    assert fcn.receptive_field == classifier_support == (22, 22)


# ------------------------------------------------------------------ nesting and errors


def test_nested_backbone_in_sequential_and_whole_classifier_in_functional() -> None:
    keras.utils.set_random_seed(1)
    inner_in = keras.Input((16, 16, 3))
    y = keras.layers.Conv2D(4, 3, activation="relu")(inner_in)
    y = keras.layers.MaxPooling2D()(y)
    backbone = keras.Model(inner_in, keras.layers.Conv2D(5, 3, activation="relu")(y), name="backbone")
    seq = keras.Sequential(
        [keras.Input((16, 16, 3)), backbone, keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")]
    )
    outer_in = keras.Input((20, 20, 3))
    wrapped = keras.Model(outer_in, flatten_net("valid")(outer_in), name="wrapper")
    image = _image(30, 28)
    for model, stride in ((seq, 2), (wrapped, 4)):
        fcn = to_fully_convolutional(model)
        assert fcn.exact and fcn.stride == (stride, stride)
        assert max_rel_err(_grid(fcn, image), crops_reference(model, image, stride)) <= 1e-5


def _bad_model(kind: str) -> keras.Model:
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inp)
    if kind == "reshape":
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(6)(x)
        x = keras.layers.Reshape((2, 3), name="odd_reshape")(x)
        x = keras.layers.Flatten(name="flatten_again")(x)
        x = keras.layers.Dense(2)(x)
    elif kind == "bn_before_dense":
        x = keras.layers.Flatten()(x)
        x = keras.layers.BatchNormalization(name="flat_bn")(x)
        x = keras.layers.Dense(2)(x)
    elif kind == "no_head":
        x = keras.layers.Conv2D(2, 1, name="conv_out")(x)
    elif kind == "layernorm":
        x = keras.layers.GlobalAveragePooling2D()(x)
        x = keras.layers.LayerNormalization(name="head_ln")(x)
        x = keras.layers.Dense(2)(x)
    return keras.Model(inp, x)


@pytest.mark.parametrize(
    "kind, names",
    [
        ("reshape", "odd_reshape"),
        ("bn_before_dense", "flat_bn"),
        ("no_head", "conv_out"),
        ("layernorm", "head_ln"),
    ],
)
def test_unconvertible_heads_raise_naming_the_layer(kind: str, names: str) -> None:
    with pytest.raises(ConversionError, match=names):
        to_fully_convolutional(_bad_model(kind))


def test_class_maps_need_a_gap_head() -> None:
    with pytest.raises(ConversionError, match="'flatten'.*head='window'"):
        to_fully_convolutional(flatten_net("valid"), head="classmap")
    with pytest.raises(ValueError, match="allowed: window, classmap"):
        to_fully_convolutional(flatten_net("valid"), head="grid")


# ------------------------------------------------------------------ keras.applications


@pytest.fixture(scope="module")
def vgg16() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.applications.VGG16(weights=None, include_top=True)


@pytest.fixture(scope="module")
def vgg16_fcn(vgg16: keras.Model):
    return to_fully_convolutional(vgg16)


def test_vgg16_converts_to_a_6x6x1000_grid_at_384px(vgg16: keras.Model, vgg16_fcn) -> None:
    from camserve.dense import dense_scores

    fcn = vgg16_fcn
    assert (fcn.window, fcn.stride, fcn.exact) == ((224, 224), (32, 32), False)
    kernel, bias = vgg16.get_layer("fc1").get_weights()
    np.testing.assert_array_equal(fcn.model.get_layer("fc1").get_weights()[0], kernel.reshape(7, 7, 512, 4096))
    image = RNG.uniform(-100, 100, (384, 384, 3)).astype(np.float32)
    result = dense_scores(fcn, image)  # one FCN pass
    level = result[0]
    assert level.scores.shape == (6, 6, 1000) and result.stride == 32 and result.exact is False
    np.testing.assert_allclose(level.scores.sum(-1), 1.0, rtol=1e-4)
    for i, j in [(0, 0), (0, 5), (3, 2), (5, 5)]:
        assert tuple(level.boxes[i, j]) == (32 * j, 32 * i, 32 * j + 224, 32 * i + 224)


def test_layer_flops_of_vgg16_and_its_fcn(vgg16: keras.Model, vgg16_fcn) -> None:
    # Independent count: 2 × kernel size × output positions, output sizes written out by hand.
    def count(size: int, head_positions: int) -> int:
        out_size = {"block1": size, "block2": size // 2, "block3": size // 4, "block4": size // 8, "block5": size // 16}
        total = 0
        for layer in vgg16.layers:
            if hasattr(layer, "kernel"):
                block = layer.name.split("_")[0]
                positions = out_size[block] ** 2 if block in out_size else head_positions
                total += 2 * int(np.prod(layer.kernel.shape)) * positions
        return total

    want = count(224, 1)
    assert layer_flops(vgg16, (224, 224, 3)) == want
    assert want == pytest.approx(2 * 15.47e9, rel=2e-3)  # the published 15.47 G multiply-adds
    assert layer_flops(vgg16_fcn.model, (384, 384, 3)) == count(384, 36)  # the head at 6×6 positions


@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2"])
def test_keras_applications_gap_models(name: str) -> None:
    keras.utils.set_random_seed(0)
    kwargs = {"alpha": 0.35} if name == "MobileNetV2" else {}
    model = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), classes=10, **kwargs)
    fcn = to_fully_convolutional(model)
    assert (fcn.stride, fcn.exact, fcn.feature_size) == ((32, 32), False, (2, 2))
    images = RNG.random((2, 64, 64, 3), dtype=np.float32)
    want = model.predict(images, verbose=0)
    # At the training size the window model computes the classifier itself.
    assert max_rel_err(fcn.model.predict_on_batch(images)[:, 0, 0], want) <= 1e-4
    assert fcn.model.predict_on_batch(RNG.random((1, 128, 96, 3), dtype=np.float32)).shape == (1, 3, 2, 10)
    cmap = to_fully_convolutional(model, head="classmap")
    maps = cmap.model.predict_on_batch(images)
    np.testing.assert_allclose(tf.nn.softmax(maps.mean(axis=(1, 2)) + cmap.bias).numpy(), want, rtol=1e-4, atol=1e-6)


def test_keras_application_nested_in_sequential() -> None:
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3), alpha=0.35
    )
    model = keras.Sequential(
        [keras.Input((64, 64, 3)), base, keras.layers.Dropout(0.2), keras.layers.Dense(4, activation="softmax")]
    )
    rf = analyze(model)
    assert rf.stride == (32, 32) and not rf.exact
    fcn = to_fully_convolutional(model)
    images = RNG.random((2, 64, 64, 3), dtype=np.float32)
    assert max_rel_err(fcn.model.predict_on_batch(images)[:, 0, 0], model.predict(images, verbose=0)) <= 1e-4
    assert fcn.model.predict_on_batch(images[:1, :, :, :].repeat(2, 1)).shape == (1, 3, 1, 4)


def test_converted_model_saves_and_loads_in_safe_mode(tmp_path) -> None:
    fcn = to_fully_convolutional(flatten_net("valid"))
    fcn.model.save(tmp_path / "fcn.keras")
    loaded = keras.models.load_model(tmp_path / "fcn.keras", safe_mode=True)
    image = RNG.random((1, 28, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict_on_batch(image), fcn.model.predict_on_batch(image))


# ------------------------------------------------------------------ bundled models

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("name, exact, stride", [("shapes_gap", False, 4), ("shapes_fc", True, 8)])
def test_bundled_models_convert(name: str, exact: bool, stride: int) -> None:
    if not (MODELS / name / "1" / "model.keras").is_file():
        pytest.skip(f"models/{name}/1/model.keras not built yet")
    from camserve.serving.repository import load_model_dir

    model = load_model_dir(MODELS / name).model
    fcn = to_fully_convolutional(model)
    assert (fcn.exact, fcn.stride, fcn.window) == (exact, (stride, stride), (64, 64))
    image = RNG.random((64 + 3 * stride, 64 + 2 * stride, 3), dtype=np.float32)
    want = crops_reference(model, image, stride)
    if exact:
        assert max_rel_err(_grid(fcn, image), want) <= 1e-5
    else:  # same padding: only the window at the training size is the classifier itself
        assert max_rel_err(_grid(fcn, image[:64, :64]), want[:1, :1]) <= 1e-5
    if name == "shapes_gap":
        cmap = to_fully_convolutional(model, head="classmap")
        maps = cmap.model.predict_on_batch(image[None, :64, :64])
        np.testing.assert_allclose(
            tf.nn.softmax(maps.mean(axis=(1, 2)) + cmap.bias).numpy()[0], want[0, 0], rtol=1e-4, atol=1e-6
        )
