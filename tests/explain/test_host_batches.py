"""Host batches handed to TensorFlow in place (camserve.explain.host_batches) and the
Explainer's results along both paths (read in place, copied)."""

from __future__ import annotations

import numpy as np
import pytest
from models_for_tests import two_conv_model

from camserve.explain import Explainer
from camserve.explain.host_batches import ALIGNMENT, aligned_empty, padded_batch, shareable, to_tensor


def _misaligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` whose data starts 8 bytes past an ALIGNMENT boundary."""
    raw = aligned_empty((array.nbytes + ALIGNMENT,), np.uint8)
    out = raw[8 : 8 + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


@pytest.mark.parametrize("shape, dtype", [((1,), np.uint8), ((3, 5, 7, 3), np.uint8), ((2, 9, 9, 1), np.float32)])
def test_aligned_empty_is_aligned_contiguous_and_of_the_shape(shape, dtype) -> None:
    a = aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % ALIGNMENT == 0


def test_padded_batch_copies_then_zeros() -> None:
    part = np.random.default_rng(0).integers(1, 256, (3, 4, 4, 3), dtype=np.uint8)
    out = padded_batch(part, 8)
    assert out.shape == (8, 4, 4, 3) and out.ctypes.data % ALIGNMENT == 0
    assert np.array_equal(out[:3], part) and not out[3:].any()
    out[0] = 0
    assert part[0].any()  # a copy, not a view


def test_shareable_only_when_tensorflow_may_read_in_place() -> None:
    good = aligned_empty((2, 4, 4, 3), np.uint8)
    assert shareable(good)
    assert not shareable(_misaligned(good))
    assert not shareable(np.frombuffer(bytes(good.nbytes), np.uint8).reshape(good.shape))  # read-only
    assert not shareable(aligned_empty((4, 4, 4, 3), np.uint8)[::2])  # not contiguous
    assert not shareable(aligned_empty((2, 3), np.float64))  # not a batch dtype
    assert not shareable(aligned_empty((0, 3), np.uint8))


def test_to_tensor_shares_what_it_may_and_copies_the_rest() -> None:
    a = aligned_empty((2, 3), np.float32)
    a[...] = 1.0
    shared, copied = to_tensor(a), to_tensor(_misaligned(a))
    a[0, 0] = 7.0
    assert float(shared[0, 0]) == 7.0  # read in place
    assert float(copied[0, 0]) == 1.0 and np.array_equal(copied.numpy(), np.ones((2, 3), np.float32))
    ro = np.frombuffer(np.arange(6, dtype=np.uint8).tobytes(), np.uint8).reshape(2, 3)
    assert to_tensor(ro).numpy().tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.fixture(scope="module")
def explainer() -> Explainer:
    return Explainer(two_conv_model(24, 3, seed=5), max_batch_size=4, preprocessing="scale_0_1")


@pytest.mark.parametrize("n", [4, 3, 6])
def test_explainer_results_equal_read_in_place_or_copied(explainer: Explainer, n: int) -> None:
    """The same pixels as an aligned array (a bucket-sized chunk is read in place) and as a
    misaligned one (copied): equal scores and heatmaps, equal to Keras on the preprocessed
    input; the caller's array is left as it was."""
    h, w = explainer.input_shape[:2]
    pixels = np.random.default_rng(n).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    aligned = aligned_empty(pixels.shape, np.uint8)
    aligned[...] = pixels
    misaligned = _misaligned(pixels)
    keras_scores = explainer.model(pixels.astype(np.float32) / 255.0).numpy()
    for x in (aligned, misaligned):
        np.testing.assert_allclose(explainer.predict(x), keras_scores, rtol=1e-5, atol=1e-6)
    a, m = explainer.explain(aligned), explainer.explain(misaligned)
    for ea, em in zip(a, m, strict=True):
        assert [e.class_index for e in ea] == [e.class_index for e in em]
        np.testing.assert_array_equal(ea[0].heatmap, em[0].heatmap)
    assert np.array_equal(aligned, pixels) and np.array_equal(misaligned, pixels)
