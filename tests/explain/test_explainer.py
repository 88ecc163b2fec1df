"""The Explainer's machinery: batching, buckets, targets, layers, errors."""

import keras
import numpy as np
import pytest

from camserve import Explainer, Explanation
from camserve.errors import InvalidArgument, NotFound
from camserve.explain import UnknownClass, UnknownMethod, bucket_sizes
from camserve.keras_graph import UnknownLayer

ALL = ("cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam", "ablationcam")
ALL += ("kpcacam", "fem", "gradcamelementwise", "eigengradcam", "finercam", "shapleycam")
ALL += ("guidedbackprop", "guided_gradcam", "smoothgrad", "integrated_gradients")


def test_methods_table_has_every_method():
    assert Explainer.methods == ALL


def test_result_structure_and_ranges(gap_model, rng_images):
    ex = Explainer(gap_model, class_names=["a", "b", "c", "d"])
    results = ex.explain(rng_images[:2], methods=("gradcam", "cam"), top_k=2)
    probs = gap_model.predict(rng_images[:2], verbose=0)
    assert len(results) == 2
    for i, per_image in enumerate(results):
        assert [e.method for e in per_image] == ["gradcam", "cam", "gradcam", "cam"]
        ranked = np.argsort(-probs[i])
        assert [e.class_index for e in per_image[::2]] == list(ranked[:2])
        for e in per_image:
            assert isinstance(e, Explanation)
            assert e.label == "abcd"[e.class_index]
            assert e.score == pytest.approx(probs[i, e.class_index], rel=1e-5)
            assert e.raw.shape == (16, 16) and e.raw.dtype == np.float32 and e.raw.min() >= 0
            assert e.heatmap.shape == (32, 32) and e.heatmap.dtype == np.float32
            assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0
            if e.raw.max() > 0:
                assert e.heatmap.max() == pytest.approx(1.0)


def test_alone_equals_inside_batch(gap_model, rng_images):
    ex = Explainer(gap_model, max_batch_size=4)
    methods = ("gradcam", "gradcam++", "scorecam", "ablationcam", "eigencam")
    together = ex.explain(rng_images, methods=methods)  # 5 images: a bucket of 4, then 1
    for i in range(len(rng_images)):
        alone = ex.explain(rng_images[i : i + 1], methods=methods)[0]
        for a, b in zip(alone, together[i]):
            assert a.class_index == b.class_index
            np.testing.assert_allclose(a.raw, b.raw, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(a.heatmap, b.heatmap, rtol=1e-4, atol=1e-5)
            assert a.box == b.box


def test_buckets_do_not_retrace(gap_model, rng_images):
    ex = Explainer(gap_model, max_batch_size=8)
    assert ex.buckets == (1, 2, 4, 8)
    images = np.concatenate([rng_images, rng_images])[:8]
    for n in range(1, 9):
        ex.explain(images[:n], methods=("gradcam",))
    traced = ex.trace_count
    assert traced <= len(ex.buckets)
    for n in range(1, 9):
        ex.explain(images[:n], methods=("gradcam",))
    assert ex.trace_count == traced  # nothing new compiled the second time round


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    with pytest.raises(InvalidArgument):
        bucket_sizes(0)


def test_explicit_targets_by_index_name_and_list(gap_model, rng_images):
    ex = Explainer(gap_model, class_names=["a", "b", "c", "d"])
    res = ex.explain(rng_images[:3], methods=("gradcam",), targets=[1, "d", [0, "c", 2]])
    assert [e.class_index for e in res[0]] == [1]
    assert [e.class_index for e in res[1]] == [3]
    assert [e.class_index for e in res[2]] == [0, 2, 2]
    # a target's map does not depend on which other targets share the pass
    single = ex.explain(rng_images[2:3], methods=("gradcam",), targets=[2])[0][0]
    np.testing.assert_allclose(single.raw, res[2][1].raw, rtol=1e-5, atol=1e-7)
    other = ex.explain(rng_images[2:3], methods=("gradcam",), targets=[0])[0][0]
    assert not np.allclose(other.raw, single.raw)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"targets": ["zebra"] * 2}, UnknownClass, ["zebra", "'a'"]),
        ({"targets": [7, 0]}, UnknownClass, ["7", "0..3"]),
        ({"targets": [0, 1, 2]}, InvalidArgument, ["3 target entries for 2 images"]),
        ({"top_k": 0}, InvalidArgument, ["top_k", "between 1 and 4"]),
        ({"top_k": 5}, InvalidArgument, ["top_k", "between 1 and 4"]),
        ({"methods": ("gradcam", "nosuchcam")}, UnknownMethod, ["nosuchcam", "gradcam++"]),
    ],
)
def test_bad_parameters_name_the_problem(gap_model, rng_images, kwargs, error, words):
    ex = Explainer(gap_model, class_names=["a", "b", "c", "d"])
    with pytest.raises(error) as info:
        ex.explain(rng_images[:2], **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_images_are_rejected(gap_model, rng_images):
    ex = Explainer(gap_model)
    with pytest.raises(InvalidArgument, match=r"\(N, 32, 32, 3\)"):
        ex.explain(rng_images[:, :16])
    bad = rng_images[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"):
        ex.explain(bad)


def test_all_zero_map_gives_zero_heatmap_and_no_box():
    keras.utils.set_random_seed(1)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer="zeros", name="dead")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3)(x)
    ex = Explainer(keras.Model(inp, out))
    for e in ex.explain(np.ones((1, 16, 16, 3), np.float32), methods=ex.methods)[0]:
        assert np.all(e.heatmap == 0) and np.all(np.isfinite(e.heatmap)), e.method
        assert e.box is None, e.method


