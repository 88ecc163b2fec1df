"""``camserve serve``: run the gRPC server over a model repository.

    camserve serve --models models --port 8500 --metrics-port 8501 --max-batch-size 32 --batch-timeout-ms 5

Every flag is also a ``CAMSERVE_*`` environment variable and a key of the ``--config`` TOML
file; flags win over the environment, which wins over the file. SIGTERM drains then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio

from camserve.serving import config as server_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (dynamic batching, health, metrics)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server_config.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camserve.serving.server import configure_logging, serve

    cfg = server_config.from_args(args)
    configure_logging(cfg.log_level, cfg.log_format)
    return asyncio.run(serve(cfg))
