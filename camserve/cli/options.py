"""Options that ``camserve explain``, ``bulk``, ``evaluate`` and ``dense`` share, defined once:
the model folder (``--model``, ``--version``), what to explain (``--method``, ``--top-k`` or
``--target``, ``--layer``, ``--aug-smooth``, ``--eigen-smooth``, ``--max-channels``) and the
parsers of their values.

>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_explain_options(p)
>>> choices = explain_choices(p.parse_args(["--method", "cam", "--layer", "a,b", "--target", "2"]))
>>> choices.methods, choices.layer, choices.targets, choices.top_k
(('cam',), ('a', 'b'), (2,), 1)
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from camserve.errors import InvalidArgument

MODEL_HELP = "model folder: <dir>/config.toml and <dir>/<version>/model.keras"
TARGET_FORMS = (
    "class name or index, prob:CLASS, regression:INDEX[:-1], multilabel[:THRESHOLD], "
    "segmentation:CLASS:MASK.png, similarity:REFERENCE.npy"
)


def add_model_options(p: argparse.ArgumentParser, model_help: str = MODEL_HELP, group: Any = None) -> None:
    """``--model DIR`` (a Path; required, unless it goes into the required mutually exclusive
    ``group``) and ``--version N``."""
    (group or p).add_argument("--model", type=Path, required=group is None, metavar="DIR", help=model_help)
    p.add_argument("--version", type=int, default=None, metavar="N", help="model version (default: newest)")


def add_method_option(p: argparse.ArgumentParser) -> None:
    """``--method M`` (repeatable; :func:`methods_of` gives gradcam when none is given)."""
    p.add_argument(
        "--method", dest="methods", action="append", metavar="M", help="method (repeatable); default gradcam"
    )


def add_explain_options(p: argparse.ArgumentParser) -> None:
    """``--method``, ``--top-k K`` or ``--target T`` (one or the other), ``--layer``,
    ``--aug-smooth``, ``--eigen-smooth`` and ``--max-channels`` (read back by :func:`explain_choices`)."""
    add_method_option(p)
    choice = p.add_mutually_exclusive_group()
    choice.add_argument("--top-k", type=int, default=1, metavar="K", help="explain the K best classes (default 1)")
    choice.add_argument(
        "--target", dest="targets", action="append", metavar="T", help=f"what to explain: {TARGET_FORMS} (repeatable)"
    )
    p.add_argument(
        "--layer",
        dest="layers",
        action="append",
        metavar="L",
        help="layer to explain at (outer/inner for nested models; token layers of transformers too); several "
        "(repeated or comma-separated) are fused; default: the model's config, else automatic",
    )
    p.add_argument("--aug-smooth", action="store_true", help="average 6 augmented views (flips x brightness)")
    p.add_argument("--eigen-smooth", action="store_true", help="first principal component of the weighted activations")
    p.add_argument("--max-channels", type=int, default=None, metavar="N", help="Score-CAM / Ablation-CAM channel cap")


@dataclasses.dataclass(frozen=True)
class ExplainChoices:
    """What :func:`add_explain_options` read: the fields of
    :class:`~camserve.bulk.actors.BulkSettings` of the same names, and what ``camserve explain``
    passes to :meth:`~camserve.explain.folder.FolderExplainer.explain_rgbs`."""

    methods: tuple[str, ...]
    targets: tuple[Any, ...] | None
    top_k: int
    layer: str | tuple[str, ...] | None
    aug_smooth: bool
    eigen_smooth: bool
    max_channels: int | None

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (shallow: target objects stay as they are)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def methods_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``--method`` values, each once, in order; ``("gradcam",)`` when none is given.

    >>> methods_of(argparse.Namespace(methods=["cam", "gradcam", "cam"])), methods_of(argparse.Namespace(methods=None))
    (('cam', 'gradcam'), ('gradcam',))
    """
    return tuple(dict.fromkeys(args.methods or ("gradcam",)))


def explain_choices(args: argparse.Namespace) -> ExplainChoices:
    """The :class:`ExplainChoices` of parsed arguments (target and layer values parsed)."""
    targets = parse_targets(args.targets)
    layer = parse_layers(args.layers)
    return ExplainChoices(
        methods=methods_of(args),
        targets=tuple(targets) if targets else None,
        top_k=args.top_k,
        layer=tuple(layer) if isinstance(layer, list) else layer,
        aug_smooth=args.aug_smooth,
        eigen_smooth=args.eigen_smooth,
        max_channels=args.max_channels,
    )


def parse_target(text: str) -> Any:
    """One ``--target`` value: :func:`camserve.targets.from_text` (a class index or name,
    ``prob:``, ``regression:``, ``multilabel``), or the file forms ``segmentation:CLASS:MASK.png``
    (the mask's non-zero pixels; :func:`fit_masks` resizes it to the model's output) and
    ``similarity:REFERENCE.npy``.

    >>> parse_target("3"), parse_target("regression:1:-1")
    (3, RegressionTarget(index=1, sign=-1))
    """
    import numpy as np

    from camserve import imaging
    from camserve import targets as tg

    kind, _, rest = text.partition(":")
    try:
        if kind == "segmentation" and rest.count(":") >= 1:
            c, _, path = rest.partition(":")
            mask = imaging.read_image(Path(path)).max(axis=-1) > 0
            return tg.SegmentationTarget(int(c) if c.isdigit() else c, mask.astype(np.float32))
        if kind == "similarity" and rest:
            return tg.SimilarityTarget(np.load(rest))
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"--target {text!r}: {exc}; allowed: {TARGET_FORMS}") from None
    return tg.from_text(text)


def parse_targets(raw: list[str] | None) -> list[Any] | None:
    """``--target`` values (:func:`parse_target`); None when there are none.

    >>> parse_targets(None), parse_targets(["cat", "2"])
    (None, ['cat', 2])
    """
    if not raw:
        return None
    return [parse_target(t) for t in raw]


def parse_layers(raw: list[str] | None) -> str | list[str] | None:
    """``--layer`` values: None (automatic), one name, or several (repeated or comma-separated).

    >>> parse_layers(None), parse_layers(["conv"]), parse_layers(["a,b", "c"])
    (None, 'conv', ['a', 'b', 'c'])
    """
    names = [n.strip() for r in raw or () for n in r.split(",") if n.strip()]
    return None if not names else names[0] if len(names) == 1 else names


def fit_masks(targets: tuple[Any, ...] | list[Any] | None, output_shape: tuple[int, ...]) -> list[Any] | None:
    """Segmentation masks resized (nearest) to a dense model output's (H, W); other targets,
    and every target of a model without a dense (N, H, W, C) output, as they are.

    >>> from camserve.targets import SegmentationTarget
    >>> import numpy as np
    >>> fit_masks([SegmentationTarget(1, np.ones((4, 6), np.float32)), 2], (2, 3, 5))[0].mask.shape
    (2, 3)
    """
    import cv2

    from camserve.targets import SegmentationTarget

    if not targets:
        return None
    if len(output_shape) != 3:
        return list(targets)
    size = (int(output_shape[1]), int(output_shape[0]))
    return [
        SegmentationTarget(t.class_index, cv2.resize(t.mask, size, interpolation=cv2.INTER_NEAREST))
        if isinstance(t, SegmentationTarget)
        else t
        for t in targets
    ]
