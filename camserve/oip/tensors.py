"""Open Inference Protocol tensors: datatypes, shapes and the three ways elements travel.

A :class:`Tensor` holds its elements as a numpy array of the tensor's shape (``BYTES``: an
object array of ``bytes``). Elements arrive and leave as

- *raw* bytes (gRPC ``raw_input_contents``/``raw_output_contents`` and the REST binary tensor
  data extension): flattened, row-major, little-endian; ``BYTES`` elements each a 4-byte
  little-endian length then the bytes (:func:`to_raw`, :func:`from_raw`);
- JSON ``data`` lists (REST), flat or nested (:func:`from_json`, :func:`to_json`); ``BYTES``
  elements are JSON strings;
- typed repeated fields (gRPC ``InferTensorContents``), read by the gRPC adapter with
  :func:`from_values`.

Every reader checks the datatype, the shape and that the number of elements (or bytes) agrees
with it, and says what was wrong and what is allowed.

>>> t = from_raw("x", "FP32", [1, 2], np.array([1, 2], "<f4").tobytes())
>>> t.array.tolist(), to_json(t)
([[1.0, 2.0]], [1.0, 2.0])
>>> from_raw("s", "BYTES", [2], serialize_bytes([b"ab", b""])).array.tolist()
[b'ab', b'']
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from camserve.errors import InvalidArgument

__all__ = [
    "DATATYPES",
    "MAX_DIMS",
    "Tensor",
    "check_shape",
    "deserialize_bytes",
    "from_json",
    "from_raw",
    "from_values",
    "serialize_bytes",
    "to_json",
    "to_raw",
]

#: Numeric datatypes of the protocol and their little-endian numpy dtypes (``BYTES`` aside).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
ALL_DATATYPES = (*DATATYPES, "BYTES")

#: The most dimensions a tensor may have.
MAX_DIMS = 8

_LENGTH = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One named tensor: ``array`` has the tensor's shape (``BYTES``: dtype object, bytes
    elements); ``parameters`` are the tensor's own (e.g. ``binary_data_size``)."""

    name: str
    datatype: str
    array: np.ndarray
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return [int(s) for s in self.array.shape]


def check_datatype(datatype: str, what: str) -> str:
    """``datatype`` when the protocol knows it, else InvalidArgument listing them.

    >>> check_datatype("FP32", "input 'images'")
    'FP32'
    >>> check_datatype("FLOAT", "input 'images'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    camserve.errors.InvalidArgument: input 'images': unknown datatype 'FLOAT'; the protocol's datatypes: [...]
    """
    if datatype not in ALL_DATATYPES:
        raise InvalidArgument(f"{what}: unknown datatype {datatype!r}; the protocol's datatypes: {list(ALL_DATATYPES)}")
    return datatype


