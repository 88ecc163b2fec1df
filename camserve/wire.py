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

Float maps (heatmaps, raw maps, dense scores, Predict's scores) travel as little-endian
float32 bytes with their shape, written and read without per-element work; the repeated
``values`` field of servers before that is still read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import cv2
import numpy as np

# Re-exported: callers read image sizes and heatmap PNGs through the wire module.
from camserve.encoded_images import (
    DEFAULT_MAX_PIXELS,
    check_pixels,
    encoded_size,
    heatmap_to_png,
    png_to_heatmap,
)
from camserve.errors import InvalidArgument
from camserve.imaging import ImageError, decode_image, scale_box  # scale_box: re-exported
from camserve.proto import pb
from camserve.wire_detections import (  # noqa: F401 - re-exported
    WireDetection,
    detection_fields,
    detection_options,
    detections_from_proto,
)

if TYPE_CHECKING:
    from camserve.explanation import Explanation

#: What a caller may pass as one image.
ImageLike: TypeAlias = np.ndarray | bytes | bytearray | memoryview | str | Path

#: Tensor dtypes accepted on the wire and what they mean.
TENSOR_DTYPES = {
    "uint8": "RGB (or grey / RGBA) pixels, shape (H, W, C), treated like a decoded image",
    "float32": "an already preprocessed model input, shape (H, W, C)",
}

#: The most dimensions a FloatMap may have, and the largest entry of its shape: a reader's
#: bounds, so that a malformed map is refused (InvalidArgument) before numpy sees it.
MAX_MAP_DIMS = 8
MAX_MAP_DIM = 2**31 - 1

#: The little-endian numpy dtype of each wire tensor dtype.
_LITTLE_ENDIAN = {name: np.dtype(name).newbyteorder("<") for name in TENSOR_DTYPES}

#: Float maps on the wire: little-endian float32.
MAP_DTYPE = np.dtype("<f4")


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


@dataclasses.dataclass(frozen=True)
class TensorImage:
    """A wire Image sent as a raw tensor whose ``data`` the server read in place, in the
    request's bytes (:func:`camserve.protowire.detach_tensor_data`): ``tensor`` holds the dtype
    and shape (its own ``data`` is empty), ``data`` the bytes. Decoded like the Image."""

    tensor: pb.Tensor
    data: memoryview


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
    data: bytes | memoryview | None = None,
) -> np.ndarray:
    """Validate and view a wire Tensor as numpy; errors say what was wrong and what is allowed.
    ``data``: the tensor's bytes when they are not in the message (:class:`TensorImage`).

    NaN and Inf are refused in float tensors.
    """
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise InvalidArgument(f"{what}: dtype {t.dtype!r} not allowed; allowed: {list(dtypes)}")
    shape = tuple(t.shape)  # Python ints already
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{what}: shape {list(shape)} has {len(shape)} dimensions, expected {ndim}")
    if min(shape, default=1) <= 0:
        raise InvalidArgument(f"{what}: shape {list(shape)} has an empty or negative dimension")
    dtype = _LITTLE_ENDIAN.get(t.dtype)
    if dtype is None:
        dtype = np.dtype(t.dtype).newbyteorder("<")
    count = math.prod(shape)  # Python ints: an int64 product could wrap around to a small number
    if max_elements is not None and count > max_elements:
        raise InvalidArgument(f"{what}: {count} elements exceed the limit of {max_elements}")
    if data is None:
        data = t.data  # each read of a bytes field copies it out of the message: read it once
    if len(data) != count * dtype.itemsize:
        raise InvalidArgument(
            f"{what}: {len(data)} data bytes do not match shape {list(shape)} of {t.dtype} "
            f"({count * dtype.itemsize} bytes expected)"
        )
    a = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.itemsize == 1:
        return a  # bytes have no byte order, and no NaN
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise InvalidArgument(f"{what}: {bad} values are NaN or Inf; only finite values are allowed")
    return a.astype(dtype.newbyteorder("="), copy=False)


# ------------------------------------------------------------------ images


def decode_image_proto(
    msg: pb.Image | TensorImage, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "image"
) -> WireImage:
    """Check and decode one wire Image (or a :class:`TensorImage`).

    Encoded bytes: the header's width x height is checked against ``max_pixels`` before
    decoding. Tensors: see :data:`TENSOR_DTYPES`. Raises InvalidArgument (ImageError).
    """
    if isinstance(msg, TensorImage):
        return _decode_tensor(msg.tensor, max_pixels, what, msg.data)
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
    return _decode_tensor(msg.tensor, max_pixels, what)


def _decode_tensor(t: pb.Tensor, max_pixels: int, what: str, data: memoryview | None = None) -> WireImage:
    if len(t.shape) == 3 and t.shape[0] > 0 and t.shape[1] > 0:
        check_pixels(int(t.shape[1]), int(t.shape[0]), max_pixels, f"{what} (tensor)")
    a = tensor_to_array(t, ndim=3, what=f"{what} tensor (H, W, C)", data=data)
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


