"""What a request's parameters resolve to before anything is queued: its work units (checked
against the :class:`~camserve.serving.budget.WorkBudget`), its answer's estimated size
(checked against ``max_message_bytes``) and, for Explain, the explainer, methods, targets
and batch key (an :class:`ExplainPlan`, which the data plane keeps per runtime for the next
request with the same parameters: :meth:`ModelRuntime.remember_plan
<camserve.serving.runtime.ModelRuntime.remember_plan>`). Errors name the budget or limit, what
was counted and what to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from camserve.errors import InvalidArgument
from camserve.serving import budget
from camserve.serving.budget import AUG_SMOOTH_VIEWS, Cost, Outputs, WorkBudget, target_count
from camserve.serving.inputs import ImageInput, declared_size
from camserve.serving.jobs import ExplainKey

if TYPE_CHECKING:
    from camserve.explain import Explainer
    from camserve.serving.runtime import ModelRuntime


def plural(n: int, word: str) -> str:
    """``n`` and ``word``, in the plural unless ``n`` is 1.

    >>> plural(1, "image"), plural(3, "target")
    ('1 image', '3 targets')
    """
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request must fit: the server's work budget, and the largest answer it sends."""

    work: WorkBudget
    max_message_bytes: int

    def check_response(self, estimate: int, what: str | Callable[[], str], change: str) -> None:
        """RESOURCE_EXHAUSTED, before any compute, for an answer larger than ``max_message_bytes``."""
        budget.check_response(estimate, self.max_message_bytes, what, change)


@dataclasses.dataclass(frozen=True)
class ExplainPlan:
    """What an Explain request's parameters resolve to: the layer (its explainer's key) and
    its explainer, the methods (checked, in the request's order), the targets per image
    (None: the key's ``top_k``), the work and answer size (checked) and the batch key."""

    layer: str
    explainer: Explainer
    methods: tuple[str, ...]
    targets: list[list[Any]] | None
    cost: Cost
    answer_bytes: int
    key: ExplainKey


def explain_plan(
    rt: ModelRuntime,
    ex: Explainer,
    layer: str,
    images: Sequence[ImageInput],
    methods: Sequence[str],
    targets: Sequence[Sequence[Any]] | None,
    top_k: int,
    outputs: Outputs,
    aug_smooth: bool,
    eigen_smooth: bool,
    limits: Limits,
) -> ExplainPlan:
    """An Explain request's parameters checked and resolved for ``ex``, the explainer of
    ``layer`` (see :meth:`DataPlane.explain <camserve.serving.dataplane.DataPlane.explain>`),
    its work and answer within ``limits``."""
    n = len(images)
    checked = ex.check_methods(tuple(methods) or ("gradcam",))  # before batching
    top_k = top_k or 1
    if targets is not None and len(targets) not in (1, n):
        # Said in the wire's words (``repeated TargetList targets``) before the library checks the rest.
        raise InvalidArgument(
            f"{len(targets)} target lists for {n} images: give none (top_k), one for all images, or one per image"
        )
    per_image = ex.resolve_targets(n, None if targets is None else [list(t) for t in targets], top_k)
    views = AUG_SMOOTH_VIEWS if aug_smooth else 1
    cost, answer_bytes = explain_cost(rt, ex, images, checked, per_image, top_k, outputs, views, limits)
    batch_key = ExplainKey(
        rt.name,
        rt.version,
        ex.layer_name,
        tuple(sorted(checked)),
        rt.input_shape,
        top_k if per_image is None else None,
        bool(aug_smooth),
        bool(eigen_smooth),
    )
    return ExplainPlan(layer, ex, checked, per_image, cost, answer_bytes, batch_key)


