"""Models at run time: each loaded version with its explainers, and its readiness.

A :class:`ModelRuntime` is one loaded model version of the repository, with one
:class:`~camserve.Explainer` per target layer (built on first use, at most
``max_layers_cached`` besides the default one, least recently used dropped first; the
default layer's is built and warmed up at start-up: every (operation, bucket) graph
compiled, so the first request is fast). Warm-up also converts the model for DenseScores
(once, not inside a batch worker) and records its window and total stride
(:class:`DenseGeometry`), which the work budget needs. :class:`ModelRuntimes` loads the
whole repository, warms every version up and answers which runtimes are ready; a version
whose warm-up fails is reported unavailable through the repository
(:meth:`~camserve.serving.repository.ModelRepository.mark_failed`) and the others serve.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

from camserve.errors import InvalidArgument
from camserve.serving.config import ServerConfig
from camserve.serving.repository import ModelEntry, ModelRepository, ModelUnavailable

if TYPE_CHECKING:
    from camserve.explain import Explainer
    from camserve.serving.observability import ServerMetrics

log = logging.getLogger("camserve.serving.runtime")

#: Resolved request parameters kept per runtime (:meth:`ModelRuntime.remember_plan`).
MAX_PLANS = 256


@dataclasses.dataclass(frozen=True)
class ExplainerSettings:
    """How the server builds its explainers (from :class:`~camserve.serving.config.ServerConfig`)."""

    chunk_size: int = 32
    max_channels: int | None = None
    max_batch_size: int = 32
    warmup_methods: tuple[str, ...] = ("gradcam",)
    max_layers_cached: int = 8
    max_graphs: int = 32
    precision: str = "float32"
    jit_compile: bool = False
    device: str | None = "auto"

    @classmethod
    def from_config(cls, config: ServerConfig) -> ExplainerSettings:
        return cls(
            chunk_size=config.chunk_size,
            max_channels=config.max_channels or None,
            max_batch_size=config.max_batch_size,
            warmup_methods=tuple(config.warmup_methods),
            max_layers_cached=config.max_layers_cached,
            max_graphs=config.max_graphs,
            precision=config.precision,
            jit_compile=config.xla,
            device=config.device,
        )

    def dense_options(self) -> dict[str, Any]:
        """The accelerator keywords of :func:`camserve.dense.dense_scores` (precision, device)."""
        return {"precision": self.precision, "device": self.device}


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """What the budget needs of the explained layers: the raw map's spatial size and the
    channels Score-CAM / Ablation-CAM score (each layer's: all, or ``max_channels``; summed
    over the fused layers)."""

    size: tuple[int, int]
    channels: int


@dataclasses.dataclass(frozen=True)
class DenseGeometry:
    """A model's DenseScores geometry from warm-up: the classifier's window and the network's
    total stride, (y, x) each; ``error``: why the model does not convert (then fcn mode
    fails, and ``stride`` is None)."""

    window: tuple[int, int]
    stride: tuple[int, int] | None
    error: str = ""


@dataclasses.dataclass(eq=False)
class ModelRuntime:
    """A loaded model version with its explainers (one per layer, ``""`` = the default
    layer) and readiness; ``methods`` are those the model supports, ``layers`` the names of
    the layers that can be explained."""

    entry: ModelEntry
    settings: ExplainerSettings = ExplainerSettings()
    explainers: collections.OrderedDict[str, Explainer] = dataclasses.field(default_factory=collections.OrderedDict)
    ready: bool = False
    methods: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    dense: DenseGeometry | None = None
    _geometry: weakref.WeakKeyDictionary[Explainer, LayerGeometry] = dataclasses.field(
        default_factory=weakref.WeakKeyDictionary, repr=False
    )
    #: The data plane's resolved Explain parameters (:meth:`remember_plan`), dropped with
    #: the explainers they name.
    plans: dict[Hashable, Any] = dataclasses.field(default_factory=dict, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> int:
        return self.entry.version

    @property
    def default_explainer(self) -> Explainer:
        return self.explainers[""]

    @functools.cached_property
    def label_bytes(self) -> int:
        """The longest class name, in UTF-8 bytes (for the size of answers)."""
        return max((len(n.encode()) for n in self.entry.config.class_names), default=8)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One model input (H, W, C), as the configuration says."""
        cfg = self.entry.config
        return (int(cfg.input_size[0]), int(cfg.input_size[1]), int(cfg.channels))

    def cached_explainer(self, layer: str) -> Explainer | None:
        """The Explainer of ``layer`` when it is built already (cheap: call it on the event
        loop), else None."""
        ex = self.explainers.get(layer)
        if ex is not None and layer:
            try:
                self.explainers.move_to_end(layer)
            except KeyError:  # evicted by another thread meanwhile
                pass
        return ex

    def explainer(self, layer: str) -> Explainer:
        """The Explainer of ``layer`` ("" = the default), built on first use; UnknownLayer
        (NOT_FOUND) lists the choices. Building one (and looking a name up) is work: the
        server calls this off the event loop unless :meth:`cached_explainer` has it. At most
        ``max_layers_cached`` layers besides the default keep their explainer (and its
        compiled graphs); the least recently used goes first."""
        ex = self.cached_explainer(layer)
        if ex is not None:
            return ex
        if layer not in self.layers:
            from camserve.explain.tokens import resolve_sites

            resolve_sites(
                self.entry.model, layers_of_key(layer), self.entry.config.prefix_tokens
            )  # UnknownLayer lists the choices
        with self._lock:
            ex = self.explainers.get(layer)
            if ex is None:
                ex = self._make_explainer(layer)
                self.explainers[layer] = ex
                extra = [k for k in self.explainers if k]
                for old in extra[: max(0, len(extra) - self.settings.max_layers_cached)]:
                    del self.explainers[old]
                    self.plans.clear()  # a plan may hold the explainer dropped here
        return ex

    def remember_plan(self, key: Hashable, plan: Any) -> None:
        """Keep ``plan`` (what the parameters ``key`` of a request resolve to) for the next
        request with the same parameters; at most :data:`MAX_PLANS`, the oldest dropped first."""
        if len(self.plans) >= MAX_PLANS:
            self.plans.pop(next(iter(self.plans), None), None)  # (another thread may clear them meanwhile)
        self.plans[key] = plan

    def geometry(self, ex: Explainer) -> LayerGeometry:
        """The explained layer's (h, w) (the first layer's when several are fused: the raw
        map's size) and the channels Score-CAM / Ablation-CAM score, summed over the layers
        (cached per explainer)."""
        found = self._geometry.get(ex)
        if found is None:
            first = ex.sites[0]
            if first.grid is not None:  # a token layer (N, T, C) laid on its grid
                h, w = first.grid
            else:
                h, w = (int(v) if v else 1 for v in _output_shape(first.layer)[1:3])
            cap = self.settings.max_channels
            channels = [int(_output_shape(site.layer)[-1] or 1) for site in ex.sites]
            found = self._geometry[ex] = LayerGeometry((h, w), sum(min(k, cap) if cap else k for k in channels))
        return found

    def _make_explainer(self, layer: str | None) -> Explainer:
        from camserve.explain import Explainer

        s = self.settings
        return Explainer(
            self.entry.model,
            layer=layers_of_key(layer) if layer else None,
            class_names=self.entry.config.class_names,
            prefix_tokens=self.entry.config.prefix_tokens,
            chunk_size=s.chunk_size,
            max_channels=s.max_channels,
            max_batch_size=s.max_batch_size,
            max_graphs=s.max_graphs,
            precision=s.precision,
            jit_compile=s.jit_compile,
            device=s.device,
            preprocessing=self.entry.config.preprocessing,  # uint8 batches preprocessed in the graphs
        )

    def warm_up(self) -> None:
        """Build the default layer's explainer, find the supported methods and the layers,
        and compile every batch bucket for the warm-up methods (blocking: run it in a
        thread)."""
        from camserve import keras_graph as graph

        ex = self._make_explainer(self.entry.config.default_layer)
        self.explainers[""] = ex
        usable = []
        for m in ex.methods:
            try:
                ex.check_methods((m,))
                usable.append(m)
            except InvalidArgument:
                pass
        self.methods = tuple(usable)
        from camserve.explain.tokens import gridded_token_layers

        found = graph.candidate_layers(self.entry.model) + gridded_token_layers(
            self.entry.model, self.entry.config.prefix_tokens
        )
        self.layers = tuple(graph.layer_path_name(p) for p in found)  # 4-D, then token layers
        warm = [m for m in self.settings.warmup_methods if m in usable]
        ex.warm_up(methods=tuple(warm) or ("gradcam",))
        self.dense = self._warm_up_dense()

    def _warm_up_dense(self) -> DenseGeometry:
        """Convert the model for DenseScores now (the conversion is cached by the library) and
        run it once on a window; its geometry, or why it does not convert."""
        import numpy as np

        from camserve.dense import dense_scores
        from camserve.errors import InvalidArgument as Refused

        cfg = self.entry.config
        window = tuple(cfg.input_size)
        try:
            s = self.settings
            result = dense_scores(
                self.entry.model, np.zeros((*window, cfg.channels), np.float32), precision=s.precision, device=s.device
            )
        except Refused as e:  # ConversionError: fcn mode is refused, crops mode may still work
            log.info(
                "no DenseScores in fcn mode", extra={"model": self.name, "version": self.version, "reason": str(e)}
            )
            return DenseGeometry((int(window[0]), int(window[1])), None, str(e))
        return DenseGeometry(
            (int(result.window[0]), int(result.window[1])), (int(result.strides[0]), int(result.strides[1]))
        )


