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


def test_top_classes_and_predictions() -> None:
    scores = np.array([0.1, 0.5, 0.2, 0.5], np.float32)
    top = wire.top_classes(scores, 3, ["a", "b", "c", "d"])
    assert [(t.index, t.label) for t in top] == [(1, "b"), (3, "d"), (2, "c")]
    resp = pb.PredictResponse(predictions=[wire.prediction_to_proto(scores, 1, "abcd")] * 2)
    np.testing.assert_array_equal(wire.predictions_from_proto(resp), np.stack([scores, scores]))


def test_targets_to_proto() -> None:
    assert wire.targets_to_proto(None, 3) == []
    (one,) = wire.targets_to_proto("star", 3)
    assert [wire.target_from_proto(t) for t in one.targets] == ["star"]
    lists = wire.targets_to_proto([1, ["circle", 2]], 2)
    assert [[wire.target_from_proto(t) for t in tl.targets] for tl in lists] == [[1], ["circle", 2]]
    with pytest.raises(InvalidArgument, match="3 target entries for 2 images"):
        wire.targets_to_proto([1, 2, 3], 2)


def test_prediction_round_trip_keeps_scores_and_top_classes() -> None:
    scores = np.array([0.1, 0.6, 0.05, 0.25], np.float32)
    msg = wire.prediction_to_proto(scores, top_k=3, class_names=["a", "b", "c"])
    top = wire.top_from_proto(msg)
    assert [(i, label) for i, label, _ in top] == [(1, "b"), (3, "3"), (0, "a")]  # index 3 has no name
    np.testing.assert_allclose([s for _, _, s in top], [0.6, 0.25, 0.1], rtol=1e-6)
    resp = pb.PredictResponse(model=wire.model_spec("m", 2), predictions=[msg, msg])
    np.testing.assert_array_equal(wire.predictions_from_proto(resp), np.stack([scores, scores]))
    assert wire.model_from_proto(resp.model) == ("m", 2)
    assert wire.model_spec("m", None).version == 0  # 0: the newest version
