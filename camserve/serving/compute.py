"""The worker-thread side of the data plane: one batch of equal-keyed jobs → one result per job.

Runs in the :class:`~camserve.serving.batching.Batcher`'s worker threads, never on the event
loop. The batch's uint8 pixels go to the explainer as one uint8 array, preprocessed inside its
compiled graph; float32 inputs (or a batch mixing both) become one float32 input
(:func:`model_inputs`). The engine (:meth:`Explainer.predict <camserve.explain.Explainer.predict>`,
:meth:`~camserve.explain.Explainer.explain`, :func:`camserve.dense.dense_scores`) is given a
``checkpoint`` callable (:func:`checkpoint_for`) that it calls between chunks and batches:
it raises :class:`~camserve.errors.DeadlineExceeded` once every job of the batch is past its
deadline or abandoned by its caller, and :class:`~camserve.errors.Unavailable` once the server
stops past its drain time, so that no work goes on that nobody waits for.

A batch that fails with a client error (:class:`~camserve.errors.InvalidArgument`,
:class:`~camserve.errors.NotFound`) is retried job by job, so that one bad request does not
fail those it was batched with; anything else (a bug, a deadline, a stop) fails the batch.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from camserve.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable, kind_of
from camserve.explain.host_batches import aligned_empty
from camserve.imaging import preprocess
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

if TYPE_CHECKING:
    from camserve.imaging import InputSpec

#: A function the worker calls between chunks; raises to stop the computation.
Checkpoint = Callable[[], None]

#: Error kinds that may be one request's own fault: the batch is retried job by job.
RETRIED_KINDS = (InvalidArgument, NotFound)


class BatchDeadlineExceeded(DeadlineExceeded):
    """Every request of a batch is past its deadline (or gone): its compute stopped."""


class Stopped(Unavailable):
    """The server stopped past its drain time while this request was computed."""


def checkpoint_for(jobs: Sequence[Job], stop_reason: Callable[[], str | None]) -> Checkpoint:
    """The checkpoint of one batch: raises :class:`Stopped` when ``stop_reason()`` says why the
    server stops, :class:`BatchDeadlineExceeded` when every job is past its deadline or
    abandoned; returns otherwise."""

    def checkpoint() -> None:
        reason = stop_reason()
        if reason:
            raise Stopped(reason)
        now = time.monotonic()
        if all(j.expired(now) for j in jobs):
            raise BatchDeadlineExceeded(
                "the request's deadline passed while it was computed; the computation was stopped"
            )

    return checkpoint


@functools.lru_cache(maxsize=256)
def _takes_checkpoint(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "checkpoint" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_engine(fn: Callable[..., Any], *args: Any, checkpoint: Checkpoint, **kwargs: Any) -> Any:
    """``fn(*args, checkpoint=checkpoint, **kwargs)``; an engine function without the
    ``checkpoint`` keyword is called after one check."""
    checkpoint()
    try:
        takes = _takes_checkpoint(getattr(fn, "__func__", fn))
    except TypeError:  # not hashable
        takes = False
    if takes:
        return fn(*args, checkpoint=checkpoint, **kwargs)
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------------- inputs


def pixels_to_input(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 pixels (N, H, W, 3) at the model's size → float32 model input (N, H, W, C), in one
    step for the whole batch (what :func:`camserve.imaging.model_input` does per image)."""
    x = preprocess(pixels, spec.preprocessing)
    return x.mean(axis=-1, keepdims=True) if spec.channels == 1 else x


