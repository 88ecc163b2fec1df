"""A ``camserve bulk`` job on Ray Data: the images not yet in ``OUT`` flow through a pool of
:class:`~camserve.bulk.actors.ExplainActor` (``map_batches`` with an autoscaling actor pool),
each batch written as one atomic part; a progress bar; a :class:`Summary` at the end.

Nothing lost, nothing twice: every input is either already in ``OUT`` (skipped) or sent to the
actors; a part holds whole images and appears at once (temporary name, rename), is named by its
images (a retried batch replaces it), and a last pass removes any image found in two parts. A
crash or Ctrl-C loses only the batches in flight: run again with the same ``OUT`` to resume.

>>> str(Summary(images=10, done=7, skipped=2, failed=1, seconds=2.0, startup_seconds=1.0, work_seconds=0.5))
'10 images: 7 done, 2 skipped, 1 failed; 4.0 images/s (16.0 images/s after 1.0 s of start-up)'
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from typing import Any

from camserve.bulk import output
from camserve.bulk.actors import BulkSettings, ExplainActor, actor_resources, model_batch_size
from camserve.bulk.inputs import DEFAULT_PATH_COLUMN, is_uri, local_location, resolve_inputs
from camserve.errors import CamserveError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

INSTALL_HINT = 'camserve bulk needs Ray Data: pip install "camserve[bulk]" (or pip install "ray[data]>=2.60")'


@dataclasses.dataclass
class Summary:
    """What a job did. ``done``: images explained now; ``skipped``: already in ``OUT``;
    ``failed``: images that got an error row now; ``seconds``: the whole job; ``startup_seconds``:
    until the first actor was ready (Ray, the actor's TensorFlow, model and warm-up; reading the
    inputs and ``OUT`` too); ``work_seconds``: from then until the last batch came back (Ray's
    shutdown and the final checks of ``OUT`` are in neither); ``missing``: inputs not in ``OUT``
    at the end (0 unless something is wrong)."""

    images: int
    done: int
    skipped: int
    failed: int
    seconds: float
    startup_seconds: float
    work_seconds: float
    missing: int = 0
    duplicates_removed: int = 0

    @property
    def images_per_s(self) -> float:
        """Images done or failed now, per second of the whole job."""
        return (self.done + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Images done or failed now, per second of work once the first actor was ready (start-up excluded)."""
        return (self.done + self.failed) / self.work_seconds if self.work_seconds > 0 else 0.0

    def __str__(self) -> str:
        text = (
            f"{self.images} images: {self.done} done, {self.skipped} skipped, {self.failed} failed; "
            f"{self.images_per_s:.1f} images/s ({self.steady_images_per_s:.1f} images/s after "
            f"{self.startup_seconds:.1f} s of start-up)"
        )
        if self.missing:
            text += f"; {self.missing} missing from the output"
        return text


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or :class:`~camserve.errors.Unavailable` saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise Unavailable(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray for the job: the session already started in this process if any, else a cluster at
    ``address`` (or ``RAY_ADDRESS``), else an embedded local Ray on this machine's CPUs (no
    dashboard, quiet logs), shut down at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **quiet)
    try:
        yield ray
    finally:
        ray.shutdown()


def _quiet_ray_data(ray: Any) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the tqdm bar
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # execution plans, "progress bars disabled"


def _check_settings(settings: BulkSettings) -> None:
    """What the driver can check without TensorFlow: the model folder, targets, top-k."""
    from camserve.serving.repository import ModelConfig, resolve_version

    if is_uri(settings.model_dir):
        raise InvalidArgument(f"--model must be a local folder (on every worker), got {settings.model_dir}")
    config = ModelConfig.from_toml(os.path.join(settings.model_dir, "config.toml"))
    resolve_version(settings.model_dir, settings.version)
    names = config.class_names
    for t in settings.targets or ():
        if isinstance(t, int) and not 0 <= t < len(names):
            raise InvalidArgument(f"--target {t}: out of range; the model has classes 0..{len(names) - 1}")
        if isinstance(t, str) and t not in names:
            raise InvalidArgument(f"--target {t!r}: unknown class; allowed: {', '.join(names)} or 0..{len(names) - 1}")
    if not settings.targets and not 1 <= settings.top_k <= len(names):
        raise InvalidArgument(f"--top-k must be between 1 and {len(names)} (the class count), got {settings.top_k}")
    if settings.batch_size is not None and settings.batch_size < 1:
        raise InvalidArgument(f"--batch-size must be ≥ 1, got {settings.batch_size}")


