"""What an explanation explains: the scalar whose gradients (or scores) the pass reads.

A target is, per image, one of

- a class index or name, or :class:`ClassTarget` (the class's pre-activation logit; with
  ``probability=True`` its probability: softmax, or sigmoid for sigmoid / single-logit heads);
- :class:`RegressionTarget` (``sign`` × the model's output ``index``);
- :class:`MultiLabelTarget` (every class whose output reaches ``threshold``: sigmoid heads);
- :class:`SegmentationTarget` (Σ over the ``mask`` pixels of the class's logit, for dense
  (N, H, W, C) outputs);
- :class:`SimilarityTarget` (cosine similarity of the (N, D) output to a ``reference``).

:func:`encode` turns them into the arrays the compiled pass takes: every target is a weight
vector over one *space* of the flattened output (logits, probabilities, outputs, outputs
normalised to unit length), so that one pass handles any mix of them. TensorFlow-free.

>>> enc = encode([[1, RegressionTarget(0, sign=-1)]], output_shape=(3,))
>>> enc.classes.tolist(), enc.space.tolist(), enc.weights[0, 1].tolist()
([[1, 0]], [[0, 2]], [-1.0, 0.0, 0.0])
>>> [round(float(w), 3) for w in encode([[SimilarityTarget([3.0, 4.0])]], output_shape=(2,)).weights[0, 0]]
[0.6, 0.8]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from camserve.errors import InvalidArgument, NotFound

#: The spaces a target's weights apply to (``EncodedTargets.space``).
LOGITS, PROBABILITIES, OUTPUTS, UNIT_OUTPUTS = 0, 1, 2, 3


class UnknownClass(NotFound):
    """A target that names no class (or output) of the model."""


@dataclasses.dataclass(frozen=True)
class ClassTarget:
    """A class (index or name): its logit, or its probability with ``probability=True``.

    >>> ClassTarget("cat", probability=True).probability
    True
    """

    index_or_name: int | str
    probability: bool = False


@dataclasses.dataclass(frozen=True)
class RegressionTarget:
    """``sign`` (+1 or −1) × output ``index`` of a regression model (``sign=-1``: what
    lowers the value).

    >>> RegressionTarget().index, RegressionTarget(sign=-1).sign
    (0, -1)
    """

    index: int = 0
    sign: int = 1


@dataclasses.dataclass(frozen=True)
class MultiLabelTarget:
    """Every class whose output (the sigmoid probability of a multi-label head) is at least
    ``threshold``, each explained through its logit; an image with none gets no explanation.

    >>> MultiLabelTarget().threshold
    0.5
    """

    threshold: float = 0.5


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentationTarget:
    """Σ_{(y, x) in mask} logit[y, x, class]: for models with dense (N, H, W, C) outputs;
    ``mask`` (H, W) of the output's size, boolean or weights.

    >>> SegmentationTarget(1, np.ones((2, 2), bool)).class_index
    1
    """

    class_index: int | str
    mask: Any


@dataclasses.dataclass(frozen=True, eq=False)
class SimilarityTarget:
    """Cosine similarity of the model's (N, D) output (an embedding) to ``reference`` (D,).

    >>> SimilarityTarget([1.0, 0.0]).reference
    [1.0, 0.0]
    """

    reference: Any


TargetKind = int | str | ClassTarget | RegressionTarget | MultiLabelTarget | SegmentationTarget | SimilarityTarget
#: Target objects (anything but a plain class index or name).
TARGET_TYPES = (ClassTarget, RegressionTarget, MultiLabelTarget, SegmentationTarget, SimilarityTarget)


def is_target(value: Any) -> bool:
    """Whether ``value`` is one target (not a list of them).

    >>> is_target(3), is_target("cat"), is_target([1, 2]), is_target(RegressionTarget())
    (True, True, False, True)
    """
    return isinstance(value, (int, np.integer, str, np.str_) + TARGET_TYPES) and not isinstance(value, bool)


def class_of(target: Any, class_names: Sequence[str] | None, num_classes: int, what: str = "class") -> int:
    """The class index of an index or name; :class:`~camserve.errors.NotFound` otherwise.

    >>> class_of("b", ["a", "b"], 2)
    1
    """
    if isinstance(target, (str, np.str_)):
        if class_names and target in class_names:
            return list(class_names).index(target)
        allowed = f"one of {list(class_names)}" if class_names else "an integer index"
        raise UnknownClass(f"unknown {what} {target!r}; use {allowed}")
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)):
        raise InvalidArgument(f"a {what} must be an index or a name, got {target!r}")
    if not 0 <= int(target) < num_classes:
        raise UnknownClass(
            f"{what} index {target} out of range; the model has {what}{'es' if what == 'class' else 's'} 0..{num_classes - 1}"
        )
    return int(target)


def check(target: Any, output_shape: tuple[int, ...], class_names: Sequence[str] | None = None) -> Any:
    """``target`` validated against a model output of ``output_shape`` (without the batch):
    a class becomes its index; a target object comes back with its class resolved and its
    arrays as float32. Errors say what was wrong and what is allowed.

    >>> check(ClassTarget("b"), (2,), ["a", "b"])
    1
    >>> check(SegmentationTarget(0, [[1, 0]]), (2, 3)).mask.shape
    Traceback (most recent call last):
    camserve.errors.InvalidArgument: SegmentationTarget needs a model with dense (N, H, W, C) outputs; this one's output is (N, 2, 3)
    """
    k = int(output_shape[-1]) if output_shape else 1
    dense_output = len(output_shape) == 3
    shape_text = f"(N, {', '.join(map(str, output_shape))})"
    if isinstance(target, SegmentationTarget):
        if not dense_output:
            raise InvalidArgument(
                f"SegmentationTarget needs a model with dense (N, H, W, C) outputs; this one's output is {shape_text}"
            )
        mask = np.asarray(target.mask, np.float32)
        if mask.shape != tuple(output_shape[:2]) or not np.isfinite(mask).all():
            raise InvalidArgument(
                f"a segmentation mask must be finite and of the output's size {tuple(output_shape[:2])}, got {mask.shape}"
            )
        return SegmentationTarget(class_of(target.class_index, class_names, k), mask)
    if dense_output:
        raise InvalidArgument(
            f"a model with dense {shape_text} outputs is explained with SegmentationTarget(class, mask) targets, "
            f"got {target!r}"
        )
    if isinstance(target, SimilarityTarget):
        ref = np.asarray(target.reference, np.float32).reshape(-1)
        if ref.shape != (int(np.prod(output_shape)),) or not np.isfinite(ref).all() or not np.any(ref):
            raise InvalidArgument(
                f"a similarity reference must be a finite, non-zero vector of the output's {int(np.prod(output_shape))} "
                f"values, got shape {np.shape(target.reference)}"
            )
        return SimilarityTarget(ref)
    if isinstance(target, RegressionTarget):
        if target.sign not in (1, -1):
            raise InvalidArgument(f"RegressionTarget sign must be +1 or -1, got {target.sign!r}")
        return RegressionTarget(class_of(target.index, None, k, "output"), int(target.sign))
    if isinstance(target, MultiLabelTarget):
        if not isinstance(target.threshold, (int, float, np.floating)) or not np.isfinite(target.threshold):
            raise InvalidArgument(f"MultiLabelTarget threshold must be a number, got {target.threshold!r}")
        return target
    if isinstance(target, ClassTarget):
        c = class_of(target.index_or_name, class_names, k)
        return ClassTarget(c, True) if target.probability else c
    return class_of(target, class_names, k)


def label_of(target: Any, class_names: Sequence[str] | None) -> tuple[int, str]:
    """(class_index, label) of a checked target (class_index −1 for a similarity).

    >>> label_of(RegressionTarget(0), None), label_of(SimilarityTarget([1.0]), None)
    ((0, '0'), (-1, 'similarity'))
    """
    if isinstance(target, SimilarityTarget):
        return -1, "similarity"
    c = target.index if isinstance(target, RegressionTarget) else getattr(target, "class_index", None)
    if c is None:
        c = target.index_or_name if isinstance(target, ClassTarget) else target
    c = int(c)
    return c, class_names[c] if class_names and 0 <= c < len(class_names) else str(c)


@dataclasses.dataclass
class EncodedTargets:
    """A batch's targets as arrays (N images, T slots): ``classes`` (a class ≥ 0, or −(r + 1)
    for the r-th predicted class), ``space`` (what the weights apply to: :data:`LOGITS`,
    :data:`PROBABILITIES`, :data:`OUTPUTS`, :data:`UNIT_OUTPUTS`), ``dense`` (the slot uses
    ``weights`` (N, T, D) over the flattened output, else the one-hot of its class),
    ``valid`` (the slot is real) and ``labels`` ((class_index, label) per real slot, None for
    predicted classes). ``weights`` is None when every slot is a class (the plain pass)."""

    classes: np.ndarray
    space: np.ndarray
    dense: np.ndarray
    weights: np.ndarray | None
    valid: np.ndarray
    labels: list[list[tuple[int, str] | None]]

    @property
    def plain(self) -> bool:
        """Every slot a class logit: the pass needs no spaces nor weights."""
        return self.weights is None and not np.any(self.space[self.valid])


def encode(
    per_image: Sequence[Sequence[Any]] | None,
    output_shape: tuple[int, ...],
    class_names: Sequence[str] | None = None,
    n: int = 0,
    top_k: int = 1,
) -> EncodedTargets:
    """Arrays of checked targets per image (see :func:`check`; :class:`MultiLabelTarget`
    already expanded); ``per_image=None``: the ``top_k`` predicted classes of ``n`` images."""
    if per_image is None:
        classes = np.tile(-np.arange(1, top_k + 1, dtype=np.int32), (n, 1))
        ones = np.ones_like(classes, bool)
        return EncodedTargets(classes, np.zeros_like(classes), ~ones, None, ones, [[None] * top_k for _ in range(n)])
    n, width = len(per_image), max([len(p) for p in per_image] + [1])
    d = int(np.prod(output_shape))
    classes = np.zeros((n, width), np.int32)
    space = np.zeros((n, width), np.int32)
    dense = np.zeros((n, width), bool)
    valid = np.zeros((n, width), bool)
    weights = None
    labels: list[list[tuple[int, str] | None]] = []
    for i, targets in enumerate(per_image):
        labels.append([])
        for t, target in enumerate(targets):
            valid[i, t] = True
            labels[i].append(label_of(target, class_names))
            if isinstance(target, (int, np.integer)):
                classes[i, t] = target
                continue
            if isinstance(target, ClassTarget):
                classes[i, t], space[i, t] = int(target.index_or_name), PROBABILITIES
                continue
            if weights is None:
                weights = np.zeros((n, width, d), np.float32)
            dense[i, t] = True
            if isinstance(target, RegressionTarget):
                classes[i, t], space[i, t] = target.index, OUTPUTS
                weights[i, t, target.index] = target.sign
            elif isinstance(target, SegmentationTarget):
                classes[i, t], space[i, t] = int(target.class_index), LOGITS
                w = np.zeros(tuple(output_shape), np.float32)
                w[..., int(target.class_index)] = target.mask
                weights[i, t] = w.reshape(-1)
            elif isinstance(target, SimilarityTarget):
                ref = np.asarray(target.reference, np.float32)
                space[i, t] = UNIT_OUTPUTS
                weights[i, t] = ref / np.linalg.norm(ref)
            else:
                raise InvalidArgument(f"unsupported target {target!r}")
    return EncodedTargets(classes, space, dense, weights, valid, labels)


def per_image(
    n: int, targets: Any, output_shape: tuple[int, ...], class_names: Sequence[str] | None = None
) -> list[list[Any]]:
    """Checked targets per image for ``n`` images: ``targets`` one target for all images, one
    entry for all images, or one entry per image; an entry is a target or a list of them (at
    most the class count).

    >>> per_image(2, "b", (2,), ["a", "b"])
    [[1], [1]]
    >>> per_image(2, [[0, RegressionTarget(1)], 1], (2,))
    [[0, RegressionTarget(index=1, sign=1)], [1]]
    """
    if is_target(targets):
        targets = [targets]
    targets = list(targets)
    if len(targets) not in (1, n):
        raise InvalidArgument(
            f"{len(targets)} target entries for {n} images: give none (top_k), one for all images, or one per image"
        )
    limit = max(int(output_shape[-1]), 2)  # bounds the pass's target width
    out = []
    for i, entry in enumerate(targets):
        entries: list[Any] = [entry] if is_target(entry) else list(entry)
        if not entries:
            raise InvalidArgument(f"image {i} has an empty target list; give at least one target")
        if len(entries) > limit:
            raise InvalidArgument(
                f"image {i} has {len(entries)} targets; at most {limit} (the class count, at least 2)"
            )
        out.append([check(t, output_shape, class_names) for t in entries])
    return out * n if len(out) == 1 and n != 1 else out


def expand_multi_label(per_image_targets: list[list[Any]], outputs: Any) -> list[list[Any]]:
    """:class:`MultiLabelTarget` entries replaced by the classes whose output reaches the
    threshold (``outputs`` (N, classes), the model's predictions), best first.

    >>> expand_multi_label([[MultiLabelTarget(0.5)]], np.array([[0.2, 0.9, 0.6]]))
    [[1, 2]]
    """
    out = []
    for targets, row in zip(per_image_targets, np.asarray(outputs)):
        expanded: list[Any] = []
        for t in targets:
            if isinstance(t, MultiLabelTarget):
                order = np.argsort(-row, kind="stable")
                expanded += [int(c) for c in order if row[c] >= t.threshold and int(c) not in expanded]
            else:
                expanded.append(t)
        out.append(expanded)
    return out


def from_text(text: str) -> Any:
    """A target written as text (the CLI's ``--target``, OIP's ``target`` parameter): a class
    index or name, ``prob:CLASS``, ``regression:INDEX`` or ``regression:INDEX:-1``,
    ``multilabel`` or ``multilabel:THRESHOLD``.

    >>> from_text("3"), from_text("star"), from_text("regression:1:-1")
    (3, 'star', RegressionTarget(index=1, sign=-1))
    >>> from_text("prob:star"), from_text("multilabel:0.3")
    (ClassTarget(index_or_name='star', probability=True), MultiLabelTarget(threshold=0.3))
    """
    text = text.strip()
    kind, _, rest = text.partition(":")
    try:
        if kind == "prob" and rest:
            return ClassTarget(_class_text(rest), probability=True)
        if kind == "regression" and rest:
            index, _, sign = rest.partition(":")
            return RegressionTarget(int(index), int(sign or 1))
        if kind == "multilabel":
            return MultiLabelTarget(float(rest or 0.5))
    except ValueError as exc:
        raise InvalidArgument(
            f"target {text!r}: {exc}; use CLASS, prob:CLASS, regression:INDEX[:-1] or multilabel[:THRESHOLD]"
        ) from None
    return _class_text(text)


def _class_text(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text
