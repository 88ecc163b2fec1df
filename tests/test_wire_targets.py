"""Targets, several layers and smoothing through the wire (camserve/wire_targets.py): every
target kind survives the camserve.v1 round trip, and a served model answers the Python
client, OIP and HTTP v1 as the in-process Explainer does (targets of every kind, fused
layers, token layers, aug_smooth, eigen_smooth)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_serving import CLASSES, RunningServer, local_config, save_model

from camserve import wire
from camserve.errors import InvalidArgument
from camserve.serving import budget
from camserve.targets import (
    ClassTarget,
    MultiLabelTarget,
    RegressionTarget,
    SegmentationTarget,
    SimilarityTarget,
)

MASK = np.arange(12, dtype=np.float32).reshape(3, 4) / 11.0


def same(a, b) -> bool:
    if isinstance(a, SegmentationTarget):
        return a.class_index == b.class_index and np.array_equal(a.mask, b.mask)
    if isinstance(a, SimilarityTarget):
        return np.array_equal(np.ravel(a.reference), b.reference)
    return a == b


@pytest.mark.parametrize(
    "target",
    [
        3,
        "star",
        ClassTarget(2, probability=True),
        ClassTarget("circle", probability=True),
        RegressionTarget(1),
        RegressionTarget(0, sign=-1),
        SegmentationTarget(2, MASK),
        SegmentationTarget("square", MASK),
        SimilarityTarget(np.array([0.5, -1.0, 2.0], np.float32)),
        MultiLabelTarget(0.25),
    ],
    ids=repr,
)
def test_every_target_kind_survives_the_wire(target):
    (entry,) = wire.targets_to_proto([[target]], 1)
    (back,) = [wire.target_from_proto(t) for t in entry.targets]
    assert same(target, back)


def test_wire_target_errors_say_what_is_allowed():
    from camserve.proto import pb

    with pytest.raises(InvalidArgument, match="empty target: set index, name, regression"):
        wire.target_from_proto(pb.Target())
    with pytest.raises(InvalidArgument, match="needs class_index or class_name, and a mask"):
        wire.target_from_proto(pb.Target(segmentation=pb.SegmentationTarget(class_index=1)))
    with pytest.raises(InvalidArgument, match="camserve.targets object"):
        wire.target_to_proto(1.5)


def test_budget_counts_the_augmented_views():
    from camserve.explain.smoothing import VIEWS

    assert budget.AUG_SMOOTH_VIEWS == len(VIEWS)
    plain = budget.explain_units(2, [1], ("gradcam",), 16)
    assert budget.explain_units(2, [1], ("gradcam",), 16, views=len(VIEWS)) == len(VIEWS) * plain


def two_layer_model():
    from models_for_tests import two_conv_model

    return two_conv_model(32, len(CLASSES), seed=9, output_name="predictions")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    path = save_model(root, "two", 1, two_layer_model())
    with RunningServer(local_config(root, max_batch_size=4, max_images=4, batch_timeout_ms=2)) as rs:
        yield rs, path


@pytest.mark.parametrize(
    "options",
    [
        {"targets": [[ClassTarget("star", probability=True), RegressionTarget(1, sign=-1)], [MultiLabelTarget(0.2)]]},
        {"targets": [1, 2], "layer": ["first_conv", "last_conv"], "methods": ("gradcam", "scorecam")},
        {"aug_smooth": True, "methods": ("gradcam", "layercam")},
        {"targets": [0, 3], "eigen_smooth": True},
    ],
    ids=["targets", "layers", "aug_smooth", "eigen_smooth"],
)
def test_the_client_gets_what_the_explainer_computes(served, options):
    import keras

    from camserve.client import Client
    from camserve.explain import Explainer

    rs, path = served
    images = np.random.default_rng(4).random((2, 32, 32, 3), dtype=np.float32)
    local = dict(options)
    layer = local.pop("layer", None)
    want = Explainer(keras.models.load_model(path), layer=layer, class_names=CLASSES).explain(images, **local)
    with Client(rs.target) as client:
        got = client.explain(images, "two", **options)
    for got_image, want_image in zip(got, want):
        assert [(e.method, e.class_index, e.label) for e in got_image] == [
            (e.method, e.class_index, e.label) for e in want_image
        ]
        for g, w in zip(got_image, want_image):
            np.testing.assert_allclose(g.raw, w.raw, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(g.heatmap, w.heatmap, atol=1e-5)
            np.testing.assert_allclose(g.score, w.score, rtol=1e-5)


def test_open_inference_protocol_parameters_take_the_new_targets(served):
    """OIP's ``target`` parameter takes the text forms, ``layer`` a comma-separated list, and
    ``aug_smooth`` / ``eigen_smooth`` booleans: the raw maps equal the Explainer's."""
    import keras

    from camserve.explain import Explainer
    from camserve.oip.inference import InferRequest, RequestedOutput, infer
    from camserve.oip.tensors import Tensor

    rs, path = served
    images = np.random.default_rng(6).random((2, 32, 32, 3), dtype=np.float32)
    parameters = {"target": "prob:star,regression:1:-1", "layer": "first_conv,last_conv", "aug_smooth": True}
    request = InferRequest(
        "two", parameters=parameters, inputs=[Tensor("images", "FP32", images)], outputs=[RequestedOutput("raw")]
    )
    result = rs.run(infer(rs.server.dataplane, request))
    (raw,) = [t.array for t in result.outputs if t.name == "raw"]
    targets = [[ClassTarget("star", probability=True), RegressionTarget(1, sign=-1)]] * 2
    ex = Explainer(keras.models.load_model(path), layer=["first_conv", "last_conv"], class_names=CLASSES)
    want = ex.explain(images, targets=targets, aug_smooth=True)
    np.testing.assert_allclose(raw[:, :, 0], [[e.raw for e in per_image] for per_image in want], rtol=1e-4, atol=1e-6)
    bad = InferRequest("two", parameters={"eigen_smooth": "maybe"}, inputs=[Tensor("images", "FP32", images)])
    with pytest.raises(InvalidArgument, match="'eigen_smooth' must be a boolean"):
        rs.run(infer(rs.server.dataplane, bad))


