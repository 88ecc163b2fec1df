"""Bounds of the Explainer (issue 9 item 4): a ``checkpoint`` called between compiled passes
stops the work, canonical graph keys (method order, target width) and an LRU bound on the
compiled graphs."""

from __future__ import annotations

import numpy as np
import pytest

from camserve import Explainer


class Stop(Exception):
    pass


def _stopping_after(k: int):
    calls: list[int] = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) > k:
            raise Stop(f"stopped at call {len(calls)}")

    return checkpoint, calls


def _count_passes(ex: Explainer) -> list[tuple]:
    """Record every call of a compiled graph of ``ex`` (key, first argument's shape)."""
    passes: list[tuple] = []
    make = ex._graph

    def counting(key, *args, **kwargs):
        fn = make(key, *args, **kwargs)

        def call(*a, **kw):
            passes.append((key[0], tuple(a[0].shape)))
            return fn(*a, **kw)

        return call

    ex._graph = counting  # type: ignore[method-assign]
    return passes


@pytest.mark.parametrize("op", ["explain", "predict"])
def test_checkpoint_stops_between_bucket_batches(gap_model, op) -> None:
    images = np.random.default_rng(1).random((20, 32, 32, 3), dtype=np.float32)
    ex = Explainer(gap_model, max_batch_size=4)  # five batches of four
    passes = _count_passes(ex)
    checkpoint, calls = _stopping_after(2)
    with pytest.raises(Stop, match="call 3"):
        getattr(ex, op)(images, checkpoint=checkpoint)
    assert len(passes) == 2 and len(calls) == 3


@pytest.mark.parametrize("op", ["explain", "predict"])
def test_a_checkpoint_that_never_raises_changes_nothing(gap_model, rng_images, op) -> None:
    ex = Explainer(gap_model, max_batch_size=2)
    passes = _count_passes(ex)
    calls: list[int] = []
    got = getattr(ex, op)(rng_images, checkpoint=lambda: calls.append(1))
    assert len(calls) == len(passes) == 3  # 5 images: 2 + 2 + 1, a check before each pass
    want = getattr(ex, op)(rng_images)
    if op == "predict":
        np.testing.assert_array_equal(got, want)
        return
    for a_img, b_img in zip(got, want):
        for a, b in zip(a_img, b_img):
            assert (a.method, a.class_index) == (b.method, b.class_index)
            np.testing.assert_array_equal(a.raw, b.raw)
            np.testing.assert_array_equal(a.heatmap, b.heatmap)


def _assert_same(a, b) -> None:
    assert (a.method, a.class_index, a.label) == (b.method, b.class_index, b.label)
    assert a.score == b.score and a.box == b.box
    np.testing.assert_array_equal(a.raw, b.raw)
    np.testing.assert_array_equal(a.heatmap, b.heatmap)


def test_method_order_shares_one_graph_and_answers_in_the_callers_order(gap_model, rng_images) -> None:
    ex = Explainer(gap_model, max_batch_size=8)
    first = ex.explain(rng_images, methods=("gradcam", "cam"), top_k=2)
    traced = ex.trace_count
    second = ex.explain(rng_images, methods=("cam", "gradcam"), top_k=2)
    assert ex.trace_count == traced, "a new order of the same methods compiled a new graph"
    for row_a, row_b in zip(first, second):
        assert [e.method for e in row_a] == ["gradcam", "cam"] * 2
        assert [e.method for e in row_b] == ["cam", "gradcam"] * 2
        for t in range(2):  # per target: the same maps, in the order asked
            _assert_same(row_a[2 * t], row_b[2 * t + 1])
            _assert_same(row_a[2 * t + 1], row_b[2 * t])


def test_target_widths_3_and_4_share_a_graph_and_give_the_same_maps(rng_images) -> None:
    import keras

    keras.utils.set_random_seed(4)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(7, activation="softmax")(x))
    images = rng_images[:3, :16, :16]
    ex = Explainer(model, max_batch_size=4)
    three = ex.explain(images, methods=("gradcam", "hirescam"), targets=[[0, 3, 5]])
    traced = ex.trace_count
    four = ex.explain(images, methods=("gradcam", "hirescam"), targets=[[0, 3, 5, 6]])
    assert ex.trace_count == traced, "target width 4 compiled a new graph after width 3"
    for row3, row4 in zip(three, four):
        assert len(row3) == 6 and len(row4) == 8  # the caller's target count, not the bucket's
        assert [e.class_index for e in row4] == [0, 0, 3, 3, 5, 5, 6, 6]
        for a, b in zip(row3, row4[:6]):
            _assert_same(a, b)


