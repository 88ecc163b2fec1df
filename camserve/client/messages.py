"""The client's side of the messages: request builders and what the answers become
(:class:`PredictResult`, Explanations, :class:`DenseReply`). The conversions themselves are
:mod:`camserve.wire`'s, shared with the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from google.protobuf import json_format

from camserve import wire
from camserve.errors import InvalidArgument
from camserve.proto import pb

__all__ = [
    "DenseReply",
    "PredictResult",
    "ScaleScores",
    "dense_request",
    "dense_result",
    "explain_request",
    "explain_result",
    "model_dict",
    "predict_request",
    "predict_result",
]


class PredictResult(NamedTuple):
    """``scores`` (N, classes) float32; ``top`` per image the best (index, label, score)."""

    scores: np.ndarray
    top: list[list[tuple[int, str, float]]]
    model: tuple[str, int]


@dataclasses.dataclass
class ScaleScores:
    """One pyramid level of a :class:`DenseReply`, as the wire's ``ScaleScores`` message carries
    it: the ``scale``, ``scores`` (gh, gw, classes) and ``boxes`` (gh, gw, 4, x0 y0 x1 y1 in
    pixels of the original image).

    The in-process :class:`camserve.dense.DenseScores` has the same three fields plus the
    per-level ``strides``, ``window`` and ``image_size``, which the wire does not carry.
    """

    scale: float
    scores: np.ndarray
    boxes: np.ndarray


@dataclasses.dataclass
class DenseReply:
    """What the DenseScores RPC answers: one :class:`ScaleScores` per scale (iterate or index it
    like a list), the stride used (``stride``; ``strides`` as (sy, sx)), the sliding ``window``
    (h, w), whether the FCN pass equals the classifier on every crop (``exact``), the ``mode``,
    the model's ``class_names`` and the (name, version) that answered.

    The remote counterpart of :class:`camserve.dense.DenseResult` (what
    :func:`camserve.dense.dense_scores` returns in-process), plus ``class_names`` and
    ``model``. Called ``DenseResult`` before; that name still works, with a DeprecationWarning.
    """

    scales: list[ScaleScores]
    stride: int
    exact: bool
    class_names: list[str]
    model: tuple[str, int]
    strides: tuple[int, int] = (0, 0)
    window: tuple[int, int] = (0, 0)
    mode: str = "fcn"

    def __iter__(self) -> Iterator[ScaleScores]:
        return iter(self.scales)

    def __getitem__(self, i: int) -> ScaleScores:
        return self.scales[i]

    def __len__(self) -> int:
        return len(self.scales)


def predict_request(images: Any, model: str, version: int = 0, top_k: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(model=wire.model_spec(model, version), images=wire.images_to_proto(images), top_k=top_k)


def explain_request(
    images: Any,
    model: str,
    methods: Sequence[str] = ("gradcam",),
    targets: Any = None,
    top_k: int = 1,
    layer: str | None = None,
    version: int = 0,
    raw: bool = True,
    heatmap: bool = True,
    overlay: bool = False,
    request_id: str = "",
) -> pb.ExplainRequest:
    msgs = wire.images_to_proto(images)
    if isinstance(methods, str):
        methods = [methods]
    return pb.ExplainRequest(
        model=wire.model_spec(model, version),
        images=msgs,
        methods=list(methods),
        targets=wire.targets_to_proto(targets, len(msgs)),
        top_k=top_k,
        layer=layer or "",
        return_raw=raw,
        return_heatmap=heatmap,
        return_overlay=overlay,
        request_id=request_id,
    )


def dense_request(
    image: Any,
    model: str,
    stride: int | None = None,
    scales: Sequence[float] = (1.0,),
    mode: str = "fcn",
    version: int = 0,
) -> pb.DenseScoresRequest:
    msgs = wire.images_to_proto(image)
    if len(msgs) != 1:
        raise InvalidArgument(f"DenseScores takes one image; got {len(msgs)}")
    return pb.DenseScoresRequest(
        model=wire.model_spec(model, version), image=msgs[0], stride=int(stride or 0), scales=list(scales), mode=mode
    )


def predict_result(resp: pb.PredictResponse) -> PredictResult:
    return PredictResult(
        scores=wire.predictions_from_proto(resp),
        top=[wire.top_from_proto(p) for p in resp.predictions],
        model=wire.model_from_proto(resp.model),
    )


def explain_result(resp: pb.ExplainResponse, overlays: bool = False) -> list[list[Any]]:
    """Per image, the Explanations (or, with ``overlays``, (Explanation, overlay PNG bytes) pairs)."""
    out: list[list[Any]] = []
    for img in resp.images:
        if overlays:
            out.append([(wire.explanation_from_proto(e), e.overlay_png) for e in img.explanations])
        else:
            out.append([wire.explanation_from_proto(e) for e in img.explanations])
    return out


def dense_result(resp: pb.DenseScoresResponse) -> DenseReply:
    return DenseReply(
        scales=[
            ScaleScores(s.scale, wire.floatmap_to_array(s.scores), wire.floatmap_to_array(s.boxes)) for s in resp.scales
        ],
        stride=int(resp.stride),
        exact=bool(resp.exact),
        class_names=list(resp.class_names),
        model=wire.model_from_proto(resp.model),
        strides=(int(resp.strides[0]), int(resp.strides[1])) if len(resp.strides) == 2 else (resp.stride, resp.stride),
        window=(int(resp.window[0]), int(resp.window[1])) if len(resp.window) == 2 else (0, 0),
        mode=resp.mode,
    )


def model_dict(info: pb.ModelInfo) -> dict[str, Any]:
    """A ModelInfo as a plain dict with every field present."""
    return json_format.MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
