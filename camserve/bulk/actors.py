"""The workers of ``camserve bulk``: one :class:`ExplainActor` per Ray actor, each holding one
model and its :class:`~camserve.explain.folder.FolderExplainer`, built and warmed up once; every
call explains a batch of images and writes their rows as one part of the output.

>>> settings = BulkSettings(model_dir="models/shapes_gap", out="out")
>>> settings.methods, settings.top_k
(('gradcam',), 1)
>>> default_batch_size((64, 64, 3)), default_batch_size((224, 224, 3))
(64, 16)
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from camserve import imaging
from camserve.bulk import output
from camserve.bulk.inputs import load_rgb
from camserve.errors import CamserveError

#: Input values one batch may hold when the batch size is chosen from the model (16 MiB of float32).
BATCH_VALUES = 1 << 22
MAX_DEFAULT_BATCH = 64


def default_batch_size(input_shape: Sequence[int | None]) -> int:
    """The largest power of two (at most :data:`MAX_DEFAULT_BATCH`) whose batch of the model's
    input holds at most :data:`BATCH_VALUES` values."""
    values = int(np.prod([d or 1 for d in input_shape]))
    size = 1
    while size * 2 <= MAX_DEFAULT_BATCH and size * 2 * values <= BATCH_VALUES:
        size *= 2
    return size


@dataclasses.dataclass(frozen=True)
class BulkSettings:
    """What every actor needs to know (sent to each one; plain values only).

    ``targets``: the same targets for every image (class names or indices, or the target objects
    of :mod:`camserve.targets`), else the ``top_k`` best. ``layer``: a name, several (fused), or
    None (the model's default). ``aug_smooth`` / ``eigen_smooth`` as for ``Explainer.explain``.
    ``batch_size``: images per call, None for the model's config (``max_batch_size`` in
    ``config.toml``) or :func:`default_batch_size`. ``threads``: TensorFlow threads per actor
    (None: TensorFlow's choice). ``dense``: add ``dense`` rows (sliding-window scores).
    """

    model_dir: str
    out: str
    version: int | None = None
    methods: tuple[str, ...] = ("gradcam",)
    targets: tuple[Any, ...] | None = None
    top_k: int = 1
    layer: str | tuple[str, ...] | None = None
    aug_smooth: bool = False
    eigen_smooth: bool = False
    max_channels: int | None = None
    batch_size: int | None = None
    overlays: bool = False
    dense: bool = False
    threads: int | None = None


def model_batch_size(settings: BulkSettings) -> int:
    """``settings.batch_size``, else the model's ``max_batch_size`` in its ``config.toml``, else
    :func:`default_batch_size` of its input (``input_size`` × ``channels``).

    >>> model_batch_size(BulkSettings(model_dir="any", out="out", batch_size=8))
    8
    """
    if settings.batch_size:
        return int(settings.batch_size)
    from camserve.serving.repository import ModelConfig

    config = ModelConfig.from_toml(os.path.join(settings.model_dir, "config.toml"))
    configured = config.extra.get("max_batch_size")
    return int(configured) if configured else default_batch_size((*config.input_size, config.channels))


class ExplainActor:
    """Explain batches of images (a Ray Data ``map_batches`` callable class).

    Built once per actor: TensorFlow (quietly), the model folder, its Explainer, then warm-up of
    a full batch with the job's methods and targets. Each call takes ``{"image": [...], "location": [...]}``
    and returns one summary row per image (``image``, ``rows`` written, ``failed``,
    ``setup_error``: the pickled error of a start that failed, else empty); the rows go to
    a part of ``OUT/explanations.parquet`` written by the actor itself, so they never travel
    through the driver.
    """

    def __init__(self, settings: BulkSettings):
        from camserve.cli import load_tensorflow
        from camserve.cli.options import fit_masks

        load_tensorflow()
        if settings.threads:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(settings.threads)
            tf.config.threading.set_inter_op_parallelism_threads(settings.threads)
        from camserve.explain.folder import FolderExplainer

        self.settings = settings
        self.setup_error: CamserveError | None = None
        try:
            size = model_batch_size(settings)
            self.folder = FolderExplainer.load(
                settings.model_dir, settings.version, settings.layer, settings.max_channels, max_batch_size=size
            )
            # Segmentation masks to the model's output size, as camserve explain does.
            self.targets = fit_masks(settings.targets, self.folder.explainer.output_shape)
            # Warm-up: the graph of a full batch, as nearly every call is (Explainer.warm_up would
            # compile every smaller bucket too; a call that needs one compiles it then). With the
            # job's own targets and options, so a bad target is the job's error here, not an
            # error row for every image.
            blank = np.zeros((*self.folder.entry.config.input_size, 3), np.uint8)
            self.explain_rgbs([blank] * size)
            if settings.dense:  # likewise a head that cannot be made fully convolutional
                from camserve.dense import dense_scores

                dense_scores(self.folder.entry.model, imaging.model_input(blank, self.folder.entry.config))
        except CamserveError as e:
            # Sent back by every call instead (nothing written): Ray reports exceptions raised
            # by actors only as text, and the driver shows the user this error as it is.
            self.setup_error = e
        self.ready_at = time.time()  # the job's start-up ends when its first actor is ready

    def explain_rgbs(self, rgbs: list[np.ndarray]) -> list[list[Any]]:
        """The explanations of decoded RGB images with the job's methods, targets and options:
        per image, targets outer, methods inner (as :meth:`Explainer.explain`)."""
        s = self.settings
        return self.folder.explain_rgbs(
            rgbs, s.methods, self.targets, s.top_k, aug_smooth=s.aug_smooth, eigen_smooth=s.eigen_smooth
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = [str(i) for i in batch["image"]]
        if self.setup_error is not None:
            return _summary(images, dict.fromkeys(images, 0), set(), self.ready_at, pickle.dumps(self.setup_error))
        rows = explain_images(self, images, [str(p) for p in batch["location"]])
        output.write_part(self.settings.out, rows)
        counts = dict.fromkeys(images, 0)
        failed = set()
        for r in rows:
            counts[r["image"]] += 1
            if r["error"] is not None:
                failed.add(r["image"])
        return _summary(images, counts, failed, self.ready_at)


def _summary(
    images: list[str], counts: dict[str, int], failed: set[str], ready_at: float, setup_error: bytes = b""
) -> dict[str, Any]:
    """What a call sends back per image: rows written, failed or not, when the actor was ready
    (``time.time()``), and the pickled error that kept it from starting (empty bytes if none)."""
    return {
        "image": np.array(images, dtype=object),
        "rows": np.array([counts[i] for i in images], np.int64),
        "failed": np.array([i in failed for i in images], bool),
        "ready_at": np.full(len(images), ready_at, np.float64),
        "setup_error": np.array([setup_error] * len(images), dtype=object),
    }


def explain_images(
    actor: ExplainActor, images: Sequence[str], locations: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The output rows of ``images`` (read from ``locations``, default the images as given): per
    image, one row per (target, method) (then ``dense`` rows), or one error row when it cannot be
    read, decoded or explained."""
    s = actor.settings
    read: dict[str, np.ndarray] = {}
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for image, location in zip(images, locations or images):
        try:
            read[image] = load_rgb(location, name=image)
        except CamserveError as e:
            rows_of[image] = [output.error_row(image, _message(e))]
    good = list(read)
    explained: list[list[Any] | CamserveError]
    try:
        explained = list(actor.explain_rgbs([read[i] for i in good])) if good else []
    except CamserveError:  # one image the model cannot take: explain them one by one
        explained = []
        for image in good:
            try:
                explained.append(actor.explain_rgbs([read[image]])[0])
            except CamserveError as e:
                explained.append(e)
    for image, result in zip(good, explained):
        rgb = read[image]
        if isinstance(result, CamserveError):
            rows_of[image] = [output.error_row(image, _message(result), *rgb.shape[:2])]
            continue
        rows_of[image] = [_explanation_row(s, image, rgb, e) for e in result]
        if s.dense:
            rows_of[image] += _dense_rows(actor, image, rgb, list(dict.fromkeys(e.class_index for e in result)))
    return [r for image in images for r in rows_of[image]]


def _message(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _explanation_row(s: BulkSettings, image: str, rgb: np.ndarray, e: Any) -> dict[str, Any]:
    from camserve.explanation import image_box

    overlay = None
    if s.overlays:
        overlay = output.overlay_name(image, e.label, e.method)
        png = imaging.encode_png(imaging.overlay(rgb, e.heatmap, box=e.box))
        output.write_file(output.join(s.out, output.OVERLAYS, overlay), png)
    return output.row(
        image,
        method=e.method,
        class_index=e.class_index,
        label=e.label,
        score=float(e.score),
        box=image_box(e.box, e.heatmap.shape, rgb.shape),
        height=rgb.shape[0],
        width=rgb.shape[1],
        overlay=overlay,
        **output.map_columns(e.raw),
    )


def _dense_rows(actor: ExplainActor, image: str, rgb: np.ndarray, classes: list[int]) -> list[dict[str, Any]]:
    """One ``dense`` row per class: its sliding-window scores over the whole image (one FCN
    pass at the network's stride, images smaller than the window zero-padded), the best
    window's score and box."""
    from camserve.dense import dense_scores

    folder = actor.folder
    x = imaging.model_input(rgb, folder.entry.config, resize_to_input=False)
    try:
        level = dense_scores(folder.entry.model, x, pad=True)[0]
    except (CamserveError, ValueError) as e:
        return [output.error_row(image, f"dense scores: {_message(e)}", *rgb.shape[:2])]
    names = folder.explainer.class_names
    rows = []
    for c in classes:
        grid = level.scores[..., c]
        best = np.unravel_index(int(np.argmax(grid)), grid.shape)
        x0, y0, x1, y1 = (float(v) for v in level.boxes[best])
        rows.append(
            output.row(
                image,
                method="dense",
                class_index=c,
                label=names[c] if names else str(c),
                score=float(grid[best]),
                box=[int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))],
                height=rgb.shape[0],
                width=rgb.shape[1],
                **output.map_columns(grid),
            )
        )
    return rows


