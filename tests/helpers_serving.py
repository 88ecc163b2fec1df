"""Tiny model repositories for the serving tests (a few conv layers, 32 px inputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from camserve.serving.config import ServerConfig

CLASSES = ("circle", "square", "triangle", "star")


def tiny_gap(seed: int = 0, size: int = 32):
    """conv → pool → conv → GAP → Dense(softmax)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name=f"tiny_gap_{seed}")


def tiny_fc(seed: int = 0, size: int = 32):
    """valid conv → pool → valid conv → Flatten → Dense → Dense (convertible to an FCN)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="last_conv")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax", name="predictions")(x)
    return keras.Model(inp, out, name=f"tiny_fc_{seed}")


def write_config(model_dir: Path, name: str, size: int = 32, layer: str = "") -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    names = ", ".join(f'"{c}"' for c in CLASSES)
    (model_dir / "config.toml").write_text(
        f'name = "{name}"\nclass_names = [{names}]\ninput_size = [{size}, {size}]\nchannels = 3\n'
        f'preprocessing = "scale_0_1"\ndefault_layer = "{layer}"\n'
    )


def local_config(root: Path, **overrides: Any) -> ServerConfig:
    """A server on loopback with free ports, text logs and no environment, for ``root``;
    ``overrides`` replace or add settings."""
    settings: dict[str, Any] = dict(
        models=str(root), host="127.0.0.1", port=0, metrics_port=0, http_port=0, log_format="text"
    )
    return ServerConfig.load(env={}, overrides={**settings, **overrides})


def save_model(root: Path, name: str, version: int, model, size: int = 32) -> Path:
    write_config(root / name, name, size)
    path = root / name / str(version) / "model.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def make_repository(root: Path, corrupt: bool = True) -> Path:
    """gap (versions 1, 2), fc (version 1) and, when ``corrupt``, a model whose file is garbage."""
    save_model(root, "gap", 1, tiny_gap(1))
    save_model(root, "gap", 2, tiny_gap(2))
    save_model(root, "fc", 1, tiny_fc(0))
    if corrupt:
        write_config(root / "broken", "broken")
        (root / "broken" / "1").mkdir(parents=True)
        (root / "broken" / "1" / "model.keras").write_bytes(b"this is not a zip file")
    return root


class RunningServer:
    """A CamServer on its own event loop in a background thread, for blocking tests.

    >>> with RunningServer(config) as rs: Client(rs.target).models()   # doctest: +SKIP
    """

    def __init__(self, config, repository=None, ready_timeout: float = 300.0) -> None:
        import asyncio
        import threading

        from camserve.serving.server import CamServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._make(CamServer, config, repository))
        self.port = self.run(self.server.start())
        self.run(self.server.wait_ready(ready_timeout))

    @staticmethod
    async def _make(cls, config, repository):
        return cls(config, repository)

    def run(self, coro, timeout: float | None = 600):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, grace: float = 5.0) -> None:
        if self.loop.is_running():
            self.run(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class LogLines:
    """Records of one logger while in the ``with`` block, attached to the logger itself (so it
    works whatever ``configure_logging`` did to propagation): ``records`` and ``json`` (the
    lines as :class:`~camserve.serving.observability.JsonFormatter` writes them).

    >>> with LogLines("camserve.serving.status") as log: ...   # doctest: +SKIP
    """

    def __init__(self, name: str) -> None:
        import logging

        self.logger = logging.getLogger(name)
        self.records: list = []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                outer.records.append(record)

        self._handler = _Handler(logging.DEBUG)

    @property
    def json(self) -> list[dict]:
        import json

        from camserve.serving.observability import JsonFormatter

        fmt = JsonFormatter()
        return [json.loads(fmt.format(r)) for r in list(self.records)]

    def __enter__(self) -> LogLines:
        import logging

        self._level = self.logger.level
        self.logger.addHandler(self._handler)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self._handler)
        self.logger.setLevel(self._level)


def payload_only_the_gc_frees(action, min_bytes: int = 1 << 20) -> int:
    """Bytes of request payload (protobuf messages, bytes, arrays of at least ``min_bytes``)
    that, once ``action()`` has returned, only the garbage collector would free: what reference
    cycles keep alive. The collector is off while ``action`` runs, then one collection with
    ``gc.DEBUG_SAVEALL`` shows what it would have freed: payload objects found unreachable
    themselves, or referred to by unreachable objects only (what is still in use elsewhere, like
    the caller's own request, does not count)."""
    import gc
    import sys

    import numpy as np
    from google.protobuf.message import Message

    def size(o) -> int:
        if isinstance(o, Message):
            return o.ByteSize()
        if isinstance(o, bytes | bytearray):
            return len(o)
        if isinstance(o, memoryview | np.ndarray):
            return o.nbytes
        return 0

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        action()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = {id(g) for g in gc.garbage}
        here = sys._getframe()
        found: dict[int, int] = {}
        for obj in gc.garbage:
            if size(obj) >= min_bytes:
                found[id(obj)] = size(obj)
            for ref in gc.get_referents(obj):
                if size(ref) >= min_bytes and id(ref) not in found and not gc.is_tracked(ref):
                    holders = [h for h in gc.get_referrers(ref) if h is not here]
                    if all(id(h) in garbage for h in holders):
                        found[id(ref)] = size(ref)
                del ref
        return sum(found.values())
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
        gc.collect()
