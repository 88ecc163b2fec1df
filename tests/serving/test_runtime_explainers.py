"""The explainers a served model's runtime builds: a transformer's ``prefix_tokens``
(config.toml) reaches them (the token layer is laid on the grid that count leaves, a count
that leaves no grid is refused), and fused layers' geometry counts every layer's channels."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from models_for_tests import two_conv_model

from camserve.errors import InvalidArgument
from camserve.explain import Explainer
from camserve.serving.repository import ModelConfig, ModelEntry
from camserve.serving.runtime import ExplainerSettings, ModelRuntime

CONFIG = 'class_names = ["a", "b", "c"]\ninput_size = [16, 16]\n'


def vit_with_class_token() -> keras.Model:
    """4 px patches (a 4 × 4 grid, 16 tokens), one class token in front (17 tokens), one
    attention block; built from stock layers only."""
    keras.utils.set_random_seed(4)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Reshape((16, 8))(keras.layers.Conv2D(8, 4, strides=4, name="patches")(inp))
    cls = keras.layers.Reshape((1, 8))(keras.layers.Dense(8)(keras.layers.GlobalAveragePooling1D()(x)))
    x = keras.layers.Concatenate(axis=1)([cls, x])
    y = keras.layers.LayerNormalization(name="norm1")(x)
    x = keras.layers.Add()([x, keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(y, y)])
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inp, out)


def runtime(tmp_path: Path, model: keras.Model, extra: str = "", **settings) -> ModelRuntime:
    (tmp_path / "config.toml").write_text(CONFIG + extra)
    config = ModelConfig.from_toml(tmp_path / "config.toml")
    return ModelRuntime(ModelEntry("m", 1, tmp_path, config, model), ExplainerSettings(**settings))


@pytest.mark.parametrize("value", ["-1", '"one"', "true", "1.5"])
def test_prefix_tokens_must_be_a_count(tmp_path: Path, value: str) -> None:
    (tmp_path / "config.toml").write_text(CONFIG + f"prefix_tokens = {value}\n")
    with pytest.raises(InvalidArgument, match="prefix_tokens must be an integer >= 0"):
        ModelConfig.from_toml(tmp_path / "config.toml")


def test_served_explainers_drop_the_configured_prefix_tokens(tmp_path: Path) -> None:
    model = vit_with_class_token()
    rt = runtime(tmp_path, model, "prefix_tokens = 1\n")
    assert rt.entry.config.prefix_tokens == 1
    images = np.random.default_rng(0).random((2, 16, 16, 3), dtype=np.float32)
    for layer in ("final_norm", "norm1"):
        ex = rt.explainer(layer)
        assert [(s.prefix, s.grid) for s in ex.sites] == [(1, (4, 4))]
        reference = Explainer(model, layer=ex.layer_name, prefix_tokens=1)
        got, want = ex.explain(images, targets=[0, 2]), reference.explain(images, targets=[0, 2])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g[0].raw, w[0].raw, rtol=1e-5, atol=1e-6)
    # 0 prefix tokens leave 17 tokens: no 4 x 4 patch grid, not a square; the setting is obeyed
    with pytest.raises(InvalidArgument, match="dropping 0 prefix tokens leaves no grid"):
        runtime(tmp_path, model, "prefix_tokens = 0\n").explainer("norm1")


@pytest.mark.parametrize("max_channels", [None, 10])
@pytest.mark.parametrize("layers", [("narrow", "wide"), ("wide", "narrow")])
def test_fused_layers_cost_every_layers_channels(tmp_path: Path, layers, max_channels) -> None:
    """Score-CAM scores each fused layer's channels: the budget's count is their sum (it used
    to be the first layer's × the layer count, too low when a narrow layer came first); the
    map's size is the first layer's (the fused raw map's)."""
    model = two_conv_model(16, 3, seed=5, names=("narrow", "wide"))
    rt = runtime(tmp_path, model, max_channels=max_channels)
    geo = rt.geometry(rt.explainer(",".join(layers)))
    shapes = [model.get_layer(name).output.shape for name in layers]
    assert geo.channels == sum(min(s[-1], max_channels or s[-1]) for s in shapes)
    assert geo.size == tuple(shapes[0][1:3])
