"""``camserve train-bundled``: regenerate the bundled shapes models deterministically.

>>> main(["train-bundled", "--out", "models", "--seed", "0"])   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json

from camserve.cli import add_command, load_tensorflow, log_level
from camserve.errors import InvalidArgument


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train-bundled`` parser."""
    from camserve.datasets.bundled import RECIPES

    p = add_command(
        subparsers,
        "train-bundled",
        "regenerate models/shapes_gap and models/shapes_fc (deterministic, CPU, minutes)",
        description="Train the bundled shapes classifiers on freshly generated scenes and write "
        "<out>/<name>/1/model.keras and <out>/<name>/config.toml with measured metrics.",
    )
    p.add_argument("--out", default="models", help="model repository folder (default: models)")
    p.add_argument("--seed", type=int, default=0, help="random seed of data and weights (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="override each recipe's epoch count")
    p.add_argument(
        "--only",
        nargs="+",
        choices=sorted(RECIPES),
        default=list(RECIPES),
        help="train only these models (default: all)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, write the models and print their metrics as JSON."""
    load_tensorflow(log_level(args))
    from camserve.datasets.bundled import RECIPES, train_bundled

    if args.epochs is not None and args.epochs < 1:
        raise InvalidArgument(f"--epochs must be >= 1, got {args.epochs}")
    command = f"camserve train-bundled --out {args.out} --seed {args.seed}"
    if args.epochs is not None:
        command += f" --epochs {args.epochs}"
    if sorted(args.only) != sorted(RECIPES):
        command += " --only " + " ".join(args.only)
    metrics = train_bundled(args.out, seed=args.seed, epochs=args.epochs, names=args.only, command=command)
    print(json.dumps(metrics, indent=2))
    return 0