def explain_cost(
    rt: ModelRuntime,
    ex: Explainer,
    images: Sequence[ImageInput],
    methods: tuple[str, ...],
    per_image: list[list[Any]] | None,
    top_k: int,
    outputs: Outputs,
    views: int,
    limits: Limits,
) -> tuple[Cost, int]:
    """The work of an Explain request and its answer's estimated size, both checked against
    ``limits``."""
    n = len(images)
    geo = rt.geometry(ex)
    counts = [target_count(t, ex.num_classes) for t in per_image] if per_image is not None else [top_k]
    channel_methods = [m for m in methods if budget.per_channel(m)]

    def counted() -> str:
        words = f"{plural(n, 'image')} × {plural(max(counts), 'target')} × {plural(len(methods), 'method')}"
        if views > 1:
            words += f" × {views} augmented views"
        if channel_methods:
            words += f", {', '.join(channel_methods)} by {geo.channels} channels per image"
        return words

    cost = Cost(
        budget.explain_units(n, counts, methods, geo.channels, views=views),
        counted,
        "send fewer images, targets or methods"
        + (" (or a server with a smaller max_channels)" if channel_methods else ""),
    )
    limits.work.check(cost)
    cfg = rt.entry.config
    if outputs.overlay:
        sizes = [(h, w) if h and w else cfg.input_size for w, h in map(declared_size, images)]
    else:
        sizes = [cfg.input_size] * n
    answer_bytes = budget.explain_response_bytes(
        targets=counts,
        methods=len(methods),
        layer_size=budget.raw_size(methods, geo.size, cfg.input_size),  # pixel methods: the input's
        input_size=cfg.input_size,
        overlay_sizes=sizes,
        outputs=outputs,
        label_bytes=rt.label_bytes,
    )
    limits.check_response(
        answer_bytes,
        lambda: f"{counted()} with {', '.join(k for k, v in dataclasses.asdict(outputs).items() if v) or 'no maps'}",
        "ask for fewer maps or overlays, or fewer images, targets or methods per request",
    )
    return cost, answer_bytes


def dense_cost(
    rt: ModelRuntime,
    size: tuple[int, int],
    stride: int,
    scales: tuple[float, ...],
    detections: int,
    explained_per_window: int,
    limits: Limits,
) -> tuple[Cost, int]:
    """The windows a DenseScores request scores and the tight-box explanations of up to
    ``explained_per_window`` candidates each, and its answer's estimated size with at most
    ``detections`` objects, both checked against ``limits``; 0 and 0 when the model's
    geometry is unknown (the engine then decides)."""
    geo = rt.dense
    total = geo.stride if geo is not None else None
    step = (stride, stride) if stride else total
    if geo is None or step is None:
        return Cost(0, "geometry unknown", ""), 0
    units = budget.dense_units(
        size, window=geo.window, stride=step, scales=scales, explained_per_window=explained_per_window
    )
    windows = units // (1 + explained_per_window)
    tight = ""
    if explained_per_window:
        tight = f", each with up to {plural(explained_per_window, 'candidate')} explained for its tight box"
    shifts = ""
    if total is not None and all(t % s == 0 for t, s in zip(total, step)):
        n_shifts = (total[0] // step[0]) * (total[1] // step[1])
        if n_shifts > 1:
            shifts = f" ({n_shifts} shifted passes at the total stride {total[0]})"
    cost = Cost(
        units,
        lambda: (
            f"{windows} windows of {geo.window[1]}x{geo.window[0]} at stride {step[0]} over "
            f"{plural(len(scales), 'scale')}{shifts}{tight}"
        ),
        "use a coarser stride, fewer or smaller scales, or a smaller image"
        + (" (or turn tight boxes off)" if explained_per_window else ""),
    )
    limits.work.check(cost)
    answer_bytes = budget.dense_response_bytes(
        size,
        window=geo.window,
        stride=step,
        scales=scales,
        classes=len(rt.entry.config.class_names),
        detections=detections,
        label_bytes=rt.label_bytes,
    )
    limits.check_response(
        answer_bytes,
        lambda: f"scores and boxes of {units} windows",
        "use a coarser stride, fewer or smaller scales, or a smaller image",
    )
    return cost, answer_bytes
