"""Request images into what a batch takes: decoding (the pixel limit first, from the header),
resizing to the model's input, and whether that work is cheap enough for the event loop.

Raw uint8 tensors are viewed in the request's bytes, not copied; they are batched as uint8
(:func:`camserve.serving.compute.model_inputs`) and preprocessed inside the explainer's graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

from camserve import wire
from camserve.errors import InvalidArgument
from camserve.imaging import model_input, resize
from camserve.proto import pb
from camserve.serving.compute import pixels_to_input
from camserve.serving.results import Prepared

if TYPE_CHECKING:
    from camserve.serving.runtime import ModelRuntime

__all__ = ["ImageInput", "decode_image", "declared_size", "dense_input", "inline_ok", "prepare"]

#: One image of a request: a wire Image (encoded bytes or a tensor), a raw tensor read in place
#: in the request's bytes (TensorImage) or a decoded WireImage.
ImageInput = Union["pb.Image", wire.TensorImage, wire.WireImage]

#: Raw tensors up to this many bytes in all are prepared on the event loop (they are viewed,
#: not copied or decoded: cheaper than a thread hop, see :func:`inline_ok`).
SMALL_INPUT_BYTES = 1024 * 1024
#: Encoded images are decoded on the event loop only when this small (file and declared pixels).
SMALL_ENCODED_BYTES = 16 * 1024
SMALL_ENCODED_PIXELS = 64 * 64


def decode_image(image: ImageInput, max_pixels: int, what: str = "image") -> wire.WireImage:
    """Check and decode one image (pixel limit first, from the header for encoded bytes)."""
    if isinstance(image, wire.WireImage):
        h, w = image.array.shape[:2]
        wire.check_pixels(int(w), int(h), max_pixels, what)
        return image
    return wire.decode_image_proto(image, max_pixels, what=what)


def declared_size(image: ImageInput) -> tuple[int, int]:
    """(width, height) of an image without decoding it: from an encoded header, a tensor's
    shape (0 when it has none) or the array."""
    if isinstance(image, wire.WireImage):
        return int(image.array.shape[1]), int(image.array.shape[0])
    if isinstance(image, pb.Image) and image.WhichOneof("source") == "encoded":
        _, width, height = wire.encoded_size(image.encoded)
        return width, height
    height, width = (list(image.tensor.shape) + [0, 0])[:2]
    return int(width), int(height)


def inline_ok(images: Sequence[ImageInput]) -> bool:
    """True when preparing ``images`` costs less here than a thread hop (about 150 µs of CPU
    on the machine of bench/results): raw tensors of at most :data:`SMALL_INPUT_BYTES` in all
    (viewed, not copied; resized when needed), and encoded files of at most
    :data:`SMALL_ENCODED_BYTES` whose header declares at most :data:`SMALL_ENCODED_PIXELS`.
    Anything larger is decoded and resized in the pool (OpenCV releases the GIL there)."""
    total = pixels = 0
    for m in images:
        if isinstance(m, wire.WireImage):
            total += m.array.nbytes
        elif isinstance(m, wire.TensorImage) or m.WhichOneof("source") == "tensor":
            t = m.tensor  # its declared size (reading ``data`` would copy the bytes out of the message)
            total += math.prod(t.shape) * (4 if t.dtype == "float32" else 1)
        else:
            if m.ByteSize() > SMALL_ENCODED_BYTES:
                return False
            try:
                _, w, h = wire.encoded_size(m.encoded)
            except InvalidArgument:
                return True  # refused at once when decoded
            pixels += w * h
    return total <= SMALL_INPUT_BYTES and pixels <= SMALL_ENCODED_PIXELS


# ---------------------------------------------------------------------------- preparing


def prepare(rt: ModelRuntime, images: Sequence[ImageInput], max_pixels: int) -> Prepared:
    """Decode and resize to the model's input size: (N, H, W, 3) uint8 pixels (a view of
    the request's bytes for one raw tensor of that size; preprocessed later, for the whole
    batch at once) or, when float32 tensors were sent, (N, H, W, C) float32 inputs, which
    must already have exactly that shape."""
    cfg = rt.entry.config
    h, w = cfg.input_size
    expected = (h, w, cfg.channels)
    arrays: list[np.ndarray] = []
    pixels: list[np.ndarray | None] = []
    for i, msg in enumerate(images):
        what = f"image {i}" if len(images) > 1 else "image"
        img = decode_image(msg, max_pixels, what)
        if img.preprocessed:
            if img.array.shape != expected:
                raise InvalidArgument(
                    f"{what}: float32 tensor of shape {list(img.array.shape)}; model {rt.name!r} takes "
                    f"preprocessed inputs of shape {list(expected)} (send uint8 pixels or encoded bytes of any size "
                    "to have them resized)"
                )
            arrays.append(img.array)
            pixels.append(None)
            continue
        arrays.append(resize(img.array, (h, w)))
        pixels.append(img.array)
    if any(a.dtype != arrays[0].dtype for a in arrays):  # pixels beside float inputs: all as inputs
        arrays = [pixels_to_input(a[None], cfg)[0] if a.dtype == np.uint8 else a for a in arrays]
    batch = arrays[0][None] if len(arrays) == 1 else np.stack(arrays)
    return Prepared(batch, pixels)


def dense_input(rt: ModelRuntime, image: ImageInput, max_pixels: int) -> np.ndarray:
    """One image preprocessed at its own size, at least the model's window."""
    cfg = rt.entry.config
    img = decode_image(image, max_pixels)
    if img.preprocessed:
        if img.array.shape[-1] != cfg.channels:
            raise InvalidArgument(
                f"float32 tensor has {img.array.shape[-1]} channels; model {rt.name!r} takes {cfg.channels}"
            )
        x = img.array
    else:
        x = model_input(img.array, cfg, resize_to_input=False)
    h, w = cfg.input_size
    if x.shape[0] < h or x.shape[1] < w:
        raise InvalidArgument(
            f"image of {x.shape[1]}x{x.shape[0]} is smaller than the model's window {w}x{h}; send at least that size"
        )
    return x