def model_inputs(arrays: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """The images of a batch (uint8 pixels or float32 inputs, (n, H, W, C) each) as one
    array for the explainer: uint8 pixels stay pixels (the explainer preprocesses them in its
    graphs), float32 inputs and mixed batches become float32 model input."""
    if not all(a.dtype == np.uint8 for a in arrays):
        arrays = [pixels_to_input(a, spec) if a.dtype == np.uint8 else a for a in arrays]
    return arrays[0] if len(arrays) == 1 else joined(arrays)


def joined(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The arrays concatenated along the first axis into one aligned buffer, which the
    explainer hands to TensorFlow without another copy (:mod:`camserve.explain.host_batches`).

    >>> joined([np.zeros((1, 2), np.uint8), np.ones((2, 2), np.uint8)]).tolist()
    [[0, 0], [1, 1], [1, 1]]
    """
    out = aligned_empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
    return np.concatenate(arrays, out=out)


# ---------------------------------------------------------------------------- compute


def compute(key: BatchKey, jobs: list[Job], stop_reason: Callable[[], str | None]) -> list[Any]:
    """One batch of equal-keyed jobs → one result per job (an exception fails only its job)."""
    try:
        results = _run(key, jobs, stop_reason)
    except Exception as e:
        if len(jobs) == 1 or kind_of(e) not in RETRIED_KINDS:
            raise
        # One bad request must not fail the others it was batched with.
        results = []
        for job in jobs:
            try:
                results.extend(_run(key, [job], stop_reason))
            except Exception as one:  # noqa: BLE001 - this job's own error
                results.append(one)
    return _late(jobs, results)


def _late(jobs: Sequence[Job], results: list[Any]) -> list[Any]:
    """Results of jobs whose deadline passed meanwhile become DEADLINE_EXCEEDED."""
    now = time.monotonic()
    for i, job in enumerate(jobs):
        if job.deadline is not None and job.deadline <= now and not isinstance(results[i], BaseException):
            results[i] = DeadlineExceeded("the request's deadline passed while it was computed")
    return results


def _run(key: BatchKey, jobs: list[Job], stop_reason: Callable[[], str | None]) -> list[Any]:
    if isinstance(key, PredictKey):
        return _run_predict(cast(list[PredictJob], jobs), checkpoint_for(jobs, stop_reason))
    if isinstance(key, ExplainKey):
        return _run_explain(key, cast(list[ExplainJob], jobs), checkpoint_for(jobs, stop_reason))
    return _run_dense(key, cast(list[DenseJob], jobs), stop_reason)


def _run_predict(jobs: list[PredictJob], checkpoint: Checkpoint) -> list[Any]:
    images = model_inputs([j.images for j in jobs], jobs[0].runtime.entry.config)
    scores = call_engine(jobs[0].explainer.predict, images, checkpoint=checkpoint)
    return split(scores, jobs)


def _run_explain(key: ExplainKey, jobs: list[ExplainJob], checkpoint: Checkpoint) -> list[Any]:
    images = model_inputs([j.images for j in jobs], jobs[0].runtime.entry.config)
    targets = None if key.top_k is not None else [t for j in jobs for t in (j.targets or ())]
    results = call_engine(
        jobs[0].explainer.explain,
        images,
        methods=key.methods,
        targets=targets,
        top_k=key.top_k or 1,
        checkpoint=checkpoint,
        aug_smooth=key.aug_smooth,
        eigen_smooth=key.eigen_smooth,
    )
    out = split(results, jobs)
    for i, job in enumerate(jobs):
        if job.methods is not None and job.methods != key.methods:
            out[i] = [in_order(per_image, job.methods) for per_image in out[i]]
    return out


def in_order(explanations: Sequence[Any], methods: Sequence[str]) -> list[Any]:
    """One image's explanations (targets outer, methods inner) with the methods of every
    target in the order ``methods`` gives.

    >>> from types import SimpleNamespace as E
    >>> [e.method for e in in_order([E(method="a"), E(method="b"), E(method="a"), E(method="b")], ("b", "a"))]
    ['b', 'a', 'b', 'a']
    """
    rank = {m: i for i, m in enumerate(methods)}
    k = len(methods)
    out: list[Any] = []
    for start in range(0, len(explanations), k):
        out.extend(sorted(explanations[start : start + k], key=lambda e: rank[e.method]))
    return out


def _run_dense(key: DenseKey, jobs: list[DenseJob], stop_reason: Callable[[], str | None]) -> list[Any]:
    from camserve.dense import dense_scores

    out: list[Any] = []
    for job in jobs:  # one after the other, each with its own deadline
        try:
            if job.detection is not None:
                out.append(call_engine(_detect, key, job, checkpoint=checkpoint_for([job], stop_reason)))
                continue
            out.append(
                call_engine(
                    dense_scores,
                    job.runtime.entry.model,
                    job.image,
                    stride=key.stride,
                    scales=key.scales,
                    mode=key.mode,
                    checkpoint=checkpoint_for([job], stop_reason),
                    **job.runtime.settings.dense_options(),  # as at warm-up: the same converted model
                )
            )
        except Stopped:
            raise
        except Exception as e:  # noqa: BLE001 - per request
            out.append(e)
    return out


def _detect(key: DenseKey, job: DenseJob, checkpoint: Checkpoint) -> Any:
    """Objects in one image (:func:`camserve.dense.detect`, stride and scales as the key's);
    tight boxes from the explainer of the tight-box model's runtime."""
    from camserve.dense import detect

    settings = job.detection
    tight = job.tight_runtime.explainer(settings.tight_box_layer or "") if job.tight_runtime is not None else None
    entry = job.runtime.entry
    return detect(
        entry.model,
        job.image,
        settings,
        entry.config.class_names,
        explainer=tight,
        mode=key.mode,
        checkpoint=checkpoint,
        **job.runtime.settings.dense_options(),
    )