def test_compiled_graphs_stay_under_max_graphs_and_evicted_ones_are_released(gap_model, rng_images) -> None:
    import gc
    import itertools
    import weakref

    ex = Explainer(gap_model, max_batch_size=2, max_graphs=3)
    assert ex.max_graphs == 3
    methods = ("gradcam", "hirescam", "layercam", "xgradcam", "gradcam++")
    refs = []
    for combo in itertools.islice(itertools.combinations(methods, 2), 6):
        ex.explain(rng_images[:1], methods=combo)
        refs.extend(weakref.ref(g) for g in ex._graphs._graphs.values())
        assert len(ex._graphs) <= 3
    gc.collect()
    alive = {id(r()) for r in refs if r() is not None}
    assert alive == {id(g) for g in ex._graphs._graphs.values()}, "an evicted graph is still alive"
    # an evicted key compiles again and answers the same
    before = ex.explain(rng_images[:1], methods=("gradcam", "hirescam"))
    again = Explainer(gap_model, max_batch_size=2).explain(rng_images[:1], methods=("hirescam", "gradcam"))
    _assert_same(before[0][0], again[0][1])


def test_graphs_per_request_order_do_not_grow_without_bound(gap_model, rng_images) -> None:
    import itertools

    ex = Explainer(gap_model, max_batch_size=1)
    for combo in itertools.permutations(("gradcam", "hirescam", "layercam", "xgradcam")):
        ex.explain(rng_images[:1], methods=combo)
    assert len(ex._graphs) == 1 and ex.trace_count == 1  # 24 orders, one graph


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_checkpoint_stops_score_cam_between_chunks(gap_model, rng_images, method) -> None:
    # 16 channels in chunks of 2 (at least 4 chunks per image: scored in calls of their own);
    # 2 images: 32 masked inputs (Score-CAM: one chunk per call) or ablated channels (several).
    ex = Explainer(gap_model, chunk_size=2, max_batch_size=8)
    passes = _count_passes(ex)
    calls: list[int] = []
    got = ex.explain(rng_images[:2], methods=(method, "gradcam"), checkpoint=lambda: calls.append(1))
    chunks = len([p for p in passes if p[0] == "chunk"])
    assert chunks >= 2 and len(calls) == 1 + chunks  # a check before the batch and before every chunk
    passes.clear()
    checkpoint, _ = _stopping_after(2)
    with pytest.raises(Stop, match="call 3"):
        ex.explain(rng_images[:2], methods=(method,), checkpoint=checkpoint)
    assert [p[0] for p in passes] == ["prepare", "chunk"]  # one chunk of several done, then stopped
    # a checkpoint that never raises: the same maps as without one
    want = ex.explain(rng_images[:2], methods=(method, "gradcam"))
    for row_a, row_b in zip(got, want):
        for a, b in zip(row_a, row_b):
            _assert_same(a, b)


@pytest.mark.parametrize("methods", [("scorecam",), ("ablationcam",), ("gradcam", "scorecam", "ablationcam")])
def test_chunked_score_cam_equals_the_single_pass(gap_model, rng_images, methods) -> None:
    ex = Explainer(gap_model, chunk_size=2)  # in calls of their own (with gradcam: a second forward pass)
    passes = _count_passes(ex)
    chunked = ex.explain(rng_images, methods=methods, top_k=2)
    assert "chunk" in [p[0] for p in passes]
    in_one = Explainer(gap_model, chunk_size=1000).explain(rng_images, methods=methods, top_k=2)
    for row_a, row_b in zip(chunked, in_one):
        for a, b in zip(row_a, row_b):
            assert (a.class_index, a.method) == (b.class_index, b.method)
            np.testing.assert_allclose(a.raw, b.raw, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a.heatmap, b.heatmap, rtol=1e-5, atol=1e-5)
