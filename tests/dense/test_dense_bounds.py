"""Bounds of dense_scores (issue 9 item 4): the shifted copies of a fine stride and the crops
go through the network in batches bounded by input pixels, a ``checkpoint`` stops the work
between batches, and the FCN conversion cache lets go of a dropped model.

The spy below stands in for the Keras model's ``predict_on_batch`` and records every batch;
numpy's own allocations (the stacked copies) are seen by tracemalloc, TensorFlow's are not.
"""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc
import weakref

import keras
import numpy as np
import pytest
from fcn_nets import crops_reference, gap_net, max_rel_err

from camserve.dense import dense_scores
from camserve.dense.fcn import to_fully_convolutional

BUDGET = 1 << 21  # the default pixels per forward pass (camserve.dense.scores.MAX_BATCH_PIXELS)
RNG = np.random.default_rng(11)


class Spy:
    """A model whose ``predict_on_batch`` records the batch shapes and calls ``checkpoint`` hooks."""

    def __init__(self, model):
        self.model = model
        self.input_shape = model.input_shape
        self.shapes: list[tuple[int, ...]] = []

    def predict_on_batch(self, batch):
        self.shapes.append(tuple(batch.shape))
        return self.model.predict_on_batch(batch)

    @property
    def max_pixels(self) -> int:
        return max(int(np.prod(s[:3])) for s in self.shapes)


def stride8_net() -> keras.Model:
    """Three valid conv3 → pool2 stages (total stride 8, window 22) → GAP → Dense."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((22, 22, 3))
    x = inp
    for filters in (4, 4, 6):
        x = keras.layers.Conv2D(filters, 3, padding="valid", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inp, out, name="stride8")


@pytest.fixture(scope="module")
def net():
    return stride8_net()


@pytest.fixture(scope="module")
def fcn(net):
    converted = to_fully_convolutional(net)
    assert converted.stride == (8, 8) and converted.exact
    return converted


def _numpy_peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fine_stride_copies_go_through_in_bounded_batches(fcn) -> None:
    # 64 shifted copies of ~290x290 pixels, all the same size: asked for in one batch of 1024,
    # they used to be stacked at once (64 x 84k pixels, 5.4 M; 65 MB of float32).
    image = RNG.random((22 + 8 * 34 + 7, 22 + 8 * 34 + 7, 3), dtype=np.float32)
    spy = Spy(fcn.model)
    result, peak = _numpy_peak(
        lambda: dense_scores(dataclasses.replace(fcn, model=spy), image, stride=1, batch_size=1024)
    )
    assert sum(s[0] for s in spy.shapes) == 64
    assert spy.max_pixels <= BUDGET, spy.shapes
    # one batch of float32 RGB and Keras's copy of it, the image, slack (the old way: 130 MB)
    assert peak < 2 * BUDGET * 3 * 4 + 3 * image.nbytes + (4 << 20), f"numpy peaked at {peak / 2**20:.1f} MiB"
    # the same scores as one pass per copy
    plain = dense_scores(dataclasses.replace(fcn, model=Spy(fcn.model)), image, stride=1, batch_size=1)
    np.testing.assert_allclose(result[0].scores, plain[0].scores, rtol=1e-6, atol=1e-7)


def test_crops_go_through_in_bounded_batches(net) -> None:
    image = RNG.random((101, 101, 3), dtype=np.float32)  # 80x80 = 6400 crops of 22x22 pixels
    spy = Spy(net)
    result = dense_scores(spy, image, stride=1, mode="crops", batch_size=100_000)
    assert sum(s[0] for s in spy.shapes) == 80 * 80
    assert spy.max_pixels <= BUDGET, spy.shapes
    assert max_rel_err(result[0].scores, crops_reference(net, image, 1)) <= 1e-5


@pytest.mark.parametrize("mode", ["fcn", "crops"])
def test_a_small_pixel_budget_changes_batches_not_scores(net, fcn, mode) -> None:
    image = RNG.random((61, 67, 3), dtype=np.float32)
    model = fcn if mode == "fcn" else net
    big = dense_scores(model, image, stride=2, mode=mode, scales=(1.0, 0.7))
    spy = Spy(fcn.model if mode == "fcn" else net)
    small_model = dataclasses.replace(fcn, model=spy) if mode == "fcn" else spy
    small = dense_scores(small_model, image, stride=2, mode=mode, scales=(1.0, 0.7), max_batch_pixels=3000)
    # every pass within the budget, or one item alone (it cannot be split)
    assert all(np.prod(s[:3]) <= 3000 or s[0] == 1 for s in spy.shapes), spy.shapes
    assert len(spy.shapes) > 4 and max(s[0] for s in spy.shapes) > 1
    for a, b in zip(big, small):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(a.boxes, b.boxes)


class Stop(Exception):
    pass


def _stopping_after(k: int):
    calls = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) > k:
            raise Stop(f"stopped at call {len(calls)}")

    return checkpoint, calls


@pytest.mark.parametrize("mode", ["fcn", "crops"])
def test_checkpoint_stops_dense_scores_between_batches(net, fcn, mode) -> None:
    image = RNG.random((90, 90, 3), dtype=np.float32)
    spy = Spy(fcn.model if mode == "fcn" else net)
    model = dataclasses.replace(fcn, model=spy) if mode == "fcn" else spy
    checkpoint, calls = _stopping_after(2)
    with pytest.raises(Stop, match="call 3"):
        dense_scores(model, image, stride=1, mode=mode, batch_size=4, scales=(1.0, 0.5), checkpoint=checkpoint)
    assert len(spy.shapes) == 2  # two forward passes, then stopped before the third
    full = Spy(spy.model)
    dense_scores(
        dataclasses.replace(fcn, model=full) if mode == "fcn" else full, image, stride=1, mode=mode, batch_size=4
    )
    assert len(full.shapes) > 10  # the work it did not do


@pytest.mark.parametrize("mode", ["fcn", "crops"])
def test_a_checkpoint_that_never_raises_changes_nothing(net, fcn, mode) -> None:
    image = RNG.random((50, 47, 3), dtype=np.float32)
    model = fcn if mode == "fcn" else net
    calls: list[int] = []
    spy = Spy(fcn.model if mode == "fcn" else net)
    spied = dataclasses.replace(fcn, model=spy) if mode == "fcn" else spy
    got = dense_scores(spied, image, stride=2, mode=mode, scales=(1.0, 0.6), checkpoint=lambda: calls.append(1))
    want = dense_scores(model, image, stride=2, mode=mode, scales=(1.0, 0.6))
    assert len(calls) == len(spy.shapes) >= 2  # one call before every forward pass
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.scores, b.scores)


def test_fcn_cache_lets_go_of_a_dropped_model() -> None:
    model = gap_net("valid", seed=5)
    image = RNG.random((30, 30, 3), dtype=np.float32)
    first = dense_scores(model, image, stride=1)
    again = dense_scores(model, image, stride=1)  # the cached conversion: same numbers
    np.testing.assert_array_equal(first[0].scores, again[0].scores)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "the FCN cache keeps the model alive"