def layer_key(layer: str, layers: Sequence[str]) -> str:
    """The explainer key of a request's ``layer`` or ``layers`` (several: joined by ",").

    >>> layer_key("", ["block3", "block4"]), layer_key("conv", [])
    ('block3,block4', 'conv')
    """
    if not layers:
        return layer
    if layer:
        raise InvalidArgument(f"set layer ({layer!r}) or layers ({list(layers)}), not both")
    bad = [name for name in layers if not name or "," in name]
    if bad:
        raise InvalidArgument(f"layer names in layers must be non-empty and without commas, got {bad}")
    if len(set(layers)) != len(layers):
        raise InvalidArgument(f"layer names repeat in {list(layers)}; give each layer once")
    return ",".join(layers)


def layers_of_key(key: str) -> str | list[str]:
    """What :func:`layer_key` joined, as the Explainer takes it: one name, or the fused list.

    >>> layers_of_key("block3,block4"), layers_of_key("conv")
    (['block3', 'block4'], 'conv')
    """
    return key.split(",") if "," in key else key


def _output_shape(layer: Any) -> tuple:
    """A layer's output shape ((N, h, w, K), or (N, T, C) for tokens); Nones where unknown."""
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):  # a layer used more than once has no single output
        return (None, None, None, None)


class ModelRuntimes:
    """The runtimes of a repository's versions, by (name, version); only ready ones are
    kept."""

    def __init__(
        self, repository: ModelRepository, settings: ExplainerSettings, metrics: ServerMetrics | None = None
    ) -> None:
        self.repository = repository
        self.settings = settings
        self._metrics = metrics
        self._ready: dict[tuple[str, int], ModelRuntime] = {}

    def get(self, name: str, version: int | None = None) -> ModelRuntime:
        """The ready runtime of ``name`` (newest loaded version when ``version`` is None or 0);
        ModelNotFound / ModelUnavailable (also while it warms up) otherwise."""
        entry = self.repository.get(name, version or None)
        rt = self._ready.get((entry.name, entry.version))
        if rt is None:
            raise ModelUnavailable(f"model {entry.name!r} version {entry.version} is warming up; retry shortly")
        return rt

    def ready_versions(self, name: str) -> dict[int, ModelRuntime]:
        """The ready runtimes of ``name`` by version, ascending."""
        return {v: rt for (n, v), rt in sorted(self._ready.items()) if n == name}

    async def load_all(
        self,
        pool: concurrent.futures.Executor,
        on_model: Callable[[str, bool], Awaitable[None]] | None = None,
    ) -> None:
        """Load every model of the repository and warm each version up, in ``pool``; after
        each model, ``on_model(name, available)``. Failures are recorded, never raised."""
        loop = asyncio.get_running_loop()
        repo = self.repository
        for name in repo.names():
            await loop.run_in_executor(pool, repo.load, [name])
            st = repo.status(name)
            if st.errors:
                log.warning("model failed to load", extra={"model": name, "reason": st.reason})
            for version, entry in sorted(st.entries.items()):
                rt = ModelRuntime(entry, self.settings)
                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(pool, rt.warm_up)
                except Exception as e:  # only this version becomes unavailable
                    log.exception("warm-up failed", extra={"model": name, "version": version})
                    repo.mark_failed(name, version, f"warm-up failed: {type(e).__name__}: {e}")
                    continue
                rt.ready = True
                self._ready[(name, version)] = rt
                if self._metrics is not None:
                    self._metrics.model_is_ready(name, version)
                log.info(
                    "model ready",
                    extra={
                        "model": name,
                        "version": version,
                        "layer": rt.default_explainer.layer_name,
                        "warmup_s": round(time.perf_counter() - t0, 3),
                    },
                )
            if on_model is not None:
                await on_model(name, repo.status(name).available)
