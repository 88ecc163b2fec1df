"""The protobuf wire format below the message API (camserve.protowire): requests with their
image tensors' bytes detached must parse, once the bytes are put back, to exactly what the
whole request parses to (compared with protobuf's own parser, on generated, reordered,
duplicated and truncated messages), and answers built from pieces must parse to the message
protobuf builds."""

from __future__ import annotations

import random

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from camserve import protowire, wire
from camserve.proto import pb
from camserve.protowire import LEN, Pieces, detach_tensor_data, encode_varint, read_varint


def test_the_field_numbers_it_reads_are_the_protos() -> None:
    image = pb.Image.DESCRIPTOR.fields_by_name
    assert (image["encoded"].number, image["tensor"].number) == (protowire.IMAGE_ENCODED, protowire.IMAGE_TENSOR)
    assert pb.Tensor.DESCRIPTOR.fields_by_name["data"].number == protowire.TENSOR_DATA


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**31, 2**63 + 5, 2**64 - 1])
def test_varints_round_trip_and_match_protobuf(n: int) -> None:
    data = encode_varint(n)
    assert read_varint(data, 0, len(data)) == (n, len(data))
    assert pb.Tensor(shape=[n if n < 2**63 else n - 2**64]).SerializeToString() == b"\x12" + bytes([len(data)]) + data


def test_truncated_and_overlong_varints_are_refused() -> None:
    with pytest.raises(protowire.WireFormatError):
        read_varint(b"\x80\x80", 0, 2)
    with pytest.raises(protowire.WireFormatError):
        read_varint(b"\xff" * 11 + b"\x01", 0, 12)


# ---------------------------------------------------------------- requests


def _field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | LEN) + encode_varint(len(payload)) + payload


def _tensor_image(rng: random.Random, size: int) -> pb.Image:
    h, w = rng.randint(1, size), rng.randint(1, size)
    pixels = np.random.default_rng(rng.randint(0, 1 << 30)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return wire.image_to_proto(pixels)


def _random_request(rng: random.Random) -> tuple[bytes, list[str]]:
    """An ExplainRequest's bytes with its fields in a random order (tensor images, encoded ones,
    an unknown field, and images laid out as protobuf merges them), and each image's kind."""
    parts = [
        pb.ExplainRequest(model={"name": "m", "version": 3}).SerializeToString(),
        pb.ExplainRequest(methods=["gradcam", "cam"], top_k=2, return_heatmap=True).SerializeToString(),
        _field(99, b"an unknown field"),
    ]
    images = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["tensor", "tensor", "encoded", "tensor_then_encoded", "encoded_then_tensor", "two_tensors"])
        image = _tensor_image(rng, 40)
        tensor = image.tensor.SerializeToString()
        if kind == "tensor":
            payload = image.SerializeToString()
        elif kind == "encoded":
            payload = pb.Image(encoded=b"\x89PNG fake").SerializeToString()
        elif kind == "tensor_then_encoded":
            payload = _field(2, tensor) + _field(1, b"png")
        elif kind == "encoded_then_tensor":
            payload = _field(1, b"png") + _field(2, tensor)
        else:  # protobuf merges the two tensors: the shapes concatenate, the last data wins
            payload = _field(2, tensor) + _field(2, _tensor_image(rng, 40).tensor.SerializeToString())
        images.append((kind, _field(2, payload)))
    rng.shuffle(parts)
    at = 0
    for _kind, field in images:  # among the other fields, the images in their order
        at = rng.randint(at, len(parts))
        parts.insert(at, field)
        at += 1
    return b"".join(parts), [kind for kind, _ in images]


def _put_back(lean: bytes, views: list[memoryview | None]) -> pb.ExplainRequest:
    request = pb.ExplainRequest.FromString(lean)
    for image, view in zip(request.images, views):
        if view is not None:
            assert image.tensor.data == b""
            image.tensor.data = bytes(view)
    return request


