"""The ``camserve`` command line: one sub-module per sub-command.

Each sub-module defines ``register(subparsers)``, which adds its parser and sets
``func`` to the function that runs it.

>>> main(["--help"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: Sub-command modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("explain", "dense", "serve", "models", "bench", "train_bundled")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camserve", description="Explain Keras image classifiers (CAM family, dense scores, gRPC)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"camserve.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"camserve.cli.{name}":
                raise
            continue  # sub-command not present in this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``camserve`` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, LookupError, FileNotFoundError) as e:
        print(f"camserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
