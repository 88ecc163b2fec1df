"""Image I/O with OpenCV: decoding, per-model preprocessing, heatmap boxes, overlays, PNG.

Images inside camserve are RGB ``uint8`` arrays of shape (H, W, 3) until they are
preprocessed into the float32 tensors a model expects.

>>> rgb = np.zeros((8, 8, 3), np.uint8)
>>> decode_image(encode_png(rgb)).shape
(8, 8, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from camserve.errors import InvalidArgument


class ImageError(InvalidArgument):
    """Bytes that are not a decodable image, or an image camserve cannot use."""


def _scale_0_1(x: np.ndarray) -> np.ndarray:
    return x / 255.0


def _scale_m1_1(x: np.ndarray) -> np.ndarray:
    return x / 127.5 - 1.0


def _caffe(x: np.ndarray) -> np.ndarray:
    # keras.applications "caffe" mode (VGG16, ResNet50): RGB->BGR, ImageNet mean subtracted.
    return x[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)


def _torch(x: np.ndarray) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return (x / 255.0 - mean) / std


#: Preprocessing by name, as written in a model's ``config.toml``.
PREPROCESSORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "scale_0_1": _scale_0_1,
    "scale_-1_1": _scale_m1_1,  # MobileNetV2, Inception
    "caffe": _caffe,
    "torch": _torch,
}

#: Encoded formats camserve accepts, by their leading bytes.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"BM": "bmp",
}


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None.

    >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n....")
    'png'
    """
    for magic, name in _SIGNATURES.items():
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def require_format(data: bytes) -> str:
    """The format of encoded image bytes; :class:`ImageError` for empty or unknown bytes.

    >>> require_format(b"BM" + bytes(30))
    'bmp'
    """
    if not data:
        raise ImageError("empty image: expected PNG, JPEG, BMP or WebP bytes")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(
            f"not an image ({len(data)} bytes starting {bytes(data[:8])!r}); accepted formats: PNG, JPEG, BMP, WebP"
        )
    return fmt


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG / JPEG / BMP / WebP bytes to RGB uint8 (H, W, 3).

    Grey images are expanded to three channels and alpha is dropped. Anything else
    raises :class:`ImageError` naming what was wrong and what is accepted.
    """
    fmt = require_format(data)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:  # e.g. a size over OpenCV's own limit: a client error, not a server one
        raise ImageError(f"{fmt.upper()} ({len(data)} bytes) refused by the decoder: {e.err}") from None
    if img is None:
        raise ImageError(f"corrupt or truncated {fmt.upper()} ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file to RGB uint8; errors name the file."""
    try:
        return decode_image(Path(path).read_bytes())
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width) with area interpolation when shrinking."""
    h, w = size
    if rgb.shape[:2] == (h, w):
        return rgb
    shrink = h * w < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def preprocess(rgb: np.ndarray, mode: str) -> np.ndarray:
    """Apply a named preprocessing (see :data:`PREPROCESSORS`) to RGB pixels; float32 out.

    >>> float(preprocess(np.full((1, 1, 3), 255, np.uint8), "scale_0_1").max())
    1.0
    """
    try:
        fn = PREPROCESSORS[mode]
    except KeyError:
        raise InvalidArgument(f"unknown preprocessing {mode!r}; allowed: {sorted(PREPROCESSORS)}") from None
    return np.asarray(fn(np.asarray(rgb, np.float32)), np.float32)


class InputSpec(Protocol):
    """What a model takes, as its ``config.toml`` says (:class:`camserve.serving.repository.ModelConfig`)."""

    @property
    def input_size(self) -> tuple[int, int]: ...
    @property
    def channels(self) -> int: ...
    @property
    def preprocessing(self) -> str: ...


def model_input(rgb: np.ndarray, spec: InputSpec, resize_to_input: bool = True) -> np.ndarray:
    """RGB pixels as a model's input: resized to its (height, width) (unless
    ``resize_to_input`` is False, for dense scores on a large image), preprocessed, then
    averaged over the colour channels when the model takes one. The one place where pixels
    become model input (server, CLI and dense scores all call it).

    >>> from types import SimpleNamespace as Spec
    >>> model_input(np.zeros((10, 20, 3), np.uint8), Spec(input_size=(4, 4), channels=3, preprocessing="scale_0_1")).shape
    (4, 4, 3)
    >>> model_input(np.zeros((10, 20, 3), np.uint8), Spec(input_size=(4, 4), channels=1, preprocessing="scale_0_1"), False).shape
    (10, 20, 1)
    """
    if spec.channels not in (1, 3):
        raise InvalidArgument(f"models with {spec.channels} channels are not supported; allowed: 1 or 3")
    if resize_to_input:
        rgb = resize(rgb, spec.input_size)
    x = preprocess(rgb, spec.preprocessing)
    return x.mean(axis=-1, keepdims=True) if spec.channels == 1 else x


def heatmap_box(heatmap: np.ndarray, threshold: float = 0.2) -> tuple[int, int, int, int] | None:
    """Bounding box of the CAM paper (Zhou et al. 2016): keep pixels above
    ``threshold`` x the map's maximum, take the largest connected component.

    Returns (x0, y0, x1, y1) in pixels with x1, y1 exclusive, or None for an all-zero map.

    >>> m = np.zeros((10, 10), np.float32); m[2:5, 3:8] = 1.0
    >>> heatmap_box(m)
    (3, 2, 8, 5)
    """
    peak = float(np.max(heatmap)) if heatmap.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return None
    mask = (heatmap >= threshold * peak).astype(np.uint8)
    # Labels alone cost a fifth of labels with statistics (224 px: 40 vs 190 us): the areas
    # come from the labels, and a single component (the usual CAM) is the mask's own box.
    n, labels = cv2.connectedComponents(mask, connectivity=8)
    if n <= 1:
        return None
    if n > 2:
        best = 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=n)[1:]))  # first of equal areas
        mask = labels == best
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def scale_box(
    box: tuple[int, int, int, int], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A pixel box (x0, y0, x1, y1; x1, y1 exclusive) on an image of ``from_size`` (height,
    width) moved to the same picture resized to ``to_size``: the smallest box of the new
    pixels that covers it (x0 = floor(x0 × W / w), x1 = ceil(x1 × W / w), likewise for y;
    exact integer arithmetic), within the image. Resizing (OpenCV's, or the server's) maps
    pixel edges linearly, so this is where the box's content lands.

    >>> scale_box((10, 20, 33, 50), (64, 64), (120, 200))
    (31, 37, 104, 94)
    """
    (h, w), (big_h, big_w) = from_size, to_size
    x0, y0, x1, y1 = (int(v) for v in box)
    if (h, w) == (big_h, big_w):
        return x0, y0, x1, y1
    return (
        min(max(x0 * big_w // w, 0), big_w),
        min(max(y0 * big_h // h, 0), big_h),
        min(max(-(-x1 * big_w // w), 0), big_w),
        min(max(-(-y1 * big_h // h), 0), big_h),
    )


def colorize(heatmap: np.ndarray, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """A [0, 1] heatmap as an RGB uint8 picture through an OpenCV colormap."""
    gray = np.clip(np.nan_to_num(heatmap) * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, colormap), cv2.COLOR_BGR2RGB)


def overlay(
    rgb: np.ndarray,
    heatmap: np.ndarray,
    alpha: float = 0.45,
    box: tuple[int, int, int, int] | None = None,
    colormap: int = cv2.COLORMAP_JET,
) -> np.ndarray:
    """Blend a colorized heatmap on the original RGB image (heatmap resized to fit);
    draw ``box`` if given. Returns RGB uint8.
    """
    h, w = rgb.shape[:2]
    hm = cv2.resize(np.asarray(heatmap, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    out = cv2.addWeighted(np.ascontiguousarray(rgb, np.uint8), 1.0 - alpha, colorize(hm, colormap), alpha, 0)
    if box is not None:
        sx, sy = w / heatmap.shape[1], h / heatmap.shape[0]
        x0, y0, x1, y1 = box
        cv2.rectangle(out, (int(x0 * sx), int(y0 * sy)), (int(x1 * sx) - 1, int(y1 * sy) - 1), (255, 255, 255), 1)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB uint8 to PNG bytes."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()