@pytest.mark.parametrize("seed", range(40))
def test_detached_requests_parse_to_what_the_whole_request_parses_to(seed: int) -> None:
    data, kinds = _random_request(random.Random(seed))
    expected = pb.ExplainRequest.FromString(data)
    split = detach_tensor_data(data, image_field=2)
    if split is None:  # nothing to detach: no image is one plain tensor
        assert "tensor" not in kinds
        return
    lean, views = split
    assert [v is not None for v in views] == [k == "tensor" for k in kinds]
    assert _put_back(lean, views) == expected
    for view, image in zip(views, expected.images):
        if view is not None:  # a view of the request's own bytes, not a copy
            assert view.obj is data and bytes(view) == image.tensor.data
    assert len(lean) < len(data) - sum(v.nbytes for v in views if v is not None) + 64


def test_only_plain_tensor_images_are_detached() -> None:
    rng = random.Random(7)
    plain, other = _tensor_image(rng, 8), _tensor_image(rng, 8)
    tensor, other_tensor = plain.tensor.SerializeToString(), other.tensor.SerializeToString()
    data = b"".join(
        [
            _field(2, plain.SerializeToString()),
            _field(2, _field(1, b"png") + _field(2, tensor)),  # oneof: the tensor wins, left to the parser
            _field(2, _field(2, tensor) + _field(2, other_tensor)),  # merged tensors
            _field(2, _field(7, b"unknown") + _field(2, tensor)),  # an unknown field beside: kept
        ]
    )
    lean, views = detach_tensor_data(data, image_field=2)
    assert [v is not None for v in views] == [True, False, False, True]
    assert b"unknown" in lean and _put_back(lean, views) == pb.ExplainRequest.FromString(data)


def test_a_single_image_field_sent_twice_is_left_to_the_parser() -> None:
    image = _tensor_image(random.Random(1), 8).SerializeToString()
    once = _field(2, image)
    assert detach_tensor_data(once, image_field=2, repeated=False) is not None
    assert detach_tensor_data(once + once, image_field=2, repeated=False) is None  # protobuf merges them


def test_small_requests_are_left_whole() -> None:
    data = pb.PredictRequest(images=[_tensor_image(random.Random(2), 8)]).SerializeToString()
    detached = detach_tensor_data(data, image_field=2)
    assert detached is not None
    assert detach_tensor_data(data, image_field=2, min_bytes=detached[1][0].nbytes + 1) is None


def test_every_truncation_either_is_refused_or_parses_as_protobuf_parses_it() -> None:
    data = pb.ExplainRequest(
        model={"name": "m"}, images=[_tensor_image(random.Random(3), 6)] * 2, methods=["gradcam"]
    ).SerializeToString()
    for end in range(len(data) + 1):
        cut = data[:end]
        split = detach_tensor_data(cut, image_field=2)
        try:
            expected = pb.ExplainRequest.FromString(cut)
        except DecodeError:
            assert split is None, end  # malformed: left to the parser, whose error names it
            continue
        if split is not None:
            assert _put_back(*split) == expected, end


# ---------------------------------------------------------------- answers


def test_pieces_join_nested_messages_with_their_lengths() -> None:
    heat = np.arange(40_000, dtype=np.float32).reshape(200, 200)  # a length over one varint byte
    floatmap = Pieces()
    floatmap.raw(pb.FloatMap(shape=heat.shape).SerializeToString())
    floatmap.bytes_field(3, memoryview(heat.reshape(-1)).cast("B"))
    explanation = Pieces()
    explanation.raw(pb.Explanation(method="cam", score=0.5).SerializeToString())
    explanation.message_field(6, floatmap)
    data = explanation.join()
    assert len(data) == explanation.size
    expected = pb.Explanation(method="cam", score=0.5, heatmap=wire.array_to_floatmap(heat))
    assert pb.Explanation.FromString(data) == expected
    assert pb.Explanation.DESCRIPTOR.fields_by_name["heatmap"].number == 6
