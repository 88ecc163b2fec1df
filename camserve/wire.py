"""Conversions between the wire messages (``camserve.v1``) and numpy / library objects.

Shared by the server and the client so that both sides agree byte for byte. Images are
checked before they are decoded: the pixel count declared in a PNG / JPEG / BMP / WebP
header is compared with the allowed maximum first, so a small file that declares a giant
image (a decompression bomb) is refused without allocating it.

>>> msg = image_to_proto(np.zeros((4, 5, 3), np.uint8))
>>> decode_image_proto(msg, max_pixels=100).array.shape
(4, 5, 3)
>>> floatmap_to_array(array_to_floatmap(np.eye(2, dtype=np.float32))).tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from camserve.errors import InvalidArgument
from camserve.imaging import ImageError, decode_image, require_format
from camserve.proto import pb

if TYPE_CHECKING:
    from camserve.explanation import Explanation

#: What a caller may pass as one image.
ImageLike: TypeAlias = np.ndarray | bytes | bytearray | memoryview | str | Path

#: Tensor dtypes accepted on the wire and what they mean.
TENSOR_DTYPES = {
    "uint8": "RGB (or grey / RGBA) pixels, shape (H, W, C), treated like a decoded image",
    "float32": "an already preprocessed model input, shape (H, W, C)",
}

DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclasses.dataclass(frozen=True)
class WireImage:
    """A decoded image: ``pixels`` RGB uint8 (H, W, 3) when it came as pixels (encoded or a
    uint8 tensor), else None; ``array`` is what the model pipeline continues with: the same
    pixels, or the float32 (H, W, C) preprocessed input."""

    array: np.ndarray
    preprocessed: bool

    @property
    def pixels(self) -> np.ndarray | None:
        return None if self.preprocessed else self.array


# ------------------------------------------------------------------ encoded headers


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return w, h


# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) are not SOFs.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            return None  # a marker must start here
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            continue  # stand-alone markers
        if marker in (0xD9, 0xDA):
            return None  # end of image / start of scan before any frame header
        if i + 2 > n:
            return None
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if i + 7 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 3 : i + 7])
            return w, h
        i += length
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # BITMAPCOREHEADER (OS/2): unsigned 16-bit width and height
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    return abs(w), abs(h)  # negative height = top-down rows


def _webp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 30:
        return None
    chunk, body = data[12:16], data[20:]
    if chunk == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", body[6:10])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and body[0] == 0x2F:
        (bits,) = struct.unpack("<I", body[1:5])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(body[4:7], "little") + 1
        h = int.from_bytes(body[7:10], "little") + 1
        return w, h
    return None


_HEADER_READERS = {"png": _png_size, "jpeg": _jpeg_size, "bmp": _bmp_size, "webp": _webp_size}


def encoded_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) as declared by an encoded image's header, without decoding.

    Raises :class:`~camserve.imaging.ImageError` for non-images and unreadable headers.

    >>> import camserve.imaging as im
    >>> encoded_size(im.encode_png(np.zeros((3, 7, 3), np.uint8)))
    ('png', 7, 3)
    """
    fmt = require_format(data)
    size = _HEADER_READERS[fmt](data)
    if size is None:
        raise ImageError(f"corrupt or truncated {fmt.upper()} ({len(data)} bytes): no readable size in its header")
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{fmt.upper()} header declares an empty image ({w}x{h})")
    return fmt, w, h


def check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    """InvalidArgument when width x height exceeds ``max_pixels``."""
    if width * height > max_pixels:
        raise ImageError(
            f"{what} of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels per image"
        )


# ------------------------------------------------------------------ tensors


def array_to_tensor(a: np.ndarray) -> pb.Tensor:
    """A numpy array as a wire Tensor (little-endian, C order)."""
    a = np.ascontiguousarray(a)
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    return pb.Tensor(dtype=dt.name, shape=list(a.shape), data=a.astype(dt, copy=False).tobytes())


