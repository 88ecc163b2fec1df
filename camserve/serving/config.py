"""Server configuration: defaults < TOML file < ``CAMSERVE_*`` environment variables < flags.

Every field of :class:`ServerConfig` is a flag (``--max-batch-size``), an environment
variable (``CAMSERVE_MAX_BATCH_SIZE``) and a TOML key (``max_batch_size``).

>>> cfg = ServerConfig.load(env={"CAMSERVE_PORT": "9000"}, overrides={"max_batch_size": 8})
>>> cfg.port, cfg.max_batch_size, cfg.batch_timeout_ms
(9000, 8, 5.0)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from camserve.accelerator import check_device, check_precision
from camserve.errors import InvalidArgument

ENV_PREFIX = "CAMSERVE_"
#: An origin as browsers send it in ``Origin``: scheme://host[:port], nothing after.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


def _field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return dataclasses.field(default_factory=functools.partial(list, default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class ServerConfig:
    """Everything ``camserve serve`` can be told (TF Serving / Triton names in the help)."""

    models: str = _field("models", "model repository root: <root>/<name>/<version>/model.keras + config.toml")
    host: str = _field("[::]", "address to listen on")
    port: int = _field(8500, "gRPC port (0: pick a free one)")
    metrics_port: int = _field(8501, "Prometheus /metrics HTTP port (-1: off; 0: pick a free one)")
    http_port: int = _field(
        8080,
        "HTTP API port: v1 REST, camserve.v1 RPCs as JSON, Open Inference Protocol v2, viewer (-1: off; 0: pick a "
        "free one; KServe's 8080, TF Serving's REST 8501 is camserve's metrics port)",
    )
    http_cors_origins: list[str] = _field(
        [],
        "origins (scheme://host[:port], exact) whose browser pages may call the HTTP API (CORS; empty: no CORS "
        "headers ever; '*': any origin, not for a server with a token)",
    )
    max_batch_size: int = _field(32, "images per merged batch (Triton max_batch_size)")
    batch_timeout_ms: float = _field(
        5.0,
        "how long a free batch worker waits for more requests while another batch computes; a request that "
        "finds nothing computing runs at once (Triton max_queue_delay; TF Serving batch_timeout_micros / 1000)",
    )
    max_queued: int = _field(
        1024, "requests waiting before RESOURCE_EXHAUSTED (TF Serving max_enqueued_batches x batch size)"
    )
    workers: int = _field(1, "batches computed concurrently (TF Serving num_batch_threads)")
    max_images: int = _field(64, "images per request")
    max_pixels: int = _field(4096 * 4096, "pixels per image, checked from the header before decoding")
    max_message_mb: float = _field(64.0, "largest request or response message, MiB")
    warmup_methods: list[str] = _field(["gradcam"], "methods compiled for every batch bucket at start-up")
    version_policy: str = _field("all", "model versions to load: all | latest")
    chunk_size: int = _field(32, "masked inputs per pass for Score-CAM / Ablation-CAM")
    max_channels: int = _field(0, "Score-CAM channels (highest variance first; 0: all)")
    stream_inflight: int = _field(16, "requests of one ExplainStream in progress at once (read, not yet sent back)")
    max_work_units: int = _field(
        1_000_000,
        "work one request may ask for, and the requests in progress together (one unit: about one classifier "
        "pass over an image or window: Predict images; Explain images x targets x methods, Score-CAM and "
        "Ablation-CAM by channels; DenseScores windows scored over all scales and shifts)",
    )
    max_layers_cached: int = _field(8, "explainers kept for layers other than the default (least recently used go)")
    max_graphs: int = _field(
        32, "compiled graphs kept per explainer (method sets x target widths; least recently used go)"
    )
    precision: str = _field(
        "float32",
        "model compute precision: float32 | mixed_float16 | mixed_bfloat16 (Keras mixed-precision policy, output "
        "layer kept float32; scores, maps and heatmaps stay float32; mixed_float16 for GPUs with tensor cores)",
    )
    xla: bool = _field(False, "XLA-compile (jit_compile) the explain and predict graphs")
    device: str = _field(
        "auto", "where models run: auto (/GPU:0 when a GPU is visible, else the CPU) | /GPU:<n> | /CPU:0"
    )
    gpu_memory_growth: bool = _field(
        True, "allocate GPU memory as it is needed, not all of it at start-up (tf.config set_memory_growth)"
    )
    gc_freeze: bool = _field(
        True,
        "after warm-up, collect garbage once and leave every object then alive (models, graphs) out of later "
        "collections (Python's gc.freeze): a full collection otherwise walks all of them holding the GIL, "
        "0.1 s and more during which no request moves",
    )
    intra_op_threads: int = _field(
        0,
        "threads one TensorFlow op may use (0: TensorFlow's choice, one per core); TF Serving "
        "--tensorflow_intra_op_parallelism",
    )
    inter_op_threads: int = _field(
        0, "TensorFlow ops run concurrently (0: TensorFlow's choice); TF Serving --tensorflow_inter_op_parallelism"
    )
    tls_cert: str = _field("", "PEM certificate chain: serve TLS when set (with --tls-key)")
    tls_key: str = _field("", "PEM private key for --tls-cert")
    token: str = _field(
        "",
        "bearer token required in 'authorization: Bearer <token>' (empty: no auth); a flag shows in the process "
        "list: prefer --token-file or the environment",
        secret=True,
    )
    token_file: str = _field("", "file holding the bearer token (instead of --token)")
    metrics_auth: bool = _field(False, "require the bearer token on /metrics too (401 without it)")
    drain_timeout_s: float = _field(30.0, "on SIGTERM: longest wait for in-flight requests")
    log_level: str = _field("INFO", "DEBUG | INFO | WARNING | ERROR")
    log_format: str = _field("json", "json | text")

    # ------------------------------------------------------------------ derived

    @property
    def batch_timeout(self) -> float:
        return self.batch_timeout_ms / 1000.0

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def bearer_token(self) -> str:
        """The token from ``token`` or ``token_file`` (stripped); empty when auth is off."""
        if self.token_file:
            return Path(self.token_file).read_text().strip()
        return self.token

    def validate(self) -> ServerConfig:
        """Raise ValueError naming the bad setting and what is allowed."""
        positive = (
            "max_batch_size",
            "max_queued",
            "workers",
            "max_images",
            "max_pixels",
            "chunk_size",
            "stream_inflight",
            "max_work_units",
            "max_graphs",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_ms < 0 or self.max_message_mb <= 0 or self.drain_timeout_s < 0:
            raise InvalidArgument("batch_timeout_ms and drain_timeout_s must be >= 0 and max_message_mb > 0")
        if self.max_layers_cached < 0:
            raise InvalidArgument(f"max_layers_cached must be >= 0, got {self.max_layers_cached}")
        if self.max_channels < 0:
            raise InvalidArgument(f"max_channels must be >= 0 (0: all), got {self.max_channels}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0 (0: TensorFlow's choice), got {getattr(self, name)}")
        if not 0 <= self.port < 65536 or not -1 <= self.metrics_port < 65536 or not -1 <= self.http_port < 65536:
            raise InvalidArgument(
                "ports must be in 0..65535 (metrics_port and http_port -1: off); got "
                f"port={self.port}, metrics_port={self.metrics_port}, http_port={self.http_port}"
            )
        for origin in self.http_cors_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise InvalidArgument(
                    f"http_cors_origins: {origin[:80]!r} is not an origin; give scheme://host[:port] exactly as "
                    "browsers send it (no path, no trailing slash), or '*'"
                )
        if self.metrics_auth and not (self.token or self.token_file):
            raise InvalidArgument("metrics_auth needs a token (token_file or token)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidArgument("TLS needs both tls_cert and tls_key")
        if self.version_policy not in ("all", "latest"):
            raise InvalidArgument(f"version_policy must be 'all' or 'latest', got {self.version_policy!r}")
        if self.log_format not in ("json", "text"):
            raise InvalidArgument(f"log_format must be 'json' or 'text', got {self.log_format!r}")
        check_precision(self.precision)
        check_device(self.device)
        return self

    def public_dict(self) -> dict[str, Any]:
        """The settings with secrets masked (for the start-up log)."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("secret") and out[f.name]:
                out[f.name] = "***"
        return out

    # ------------------------------------------------------------------ sources

    @classmethod
    def load(
        cls,
        toml_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ServerConfig:
        """Merge the sources, later ones winning: defaults, TOML, environment, overrides.

        ``env`` defaults to ``os.environ``; ``CAMSERVE_CONFIG`` names a TOML file when
        ``toml_path`` is None. Unknown TOML keys are errors (typos must not pass silently).
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        toml_path = toml_path or env.get(f"{ENV_PREFIX}CONFIG") or None
        if toml_path:
            with open(toml_path, "rb") as f:
                data = tomllib.load(f)
            data = data.get("serve", data)  # either top-level keys or a [serve] table
            for key, value in data.items():
                _check_key(key, f"{toml_path}")
                values[key] = _coerce(key, value, f"{toml_path}: {key}")
        for fld in dataclasses.fields(cls):
            name = f"{ENV_PREFIX}{fld.name.upper()}"
            if name in env:
                values[fld.name] = _coerce(fld.name, env[name], name)
        for key, value in (overrides or {}).items():
            if value is not None:
                _check_key(key, "overrides")
                values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
        return cls(**values).validate()


def _types() -> dict[str, Any]:
    return typing.get_type_hints(ServerConfig)


def _check_key(key: str, where: str) -> str:
    if key not in _types():
        raise InvalidArgument(f"{where}: unknown setting {key!r}; known: {sorted(_types())}")
    return key


def _coerce(key: str, value: Any, where: str) -> Any:
    kind = _types()[key]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise InvalidArgument(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind == list[str]:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise InvalidArgument(value)
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{where}: {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting (default None: unset flags do not override other sources)."""
    parser.add_argument(
        "--config", dest="config_file", default=None, help="TOML file with settings (also CAMSERVE_CONFIG)"
    )
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default: Any = f.default
        if default is dataclasses.MISSING and callable(f.default_factory):
            default = f.default_factory()
        shown = "" if f.metadata.get("secret") else f" (default: {default})"
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if f.type in (bool, "bool") else {}
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']}{shown}; env {ENV_PREFIX}{f.name.upper()}",
            **switch,  # a bool flag alone means true: --xla (or --xla false)
        )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerConfig:
    """The configuration for parsed ``camserve serve`` arguments."""
    names = [f.name for f in dataclasses.fields(ServerConfig)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return ServerConfig.load(getattr(args, "config_file", None), env=env, overrides=overrides)