def tiny_token_model():
    """Patch-embedding conv → tokens → one pre-norm attention block → GAP1D → Dense (built-in
    layers only, so it loads in safe mode)."""
    import keras

    keras.utils.set_random_seed(10)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Reshape((16, 8))(keras.layers.Conv2D(8, 8, strides=8, name="patches")(inp))
    y = keras.layers.LayerNormalization(name="block0_norm1")(x)
    x = keras.layers.Add()([x, keras.layers.MultiHeadAttention(2, 4, name="block0_attn")(y, y)])
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inp, keras.layers.Dense(len(CLASSES), activation="softmax")(x))


def test_a_served_transformer_lists_and_explains_its_token_layers(tmp_path):
    import keras

    from camserve.client import Client
    from camserve.explain import Explainer

    path = save_model(tmp_path, "vit", 1, tiny_token_model())
    images = np.random.default_rng(12).random((2, 32, 32, 3), dtype=np.float32)
    with RunningServer(local_config(tmp_path, max_batch_size=2, max_images=2, batch_timeout_ms=2)) as rs:
        with Client(rs.target) as client:
            info = client.model("vit")
            got = client.explain(images, "vit", targets=[1, 2], methods=("gradcam", "scorecam"))
    assert {"block0_norm1", "final_norm"} <= set(info["target_layers"]) and info["default_layer"] == "block0_norm1"
    want = Explainer(keras.models.load_model(path), class_names=CLASSES).explain(
        images, targets=[1, 2], methods=("gradcam", "scorecam")
    )
    for g_image, w_image in zip(got, want):
        for g, w in zip(g_image, w_image):
            assert g.raw.shape == (4, 4)
            np.testing.assert_allclose(g.raw, w.raw, rtol=1e-4, atol=1e-6)


def test_rest_explain_takes_text_targets_layer_lists_and_smoothing(served):
    """HTTP v1 ``:explain``: text targets, a list of layers and the smoothing flags give the
    Explainer's raw maps."""
    import json
    import urllib.error
    import urllib.request

    import keras

    from camserve.explain import Explainer

    def call(port, body):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/two:explain", json.dumps(body).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    rs, path = served
    images = np.random.default_rng(13).random((1, 32, 32, 3), dtype=np.float32)
    body = {
        "instances": images.tolist(),
        "targets": ["prob:star", "regression:1:-1"],
        "layer": ["first_conv", "last_conv"],
        "eigen_smooth": True,
        "raw": True,
        "predictions": False,
    }
    status, answer = call(rs.server.http.port, body)
    assert status == 200, answer
    got = [np.array(e["raw"]) for e in answer["explanations"][0]]
    ex = Explainer(keras.models.load_model(path), layer=["first_conv", "last_conv"], class_names=CLASSES)
    want = ex.explain(
        images, targets=[[ClassTarget("star", probability=True), RegressionTarget(1, sign=-1)]], eigen_smooth=True
    )
    for g, w in zip(got, want[0]):
        np.testing.assert_allclose(g, w.raw, rtol=1e-4, atol=1e-6)
    status, answer = call(rs.server.http.port, {**body, "layer": ["a", 3]})
    assert status == 400 and "list of layer names" in answer["error"]["message"]
