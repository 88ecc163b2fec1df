"""Wire conversions: header sizes read without decoding, tensor validation, round trips."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from camserve import wire
from camserve.errors import InvalidArgument
from camserve.imaging import encode_png
from camserve.proto import pb


def _encode(fmt: str, h: int, w: int) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(fmt, rgb)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("fmt", [".png", ".jpg", ".bmp", ".webp"])
@pytest.mark.parametrize("h,w", [(1, 1), (31, 57), (300, 17)])
def test_encoded_size_matches_decoder(fmt: str, h: int, w: int) -> None:
    data = _encode(fmt, h, w)
    _, got_w, got_h = wire.encoded_size(data)
    assert (got_w, got_h) == (w, h)
    assert wire.decode_image_proto(pb.Image(encoded=data)).array.shape == (h, w, 3)


def test_lossless_webp_and_progressive_jpeg_headers() -> None:
    rgb = np.zeros((23, 45, 3), np.uint8)
    ok, lossless = cv2.imencode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, 101])
    ok2, progressive = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and ok2
    assert wire.encoded_size(lossless.tobytes())[1:] == (45, 23)
    assert wire.encoded_size(progressive.tobytes())[1:] == (45, 23)


def _png_bomb(w: int, h: int) -> bytes:
    """A well-formed PNG header declaring w x h with a tiny (truncated) IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(_: bytes) -> np.ndarray:
        raise AssertionError("decoder called on an oversize image")

    monkeypatch.setattr(wire, "decode_image", never)
    with pytest.raises(InvalidArgument, match=r"100000x100000 = 10000000000 pixels exceeds the limit of 1000000"):
        wire.decode_image_proto(pb.Image(encoded=_png_bomb(100000, 100000)), max_pixels=1_000_000)


