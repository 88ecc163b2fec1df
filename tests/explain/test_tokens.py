"""Token (ViT-style) layers: reshaped to a grid with prefix tokens dropped, chosen
automatically, every method works; Grad-CAM compared with a hand computation on the tokens."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from camserve.errors import InvalidArgument
from camserve.explain import METHODS, Explainer
from camserve.explain.tokens import infer_grid


class ClassToken(keras.layers.Layer):
    """Prepends a learned class token."""

    def build(self, input_shape):
        self.token = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="random_normal")

    def call(self, x):
        token = tf.tile(self.token, (tf.shape(x)[0], 1, 1))
        return tf.concat([token, x], axis=1)


class AddPositions(keras.layers.Layer):
    def build(self, input_shape):
        self.pos = self.add_weight(shape=(1,) + tuple(input_shape[1:]), initializer="random_normal")

    def call(self, x):
        return x + self.pos


def tiny_vit(class_token: bool, blocks: int = 2, classes: int = 3, size: tuple = (16, 16)) -> keras.Model:
    """Patch-embedding conv (4 px patches: 4 × 4 of them at 16 px) and ``blocks`` pre-norm
    transformer blocks; the head reads the class token, or averages the tokens."""
    keras.utils.set_random_seed(1)
    inp = keras.Input(size + (3,))
    x = keras.layers.Conv2D(8, 4, strides=4, name="patches")(inp)
    x = keras.layers.Reshape((size[0] * size[1] // 16, 8))(x)
    if class_token:
        x = ClassToken(name="cls")(x)
    x = AddPositions()(x)
    for b in range(blocks):
        y = keras.layers.LayerNormalization(name=f"block{b}_norm1")(x)
        y = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name=f"block{b}_attn")(y, y)
        x = keras.layers.Add()([x, y])
        y = keras.layers.LayerNormalization(name=f"block{b}_norm2")(x)
        y = keras.layers.Dense(8, activation="gelu")(y)
        x = keras.layers.Add(name=f"block{b}_out")([x, y])
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = (keras.layers.Lambda(lambda t: t[:, 0])(x)) if class_token else keras.layers.GlobalAveragePooling1D()(x)
    out = keras.layers.Dense(classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module", params=[True, False], ids=["class_token", "no_class_token"])
def vit(request):
    return request.param, tiny_vit(request.param)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).random((3, 16, 16, 3), dtype=np.float32)


def hand_gradcam(model, layer_name, images, classes, prefix):
    """Grad-CAM by hand: the token layer's output and the gradient of the class logit
    (softmax head: logits = the head's pre-activation) with a plain GradientTape; the model
    after the layer is a Keras model of its own (taking the block's input too when a
    residual connection skips the layer)."""
    head = model.get_layer("head")
    cut = [model.get_layer(layer_name).output]
    if layer_name.endswith("norm1") and layer_name != "block0_norm1":
        cut.append(model.get_layer(f"block{int(layer_name[5]) - 1}_out").output)
    first = keras.Model(model.inputs, cut)
    rest = keras.Model(cut, head.input)
    outs = first(images)
    values = [tf.constant(v) for v in (outs if isinstance(outs, list) else [outs])]
    with tf.GradientTape() as tape:
        tape.watch(values[0])
        logits = tf.matmul(rest(values if len(values) > 1 else values[0]), head.kernel) + head.bias
        total = tf.reduce_sum(tf.gather(logits, classes, batch_dims=1))
    grads = tape.gradient(total, values[0]).numpy()
    tokens = values[0].numpy()
    h, w = images.shape[1] // 4, images.shape[2] // 4
    a = tokens[:, prefix:].reshape(len(images), h, w, -1)
    g = grads[:, prefix:].reshape(len(images), h, w, -1)
    return np.maximum(np.einsum("bhwk,bk->bhw", a, g.mean(axis=(1, 2))), 0.0)


def test_automatic_layer_is_the_last_blocks_first_norm(vit):
    class_token, model = vit
    ex = Explainer(model)
    assert ex.layer_name == "block1_norm1"
    assert ex.sites[0].prefix == (1 if class_token else 0) and ex.sites[0].grid == (4, 4)


@pytest.mark.parametrize("layer", ["block1_norm1", "block0_out"])
def test_gradcam_on_tokens_matches_hand_computation(vit, images, layer):
    class_token, model = vit
    ex = Explainer(model, layer=layer)
    targets = [0, 2, 1]
    got = np.stack([e[0].raw for e in ex.explain(images, targets=targets)])
    want = hand_gradcam(model, layer, images, np.array(targets), 1 if class_token else 0)
    assert want.max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * want.max())


def test_every_method_on_tokens_equals_the_method_on_the_grid_they_reshape(images):
    """The patch tokens (the Reshape of the patch embedding's 4 × 4 × 8 output) laid on their
    grid are that 4-D output: every method (gradients, masked inputs, ablations, head re-runs,
    pixel maps) gives the same map on either layer (a class token comes after them)."""
    model = tiny_vit(True, blocks=1)
    reshape = next(layer.name for layer in model.layers if isinstance(layer, keras.layers.Reshape))
    names = [m for m in METHODS if m != "cam"]  # cam needs a GlobalAveragePooling2D → Dense head
    on_tokens = Explainer(model, layer=reshape, chunk_size=4)
    assert (on_tokens.sites[0].prefix, on_tokens.sites[0].grid) == (0, (4, 4))
    got = on_tokens.explain(images[:1], methods=names, targets=[[0, 1, 2]])
    want = Explainer(model, layer="patches", chunk_size=4).explain(images[:1], methods=names, targets=[[0, 1, 2]])
    for name in names:
        g = np.stack([e.raw for image in got for e in image if e.method == name])
        w = np.stack([e.raw for image in want for e in image if e.method == name])
        assert len(w) == 3 and w.max() > 0, name  # 3 classes; some maps are all zero after ReLU
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * w.max(), err_msg=name)


def test_ablationcam_on_tokens_matches_zeroed_tokens(vit, images):
    """Ablation-CAM's weights: the logit drop when one channel of the patch tokens is zeroed
    (the class token kept), computed here with the model's rest as a Keras model of its own."""
    class_token, model = vit
    prefix, layer = (1 if class_token else 0), "block0_out"
    ex = Explainer(model, layer=layer)
    got = [e.raw for e in ex.explain(images[:1], methods=("ablationcam",), targets=[[0, 1, 2]])[0]]
    head = model.get_layer("head")
    tokens = keras.Model(model.inputs, model.get_layer(layer).output)(images[:1]).numpy()
    rest = keras.Model(model.get_layer(layer).output, head.input)

    def logits(t):
        return (tf.matmul(rest(t), head.kernel) + head.bias).numpy()[0]

    y = logits(tokens)
    drops = []
    for k in range(tokens.shape[-1]):
        ablated = tokens.copy()
        ablated[:, prefix:, k] = 0.0
        drops.append((y - logits(ablated)) / np.abs(y))
    a = tokens[0, prefix:].reshape(4, 4, -1)
    want = np.maximum(np.einsum("hwk,kc->chw", a, np.array(drops)), 0.0)
    assert want.max() > 0
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-3, atol=1e-4 * want.max())


def test_prefix_tokens_given_and_refused():
    model = tiny_vit(True, blocks=1)
    ex = Explainer(model, layer="block0_out", prefix_tokens=1)
    assert ex.sites[0].grid == (4, 4)
    with pytest.raises(InvalidArgument, match="leaves no grid .*; give prefix_tokens"):
        Explainer(model, layer="block0_out", prefix_tokens=3)
    with pytest.raises(InvalidArgument, match="prefix_tokens must be an integer from 0 to 16"):
        Explainer(model, layer="block0_out", prefix_tokens=-1)


def test_infer_grid_prefers_the_fewest_prefix_tokens():
    assert infer_grid(50) == (1, 7, 7)
    assert infer_grid(49) == (0, 7, 7)
    assert infer_grid(53) == (4, 7, 7)  # class + 3 register tokens
    assert infer_grid(33) is None and infer_grid(33, prefix_tokens=8) == (8, 5, 5)


def test_a_non_square_image_takes_the_patch_embeddings_grid():
    """16 × 24 px: 4 × 6 patches + a class token = 25 tokens, which is also 5 × 5: the patch
    embedding's grid wins over the square."""
    model = tiny_vit(True, size=(16, 24))
    ex = Explainer(model)
    assert (ex.layer_name, ex.sites[0].prefix, ex.sites[0].grid) == ("block1_norm1", 1, (4, 6))
    x = np.random.default_rng(4).random((2, 16, 24, 3), dtype=np.float32)
    got = np.stack([e[0].raw for e in ex.explain(x, targets=[1, 2])])
    want = hand_gradcam(model, "block1_norm1", x, np.array([1, 2]), 1)
    assert want.max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * want.max())
