"""The protocol-independent request path of the server.

validate → decode → prepare (:func:`camserve.imaging.model_input`) → batch (the
:class:`~camserve.serving.batching.Batcher`) → compute (:class:`camserve.Explainer`,
:func:`camserve.dense.dense_scores`, in a worker thread) → results as library objects (numpy
scores, :class:`~camserve.explanation.Explanation` lists, a
:class:`~camserve.dense.DenseResult`). Protocol front ends (the gRPC servicer; later HTTP and
the Open Inference Protocol) only convert their messages to these calls and the results
back, so every front end shares one batcher, one set of limits and the same checks.

Inputs are plain values; images are :data:`ImageInput`: a wire ``camserve.v1.Image`` (decoded
here, in :func:`decode_image`, the one place that reads one) or an already decoded
:class:`~camserve.wire.WireImage`. Request parameters are checked by the library
(:meth:`Explainer.check_methods <camserve.explain.Explainer.check_methods>`,
:meth:`~camserve.explain.Explainer.resolve_targets`) before anything is queued; errors are
:mod:`camserve.errors` kinds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Union, cast

import numpy as np

from camserve import wire
from camserve.errors import InvalidArgument, NotFound, Unavailable
from camserve.imaging import encode_png, model_input, overlay
from camserve.proto import pb
from camserve.serving.batching import Batcher, BatcherMetrics
from camserve.serving.config import ServerConfig
from camserve.serving.jobs import (
    BatchKey,
    DenseJob,
    DenseKey,
    ExplainJob,
    ExplainKey,
    Job,
    PredictJob,
    PredictKey,
    split,
)
from camserve.serving.repository import ModelConfig, ModelNotFound, ModelRepository
from camserve.serving.runtime import ModelRuntime, ModelRuntimes

if TYPE_CHECKING:
    from camserve.dense import DenseResult
    from camserve.explanation import Explanation

#: One image of a request: a wire Image (encoded bytes or a tensor) or a decoded WireImage.
ImageInput = Union["pb.Image", wire.WireImage]

#: Inputs up to this many bytes in all are prepared on the event loop (cheaper than a thread hop).
SMALL_INPUT_BYTES = 256 * 1024

MAX_SCALES = 16


# ---------------------------------------------------------------------------- images


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
    if image.WhichOneof("source") == "encoded":
        _, width, height = wire.encoded_size(image.encoded)
        return width, height
    height, width = (list(image.tensor.shape) + [0, 0])[:2]
    return int(width), int(height)


def input_bytes(images: Sequence[ImageInput]) -> int:
    """Bytes of the raw inputs; encoded images count as large (decoding them is work)."""
    total = 0
    for m in images:
        if isinstance(m, wire.WireImage):
            total += m.array.nbytes
        else:
            total += len(m.tensor.data) if m.WhichOneof("source") == "tensor" else 1 << 30
    return total


def display_pixels(x: np.ndarray) -> np.ndarray:
    """A preprocessed input rescaled to uint8 RGB, as the background of an overlay.

    >>> display_pixels(np.array([[[-1.0], [1.0]]], np.float32))[0].tolist()
    [[0, 0, 0], [255, 255, 255]]
    """
    x = np.asarray(x, np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    x = x[..., :3]
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Images as the model takes them: ``inputs`` (n, H, W, C) float32, and the pixels as
    sent (None for preprocessed tensors)."""

    inputs: np.ndarray
    pixels: list[np.ndarray | None]


@dataclasses.dataclass(frozen=True)
class PredictResult:
    model: str
    version: int
    class_names: tuple[str, ...]
    scores: np.ndarray  # (n, classes)


@dataclasses.dataclass(frozen=True)
class ExplainResult:
    """Per image, one Explanation per (target, method), targets outer, methods inner."""

    model: str
    version: int
    layer: str
    explanations: list[list[Explanation]]
    prepared: Prepared

    def overlays(self, i: int) -> list[bytes]:
        """PNG overlays of image ``i``'s explanations, drawn on the image as sent (or on its
        preprocessed input rescaled, when a tensor was sent)."""
        pixels = self.prepared.pixels[i]
        background = pixels if pixels is not None else display_pixels(self.prepared.inputs[i])
        return [encode_png(overlay(background, e.heatmap, box=e.box)) for e in self.explanations[i]]