def test_jpeg_bomb_header_refused() -> None:
    data = bytearray(_encode(".jpg", 8, 8))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 60000, 60000)
    with pytest.raises(InvalidArgument, match="exceeds the limit"):
        wire.decode_image_proto(pb.Image(encoded=bytes(data)), max_pixels=10_000)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "empty image"),
        (b"hello world, not an image", "not an image"),
        (b"\x89PNG\r\n\x1a\n\0\0", "corrupt or truncated PNG"),
        (b"\xff\xd8\xff\xd9", "corrupt or truncated JPEG"),
    ],
)
def test_bad_bytes(data: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        wire.decode_image_proto(pb.Image(encoded=data))


def test_truncated_png_body() -> None:
    data = _encode(".png", 40, 40)
    with pytest.raises(InvalidArgument, match="corrupt or truncated PNG"):
        wire.decode_image_proto(pb.Image(encoded=data[: len(data) // 2]))


def test_empty_image_message() -> None:
    with pytest.raises(InvalidArgument, match="set `encoded`"):
        wire.decode_image_proto(pb.Image())


def test_uint8_tensor_round_trip_and_grey() -> None:
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    got = wire.decode_image_proto(wire.image_to_proto(rgb))
    assert not got.preprocessed and np.array_equal(got.array, rgb)
    grey = wire.decode_image_proto(wire.image_to_proto(rgb[..., 0]))
    assert grey.array.shape == (4, 5, 3) and np.array_equal(grey.array[..., 2], rgb[..., 0])


def test_float_tensor_is_preprocessed_input() -> None:
    x = np.random.default_rng(1).normal(size=(6, 7, 3)).astype(np.float32)
    got = wire.decode_image_proto(wire.image_to_proto(x.astype(np.float64)))
    assert got.preprocessed and got.pixels is None
    np.testing.assert_array_equal(got.array, x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor_refused(bad: float) -> None:
    x = np.zeros((4, 4, 3), np.float32)
    x[1, 2, 0] = bad
    with pytest.raises(InvalidArgument, match="1 values are NaN or Inf"):
        wire.decode_image_proto(wire.image_to_proto(x))


@pytest.mark.parametrize(
    "tensor,match",
    [
        (
            pb.Tensor(dtype="int64", shape=[2, 2, 3], data=b"\0" * 96),
            r"dtype 'int64' not allowed; allowed: \['uint8', 'float32'\]",
        ),
        (pb.Tensor(dtype="uint8", shape=[2, 2], data=b"\0" * 4), "has 2 dimensions, expected 3"),
        (pb.Tensor(dtype="uint8", shape=[2, 0, 3], data=b""), "empty or negative dimension"),
        (pb.Tensor(dtype="uint8", shape=[2, 2, 3], data=b"\0" * 11), "11 data bytes do not match"),
        (pb.Tensor(dtype="uint8", shape=[2, 2, 2], data=b"\0" * 8), "has 2 channels; allowed"),
        (pb.Tensor(dtype="uint8", shape=[5000, 5000, 3], data=b""), "25000000 pixels exceeds the limit"),
    ],
)
def test_bad_tensors(tensor: pb.Tensor, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        wire.decode_image_proto(pb.Image(tensor=tensor), max_pixels=1_000_000)


def test_images_to_proto_forms(tmp_path) -> None:
    png = encode_png(np.zeros((3, 3, 3), np.uint8))
    path = tmp_path / "a.png"
    path.write_bytes(png)
    batch = np.zeros((2, 3, 3, 3), np.uint8)
    assert len(wire.images_to_proto(batch)) == 2
    assert len(wire.images_to_proto(batch[0])) == 1
    assert [m.encoded for m in wire.images_to_proto([png, str(path), path])] == [png] * 3
    with pytest.raises(InvalidArgument, match="dtype int32 not supported"):
        wire.image_to_proto(np.zeros((3, 3, 3), np.int32))


def test_floatmap_round_trip() -> None:
    a = np.random.default_rng(2).normal(size=(3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(wire.floatmap_to_array(wire.array_to_floatmap(a)), a)
    with pytest.raises(InvalidArgument, match="carries 3 values"):
        wire.floatmap_to_array(pb.FloatMap(shape=[2, 2], values=[1, 2, 3]))


def test_floatmap_is_little_endian_float32_bytes_in_c_order() -> None:
    # Issue 9: maps were written value by value into `repeated float values` (2.7 ms for one
    # 224 x 224 heatmap); they go as the bytes of the array now, like Tensor.
    a = np.random.default_rng(3).normal(size=(5, 7)).astype(np.float64).T  # not C-contiguous, float64
    m = wire.array_to_floatmap(a)
    assert list(m.shape) == [7, 5] and len(m.values) == 0
    assert m.data == np.ascontiguousarray(a, "<f4").tobytes()
    assert struct.unpack("<f", m.data[4:8])[0] == np.float32(a[0, 1])  # C order, little-endian
    back = wire.floatmap_to_array(pb.FloatMap.FromString(m.SerializeToString()))
    assert back.dtype == np.float32 and back.flags.writeable
    np.testing.assert_array_equal(back, a.astype(np.float32))
    empty = wire.floatmap_to_array(wire.array_to_floatmap(np.zeros((0, 3), np.float32)))
    assert empty.shape == (0, 3)


def test_floatmap_of_an_old_server_is_read_from_values() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    old = pb.FloatMap(shape=[2, 3], values=a.ravel().tolist())
    np.testing.assert_array_equal(wire.floatmap_to_array(old), a)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(shape=[2, 2], data=b"\0" * 15), "15 data bytes do not match shape \\[2, 2\\] \\(16 bytes expected"),
        (dict(shape=[2, 2]), "0 data bytes do not match"),
        (dict(shape=[-1, 4], data=b"\0" * 16), "not allowed"),
        (dict(shape=[-2, -2], data=b"\0" * 16), "not allowed"),
        (dict(shape=[2**62, 2**62, 0]), "not allowed"),
        (dict(shape=[1] * 9, data=b"\0" * 4), "at most 8 dimensions"),
        (dict(shape=[2**31, 2**31], data=b"\0" * 16), "not allowed"),
        (dict(shape=[3], data=b"\0" * 12, values=[1.0]), None),  # data wins over values
    ],
)
def test_malformed_floatmaps_are_invalid_argument(fields: dict, match: str | None) -> None:
    m = pb.FloatMap(**fields)
    if match is None:
        np.testing.assert_array_equal(wire.floatmap_to_array(m), np.zeros(3, np.float32))
        return
    with pytest.raises(InvalidArgument, match=match):
        wire.floatmap_to_array(m, "the map")


def test_top_classes_and_predictions() -> None:
    scores = np.array([0.1, 0.5, 0.2, 0.5], np.float32)
    top = wire.top_classes(scores, 3, ["a", "b", "c", "d"])
    assert [(t.index, t.label) for t in top] == [(1, "b"), (3, "d"), (2, "c")]
    assert wire.top_classes(scores, 0, "abcd") == []
    resp = wire.predict_response_to_proto(np.stack([scores, scores[::-1]]), 1, "abcd", "m", 3)
    np.testing.assert_array_equal(wire.predictions_from_proto(resp), np.stack([scores, scores[::-1]]))
    assert [wire.top_from_proto(p)[0][:2] for p in resp.predictions] == [(1, "b"), (0, "a")]
    assert wire.model_from_proto(resp.model) == ("m", 3)
    top = wire.top_from_proto(wire.prediction_to_proto(np.array([0.1, 0.6, 0.05, 0.25]), 3, ["a", "b", "c"]))
    assert [(i, label) for i, label, _ in top] == [(1, "b"), (3, "3"), (0, "a")]  # index 3 has no name
    np.testing.assert_allclose([s for _, _, s in top], [0.6, 0.25, 0.1], rtol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_the_best_class_is_the_same_for_every_top_k(top_k) -> None:
    """The one best class (taken by argmax) is the head of the longer lists (a stable sort):
    ties go to the lower index, and NaN (a broken model) is never the best while a number is."""
    rng = np.random.default_rng(3)
    for scores in [
        np.array([0.1, 0.5, 0.2, 0.5]),
        np.array([np.nan, 0.2, 0.7, 0.7]),
        *rng.integers(0, 3, (20, 4)).astype(np.float32),
    ]:
        by_sort = sorted(range(4), key=lambda i: (np.isnan(scores[i]), -scores[i], i))
        assert [c.index for c in wire.top_classes(scores, top_k, "abcd")] == by_sort[:top_k]


def test_predict_scores_travel_as_one_map_of_bytes() -> None:
    # Issue 9: every class's score went value by value into each Prediction; they are one
    # (images, classes) float map of bytes now, and each Prediction keeps only its top classes.
    scores = np.random.default_rng(4).random((3, 1000), dtype=np.float32)
    resp = pb.PredictResponse.FromString(
        wire.predict_response_to_proto(scores, 2, [str(i) for i in range(1000)]).SerializeToString()
    )
    assert list(resp.scores.shape) == [3, 1000] and resp.scores.data == scores.astype("<f4").tobytes()
    assert all(len(p.scores) == 0 and len(p.top) == 2 for p in resp.predictions)
    np.testing.assert_array_equal(wire.predictions_from_proto(resp), scores)
    with pytest.raises(InvalidArgument, match=r"scores of shape \[3, 1000\] for 2 predictions"):
        wire.predictions_from_proto(pb.PredictResponse(predictions=resp.predictions[:2], scores=resp.scores))


def test_predictions_of_an_old_server_are_read_from_each_prediction() -> None:
    scores = np.array([0.1, 0.6, 0.05, 0.25], np.float32)
    old = pb.Prediction(scores=scores.tolist(), top=[pb.ClassScore(index=1, label="b", score=0.6)])
    resp = pb.PredictResponse(model=wire.model_spec("m", 2), predictions=[old, old])
    np.testing.assert_array_equal(wire.predictions_from_proto(resp), np.stack([scores, scores]))
    assert wire.top_from_proto(resp.predictions[0]) == [(1, "b", pytest.approx(0.6))]
    assert wire.model_spec("m", None).version == 0  # 0: the newest version


def test_heatmap_png_decodes_within_one_step_of_the_float_heatmap() -> None:
    rng = np.random.default_rng(6)
    heat = rng.random((48, 80), dtype=np.float32)
    heat[0, :4] = [0.0, 1.0, 0.5 / 255, 254.5 / 255]
    png = wire.heatmap_to_png(heat)
    assert wire.encoded_size(png) == ("png", 80, 48)
    gray = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert gray.dtype == np.uint8 and gray.shape == (48, 80)  # 8-bit grayscale
    np.testing.assert_array_equal(gray, np.rint(heat * 255).astype(np.uint8))
    back = wire.png_to_heatmap(png)
    assert back.dtype == np.float32 and back.shape == heat.shape
    assert float(np.abs(back - heat).max()) <= 0.5 / 255 + 1e-7
    assert back.min() >= 0.0 and back.max() <= 1.0


@pytest.mark.parametrize(
    "data,match",
    [
        (encode_png(np.zeros((4, 4, 3), np.uint8)), "expected an 8-bit grayscale PNG"),
        (_encode(".jpg", 8, 8), "a JPEG image; expected"),
        (_png_bomb(100000, 100000), "exceeds the limit"),
        (b"nothing", "not an image"),
    ],
)
def test_bad_heatmap_png_is_invalid_argument(data: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        wire.png_to_heatmap(data)


def test_scale_box_by_hand_on_a_non_square_image() -> None:
    # 64 x 64 model input, 200 x 120 (width x height) image: x scales by 200/64 = 3.125,
    # y by 120/64 = 1.875; the box covers whole pixels: floor at the start, ceil at the end.
    assert wire.scale_box((10, 20, 33, 50), (64, 64), (120, 200)) == (31, 37, 104, 94)
    # 0 * 3.125 = 0; 64 * 3.125 = 200: a box over the whole input covers the whole image.
    assert wire.scale_box((0, 0, 64, 64), (64, 64), (120, 200)) == (0, 0, 200, 120)
    # exact arithmetic: 32 * 200 / 64 = 100 is not rounded up to 101
    assert wire.scale_box((32, 32, 32, 32), (64, 64), (120, 200)) == (100, 60, 100, 60)
    assert wire.scale_box((3, 4, 5, 6), (64, 64), (64, 64)) == (3, 4, 5, 6)


def test_explanation_from_proto_at_the_image_size() -> None:
    heat = np.random.default_rng(7).random((64, 64), dtype=np.float32)
    m = pb.Explanation(
        method="gradcam",
        heatmap=wire.floatmap_fields(heat),
        box=pb.Box(x0=10, y0=20, x1=33, y1=50),
        image_box=pb.Box(x0=31, y0=37, x1=104, y1=94),
    )
    at_input = wire.explanation_from_proto(m)
    assert at_input.box == (10, 20, 33, 50)
    np.testing.assert_array_equal(at_input.heatmap, heat)
    at_image = wire.explanation_from_proto(m, (120, 200))
    assert at_image.box == (31, 37, 104, 94) and at_image.heatmap.shape == (120, 200)
    np.testing.assert_array_equal(at_image.heatmap, cv2.resize(heat, (200, 120), interpolation=cv2.INTER_LINEAR))
    # a server without image_box: the box is scaled here, the same way
    m.ClearField("image_box")
    assert wire.explanation_from_proto(m, (120, 200)).box == (31, 37, 104, 94)
    m.ClearField("heatmap")
    with pytest.raises(InvalidArgument, match="no image_box"):
        wire.explanation_from_proto(m, (120, 200))
    # the heatmap from its PNG when the float map was not sent
    m.heatmap_png = wire.heatmap_to_png(heat)
    assert wire.explanation_from_proto(m).heatmap.shape == (64, 64)


def test_targets_to_proto() -> None:
    assert wire.targets_to_proto(None, 3) == []
    (one,) = wire.targets_to_proto("star", 3)
    assert [wire.target_from_proto(t) for t in one.targets] == ["star"]
    lists = wire.targets_to_proto([1, ["circle", 2]], 2)
    assert [[wire.target_from_proto(t) for t in tl.targets] for tl in lists] == [[1], ["circle", 2]]
    with pytest.raises(InvalidArgument, match="3 target entries for 2 images"):
        wire.targets_to_proto([1, 2, 3], 2)