def _setup_error(blob: bytes) -> CamserveError:
    """The error an actor could not start with, sent back pickled (by our own workers)."""
    error = pickle.loads(blob)
    return error if isinstance(error, CamserveError) else Unavailable(f"the actors could not start: {error!r}")


def run_bulk(
    inputs: Sequence[str],
    settings: BulkSettings,
    address: str | None = None,
    path_column: str = DEFAULT_PATH_COLUMN,
    cpus_per_actor: int = 2,
    max_actors: int | None = None,
    progress: bool = True,
    min_actors: int = 1,
    gpus_per_actor: float | None = None,
    retry_failed: bool = False,
) -> Summary:
    """Explain every image of ``inputs`` (see :func:`~camserve.bulk.inputs.resolve_inputs`) not yet
    in ``settings.out``, on Ray (:func:`ray_session`); returns the :class:`Summary`. Actor
    resources and pool size: :func:`~camserve.bulk.actors.actor_resources`. ``retry_failed``:
    explain again the images whose row in ``OUT`` is an error row (their old rows are removed)."""
    from tqdm import tqdm

    import_ray()  # before anything reads tables or OUT (pyarrow comes with Ray Data)
    start, start_epoch = time.perf_counter(), time.time()  # actors say when they were ready in time.time()
    if not is_uri(settings.out):
        settings = dataclasses.replace(settings, out=os.path.abspath(settings.out))
    settings = dataclasses.replace(settings, model_dir=os.path.abspath(settings.model_dir))
    _check_settings(settings)
    if cpus_per_actor < 1 or min_actors < 1 or (max_actors is not None and max_actors < 1):
        raise InvalidArgument(
            f"--cpus-per-actor, --min-actors and --max-actors must be ≥ 1, got {cpus_per_actor}, {min_actors}, {max_actors}"
        )
    if gpus_per_actor is not None and not 0 <= gpus_per_actor:
        raise InvalidArgument(f"--gpus-per-actor must be ≥ 0 (0: CPU actors), got {gpus_per_actor}")
    images = resolve_inputs(inputs, path_column)
    done = output.done_images(settings.out)
    if retry_failed:
        wanted = set(images)
        failed_before = {i: part for i, part in output.failed_images(settings.out).items() if i in wanted}
        output.drop_images(settings.out, failed_before)
        done = {i: part for i, part in done.items() if i not in failed_before}
    todo = [i for i in images if i not in done]
    skipped = len(images) - len(todo)
    n_done = n_failed = 0
    last_back = start
    first_ready: float | None = None
    if todo:
        with ray_session(address) as ray:
            _quiet_ray_data(ray)
            pool = actor_resources(ray.cluster_resources(), cpus_per_actor, max_actors, gpus_per_actor, min_actors)
            if not pool["num_gpus"]:
                settings = dataclasses.replace(settings, threads=settings.threads or pool["num_cpus"])
            batch = model_batch_size(settings)
            items = [{"image": i, "location": local_location(i)} for i in todo]
            ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch)))
            ds = ds.map_batches(
                ExplainActor,
                fn_constructor_args=(settings,),
                batch_size=batch,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(min_size=pool["min_size"], max_size=pool["max_size"]),
                num_cpus=pool["num_cpus"],
                num_gpus=pool["num_gpus"] or None,
            )
            bar = tqdm(total=len(todo), unit="img", desc="bulk", disable=not progress)
            try:
                for result in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if len(result["image"]) and result["setup_error"][0]:  # the model, a method, a layer...
                        raise _setup_error(result["setup_error"][0])
                    n = len(result["image"])
                    failed = int(result["failed"].sum())
                    n_failed += failed
                    n_done += n - failed
                    ready = float(result["ready_at"].min())
                    first_ready = ready if first_ready is None else min(first_ready, ready)
                    bar.set_postfix(failed=n_failed, refresh=False)
                    bar.update(n)
            finally:
                bar.close()
            last_back = time.perf_counter()
    found = output.index(settings.out)
    removed = output.remove_duplicates(settings.out, found) if todo else 0
    if removed:
        log.warning("%d image(s) were written twice (a batch retried with other companions); one copy kept", removed)
    missing = len(set(images) - set(found))
    end = time.perf_counter()
    startup = min(last_back - start, max(0.0, first_ready - start_epoch)) if first_ready else last_back - start
    return Summary(
        images=len(images),
        done=n_done,
        skipped=skipped,
        failed=n_failed,
        seconds=end - start,
        startup_seconds=startup,
        work_seconds=last_back - start - startup,
        missing=missing,
        duplicates_removed=removed,
    )
