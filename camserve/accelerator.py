"""Accelerator settings of a serving process: precision, the device models run on, GPU
memory growth and TensorFlow's thread pools.

Importing this module does not import TensorFlow; the functions that need it do.

>>> check_precision(None), check_device("/gpu:1")
('float32', '/GPU:1')
>>> set_memory_growth([])   # no GPU: nothing to do
[]
>>> set_threads(0, 0)       # 0: TensorFlow's choice, nothing set
{}
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from camserve.errors import InvalidArgument

log = logging.getLogger("camserve.accelerator")

#: Precisions a model can be served in (Keras dtype policies).
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

_DEVICE = re.compile(r"/?(?P<kind>gpu|cpu):(?P<index>\d+)", re.IGNORECASE)


def check_precision(precision: str | None) -> str:
    """The precision name (None is ``"float32"``); InvalidArgument listing the allowed ones."""
    precision = precision or "float32"
    if precision not in PRECISIONS:
        raise InvalidArgument(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return precision


def check_device(device: str | None) -> str | None:
    """``"auto"``, None (TensorFlow places ops itself) or a device name in canonical form
    (``/GPU:0``, ``/CPU:0``); InvalidArgument otherwise."""
    if device is None or device == "":
        return None
    if device == "auto":
        return device
    found = _DEVICE.fullmatch(device.strip())
    if found is None:
        raise InvalidArgument(f"device must be auto, /GPU:<n> or /CPU:<n>, got {device!r}")
    return f"/{found['kind'].upper()}:{int(found['index'])}"


def gpus() -> list[Any]:
    """The GPUs TensorFlow sees (physical devices)."""
    import tensorflow as tf

    return list(tf.config.list_physical_devices("GPU"))


def resolve_device(device: str | None, visible_gpus: Sequence[Any] | None = None) -> str | None:
    """Where a model runs: ``"auto"`` is ``/GPU:0`` when a GPU is visible, else None (no
    pinning: the CPU is the only device, and TensorFlow's own placement leaves the numbers as
    they were); a named GPU must be visible (InvalidArgument naming the count otherwise); None
    stays None.

    >>> resolve_device("auto", visible_gpus=[]), resolve_device("auto", visible_gpus=["gpu0"])
    (None, '/GPU:0')
    """
    device = check_device(device)
    if device is None:
        return None
    found = list(gpus() if visible_gpus is None else visible_gpus)
    if device == "auto":
        return "/GPU:0" if found else None
    if device.startswith("/GPU:") and int(device.split(":")[1]) >= len(found):
        raise InvalidArgument(f"device {device} asked for, but {len(found)} GPU(s) are visible")
    return device


def set_memory_growth(devices: Sequence[Any] | None = None, enable: bool = True) -> list[str]:
    """Memory growth on (or off) for each GPU (all visible ones by default): TensorFlow then
    takes GPU memory as it needs it instead of all of it at start-up. Must run before the GPUs
    are first used; a GPU already initialised is logged and skipped. Returns the names set.
    """
    import tensorflow as tf

    devices = gpus() if devices is None else devices
    done = []
    for device in devices:
        name = getattr(device, "name", str(device))
        try:
            tf.config.experimental.set_memory_growth(device, enable)
        except (RuntimeError, ValueError) as exc:  # already initialised, or not a GPU
            log.warning("GPU memory growth not set", extra={"device": name, "reason": str(exc)})
            continue
        done.append(name)
    return done


#: The thread-pool settings and TensorFlow's names for them (tf.config.threading.get_/set_<name>).
_POOLS = (
    ("intra_op_threads", "intra_op_parallelism_threads"),
    ("inter_op_threads", "inter_op_parallelism_threads"),
)


def set_threads(intra_op_threads: int = 0, inter_op_threads: int = 0) -> dict[str, int]:
    """TensorFlow's thread pools (TF Serving's ``--tensorflow_intra_op_parallelism`` /
    ``--tensorflow_inter_op_parallelism``): threads one op may use, ops run at once; 0 leaves
    TensorFlow's choice. They must be set before TensorFlow's runtime starts: a value TensorFlow
    then refuses is logged (a WARNING naming the setting, the value asked for and the one in
    effect) unless it is already the one in effect, and never raised. ``intra_op_threads`` also
    sets OpenCV's threads per call (decoding, resizing, heatmap boxes; any time): on the bench
    machine OpenCV's own 2 threads spent twice the CPU of one on a 224 px heatmap box. Returns
    the values set.
    """
    wishes = {"intra_op_threads": intra_op_threads, "inter_op_threads": inter_op_threads}
    if not any(wishes.values()):
        return {}
    if intra_op_threads:
        import cv2

        cv2.setNumThreads(intra_op_threads)
    import tensorflow as tf

    done = {}
    for name, pool in _POOLS:
        wish = wishes[name]
        if not wish:
            continue
        try:
            getattr(tf.config.threading, f"set_{pool}")(wish)
        except RuntimeError:  # the runtime already started
            current = getattr(tf.config.threading, f"get_{pool}")()
            if current != wish:
                shown = f"{current} (TensorFlow's choice)" if current == 0 else str(current)
                log.warning(
                    f"{name} = {wish} not applied: TensorFlow already started with {shown}; set it before "
                    "TensorFlow starts (the flag or environment variable at start-up)",
                    extra={"setting": name, "asked": wish, "in_effect": current},
                )
            continue
        done[name] = wish
    return done


def configure(
    gpu_memory_growth: bool = True,
    devices: Sequence[Any] | None = None,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
) -> list[str]:
    """What a serving process does at start-up, before any model is loaded: TensorFlow's thread
    pools (:func:`set_threads`; 0: TensorFlow's choice), then GPU memory growth (when asked) for
    every visible GPU; the names of the GPUs set."""
    threads = set_threads(intra_op_threads, inter_op_threads)
    if threads:
        log.info("TensorFlow thread pools set", extra=threads)
    if not gpu_memory_growth:
        return []
    done = set_memory_growth(devices)
    if done:
        log.info("GPU memory growth on", extra={"devices": done})
    return done


__all__ = [
    "PRECISIONS",
    "check_device",
    "check_precision",
    "configure",
    "gpus",
    "resolve_device",
    "set_memory_growth",
    "set_threads",
]
