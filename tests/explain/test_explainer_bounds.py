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