def check_shape(shape: Iterable[Any], what: str, max_elements: int | None = None) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints (at most :data:`MAX_DIMS`; at most
    ``max_elements`` elements), else InvalidArgument.

    >>> check_shape([2, 3], "x")
    (2, 3)
    >>> check_shape([2, -1], "x")
    Traceback (most recent call last):
    ...
    camserve.errors.InvalidArgument: x: shape [2, -1] has a negative dimension; send the tensor's actual sizes
    """
    try:
        dims = list(shape)
    except TypeError:
        raise InvalidArgument(f"{what}: shape must be a list of integers, got {shape!r:.80}") from None
    if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims):
        raise InvalidArgument(f"{what}: shape must be a list of integers, got {dims!r:.80}")
    if len(dims) > MAX_DIMS:
        raise InvalidArgument(f"{what}: shape has {len(dims)} dimensions; at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{what}: shape {dims} has a negative dimension; send the tensor's actual sizes")
    count = math.prod(int(d) for d in dims)
    if max_elements is not None and count > max_elements:
        raise InvalidArgument(f"{what}: shape {dims} has {count} elements; at most {max_elements} are allowed")
    return tuple(int(d) for d in dims)


# ---------------------------------------------------------------------------- BYTES elements


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """``BYTES`` elements as raw contents: each a 4-byte little-endian length, then its bytes.

    >>> serialize_bytes([b"hi"])
    b'\\x02\\x00\\x00\\x00hi'
    """
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(data: bytes | memoryview, count: int, what: str = "tensor") -> list[bytes]:
    """``count`` length-prefixed elements read from ``data``, which they must fill exactly.

    >>> deserialize_bytes(b"\\x02\\x00\\x00\\x00hi\\x00\\x00\\x00\\x00", 2)
    [b'hi', b'']
    """
    view = memoryview(data)
    out: list[bytes] = []
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise InvalidArgument(
                f"{what}: BYTES contents end after {i} of {count} elements; each element is a 4-byte "
                "little-endian length followed by that many bytes"
            )
        (n,) = _LENGTH.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise InvalidArgument(
                f"{what}: BYTES element {i} declares {n} bytes but only {len(view) - pos} remain in the contents"
            )
        out.append(bytes(view[pos : pos + n]))
        pos += n
    if pos != len(view):
        raise InvalidArgument(
            f"{what}: {len(view) - pos} bytes left after the {count} BYTES elements of the shape; "
            "send exactly one length-prefixed element per element of the shape"
        )
    return out


def _object_array(elements: Sequence[bytes], shape: tuple[int, ...]) -> np.ndarray:
    a = np.empty(len(elements), dtype=object)
    a[:] = list(elements)
    return a.reshape(shape)


# ---------------------------------------------------------------------------- readers


def from_raw(
    name: str, datatype: str, shape: Iterable[Any], data: bytes | memoryview, max_elements: int | None = None
) -> Tensor:
    """A tensor from raw contents (viewed, not copied, for numeric datatypes)."""
    what = f"input {name!r}"
    check_datatype(datatype, what)
    dims = check_shape(shape, what, max_elements)
    count = math.prod(dims)
    if datatype == "BYTES":
        return Tensor(name, datatype, _object_array(deserialize_bytes(data, count, what), dims))
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise InvalidArgument(
            f"{what}: {len(data)} bytes of raw contents do not match shape {list(dims)} of {datatype} "
            f"({count * dtype.itemsize} bytes expected)"
        )
    return Tensor(name, datatype, np.frombuffer(data, dtype=dtype).reshape(dims))


def _flatten(data: Any, what: str) -> list[Any]:
    """A JSON ``data`` value (flat or nested lists) as one flat list."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):  # flat (a list further on is refused as an element)
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > MAX_DIMS:
                    raise InvalidArgument(f"{what}: data nested deeper than {MAX_DIMS} levels")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def from_values(name: str, datatype: str, shape: Iterable[Any], values: Sequence[Any]) -> Tensor:
    """A tensor from a flat sequence of elements (JSON numbers or strings, typed contents).

    >>> from_values("x", "INT32", [2, 1], [7, 8]).array.tolist()
    [[7], [8]]
    """
    what = f"input {name!r}"
    check_datatype(datatype, what)
    dims = check_shape(shape, what)
    count = math.prod(dims)
    if len(values) != count:
        raise InvalidArgument(f"{what}: {len(values)} elements do not match shape {list(dims)} ({count} expected)")
    if datatype == "BYTES":
        elements = []
        for v in values:
            if isinstance(v, str):
                elements.append(v.encode("utf-8"))
            elif isinstance(v, bytes | bytearray):
                elements.append(bytes(v))
            else:
                raise InvalidArgument(f"{what}: BYTES elements must be strings, got {type(v).__name__}")
        return Tensor(name, datatype, _object_array(elements, dims))
    dtype = DATATYPES[datatype]
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype) if dtype.kind == "f" else None
    limits = f" from {info.min} to {info.max}" if info is not None else ""
    expected = "true/false" if datatype == "BOOL" else "numbers" if dtype.kind == "f" else "integers"
    # numpy infers the elements' type in C: bool, int64 or float64 for clean lists, else str / object.
    try:
        a = np.asarray(values if isinstance(values, list) else list(values))
    except ValueError:  # e.g. a list among numbers
        raise InvalidArgument(f"{what}: {datatype} elements must be {expected}{limits}") from None
    if a.size and a.dtype.kind not in ("b" if datatype == "BOOL" else "iuf" if dtype.kind == "f" else "iu"):
        raise InvalidArgument(f"{what}: {datatype} elements must be {expected}{limits}")
    if a.size and dtype.kind in "iu" and (a.min() < info.min or a.max() > info.max):  # type: ignore[union-attr]
        raise InvalidArgument(f"{what}: an element is out of the range of {datatype}: allowed{limits}")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = a.astype(dtype.newbyteorder("="))
    if dtype.kind == "f" and a.size and not np.array_equal(np.isfinite(cast), np.isfinite(a)):
        raise InvalidArgument(f"{what}: an element is out of the range of {datatype}: allowed{limits}")
    a = cast
    return Tensor(name, datatype, a.reshape(dims))


def from_json(name: str, datatype: str, shape: Iterable[Any], data: Any) -> Tensor:
    """A tensor from a REST JSON ``data`` value (flat or nested lists).

    >>> from_json("x", "FP32", [2, 2], [[1, 2], [3, 4]]).array.tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    """
    return from_values(name, datatype, shape, _flatten(data, f"input {name!r}"))


# ---------------------------------------------------------------------------- writers


def to_raw(t: Tensor) -> bytes:
    """The tensor's raw contents.

    >>> to_raw(Tensor("x", "INT16", np.array([1, 258], "<i2")))
    b'\\x01\\x00\\x02\\x01'
    """
    if t.datatype == "BYTES":
        return serialize_bytes(t.array.reshape(-1).tolist())
    return np.ascontiguousarray(t.array, dtype=DATATYPES[t.datatype]).tobytes()


def to_json(t: Tensor) -> list[Any]:
    """The tensor's elements as a flat JSON list (``BYTES``: UTF-8 strings)."""
    flat = t.array.reshape(-1)
    if t.datatype == "BYTES":
        return [e.decode("utf-8", "replace") for e in flat.tolist()]
    return flat.tolist()
