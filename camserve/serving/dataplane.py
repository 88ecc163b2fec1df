"""The protocol-independent request path of the server.

validate → cost (:mod:`~camserve.serving.plans`: work units against ``max_work_units``, the
answer's size against ``max_message_mb``; an Explain request's resolved parameters are kept
for the next request with the same ones) → decode → prepare (pixels resized to the model's
input; preprocessing runs once per batch in the worker) → batch (the
:class:`~camserve.serving.batching.Batcher`) → compute (:mod:`~camserve.serving.compute`, in a
worker thread, stopping between chunks when nobody waits any more) → results as library
objects (numpy scores, :class:`~camserve.explanation.Explanation` lists, a
:class:`~camserve.dense.DenseResult`). Protocol front ends (the gRPC servicer; later HTTP and
the Open Inference Protocol) only convert their messages to these calls and the results
back, so every front end shares one batcher, one set of limits and the same checks.

Inputs are plain values; images are :data:`ImageInput`: a wire ``camserve.v1.Image`` (decoded
in :mod:`~camserve.serving.inputs`, the one place that reads one) or an already decoded
:class:`~camserve.wire.WireImage`. Request parameters are checked by the library
(:meth:`Explainer.check_methods <camserve.explain.Explainer.check_methods>`,
:meth:`~camserve.explain.Explainer.resolve_targets`) before anything is queued; errors are
:mod:`camserve.errors` kinds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from camserve import wire
from camserve.errors import InvalidArgument, Unavailable
from camserve.serving import budget, compute, inputs
from camserve.serving.batching import Batcher, BatcherMetrics
from camserve.serving.budget import Cost, Outputs, WorkBudget
from camserve.serving.config import ServerConfig
from camserve.serving.inputs import ImageInput, declared_size, decode_image, inline_ok
from camserve.serving.jobs import BatchKey, DenseJob, DenseKey, ExplainJob, Job, PredictJob, PredictKey
from camserve.serving.plans import Limits, dense_cost, explain_plan, plural
from camserve.serving.repository import ModelNotFound, ModelRepository
from camserve.serving.results import (
    DenseScoresResult,
    ExplainResult,
    ModelDescription,
    PredictResult,
    Prepared,
    display_pixels,
)
from camserve.serving.runtime import ModelRuntime, ModelRuntimes, layer_key

__all__ = [
    "DataPlane",
    "DenseScoresResult",
    "ExplainResult",
    "ImageInput",
    "ModelDescription",
    "Outputs",
    "PredictResult",
    "Prepared",
    "decode_image",
    "display_pixels",
]

MAX_SCALES = 16

#: An Explain answer with labels, scores and boxes only.
NO_MAPS = Outputs()

R = TypeVar("R")


# ---------------------------------------------------------------------------- the data plane


class DataPlane:
    """Requests in (plain values), library results out; owns the batcher and the work budget.

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
        self.budget = WorkBudget(config.max_work_units)
        self.limits = Limits(self.budget, config.max_message_bytes)
        self._pool = pool
        self._draining = False
        self._stop_at: float | None = None
        from camserve.explain.graphs import bucket_sizes  # the sizes the Explainer pads a batch to

        self.batcher: Batcher[BatchKey, Job] = Batcher(
            self.compute,
            max_batch_size=config.max_batch_size,
            batch_timeout=config.batch_timeout,
            max_queued=config.max_queued,
            workers=config.workers,
            metrics=metrics,
            batch_sizes=bucket_sizes(config.max_batch_size),
        )

    async def start(self) -> None:
        await self.batcher.start()

    def drain(self, stop_at: float | None = None) -> None:
        """Refuse new requests (UNAVAILABLE) from now on; accepted ones go on, until the
        ``time.monotonic()`` instant ``stop_at`` when given: compute still running then
        stops at its next checkpoint (UNAVAILABLE)."""
        self._draining = True
        self._stop_at = stop_at

    @property
    def draining(self) -> bool:
        return self._draining

    def stop_reason(self) -> str | None:
        """Why compute must stop now (the server stops past its drain time), else None.
        Called from worker threads."""
        stop_at = self._stop_at
        if stop_at is not None and time.monotonic() >= stop_at:
            return (
                "the server is shutting down and this request did not finish within its drain time "
                f"(drain_timeout_s={self.config.drain_timeout_s:g}); retry on another replica"
            )
        return None

    async def close(self) -> None:
        """Stop: compute still running stops at its next checkpoint, and every request not
        answered yet fails UNAVAILABLE."""
        self._draining = True
        self._stop_at = time.monotonic()
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

    async def _submit(self, key: BatchKey, job: Job, size: int) -> Any:
        """Queue ``job``; when its caller stops waiting (cancelled, deadline), the job is
        marked abandoned so that compute can stop early."""
        try:
            return await self.batcher.submit(key, job, size=size, deadline=job.deadline)
        except asyncio.CancelledError:
            job.abandoned = True
            raise

    # ------------------------------------------------------------ requests

    async def predict(
        self, model: str, version: int, images: Sequence[ImageInput], top_k: int = 0, deadline: float | None = None
    ) -> PredictResult:
        """Class scores per image. ``top_k`` (0: all classes) is how many classes the caller
        will list; it is checked here."""
        rt = self.runtime(model, version)
        n = len(images)
        self.check_count(n)
        classes = rt.entry.config.class_names
        if not 0 <= top_k <= len(classes):
            raise InvalidArgument(f"top_k must be between 0 and {len(classes)} (the class count), got {top_k}")
        cost = Cost(budget.predict_units(n), lambda: plural(n, "image"), "send fewer images")
        self.budget.check(cost)
        listed = top_k or len(classes)
        self.limits.check_response(
            budget.predict_response_bytes(n, listed, rt.label_bytes, len(classes)),
            lambda: f"{n} x {listed} scores",
            "use top_k",
        )
        with self.budget.reserve(cost):
            prepared = await self.in_pool(self.prepare, rt, images, inline=inline_ok(images))
            job = PredictJob(rt, rt.default_explainer, prepared.inputs, deadline)
            scores = await self._submit(PredictKey(rt.name, rt.version, rt.input_shape), job, n)
        return PredictResult(rt.name, rt.version, tuple(classes), scores)

    async def explain(
        self,
        model: str,
        version: int,
        images: Sequence[ImageInput],
        *,
        layer: str = "",
        methods: Sequence[str] = (),
        targets: Sequence[Sequence[Any]] | None = None,
        top_k: int = 0,
        outputs: Outputs = NO_MAPS,
        deadline: float | None = None,
        layers: Sequence[str] = (),
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> ExplainResult:
        """Explanations per image. ``layer`` "" is the model's default, ``layers`` several
        fused; no ``methods`` means gradcam; ``targets``: None (the ``top_k`` predicted
        classes, 0 meaning 1), one list of targets (class indices or names, or
        :mod:`camserve.targets` objects) for all images, or one per image; ``outputs``: what
        the caller will send back (for the answer's size, checked before any compute);
        ``aug_smooth`` counts six views per image in the work budget."""
        rt = self.runtime(model, version)
        n = len(images)
        self.check_count(n)
        # Requests without targets of their own or overlays (whose size depends on each
        # image's) resolve to the same plan whenever their parameters are the same.
        memo = None
        if targets is None and not outputs.overlay:
            memo = (layer, tuple(layers), tuple(methods), top_k, outputs, aug_smooth, eigen_smooth, n)
        plan = rt.plans.get(memo) if memo is not None else None
        if plan is None:
            key = layer_key(layer, layers)
            ex = rt.cached_explainer(key)
            if ex is None:  # a look-up may search the layers for close names, and building is work
                ex = await self.in_pool(rt.explainer, key)
            plan = explain_plan(
                rt, ex, key, images, methods, targets, top_k, outputs, aug_smooth, eigen_smooth, self.limits
            )
            if memo is not None:
                rt.remember_plan(memo, plan)
        else:
            rt.cached_explainer(plan.layer)  # used: the layer's explainer stays cached
        with self.budget.reserve(plan.cost):
            prepared = await self.in_pool(self.prepare, rt, images, inline=inline_ok(images))
            job = ExplainJob(rt, plan.explainer, prepared.inputs, plan.targets, deadline, methods=plan.methods)
            results = await self._submit(plan.key, job, n)
        return ExplainResult(rt.name, rt.version, plan.explainer.layer_name, list(results), prepared, plan.answer_bytes)

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
        detection: dict[str, Any] | None = None,
    ) -> DenseScoresResult:
        """Dense sliding-window scores of one image of at least the model's input size.
        ``stride`` 0: the network's total stride; no ``scales``: (1.0,); ``mode`` "": "fcn".
        ``detection``: also find objects, with these overrides of the model's ``[dense]``
        settings (then the settings' stride and scales stand in for 0 and none)."""
        rt = self.runtime(model, version)
        if image is None:
            raise InvalidArgument("image is required: one image at least the model's input size")
        settings, tight_rt, margin, explained = None, None, 0, 0
        if detection is not None:
            from camserve.dense.detect import DetectionSettings, candidates_per_window

            settings = DetectionSettings.from_config(rt.entry.config).with_overrides(**detection)
            scales = tuple(float(x) for x in scales) or settings.scales
            stride = stride or settings.stride or 0
            settings = settings.with_overrides(scales=scales, stride=stride or None)
            margin = settings.margin
            if settings.tight_boxes:
                tight_rt = self.runtime(settings.tight_box_model, 0) if settings.tight_box_model else rt
                explained = candidates_per_window(settings, rt.entry.model, len(rt.entry.config.class_names))
        if stride < 0:
            raise InvalidArgument(f"stride must be >= 0 (0: the network's total stride), got {stride}")
        scales = tuple(float(x) for x in scales) or (1.0,)
        if any(not np.isfinite(x) or x <= 0 for x in scales) or len(scales) > MAX_SCALES:
            raise InvalidArgument(f"scales must be 1 to {MAX_SCALES} positive finite numbers, got {list(scales)}")
        width, height = declared_size(image)
        for scale in scales:
            wire.check_pixels(
                round(width * scale), round(height * scale), self.config.max_pixels, f"image at scale {scale}"
            )
        mode = mode or "fcn"
        if mode not in ("fcn", "crops"):
            raise InvalidArgument(f"mode must be 'fcn' or 'crops', got {mode!r}")
        pad = int(np.ceil(2 * margin / min(scales))) if margin else 0  # the margin's windows, counted
        detections = settings.max_detections if settings is not None else 0
        cost, answer_bytes = dense_cost(
            rt, (height + pad, width + pad), stride, scales, detections, explained, self.limits
        )
        with self.budget.reserve(cost):
            x = await self.in_pool(self.dense_input, rt, image, inline=inline_ok([image]))
            key = DenseKey(rt.name, rt.version, x.shape, stride or None, scales, mode)
            job = DenseJob(rt, x, deadline, detection=settings, tight_runtime=tight_rt)
            result = await self._submit(key, job, 1)
        names = tuple(rt.entry.config.class_names)
        if settings is None:
            return DenseScoresResult(rt.name, rt.version, names, result, answer_bytes)
        return DenseScoresResult(
            rt.name, rt.version, names, result.scores, answer_bytes, result.detections, settings.background_class
        )

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
        """See :func:`camserve.serving.inputs.prepare`."""
        return inputs.prepare(rt, images, self.config.max_pixels)

    def dense_input(self, rt: ModelRuntime, image: ImageInput) -> np.ndarray:
        """See :func:`camserve.serving.inputs.dense_input`."""
        return inputs.dense_input(rt, image, self.config.max_pixels)

    @staticmethod
    def small(images: Sequence[ImageInput]) -> bool:
        """See :func:`inline_ok`."""
        return inline_ok(images)

    async def in_pool(self, fn: Callable[..., R], *args: Any, inline: bool = False) -> R:
        """Run ``fn`` in the I/O pool (decoding, encoding, layer look-ups), or right here when
        ``inline`` (small work, where the thread hop would cost more than the work)."""
        if inline:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    # ------------------------------------------------------------ compute (worker thread)

    def compute(self, key: BatchKey, jobs: list[Job]) -> list[Any]:
        """One batch of equal-keyed jobs → one result per job (see :mod:`~camserve.serving.compute`)."""
        return compute.compute(key, jobs, self.stop_reason)
