"""``camserve serve``: serve a model repository over gRPC and HTTP (camserve.v1, Open Inference
Protocol v2, v1 REST, the web viewer).

    camserve serve --models models --port 8500 --http-port 8080 --metrics-port 8501 --max-batch-size 32

Every flag is also a ``CAMSERVE_*`` environment variable and a key of the ``--config`` TOML
file; flags win over the environment, which wins over the file. SIGTERM drains then exits 0.
``--log-level`` here is the server's (default INFO); ``camserve --log-level LEVEL serve`` sets it
too when it is not given after ``serve``. TensorFlow's native start-up messages show only when
the level is DEBUG.
"""

from __future__ import annotations

import argparse
import asyncio

from camserve.cli import add_command, load_tensorflow
from camserve.serving import config as server_config


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "serve",
        "serve a model repository over gRPC and HTTP (dynamic batching, OIP v2, viewer, health, metrics)",
        __doc__,
    )
    server_config.add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> server_config.ServerConfig:
    """The server's configuration; ``camserve --log-level X serve`` counts as ``--log-level X``
    after ``serve`` unless that is given too."""
    if getattr(args, "log_level", None) is None and getattr(args, "cli_log_level", None):
        args.log_level = args.cli_log_level.upper()
    return server_config.from_args(args)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    load_tensorflow(cfg.log_level)
    from camserve.serving.server import configure_logging, serve

    configure_logging(cfg.log_level, cfg.log_format)
    return asyncio.run(serve(cfg))