def tensor_to_array(
    t: pb.Tensor,
    *,
    dtypes: Iterable[str] = tuple(TENSOR_DTYPES),
    ndim: int | None = None,
    max_elements: int | None = None,
    what: str = "tensor",
) -> np.ndarray:
    """Validate and view a wire Tensor as numpy; errors say what was wrong and what is allowed.

    NaN and Inf are refused in float tensors.
    """
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise InvalidArgument(f"{what}: dtype {t.dtype!r} not allowed; allowed: {list(dtypes)}")
    shape = tuple(int(s) for s in t.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{what}: shape {list(shape)} has {len(shape)} dimensions, expected {ndim}")
    if any(s <= 0 for s in shape):
        raise InvalidArgument(f"{what}: shape {list(shape)} has an empty or negative dimension")
    dtype = np.dtype(t.dtype).newbyteorder("<")
    count = math.prod(shape)  # Python ints: an int64 product could wrap around to a small number
    if max_elements is not None and count > max_elements:
        raise InvalidArgument(f"{what}: {count} elements exceed the limit of {max_elements}")
    if len(t.data) != count * dtype.itemsize:
        raise InvalidArgument(
            f"{what}: {len(t.data)} data bytes do not match shape {list(shape)} of {t.dtype} "
            f"({count * dtype.itemsize} bytes expected)"
        )
    a = np.frombuffer(t.data, dtype=dtype).reshape(shape)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise InvalidArgument(f"{what}: {bad} values are NaN or Inf; only finite values are allowed")
    return a.astype(dtype.newbyteorder("="), copy=False)


# ------------------------------------------------------------------ images


def decode_image_proto(msg: pb.Image, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image") -> WireImage:
    """Check and decode one wire Image.

    Encoded bytes: the header's width x height is checked against ``max_pixels`` before
    decoding. Tensors: see :data:`TENSOR_DTYPES`. Raises InvalidArgument (ImageError).
    """
    source = msg.WhichOneof("source")
    if source is None:
        raise ImageError(f"{what} is empty: set `encoded` (PNG, JPEG, BMP, WebP bytes) or `tensor`")
    if source == "encoded":
        data = msg.encoded
        try:
            fmt, w, h = encoded_size(data)
        except ImageError as e:
            raise ImageError(f"{what}: {e}") from None
        check_pixels(w, h, max_pixels, f"{what} ({fmt.upper()} header)")
        try:
            rgb = decode_image(data)
        except ImageError as e:
            raise ImageError(f"{what}: {e}") from None
        # The header may lie (or EXIF may rotate); the decoded size is checked too.
        check_pixels(rgb.shape[1], rgb.shape[0], max_pixels, f"{what} (decoded)")
        return WireImage(rgb, preprocessed=False)
    t = msg.tensor
    if len(t.shape) == 3 and t.shape[0] > 0 and t.shape[1] > 0:
        check_pixels(int(t.shape[1]), int(t.shape[0]), max_pixels, f"{what} (tensor)")
    a = tensor_to_array(t, ndim=3, what=f"{what} tensor (H, W, C)")
    if a.dtype == np.uint8:
        c = a.shape[2]
        if c == 1:
            a = np.repeat(a, 3, axis=2)
        elif c == 4:
            a = a[..., :3]
        elif c != 3:
            raise ImageError(f"{what}: uint8 tensor has {c} channels; allowed: 1 (grey), 3 (RGB), 4 (RGBA)")
        return WireImage(np.ascontiguousarray(a), preprocessed=False)
    return WireImage(a, preprocessed=True)


def image_to_proto(image: ImageLike) -> pb.Image:
    """One image for the wire: encoded bytes and file paths go as they are (the server
    decodes them); uint8 arrays (H, W, C) as RGB pixel tensors; float arrays (H, W, C) as
    already preprocessed float32 model inputs.

    >>> image_to_proto(b"\\x89PNG...").WhichOneof("source")
    'encoded'
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, (str, Path)):
        return pb.Image(encoded=Path(image).read_bytes())
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise InvalidArgument(f"an image array must be (H, W, C) or (H, W); got shape {a.shape}")
    if a.dtype == np.uint8:
        return pb.Image(tensor=array_to_tensor(a))
    if a.dtype.kind == "f":
        return pb.Image(tensor=array_to_tensor(a.astype(np.float32, copy=False)))
    raise InvalidArgument(f"image array dtype {a.dtype} not supported; use uint8 pixels or float32 preprocessed inputs")


def images_to_proto(images: ImageLike | Sequence[ImageLike]) -> list[pb.Image]:
    """Several images: a batch array (N, H, W, C), one array (H, W, C), one path / bytes, or a
    sequence of any of these."""
    if isinstance(images, (bytes, bytearray, memoryview, str, Path)):
        return [image_to_proto(images)]
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            return [image_to_proto(a) for a in images]
        return [image_to_proto(images)]
    return [image_to_proto(i) for i in images]


# ------------------------------------------------------------------ float maps


def array_to_floatmap(a: np.ndarray) -> pb.FloatMap:
    """A float array as a FloatMap (float32 values in C order plus the shape)."""
    a = np.asarray(a, np.float32)
    m = pb.FloatMap(shape=list(a.shape))
    m.values.extend(a.ravel().tolist())
    return m


def floatmap_to_array(m: pb.FloatMap) -> np.ndarray:
    """A FloatMap back to a float32 array; InvalidArgument when the sizes disagree."""
    shape = tuple(int(s) for s in m.shape)
    values = np.asarray(m.values, np.float32)
    if int(np.prod(shape, dtype=np.int64)) != values.size:
        raise InvalidArgument(f"FloatMap of shape {list(shape)} carries {values.size} values")
    return values.reshape(shape)


# ------------------------------------------------------------------ models


def model_spec(name: str, version: int | None = 0) -> pb.ModelSpec:
    """The ModelSpec naming ``name`` at ``version`` (0 or None: the newest).

    >>> model_spec("shapes_gap", None)
    name: "shapes_gap"
    <BLANKLINE>
    """
    return pb.ModelSpec(name=name, version=int(version or 0))


def model_from_proto(spec: pb.ModelSpec) -> tuple[str, int]:
    """(name, version) of a ModelSpec.

    >>> model_from_proto(model_spec("shapes_gap", 2))
    ('shapes_gap', 2)
    """
    return spec.name, int(spec.version)


# ------------------------------------------------------------------ predictions


def top_classes(scores: np.ndarray, top_k: int, class_names: Sequence[str]) -> list[pb.ClassScore]:
    """The ``top_k`` best classes of one score vector, best first (ties: lower index first)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:top_k]
    return [
        pb.ClassScore(index=int(i), label=class_names[i] if i < len(class_names) else str(i), score=float(scores[i]))
        for i in order
    ]


def top_from_proto(p: pb.Prediction) -> list[tuple[int, str, float]]:
    """The (index, label, score) best classes of a wire Prediction, as :func:`top_classes` made them."""
    return [(int(c.index), c.label, float(c.score)) for c in p.top]


def prediction_to_proto(scores: np.ndarray, top_k: int, class_names: Sequence[str]) -> pb.Prediction:
    p = pb.Prediction(top=top_classes(scores, top_k, class_names))
    p.scores.extend(np.asarray(scores, np.float32).tolist())
    return p


def predictions_from_proto(resp: pb.PredictResponse) -> np.ndarray:
    """(N, classes) float32 scores of a PredictResponse."""
    if not resp.predictions:
        return np.zeros((0, 0), np.float32)
    return np.stack([np.asarray(p.scores, np.float32) for p in resp.predictions])


# ------------------------------------------------------------------ explanations


def explanation_to_proto(
    e: Explanation,
    *,
    raw: bool = False,
    heatmap: bool = False,
    overlay_png: bytes | None = None,
) -> pb.Explanation:
    """One library Explanation as a wire message; maps only when asked for."""
    m = pb.Explanation(method=e.method, class_index=int(e.class_index), label=str(e.label), score=float(e.score))
    if raw and e.raw is not None:
        m.raw.CopyFrom(array_to_floatmap(e.raw))
    if heatmap and e.heatmap is not None:
        m.heatmap.CopyFrom(array_to_floatmap(e.heatmap))
    if e.box is not None:
        x0, y0, x1, y1 = (int(v) for v in e.box)
        m.box.CopyFrom(pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    if overlay_png:
        m.overlay_png = overlay_png
    return m


def explanation_from_proto(m: pb.Explanation) -> Explanation:
    """A wire Explanation as the library's :class:`~camserve.explanation.Explanation`;
    maps that were not sent are None. The overlay PNG, when sent, stays in ``m.overlay_png``."""
    from camserve.explanation import Explanation

    return Explanation(**_explanation_fields(m))


def _explanation_fields(m: pb.Explanation) -> dict[str, Any]:
    box = (m.box.x0, m.box.y0, m.box.x1, m.box.y1) if m.HasField("box") else None
    return dict(
        method=m.method,
        class_index=int(m.class_index),
        label=m.label,
        score=float(m.score),
        raw=floatmap_to_array(m.raw) if m.HasField("raw") else None,
        heatmap=floatmap_to_array(m.heatmap) if m.HasField("heatmap") else None,
        box=box,
    )


def target_from_proto(t: pb.Target) -> int | str:
    """A wire Target as an int index or a class name."""
    kind = t.WhichOneof("target")
    if kind is None:
        raise InvalidArgument("empty target: set `index` or `name`")
    return int(t.index) if kind == "index" else str(t.name)


def target_to_proto(t: int | np.integer | str) -> pb.Target:
    """A class index or class name as a wire Target."""
    if isinstance(t, (int, np.integer)):
        return pb.Target(index=int(t))
    if isinstance(t, str):
        return pb.Target(name=t)
    raise InvalidArgument(f"target {t!r}: use a class index (int) or a class name (str)")


def targets_to_proto(targets: Any, n_images: int) -> list[pb.TargetList]:
    """Targets as the library takes them (None; one int / name for all images; or per image an
    int, a name or a list of them) as wire TargetLists (one per image)."""
    if targets is None:
        return []
    if isinstance(targets, (int, np.integer, str)):
        return [pb.TargetList(targets=[target_to_proto(targets)])]
    targets = list(targets)
    if len(targets) != n_images:
        raise InvalidArgument(f"{len(targets)} target entries for {n_images} images: give one per image")
    out = []
    for t in targets:
        ts = t if isinstance(t, (list, tuple)) else [t]
        out.append(pb.TargetList(targets=[target_to_proto(x) for x in ts]))
    return out