@dataclasses.dataclass(frozen=True)
class DenseScoresResult:
    model: str
    version: int
    class_names: tuple[str, ...]
    result: DenseResult


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What a client may know about a model: versions on disk and ready, why not ready,
    its configuration and, when a version is ready, the newest one's layers and methods."""

    name: str
    versions: list[int]
    available_versions: list[int]
    reason: str
    config: ModelConfig | None
    version: int = 0  # newest ready version (0: none)
    default_layer: str = ""
    target_layers: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return bool(self.available_versions)


# ---------------------------------------------------------------------------- the data plane


class DataPlane:
    """Requests in (plain values), library results out; owns the batcher.

    ``pool`` runs decoding and encoding off the event loop; ``deadline`` arguments are
    ``time.monotonic()`` instants (None: none).
    """

    def __init__(
        self,
        config: ServerConfig,
        runtimes: ModelRuntimes,
        pool: concurrent.futures.Executor,
        metrics: BatcherMetrics[BatchKey] | None = None,
    ) -> None:
        self.config = config
        self.runtimes = runtimes
        self.repository: ModelRepository = runtimes.repository
        self._pool = pool
        self._draining = False
        self.batcher: Batcher[BatchKey, Job] = Batcher(
            self.compute,
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            max_queued=config.max_queued,
            workers=config.workers,
            metrics=metrics,
        )

    async def start(self) -> None:
        await self.batcher.start()

    def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE) from now on; accepted ones go on."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    async def close(self) -> None:
        """Stop the batcher; what is still queued fails UNAVAILABLE."""
        await self.batcher.close(drain=False)

    # ------------------------------------------------------------ checks

    def runtime(self, model: str, version: int = 0) -> ModelRuntime:
        """The ready runtime of a model (version 0: the newest); NOT_FOUND / UNAVAILABLE otherwise."""
        if self._draining:
            raise Unavailable("the server is draining (shutting down); retry on another replica")
        if not model:
            raise InvalidArgument(f"model.name is required; models: {self.repository.names()}")
        if version < 0:
            raise InvalidArgument(f"model.version must be >= 0 (0: newest), got {version}")
        return self.runtimes.get(model, version or None)

    def check_count(self, n: int, what: str = "images") -> None:
        if n < 1:
            raise InvalidArgument(f"no {what} in the request; send 1 to {self.config.max_images}")
        if n > self.config.max_images:
            raise InvalidArgument(
                f"{n} {what} in one request; at most {self.config.max_images} are allowed (max_images)"
            )

    # ------------------------------------------------------------ requests

    async def predict(
        self, model: str, version: int, images: Sequence[ImageInput], top_k: int = 0, deadline: float | None = None
    ) -> PredictResult:
        """Class scores per image. ``top_k`` (0: all classes) is how many classes the caller
        will list; it is checked here."""
        rt = self.runtime(model, version)
        self.check_count(len(images))
        classes = rt.entry.config.class_names
        if not 0 <= top_k <= len(classes):
            raise InvalidArgument(f"top_k must be between 0 and {len(classes)} (the class count), got {top_k}")
        prepared = await self.in_pool(self.prepare, rt, images, inline=self.small(images))
        job = PredictJob(rt, rt.explainer(""), prepared.inputs)
        key = PredictKey(rt.name, rt.version, prepared.inputs.shape[1:])
        scores = await self.batcher.submit(key, job, size=len(images), deadline=deadline)
        return PredictResult(rt.name, rt.version, tuple(classes), scores)

    async def explain(
        self,
        model: str,
        version: int,
        images: Sequence[ImageInput],
        *,
        layer: str = "",
        methods: Sequence[str] = (),
        targets: Sequence[Sequence[int | str]] | None = None,
        top_k: int = 0,
        deadline: float | None = None,
    ) -> ExplainResult:
        """Explanations per image. ``layer`` "" is the model's default; no ``methods`` means
        gradcam; ``targets``: None (the ``top_k`` predicted classes, 0 meaning 1), one list
        of classes (indices or names) for all images, or one per image."""
        rt = self.runtime(model, version)
        n = len(images)
        self.check_count(n)
        ex = rt.explainer(layer)
        methods = ex.check_methods(tuple(methods) or ("gradcam",))  # before batching
        top_k = top_k or 1
        if targets is not None and len(targets) not in (1, n):
            # Said in the wire's words (``repeated TargetList targets``) before the library checks the rest.
            raise InvalidArgument(
                f"{len(targets)} target lists for {n} images: give none (top_k), one for all images, or one per image"
            )
        per_image = ex.resolve_targets(n, None if targets is None else [list(t) for t in targets], top_k)
        prepared = await self.in_pool(self.prepare, rt, images, inline=self.small(images))
        key = ExplainKey(
            rt.name,
            rt.version,
            ex.layer_name,
            methods,
            prepared.inputs.shape[1:],
            top_k if per_image is None else None,
        )
        job = ExplainJob(rt, ex, prepared.inputs, per_image)
        results = await self.batcher.submit(key, job, size=n, deadline=deadline)
        return ExplainResult(rt.name, rt.version, ex.layer_name, list(results), prepared)

    async def dense_scores(
        self,
        model: str,
        version: int,
        image: ImageInput | None,
        *,
        stride: int = 0,
        scales: Sequence[float] = (),
        mode: str = "",
        deadline: float | None = None,
    ) -> DenseScoresResult:
        """Dense sliding-window scores of one image of at least the model's input size.
        ``stride`` 0: the network's total stride; no ``scales``: (1.0,); ``mode`` "": "fcn"."""
        rt = self.runtime(model, version)
        if image is None:
            raise InvalidArgument("image is required: one image at least the model's input size")
        if stride < 0:
            raise InvalidArgument(f"stride must be >= 0 (0: the network's total stride), got {stride}")
        scales = tuple(float(x) for x in scales) or (1.0,)
        if any(not np.isfinite(x) or x <= 0 for x in scales) or len(scales) > MAX_SCALES:
            raise InvalidArgument(f"scales must be 1 to {MAX_SCALES} positive finite numbers, got {list(scales)}")
        width, height = declared_size(image)
        for x in scales:
            wire.check_pixels(round(width * x), round(height * x), self.config.max_pixels, f"image at scale {x}")
        mode = mode or "fcn"
        if mode not in ("fcn", "crops"):
            raise InvalidArgument(f"mode must be 'fcn' or 'crops', got {mode!r}")
        x = await self.in_pool(self.dense_input, rt, image)
        key = DenseKey(rt.name, rt.version, x.shape, stride or None, scales, mode)
        result = await self.batcher.submit(key, DenseJob(rt, x), size=1, deadline=deadline)
        return DenseScoresResult(rt.name, rt.version, tuple(rt.entry.config.class_names), result)

    def list_models(self) -> list[ModelDescription]:
        return [self.describe(name) for name in self.repository.names()]

    def get_model(self, name: str, version: int = 0) -> ModelDescription:
        """The description of ``name``; NOT_FOUND for an unknown name, or a version not on disk."""
        if not name:
            raise InvalidArgument(f"model.name is required; models: {self.repository.names()}")
        info = self.describe(name)
        if version and version not in info.versions:
            raise ModelNotFound(f"model {name!r} has no version {version}; versions: {list(info.versions)}")
        return info

    def describe(self, name: str) -> ModelDescription:
        st = self.repository.status(name)
        ready = {v: rt for v, rt in self.runtimes.ready_versions(name).items() if v in st.entries}
        reason = st.reason or ("" if ready else "warming up")
        if not ready:
            return ModelDescription(name, list(st.versions), [], reason, st.config)
        newest = ready[max(ready)]
        return ModelDescription(
            name,
            list(st.versions),
            list(ready),
            reason,
            st.config,
            version=newest.version,
            default_layer=newest.default_explainer.layer_name,
            target_layers=newest.layers,
            methods=newest.methods,
        )

    # ------------------------------------------------------------ preparing (I/O pool or inline)

    def prepare(self, rt: ModelRuntime, images: Sequence[ImageInput]) -> Prepared:
        """Decode, resize and preprocess to the model's input (N, H, W, C) float32; float32
        tensors must already have exactly that shape."""
        cfg = rt.entry.config
        h, w = cfg.input_size
        expected = (h, w, cfg.channels)
        arrays: list[np.ndarray] = []
        pixels: list[np.ndarray | None] = []
        for i, msg in enumerate(images):
            what = f"image {i}" if len(images) > 1 else "image"
            img = decode_image(msg, self.config.max_pixels, what)
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
            arrays.append(model_input(img.array, cfg))
            pixels.append(img.array)
        return Prepared(np.stack(arrays).astype(np.float32, copy=False), pixels)

    def dense_input(self, rt: ModelRuntime, image: ImageInput) -> np.ndarray:
        """One image preprocessed at its own size, at least the model's window."""
        cfg = rt.entry.config
        img = decode_image(image, self.config.max_pixels)
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

    @staticmethod
    def small(images: Sequence[ImageInput]) -> bool:
        """Raw inputs of at most 256 KiB in all: cheap enough to prepare on the event loop."""
        return input_bytes(images) <= SMALL_INPUT_BYTES

    async def in_pool(self, fn: Callable[..., Any], *args: Any, inline: bool = False) -> Any:
        """Run ``fn`` in the I/O pool (decoding, encoding), or right here when ``inline``
        (small work, where the thread hop would cost more than the work)."""
        if inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    # ------------------------------------------------------------ compute (worker thread)

    def compute(self, key: BatchKey, jobs: list[Job]) -> list[Any]:
        """One batch of equal-keyed jobs → one result per job (an exception fails only its job)."""
        try:
            return self._run(key, jobs)
        except (InvalidArgument, NotFound, ValueError, LookupError):
            if len(jobs) == 1:
                raise
        # One bad request must not fail the others it was batched with.
        out: list[Any] = []
        for job in jobs:
            try:
                out.extend(self._run(key, [job]))
            except Exception as e:  # noqa: BLE001 - this job's own error
                out.append(e)
        return out

    def _run(self, key: BatchKey, jobs: list[Job]) -> list[Any]:
        if isinstance(key, PredictKey):
            return self._run_predict(cast(list[PredictJob], jobs))
        if isinstance(key, ExplainKey):
            return self._run_explain(key, cast(list[ExplainJob], jobs))
        return self._run_dense(key, cast(list[DenseJob], jobs))

    @staticmethod
    def _run_predict(jobs: list[PredictJob]) -> list[Any]:
        scores = jobs[0].explainer.predict(np.concatenate([j.images for j in jobs]))
        return split(scores, jobs)

    @staticmethod
    def _run_explain(key: ExplainKey, jobs: list[ExplainJob]) -> list[Any]:
        images = np.concatenate([j.images for j in jobs])
        targets = None if key.top_k is not None else [t for j in jobs for t in (j.targets or ())]
        results = jobs[0].explainer.explain(images, methods=key.methods, targets=targets, top_k=key.top_k or 1)
        return split(results, jobs)

    @staticmethod
    def _run_dense(key: DenseKey, jobs: list[DenseJob]) -> list[Any]:
        from camserve.dense import dense_scores

        out: list[Any] = []
        for job in jobs:
            try:
                out.append(
                    dense_scores(
                        job.runtime.entry.model, job.image, stride=key.stride, scales=key.scales, mode=key.mode
                    )
                )
            except Exception as e:  # noqa: BLE001 - per request
                out.append(e)
        return out
