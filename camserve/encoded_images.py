"""Encoded images as bytes: the size an image's header declares (PNG, JPEG, BMP, WebP), read
without decoding so that a decompression bomb is refused before it is allocated; the
per-image pixel limit; and heatmaps as 8-bit grayscale PNGs.

>>> from camserve.imaging import encode_png
>>> encoded_size(encode_png(np.zeros((3, 7, 3), np.uint8)))
('png', 7, 3)
>>> png_to_heatmap(heatmap_to_png(np.array([[0.0, 1.0]], np.float32))).tolist()
[[0.0, 1.0]]
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from camserve.errors import InvalidArgument
from camserve.imaging import ImageError, require_format

DEFAULT_MAX_PIXELS = 4096 * 4096

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


# ------------------------------------------------------------------ heatmaps as PNG


def heatmap_to_png(heatmap: np.ndarray) -> bytes:
    """A [0, 1] heatmap as an 8-bit grayscale PNG, pixel = round(h × 255) (values outside
    [0, 1] clipped, NaN as 0).

    >>> png_to_heatmap(heatmap_to_png(np.array([[0.0, 0.5, 1.0]], np.float32))).tolist()
    [[0.0, 0.501960813999176, 1.0]]
    """
    h = np.nan_to_num(np.asarray(heatmap, np.float32))
    if h.ndim != 2 or h.size == 0:
        raise InvalidArgument(f"a heatmap PNG needs a non-empty 2-D map; got shape {list(h.shape)}")
    gray = np.rint(np.clip(h, 0.0, 1.0) * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".png", gray)
    if not ok:
        raise ImageError("PNG encoding of a heatmap failed")
    return buf.tobytes()


def png_to_heatmap(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "heatmap_png") -> np.ndarray:
    """An 8-bit grayscale heatmap PNG (:func:`heatmap_to_png`) back to float32 in [0, 1]
    (pixel / 255). InvalidArgument for anything else; the declared size is checked against
    ``max_pixels`` before decoding."""
    try:
        fmt, w, h = encoded_size(data)
    except ImageError as e:
        raise ImageError(f"{what}: {e}") from None
    if fmt != "png":
        raise ImageError(f"{what}: a {fmt.upper()} image; expected an 8-bit grayscale PNG")
    check_pixels(w, h, max_pixels, what)
    try:
        gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ImageError(f"{what}: refused by the decoder: {e.err}") from None
    if gray is None or gray.ndim != 2 or gray.dtype != np.uint8:
        got = "undecodable" if gray is None else f"{gray.dtype} of shape {list(gray.shape)}"
        raise ImageError(f"{what}: {got}; expected an 8-bit grayscale PNG")
    return gray.astype(np.float32) * np.float32(1.0 / 255.0)
