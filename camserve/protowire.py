"""The protobuf wire format, where the server's hot path works below the message API: large
bytes fields are not copied through messages.

- Requests: :func:`detach_tensor_data` takes the raw images' tensor bytes out of a serialized
  request before it is parsed, and hands them back as views of the request's bytes. Parsing a
  message copies every bytes field into the message, and reading the field copies it out again:
  two copies of each image (150 KB for a 224 px RGB image) saved per request.
- Answers: :class:`Pieces` builds a message's bytes from pieces (protobuf-serialized parts,
  nested messages, buffers such as numpy arrays), joined once, so a float map is copied once
  into the answer instead of into ``bytes``, into the message and out again.

Only the wire format's documented rules are used (https://protobuf.dev/programming-guides/encoding/):
fields may come in any order and a parser reads them all; a message field that appears twice
is merged, a bytes field that appears twice keeps the last. Layouts where those rules would
matter (an image's ``tensor`` or ``data`` twice, an image that also has ``encoded``) are left
to the parser, as is anything malformed (its error then names the problem).

>>> p = Pieces()
>>> p.varint_field(1, 150)
>>> p.bytes_field(2, b"hi")
>>> p.join()
b'\\x08\\x96\\x01\\x12\\x02hi'
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from camserve.errors import InvalidArgument

__all__ = ["Pieces", "WireFormatError", "detach_tensor_data", "encode_varint", "fields", "read_varint"]

#: Wire types (the low 3 bits of a field's tag).
VARINT, I64, LEN, I32 = 0, 1, 2, 5
#: The fields of camserve.v1.Image and Tensor this module reads (checked against the
#: generated descriptors in the tests).
IMAGE_ENCODED, IMAGE_TENSOR, TENSOR_DATA = 1, 2, 3

Buffer = bytes | bytearray | memoryview


class WireFormatError(InvalidArgument):
    """The bytes are not a well-formed protobuf message."""


def encode_varint(n: int) -> bytes:
    """``n`` (0 ≤ n < 2**64) as a protobuf varint.

    >>> encode_varint(1), encode_varint(300)
    (b'\\x01', b'\\xac\\x02')
    """
    if 0 <= n < 0x80:
        return _ONE_BYTE[n]
    if 0 <= n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if 0 <= n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _len_header(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field."""
    tag = number << 3 | LEN
    return (_ONE_BYTE[tag] if tag < 0x80 else encode_varint(tag)) + (
        _ONE_BYTE[length] if length < 0x80 else encode_varint(length)
    )


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``; WireFormatError when it runs past
    ``end`` or is longer than 10 bytes.

    >>> read_varint(b"\\xac\\x02", 0, 2)
    (300, 2)
    """
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def fields(buf: Buffer, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """The fields of the message in ``buf[start:end]``: (number, wire type, start of the field,
    start of its value, end of its value). A LEN field's value is its payload (after the
    length); groups (wire types 3 and 4) and malformed bytes raise WireFormatError.

    >>> [f[:2] for f in fields(b"\\x08\\x01\\x12\\x02hi")]
    [(1, 0), (2, 2)]
    """
    end = len(buf) if end is None else end
    pos = start
    while pos < end:
        field_start = pos
        tag = buf[pos]
        if tag < 0x80:  # the usual one-byte tag, read inline (this loop is on the request path)
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise WireFormatError("field number 0")
        if wire_type == VARINT:
            _, value_end = read_varint(buf, pos, end)
        elif wire_type == LEN:
            length, pos = read_varint(buf, pos, end)
            value_end = pos + length
        elif wire_type == I64:
            value_end = pos + 8
        elif wire_type == I32:
            value_end = pos + 4
        else:
            raise WireFormatError(f"wire type {wire_type} not supported")
        if value_end > end:
            raise WireFormatError("a field runs past the end of its message")
        yield number, wire_type, field_start, pos, value_end
        pos = value_end


class Pieces:
    """A message's serialized bytes, built from pieces and joined once (:meth:`join`): bytes
    already serialized by protobuf (:meth:`raw`), length-delimited fields whose payload is any
    buffer (a numpy array's memory is not copied until the join), and nested messages that
    are themselves Pieces. Fields may come in any order (parsers read them all).

    >>> inner = Pieces(); inner.bytes_field(3, memoryview(b"abc"))
    >>> outer = Pieces(); outer.message_field(5, inner); outer.raw(b"\\x08\\x07")
    >>> outer.join()
    b'*\\x05\\x1a\\x03abc\\x08\\x07'
    """

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.size = 0

    def raw(self, data: Buffer) -> None:
        """Bytes of whole fields, e.g. a message's ``SerializeToString()`` (a one-dimensional
        byte buffer: ``len`` is its size)."""
        self.parts.append(data)
        self.size += len(data)

    def varint_field(self, number: int, value: int) -> None:
        self.raw(encode_varint(number << 3 | VARINT) + encode_varint(value))

    def bytes_field(self, number: int, data: Buffer) -> None:
        """A bytes (or string) field holding ``data`` (a one-dimensional byte buffer, e.g. a
        numpy array's ``data.cast("B")``, kept by reference until :meth:`join`)."""
        length = len(data)
        header = _len_header(number, length)
        self.parts += (header, data)
        self.size += len(header) + length

    def message_field(self, number: int, message: Pieces) -> None:
        """A nested message field holding ``message`` (its pieces are taken over)."""
        header = _len_header(number, message.size)
        self.parts.append(header)
        self.parts += message.parts
        self.size += len(header) + message.size

    def join(self) -> bytes:
        """The serialized message."""
        return b"".join(self.parts)


def _tensor_without_data(buf: bytes, start: int, end: int) -> tuple[bytes, memoryview] | None:
    """A Tensor's fields but ``data``, and a view of ``data``; None unless it has exactly one."""
    kept = bytearray()
    data: memoryview | None = None
    for number, wire_type, field_start, value_start, value_end in fields(buf, start, end):
        if number == TENSOR_DATA and wire_type == LEN:
            if data is not None:
                return None
            data = memoryview(buf)[value_start:value_end]
        else:
            kept += buf[field_start:value_end]
    return None if data is None else (bytes(kept), data)


def _image_without_data(buf: bytes, start: int, end: int) -> tuple[bytes, memoryview] | None:
    """An Image's bytes without its tensor's ``data``, and a view of that data; None unless the
    image has exactly one ``tensor`` field (with one ``data``) and no ``encoded``."""
    found: tuple[int, int, int] | None = None
    for number, wire_type, field_start, value_start, value_end in fields(buf, start, end):
        if number == IMAGE_ENCODED or (number == IMAGE_TENSOR and (found is not None or wire_type != LEN)):
            return None
        if number == IMAGE_TENSOR:
            found = (field_start, value_start, value_end)
    if found is None:
        return None
    field_start, value_start, value_end = found
    tensor = _tensor_without_data(buf, value_start, value_end)
    if tensor is None:
        return None
    kept, data = tensor
    head = buf[start:field_start]  # the image's other fields (unknown ones), kept as sent
    tail = buf[value_end:end]
    return head + _len_header(IMAGE_TENSOR, len(kept)) + kept + tail, data


def detach_tensor_data(
    data: bytes, image_field: int, *, repeated: bool = True, min_bytes: int = 0
) -> tuple[bytes, list[memoryview | None]] | None:
    """Split a serialized request (``data``) whose field ``image_field`` holds camserve.v1.Image
    messages (``repeated``, or one) into the request without its images' tensor ``data`` and,
    per image in order, a view of that data in ``data`` (None for an image left as it is: an
    encoded one, or one in a layout this scan leaves to the parser).

    None when less than ``min_bytes`` of tensor data would be detached, when a single image
    field appears more than once (protobuf merges them), or when ``data`` is malformed: parse
    ``data`` itself then.

    >>> from camserve.proto import pb
    >>> request = pb.PredictRequest(images=[{"tensor": {"dtype": "uint8", "shape": [1, 2, 1], "data": b"ab"}}])
    >>> lean, views = detach_tensor_data(request.SerializeToString(), image_field=2)
    >>> pb.PredictRequest.FromString(lean).images[0].tensor.data, bytes(views[0])
    (b'', b'ab')
    """
    try:
        out = Pieces()
        views: list[memoryview | None] = []
        detached = 0
        for number, wire_type, field_start, value_start, value_end in fields(data):
            if number != image_field or wire_type != LEN:
                out.raw(memoryview(data)[field_start:value_end])
                continue
            if views and not repeated:
                return None
            image = _image_without_data(data, value_start, value_end)
            if image is None:
                out.raw(memoryview(data)[field_start:value_end])
                views.append(None)
                continue
            lean_image, view = image
            out.bytes_field(image_field, lean_image)
            views.append(view)
            detached += view.nbytes
    except WireFormatError:
        return None
    if detached == 0 or detached < min_bytes:
        return None
    return out.join(), views