def actor_resources(
    cluster: dict[str, float],
    cpus_per_actor: int,
    max_actors: int | None = None,
    gpus_per_actor: float | None = None,
    min_actors: int = 1,
) -> dict[str, Any]:
    """Ray resources and pool size of the actors for a cluster's resources
    (``ray.cluster_resources()``): one GPU each where the cluster has GPUs (as many actors as
    GPUs), else ``cpus_per_actor`` CPUs each (as many as fit). ``gpus_per_actor`` (> 0: GPU
    actors even before the cluster shows a GPU, as on a cluster that autoscales from zero;
    0: CPU actors) and ``max_actors`` (the largest pool) override the choice; the pool starts
    with ``min_actors`` (at most the largest pool) and grows while work waits.

    >>> actor_resources({"CPU": 8.0, "GPU": 2.0}, 2)
    {'num_cpus': 1, 'num_gpus': 1, 'min_size': 1, 'max_size': 2}
    >>> actor_resources({"CPU": 2.0}, 2)
    {'num_cpus': 2, 'num_gpus': 0, 'min_size': 1, 'max_size': 1}
    >>> actor_resources({"CPU": 2.0}, 2, max_actors=8, gpus_per_actor=1)
    {'num_cpus': 1, 'num_gpus': 1, 'min_size': 1, 'max_size': 8}
    """
    gpus = float(cluster.get("GPU", 0))
    per_gpu = float(gpus_per_actor) if gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if per_gpu > 0:
        size = max(1, int(gpus / per_gpu))
        resources: dict[str, Any] = {"num_cpus": 1, "num_gpus": int(per_gpu) if per_gpu.is_integer() else per_gpu}
    else:
        cpus = max(1, int(cluster.get("CPU", os.cpu_count() or 1)))
        per = max(1, min(cpus_per_actor, cpus))
        size = max(1, cpus // per)
        resources = {"num_cpus": per, "num_gpus": 0}
    if max_actors:  # e.g. more GPUs than now, on a cluster that autoscales
        size = max(1, max_actors)
    return {**resources, "min_size": max(1, min(min_actors, size)), "max_size": size}
