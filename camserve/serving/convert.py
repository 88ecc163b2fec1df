"""Data-plane results as ``camserve.v1`` response messages (the gRPC side of the server).

The per-object conversions shared with the client (images, predictions, explanations,
float maps) are in :mod:`camserve.wire`; this module builds whole responses from the
:mod:`camserve.serving.dataplane` result types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from camserve import wire
from camserve.proto import pb

if TYPE_CHECKING:
    from camserve.dense import DenseResult
    from camserve.serving.dataplane import DenseScoresResult, ExplainResult, ModelDescription, PredictResult


def predict_response(result: PredictResult, top_k: int) -> Any:
    """A PredictResponse listing the ``top_k`` best classes per image (0: all of them)."""
    return pb.PredictResponse(
        model=wire.model_spec(result.model, result.version),
        predictions=[wire.prediction_to_proto(row, top_k, result.class_names) for row in result.scores],
    )


def explain_response(
    result: ExplainResult,
    *,
    raw: bool = False,
    heatmap: bool = False,
    overlay: bool = False,
    request_id: str = "",
) -> Any:
    """An ExplainResponse; maps and overlays only when asked for (overlays are PNG encoding
    work: call it off the event loop)."""
    resp = pb.ExplainResponse(
        model=wire.model_spec(result.model, result.version), layer=result.layer, request_id=request_id
    )
    for i, per_image in enumerate(result.explanations):
        pngs: list[bytes | None] = list(result.overlays(i)) if overlay else [None] * len(per_image)
        resp.images.append(
            pb.ImageExplanations(
                explanations=[
                    wire.explanation_to_proto(e, raw=raw, heatmap=heatmap, overlay_png=png)
                    for e, png in zip(per_image, pngs)
                ]
            )
        )
    return resp


def dense_response(result: DenseScoresResult) -> Any:
    return dense_to_proto(result.result, result.model, result.version, result.class_names)


def dense_to_proto(result: DenseResult, model: str, version: int, class_names: tuple[str, ...] | list[str]) -> Any:
    """A :func:`camserve.dense.dense_scores` result as a DenseScoresResponse."""
    sy, sx = (int(v) for v in result.strides)
    resp = pb.DenseScoresResponse(
        model=wire.model_spec(model, version),
        stride=sy if sy == sx else 0,
        strides=[sy, sx],
        window=[int(v) for v in result.window],
        exact=bool(result.exact),
        mode=str(result.mode),
        class_names=list(class_names),
    )
    for level in result:
        resp.scales.append(
            pb.ScaleScores(
                scale=float(level.scale),
                scores=wire.array_to_floatmap(level.scores),
                boxes=wire.array_to_floatmap(level.boxes),
            )
        )
    return resp


def model_info(d: ModelDescription) -> Any:
    """A ModelInfo message."""
    info = pb.ModelInfo(
        name=d.name, versions=d.versions, available_versions=d.available_versions, available=d.available
    )
    info.reason = d.reason
    if d.config is not None:
        c = d.config
        info.class_names.extend(c.class_names)
        info.input_height, info.input_width = c.input_size
        info.channels = c.channels
        info.preprocessing = c.preprocessing
    if d.available:
        info.version = d.version
        info.default_layer = d.default_layer
        info.target_layers.extend(d.target_layers)
        info.methods.extend(d.methods)
    return info
