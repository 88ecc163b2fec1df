"""The ``camserve`` command line: one sub-module per sub-command.

Each sub-module defines ``register(subparsers)``, which adds its parser and sets ``func`` to
the function that runs it. A sub-command that needs TensorFlow calls :func:`load_tensorflow`
before it imports anything that imports TensorFlow.

``--log-level {debug,info,warning,error}`` (default warning) goes before the sub-command, or
after it for every sub-command but ``serve``, which has its own ``--log-level`` for the server's
logs (``camserve --log-level debug serve`` sets both). Below debug, TensorFlow's native
start-up messages (oneDNN, CUDA, absl) are kept off the terminal.

Errors that the user can fix (:class:`~camserve.errors.CamserveError`, file errors, a server's
answer) print ``camserve <command>: error: <message>`` and exit 2; anything else is a bug and
shows its traceback.

>>> main(["--help"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator

from camserve.errors import CamserveError

#: Sub-command modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("explain", "evaluate", "bulk", "dense", "serve", "models", "train_bundled")

#: Values of ``--log-level``.
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "warning"

_LOG_LEVEL_HELP = (
    f"log level of the command (default {DEFAULT_LOG_LEVEL}); TensorFlow's native start-up messages "
    "(oneDNN, CUDA, absl) show only with debug"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camserve", description="Explain Keras image classifiers (CAM family, dense scores, gRPC)."
    )
    parser.add_argument("--log-level", dest="cli_log_level", type=str.lower, choices=LOG_LEVELS, help=_LOG_LEVEL_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"camserve.cli.{name}").register(sub)
    for command, p in sub.choices.items():
        if command == "serve":
            continue  # its own --log-level sets the server's (see camserve.cli.serve)
        # Also after the sub-command; SUPPRESS keeps a value given before it.
        p.add_argument(
            "--log-level",
            dest="cli_log_level",
            type=str.lower,
            choices=LOG_LEVELS,
            default=argparse.SUPPRESS,
            help=_LOG_LEVEL_HELP,
        )
    return parser


def add_command(
    sub: argparse._SubParsersAction, name: str, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A sub-command's parser: ``help`` in the command list, ``description`` (default: ``help``)
    on its own ``--help``, shown as written."""
    return sub.add_parser(
        name, help=help, description=description or help, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def log_level(args: argparse.Namespace) -> str:
    """The ``--log-level`` of the command line (lower case), or the default."""
    return getattr(args, "cli_log_level", None) or DEFAULT_LOG_LEVEL


@contextlib.contextmanager
def _native_stderr_hidden() -> Iterator[None]:
    """Send file descriptor 2 (where C++ code writes) to /dev/null for the block, while
    Python's ``sys.stderr`` (warnings, tracebacks) keeps writing to the real stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no usable stderr: nothing to hide
        yield
        return
    python_stderr = sys.stderr
    real = os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace")
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        sys.stderr = real
        yield
    finally:
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        for fd in (saved, devnull):
            os.close(fd)
        # Log handlers made in the block (TensorFlow's, when no root handler exists) took
        # ``real`` as their stream: move them to Python's stderr before it closes.
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", ()):
                if isinstance(handler, logging.StreamHandler) and handler.stream is real:
                    handler.setStream(python_stderr)
        real.close()


def load_tensorflow(level: str = DEFAULT_LOG_LEVEL) -> None:
    """Import TensorFlow and Keras, quietly unless ``level`` is debug.

    TensorFlow 2.21 writes its start-up lines (``port.cc ... oneDNN custom operations are on``,
    ``cudart_stub.cc ... Could not find cuda drivers``, ``WARNING: All log messages before
    absl::InitializeLog() ...``) from C++ while it is imported, before ``TF_CPP_MIN_LOG_LEVEL``
    is read; so file descriptor 2 goes to /dev/null during the import only (Python's own
    stderr stays). ``TF_CPP_MIN_LOG_LEVEL`` = 3 (unless already set in the environment) hides
    what comes later, such as ``failed call to cuInit`` on machines without a GPU. With debug,
    ``TF_CPP_MIN_LOG_LEVEL`` = 0 and nothing is hidden. Numerics are untouched
    (``TF_ENABLE_ONEDNN_OPTS`` is left alone). Does nothing once TensorFlow is imported.
    """
    if "tensorflow" in sys.modules:
        return
    if level.lower() == "debug":
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        import keras
        import tensorflow

        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_hidden():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")


def _user_error(e: BaseException) -> str | None:
    """The message for an error the user can act on, or None for a bug."""
    if isinstance(e, (CamserveError, OSError)):
        return str(e)
    grpc = sys.modules.get("grpc")  # a server's answer (--server): its status and details
    if grpc is not None and isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{e.code().name}: {e.details()}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``camserve`` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging(log_level(args))
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # re-raised below unless the user can fix it
        message = _user_error(e)
        if message is None:
            raise
        print(f"camserve {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