def floatmap_fields(a: np.ndarray) -> dict[str, Any]:
    """The fields of a FloatMap holding ``a`` (``shape`` and little-endian float32 ``data`` in C
    order), to pass to a message constructor: building nested messages from plain values is
    what protobuf does fastest (a message passed in is copied).

    >>> floatmap_fields(np.ones((1, 2), np.float32))
    {'shape': (1, 2), 'data': b'\\x00\\x00\\x80?\\x00\\x00\\x80?'}
    """
    a = np.asarray(a, MAP_DTYPE)  # no copy for a float32 array on a little-endian machine
    return {"shape": a.shape, "data": a.tobytes()}  # tobytes: C order whatever the layout


def array_to_floatmap(a: np.ndarray) -> pb.FloatMap:
    """A float array as a FloatMap: its shape and its values as little-endian float32 bytes in
    C order (``data``); ``values`` stays empty."""
    return pb.FloatMap(**floatmap_fields(a))


def floatmap_to_array(m: pb.FloatMap, what: str = "FloatMap") -> np.ndarray:
    """A FloatMap back to a (writable, native) float32 array: from ``data`` when set, else from
    ``values`` (servers before ``data``). InvalidArgument for a malformed map: more than
    :data:`MAX_MAP_DIMS` dimensions, an entry below 0 or above :data:`MAX_MAP_DIM`, or a size
    that does not match the shape."""
    shape = tuple(m.shape)
    if len(shape) > MAX_MAP_DIMS or any(not 0 <= s <= MAX_MAP_DIM for s in shape):
        raise InvalidArgument(
            f"{what}: shape {list(shape)} not allowed: at most {MAX_MAP_DIMS} dimensions, each 0 to {MAX_MAP_DIM}"
        )
    count = math.prod(shape)
    data = m.data
    if data or not len(m.values):
        if len(data) != count * MAP_DTYPE.itemsize:
            raise InvalidArgument(
                f"{what}: {len(data)} data bytes do not match shape {list(shape)} "
                f"({count * MAP_DTYPE.itemsize} bytes expected: 4 per float32)"
            )
        return np.frombuffer(data, MAP_DTYPE).reshape(shape).astype(np.float32)  # one copy: writable, native
    values = np.asarray(m.values, np.float32)
    if values.size != count:
        raise InvalidArgument(f"{what} of shape {list(shape)} carries {values.size} values")
    return values.reshape(shape)


# ------------------------------------------------------------------ heatmap sizes


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A heatmap resized to (height, width) bilinearly (``cv2.INTER_LINEAR``, as overlays
    stretch it); float32."""
    h = np.asarray(heatmap, np.float32)
    if h.shape[:2] == tuple(size):
        return h
    return cv2.resize(h, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


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


def _top(scores: np.ndarray, top_k: int, class_names: Sequence[str]) -> list[dict[str, Any]]:
    if top_k <= 0:
        return []
    order = np.argsort(-np.asarray(scores), kind="stable")[:top_k]
    return [
        {"index": int(i), "label": class_names[i] if i < len(class_names) else str(i), "score": float(scores[i])}
        for i in order
    ]


def top_classes(scores: np.ndarray, top_k: int, class_names: Sequence[str]) -> list[pb.ClassScore]:
    """The ``top_k`` best classes of one score vector, best first (ties: lower index first)."""
    return [pb.ClassScore(**c) for c in _top(scores, top_k, class_names)]


def top_from_proto(p: pb.Prediction) -> list[tuple[int, str, float]]:
    """The (index, label, score) best classes of a wire Prediction, as :func:`top_classes` made them."""
    return [(int(c.index), c.label, float(c.score)) for c in p.top]


def prediction_to_proto(scores: np.ndarray, top_k: int, class_names: Sequence[str]) -> pb.Prediction:
    """One image's Prediction: its ``top_k`` best classes. Every class's score goes in the
    response's ``scores`` map (:func:`predict_response_to_proto`), not here."""
    return pb.Prediction(top=_top(scores, top_k, class_names))


def predict_response_to_proto(
    scores: np.ndarray, top_k: int, class_names: Sequence[str], model: str = "", version: int = 0
) -> pb.PredictResponse:
    """A PredictResponse: ``scores`` (images, classes) as one float map of bytes, and per
    image a Prediction with its ``top_k`` best classes (0: none)."""
    scores = np.asarray(scores, np.float32)
    return pb.PredictResponse(
        model={"name": model, "version": int(version)},
        predictions=[{"top": _top(row, top_k, class_names)} for row in scores],
        scores=floatmap_fields(scores),
    )