def test_cam_refuses_a_flatten_head_and_names_it():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    ex = Explainer(keras.Model(inp, out))
    with pytest.raises(InvalidArgument, match="Flatten → Dense → Dense"):
        ex.explain(np.zeros((1, 16, 16, 3), np.float32), methods=("cam",))
    assert len(ex.explain(np.zeros((1, 16, 16, 3), np.float32), methods=("gradcam",))[0]) == 1


def _nested_models():
    keras.utils.set_random_seed(2)
    backbone = keras.applications.MobileNetV2(input_shape=(96, 96, 3), include_top=False, weights=None, alpha=0.35)
    seq = keras.Sequential(
        [
            keras.Input((96, 96, 3)),
            backbone,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    inp = keras.Input((96, 96, 3))
    x = backbone(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    func = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    return backbone, seq, func


def test_nested_backbone_layer_selection_and_equivalence():
    backbone, seq, func = _nested_models()
    images = np.random.default_rng(3).random((2, 96, 96, 3), dtype=np.float32)
    for model in (seq, func):
        ex = Explainer(model)
        assert ex.layer_name == f"{backbone.name}/out_relu"
        # explicit inner layer: same activations as a sub-model of the backbone computes
        ex_inner = Explainer(model, layer=f"{backbone.name}/block_16_project_BN")
        probe = keras.Model(backbone.inputs, backbone.get_layer("block_16_project_BN").output)
        acts = probe.predict(images, verbose=0)
        e = ex_inner.explain(images, methods=("eigencam",))[0][0]
        assert e.raw.shape == acts.shape[1:3]
        # CAM at the automatic layer equals Grad-CAM up to scale (GAP head)
        cam, grad = ex.explain(images, methods=("cam", "gradcam"))[0]
        assert cam.raw.std() > 0
        assert np.corrcoef(cam.raw.ravel(), grad.raw.ravel())[0, 1] > 0.9999


def test_unknown_layer_lists_candidates():
    backbone, seq, _ = _nested_models()
    with pytest.raises(UnknownLayer) as info:
        Explainer(seq, layer="out_relu")
    message = str(info.value)
    assert "unknown layer 'out_relu'" in message and f"{backbone.name}/out_relu" in message
    assert isinstance(info.value, NotFound)


def test_predict_matches_model(gap_model, rng_images):
    ex = Explainer(gap_model, max_batch_size=2)
    np.testing.assert_allclose(ex.predict(rng_images), gap_model.predict(rng_images, verbose=0), rtol=1e-5, atol=1e-6)


def test_multi_output_models_are_refused():
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, [keras.layers.Dense(2)(pooled), keras.layers.Dense(3)(pooled)])
    with pytest.raises(InvalidArgument, match="has 2 outputs; pick one with output="):
        Explainer(model)
