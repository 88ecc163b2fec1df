"""Synthetic shapes scenes drawn with OpenCV, with exact ground-truth boxes.

Five classes (:data:`CLASS_NAMES`) of filled shapes in random colours, sizes, rotations
and positions, on cluttered backgrounds (colour gradient, low-frequency texture, random
lines, pixel noise). Every shape is rasterised with 8x supersampling into its own
coverage mask; its box is the tight box of that mask (pixels with coverage >= 1/4), so
it encloses exactly the pixels the shape changed. Boxes are ``(x0, y0, x1, y1)`` in
pixels with ``x1, y1`` exclusive, like :func:`camserve.imaging.heatmap_box`.

:func:`make_scene` draws one scene, :func:`make_scenes` / :func:`make_dataset` many (lists
of scenes / arrays of single-shape scenes), :func:`make_windows` cuts sliding-window
training crops (centred shape or background) from larger scenes.

>>> rng = np.random.default_rng(0)
>>> scene = make_scene(rng, size=(64, 64), n_shapes=2)
>>> scene.image.shape, len(scene.labels), len(scene.boxes)
((64, 64, 3), 2, 2)
>>> images, labels, boxes = make_dataset(4, seed=0)
>>> images.shape, labels.shape, boxes.shape
((4, 64, 64, 3), (4,), (4, 4))
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from camserve.errors import InvalidArgument

#: Class names in label order.
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

#: Default range of shape sizes in pixels: the diameter of the shape's circumscribed circle.
DEFAULT_SHAPE_SIZE: tuple[int, int] = (20, 44)

_SUPERSAMPLE = 8  # rasterise at 8x and average: anti-aliased coverage
_MIN_COVERAGE = 0.25  # coverage below this is not drawn, so every box pixel visibly changes
_MIN_CONTRAST = 110.0  # Euclidean RGB distance between a shape and the background under it


@dataclasses.dataclass
class Scene:
    """One generated picture and its ground truth.

    ``image``: RGB uint8 (H, W, 3); ``labels[i]`` indexes :data:`CLASS_NAMES`;
    ``boxes[i]`` = (x0, y0, x1, y1), x1/y1 exclusive, tight around shape i's pixels.
    """

    image: np.ndarray
    labels: list[int]
    boxes: list[tuple[int, int, int, int]]

    @property
    def names(self) -> list[str]:
        """Class names of the shapes, in drawing order.

        >>> Scene(np.zeros((4, 4, 3), np.uint8), [3], [(0, 0, 2, 2)]).names
        ['star']
        """
        return [CLASS_NAMES[i] for i in self.labels]


def _unit_polygon(label: int) -> np.ndarray:
    """Vertices (K, 2) of a shape centred at 0 whose farthest vertex lies at radius 1."""
    name = CLASS_NAMES[label]
    if name == "circle":
        t = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "square":
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "triangle":
        t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    # cross: a plus sign with arms of half-width a, scaled so the arm corners sit on radius 1
    a = 0.3
    pts = np.array(
        [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)],
        dtype=np.float64,
    )
    return pts / np.hypot(1.0, a)


def shape_coverage(
    label: int, centre: tuple[float, float], size: float, angle: float, canvas: tuple[int, int]
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32, ``canvas`` = (H, W)) of one shape.

    ``centre`` is (x, y) in continuous pixel coordinates (pixel (0, 0) spans [0, 1)^2),
    ``size`` the diameter of the circumscribed circle, ``angle`` a rotation in radians.
    Coverage below 1/4 is set to 0.

    >>> m = shape_coverage(1, (8.0, 8.0), 8.0, 0.0, (16, 16))
    >>> float(m.max()), m.shape
    (1.0, (16, 16))
    """
    if not 0 <= label < len(CLASS_NAMES):
        raise InvalidArgument(f"label {label} out of range; allowed 0..{len(CLASS_NAMES) - 1} ({CLASS_NAMES})")
    h, w = canvas
    c, s = np.cos(angle), np.sin(angle)
    pts = _unit_polygon(label) * (size / 2.0)
    pts = pts @ np.array([[c, s], [-s, c]]) + np.asarray(centre, np.float64)
    cov = np.zeros((h, w), np.float32)
    # rasterise only the patch of whole pixels the shape can touch, at ss x resolution
    x0, y0 = (max(int(np.floor(v)) - 1, 0) for v in pts.min(axis=0))
    x1, y1 = int(np.ceil(pts[:, 0].max())) + 1, int(np.ceil(pts[:, 1].max())) + 1
    x1, y1 = min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return cov
    ss, shift = _SUPERSAMPLE, 4
    # continuous coordinate X -> high-res pixel-centre coordinate ss*(X - x0) - 0.5, fixed point.
    # fillPoly also fills the outline, which widens the shape by about half a high-res pixel
    # per side; at 8x that is 1/16 px, below the coverage cut-off.
    fixed = np.round((((pts - (x0, y0)) * ss) - 0.5) * (1 << shift)).astype(np.int32)
    hi = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss), np.uint8)
    cv2.fillPoly(hi, [fixed.reshape(-1, 1, 2)], 255, lineType=cv2.LINE_8, shift=shift)
    patch = cv2.resize(hi.astype(np.float32) / 255.0, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    patch[patch < _MIN_COVERAGE] = 0.0
    cov[y0:y1, x0:x1] = np.clip(patch, 0.0, 1.0)
    return cov


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _background(rng: np.random.Generator, h: int, w: int, clutter: bool) -> np.ndarray:
    """Float32 (H, W, 3) background: a plain colour, or gradient + texture + lines."""
    base = rng.uniform(0, 255, 3)
    if not clutter:
        return np.broadcast_to(np.round(base), (h, w, 3)).astype(np.float32)
    other = np.clip(base + rng.uniform(-70, 70, 3), 0, 255)
    t = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = np.cos(t) * xx / max(w - 1, 1) + np.sin(t) * yy / max(h - 1, 1)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = base + ramp[..., None] * (other - base)
    # low-frequency texture: coarse noise upsampled
    cells = int(rng.integers(3, 9))
    coarse = rng.normal(0.0, 1.0, (cells, cells, 3)).astype(np.float32)
    texture = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img = img + texture * rng.uniform(5, 22)
    img = np.clip(img, 0, 255).astype(np.float32)
    for _ in range(int(rng.integers(2, 7))):  # clutter lines, possibly crossing the frame
        p0 = rng.uniform(-0.2, 1.2, 2) * (w, h)
        p1 = rng.uniform(-0.2, 1.2, 2) * (w, h)
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(
            img, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, int(rng.integers(1, 3)), cv2.LINE_AA
        )
    return img


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour at least _MIN_CONTRAST away from the mean colour ``under``."""
    for _ in range(1000):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
            return colour
    return np.where(under > 127, 0.0, 255.0)  # the far corner of the RGB cube


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InvalidArgument(f"size must be (height, width), got {size!r}") from None
    if h < 8 or w < 8:
        raise InvalidArgument(f"size must be at least (8, 8), got {(h, w)}")
    return h, w


def make_scene(
    rng: np.random.Generator,
    size: Sequence[int] = (64, 64),
    n_shapes: int | tuple[int, int] = 1,
    shape_size: tuple[float, float] = DEFAULT_SHAPE_SIZE,
    classes: Sequence[int | str] | None = None,
    clutter: bool = True,
    centre_jitter: float | None = None,
) -> Scene:
    """Draw one scene of ``n_shapes`` shapes (an int, or an inclusive (lo, hi) range).

    ``size`` = (height, width); ``shape_size`` = (min, max) circumscribed diameter in
    pixels; ``classes`` restricts the classes drawn (indices or names); ``clutter=False``
    gives a plain background without lines or noise. With ``centre_jitter`` (single-shape
    scenes only) the shape's centre lies within that many pixels of the image centre.
    Shapes lie fully inside the image and their boxes do not intersect.

    >>> s = make_scene(np.random.default_rng(1), n_shapes=(1, 3), classes=["star"])
    >>> set(s.names) == {"star"} and 1 <= len(s.boxes) <= 3
    True
    """
    h, w = _check_size(size)
    if isinstance(n_shapes, tuple):
        lo, hi = n_shapes
        n = int(rng.integers(lo, hi + 1))
    else:
        n = int(n_shapes)
    if n < 1:
        raise InvalidArgument(f"n_shapes must be >= 1, got {n_shapes!r}")
    smin, smax = float(shape_size[0]), float(shape_size[1])
    if not 4 <= smin <= smax <= min(h, w):
        raise InvalidArgument(
            f"shape_size must be (min, max) with 4 <= min <= max <= {min(h, w)} for size {(h, w)}, got {shape_size!r}"
        )
    allowed = _class_indices(classes)
    if centre_jitter is not None and n != 1:
        raise InvalidArgument(f"centre_jitter needs a single shape per scene, got n_shapes={n_shapes!r}")

    layout = _layout(rng, h, w, n, smin, smax, centre_jitter)
    if layout is None:
        raise InvalidArgument(
            f"cannot place {n} non-overlapping shapes of size {shape_size} in a {h}x{w} scene; "
            "use fewer or smaller shapes or a larger scene"
        )
    img = _background(rng, h, w, clutter)
    labels: list[int] = []
    boxes: list[tuple[int, int, int, int]] = []
    for cx, cy, d in layout:
        label = int(allowed[rng.integers(len(allowed))])
        angle = float(rng.uniform(0, 2 * np.pi))
        cov = shape_coverage(label, (cx, cy), d, angle, (h, w))
        if not cov.any():  # pragma: no cover - sizes >= 4 px always cover some pixel
            continue
        under = img[cov > 0].mean(axis=0)
        colour = _contrasting_colour(rng, under)
        img = img * (1.0 - cov[..., None]) + colour * cov[..., None]
        labels.append(label)
        boxes.append(_mask_box(cov))
    if clutter:
        img = img + rng.normal(0.0, rng.uniform(0, 10), img.shape)
    return Scene(image=np.clip(np.round(img), 0, 255).astype(np.uint8), labels=labels, boxes=boxes)


def _layout(
    rng: np.random.Generator,
    h: int,
    w: int,
    n: int,
    smin: float,
    smax: float,
    centre_jitter: float | None,
) -> list[tuple[float, float, float]] | None:
    """Centres and sizes (cx, cy, d) of ``n`` shapes whose circumscribed squares (plus a
    one-pixel margin) do not intersect, or None when no layout was found."""
    for _ in range(50):  # whole-layout restarts: one huge first shape can block the rest
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _ in range(100):
                d = float(rng.uniform(smin, smax))
                r = d / 2
                if centre_jitter is not None:
                    cx = float(np.clip(w / 2 + rng.uniform(-centre_jitter, centre_jitter), r, w - r))
                    cy = float(np.clip(h / 2 + rng.uniform(-centre_jitter, centre_jitter), r, h - r))
                else:
                    cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
                if all(abs(cx - px) >= r + pd / 2 + 1 or abs(cy - py) >= r + pd / 2 + 1 for px, py, pd in placed):
                    placed.append((cx, cy, d))
                    break
            else:
                break
        if len(placed) == n:
            return placed
    return None


def _class_indices(classes: Sequence[int | str] | None) -> np.ndarray:
    if classes is None:
        return np.arange(len(CLASS_NAMES))
    out = []
    for c in classes:
        if isinstance(c, str):
            if c not in CLASS_NAMES:
                raise InvalidArgument(f"unknown class {c!r}; allowed: {list(CLASS_NAMES)}")
            out.append(CLASS_NAMES.index(c))
        elif 0 <= int(c) < len(CLASS_NAMES):
            out.append(int(c))
        else:
            raise InvalidArgument(f"class index {c} out of range 0..{len(CLASS_NAMES) - 1}")
    if not out:
        raise InvalidArgument(f"classes must not be empty; allowed: {list(CLASS_NAMES)}")
    return np.asarray(out)


def make_scenes(
    n: int,
    seed: int,
    size: Sequence[int] = (64, 64),
    n_shapes: int | tuple[int, int] = (1, 3),
    **kwargs,
) -> list[Scene]:
    """``n`` scenes (one to three shapes each by default), deterministic for ``seed``.

    Other keyword arguments go to :func:`make_scene`.

    >>> [len(s.labels) for s in make_scenes(3, seed=5, n_shapes=2)]
    [2, 2, 2]
    """
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size=size, n_shapes=n_shapes, **kwargs) for _ in range(n)]


def make_dataset(
    n: int,
    seed: int,
    size: Sequence[int] = (64, 64),
    n_shapes: int = 1,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` single-shape scenes as arrays, deterministic for ``seed``:
    images uint8 (N, H, W, 3), labels int64 (N,), boxes int64 (N, 4).

    Scenes with several shapes come from :func:`make_scenes`. Other keyword arguments
    go to :func:`make_scene`.

    >>> x, y, b = make_dataset(2, seed=0, size=(32, 48), shape_size=(10, 20))
    >>> x.shape, x.dtype.name, b.tolist() == make_dataset(2, seed=0, size=(32, 48), shape_size=(10, 20))[2].tolist()
    ((2, 32, 48, 3), 'uint8', True)
    """
    if n_shapes != 1:
        raise InvalidArgument(
            f"make_dataset draws single-shape scenes (n_shapes=1), got n_shapes={n_shapes!r}; "
            "use make_scenes for several shapes per scene"
        )
    scenes = make_scenes(n, seed, size=size, n_shapes=1, **kwargs)
    h, w = _check_size(size)
    images = np.stack([s.image for s in scenes]) if scenes else np.zeros((0, h, w, 3), np.uint8)
    labels = np.array([s.labels[0] for s in scenes], np.int64)
    boxes = np.array([s.boxes[0] for s in scenes], np.int64).reshape(-1, 4)
    return images, labels, boxes


def make_windows(
    n: int,
    seed: int,
    size: Sequence[int] = (64, 64),
    scene_size: Sequence[int] = (192, 192),
    positive_fraction: float = 0.5,
    per_scene: int = 8,
    jitter: float = 4.0,
    min_offset: float = 12.0,
    margin: int = 0,
    near_fraction: float = 0.0,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``size`` cut from larger multi-shape scenes, as a sliding-window
    classifier sees them; deterministic for ``seed``. Returns images uint8 (N, H, W, 3)
    and labels int64 (N,): the class of the shape whose box centre lies within ``jitter``
    pixels (each axis) of the window centre, or -1 (background) for windows whose centre is
    at least ``min_offset`` pixels (on some axis) from every shape's box centre; those may
    hold parts of shapes or whole shapes off-centre. Windows may reach ``margin`` pixels past
    the scene's border, filled with zeros (as a detector pads the image it scans); a share
    ``near_fraction`` of the background windows is centred ``min_offset`` to half a window
    from a shape (hard negatives: the shape off-centre or partly inside). Up to
    ``per_scene`` windows come from each scene. Other keyword arguments go to
    :func:`make_scene` (``n_shapes`` defaults to one to three).

    >>> x, y = make_windows(4, seed=0)
    >>> x.shape, sorted(set(y.tolist()) - set(range(5)))
    ((4, 64, 64, 3), [-1])
    """
    h, w = _check_size(size)
    sh, sw = _check_size(scene_size)
    if sh < h or sw < w:
        raise InvalidArgument(f"scene_size {tuple(scene_size)} must be at least the window size {(h, w)}")
    if per_scene < 1:
        raise InvalidArgument(f"per_scene must be >= 1, got {per_scene}")
    for name, v in (("positive_fraction", positive_fraction), ("near_fraction", near_fraction)):
        if not 0.0 <= v <= 1.0:
            raise InvalidArgument(f"{name} must be in [0, 1], got {v}")
    if not 0 <= margin <= min(h, w) // 2:
        raise InvalidArgument(f"margin must be in [0, {min(h, w) // 2}] (half the window), got {margin}")
    kwargs.setdefault("n_shapes", (1, 3))
    rng = np.random.default_rng(seed)
    images = np.zeros((n, h, w, 3), np.uint8)
    labels = np.zeros(n, np.int64)
    m = int(margin)
    lo, hi = np.array([w / 2 - m, h / 2 - m]), np.array([sw - w / 2 + m, sh - h / 2 + m])  # window centres
    i = 0
    while i < n:
        scene = make_scene(rng, size=(sh, sw), **kwargs)
        padded = np.pad(scene.image, ((m, m), (m, m), (0, 0))) if m else scene.image
        centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in scene.boxes])
        # shapes far enough from the (padded) border for a whole window around them
        eligible = np.flatnonzero(np.all((centres >= lo + jitter + 1) & (centres <= hi - jitter - 1), axis=1))
        for _ in range(per_scene * 5):
            if i == n:
                break
            positive = rng.random() < positive_fraction
            if positive:
                if not len(eligible):
                    continue
                k = int(eligible[rng.integers(len(eligible))])
                cx, cy = centres[k] + rng.uniform(-jitter, jitter, 2)
            elif near_fraction and rng.random() < near_fraction:
                angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(min_offset, max(h, w) / 2)
                near = centres[rng.integers(len(centres))]
                cx, cy = near[0] + dist * np.cos(angle), near[1] + dist * np.sin(angle)
            else:
                cx, cy = rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1])
            x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
            if not (-m <= x0 <= sw - w + m and -m <= y0 <= sh - h + m):
                continue  # the window would leave the padded scene
            off = np.abs(centres - (x0 + w / 2, y0 + h / 2))
            if positive and np.all(off[k] <= jitter + 0.5):
                labels[i] = scene.labels[k]
            elif not positive and np.all(off.max(axis=1) >= min_offset):
                labels[i] = -1
            else:
                continue
            images[i] = padded[y0 + m : y0 + m + h, x0 + m : x0 + m + w]
            i += 1
            if i % per_scene == 0:
                break
    return images, labels


def write_samples(out_dir: str | Path, seed: int = 0, size: Sequence[int] = (64, 64)) -> list[Path]:
    """Write six sample PNGs (one single-shape scene per class, one with three shapes)
    and ``ground_truth.json`` (labels and boxes per file) to ``out_dir``.

    >>> paths = write_samples("/tmp/camserve-samples")   # doctest: +SKIP
    >>> [p.name for p in paths][:2]                        # doctest: +SKIP
    ['circle.png', 'square.png']
    """
    from camserve.imaging import encode_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    named = [(f"{name}.png", make_scene(rng, size=size, classes=[name])) for name in CLASS_NAMES]
    named.append(("three_shapes.png", make_scene(rng, size=size, n_shapes=3, shape_size=(18, 26))))
    truth = {}
    paths = []
    for fname, scene in named:
        path = out / fname
        path.write_bytes(encode_png(scene.image))
        truth[fname] = {"labels": scene.names, "boxes": [list(b) for b in scene.boxes]}
        paths.append(path)
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in truth.items()]
    (out / "ground_truth.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return paths