def predictions_from_proto(resp: pb.PredictResponse) -> np.ndarray:
    """(N, classes) float32 scores of a PredictResponse: from its ``scores`` map, or from each
    Prediction's ``scores`` (servers before the map). InvalidArgument when they disagree with
    the number of predictions."""
    if resp.HasField("scores"):
        a = floatmap_to_array(resp.scores, "PredictResponse.scores")
        if a.ndim != 2 or a.shape[0] != len(resp.predictions):
            raise InvalidArgument(
                f"PredictResponse.scores of shape {list(a.shape)} for {len(resp.predictions)} predictions"
            )
        return a
    if not resp.predictions:
        return np.zeros((0, 0), np.float32)
    return np.stack([np.asarray(p.scores, np.float32) for p in resp.predictions])


# ------------------------------------------------------------------ explanations


def explanation_fields(
    e: Explanation,
    *,
    raw: bool = False,
    heatmap: bool = False,
    heatmap_png: bool = False,
    overlay_png: bytes | None = None,
    image_box: tuple[int, int, int, int] | None = None,
) -> dict[str, Any]:
    """The fields of the wire Explanation of ``e`` (maps only when asked for), to pass to a
    message constructor. ``image_box``: the box in the pixels of the image as sent
    (:func:`scale_box`); None: ``e.box`` (the image had the model's input size)."""
    m: dict[str, Any] = {
        "method": e.method,
        "class_index": int(e.class_index),
        "label": str(e.label),
        "score": float(e.score),
    }
    if raw and e.raw is not None:
        m["raw"] = floatmap_fields(e.raw)
    if heatmap and e.heatmap is not None:
        m["heatmap"] = floatmap_fields(e.heatmap)
    if heatmap_png and e.heatmap is not None:
        m["heatmap_png"] = heatmap_to_png(e.heatmap)
    if e.box is not None:
        x0, y0, x1, y1 = (int(v) for v in e.box)
        m["box"] = {"x0": x0, "y0": y0, "x1": x1, "y1": y1}
        if image_box is not None:
            x0, y0, x1, y1 = (int(v) for v in image_box)
        m["image_box"] = {"x0": x0, "y0": y0, "x1": x1, "y1": y1}
    if overlay_png:
        m["overlay_png"] = overlay_png
    return m


def explanation_to_proto(e: Explanation, **outputs: Any) -> pb.Explanation:
    """One library Explanation as a wire message; ``outputs``: the keyword arguments of
    :func:`explanation_fields` (raw, heatmap, heatmap_png, overlay_png, image_box)."""
    return pb.Explanation(**explanation_fields(e, **outputs))


def explanation_from_proto(
    m: pb.Explanation, image_size: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Explanation:
    """A wire Explanation as the library's :class:`~camserve.explanation.Explanation`;
    maps that were not sent are None. The heatmap comes from the float map, else from the
    8-bit PNG (float32 in [0, 1], steps of 1/255). The overlay PNG, when sent, stays in
    ``m.overlay_png``.

    ``image_size`` (height, width): the heatmap resized to it (:func:`resize_heatmap`) and the
    box in its pixels (the server's ``image_box``, or :func:`scale_box` for servers before
    it); None: both at the model's input size, as sent."""
    from camserve.explanation import Explanation

    if m.HasField("heatmap"):
        heat = floatmap_to_array(m.heatmap, "Explanation.heatmap")
    elif m.heatmap_png:
        heat = png_to_heatmap(m.heatmap_png, max_pixels, "Explanation.heatmap_png")
    else:
        heat = None
    box = _box(m.box) if m.HasField("box") else None
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        if box is not None:
            if m.HasField("image_box"):
                box = _box(m.image_box)
            elif heat is not None:
                box = scale_box(box, heat.shape[:2], image_size)
            else:
                raise InvalidArgument(
                    "the server sent no image_box (it predates it): ask for the heatmap too to have the box scaled"
                )
        if heat is not None:
            heat = resize_heatmap(heat, image_size)
    return Explanation(
        method=m.method,
        class_index=int(m.class_index),
        label=m.label,
        score=float(m.score),
        raw=floatmap_to_array(m.raw, "Explanation.raw") if m.HasField("raw") else None,  # type: ignore[arg-type]
        heatmap=heat,  # type: ignore[arg-type]
        box=box,
    )


def _box(b: pb.Box) -> tuple[int, int, int, int]:
    return (int(b.x0), int(b.y0), int(b.x1), int(b.y1))


# Targets: camserve/wire_targets.py (re-exported here; it reads this module's float maps).
from camserve.wire_targets import target_from_proto as target_from_proto  # noqa: E402
from camserve.wire_targets import target_to_proto as target_to_proto  # noqa: E402
from camserve.wire_targets import targets_to_proto as targets_to_proto  # noqa: E402
