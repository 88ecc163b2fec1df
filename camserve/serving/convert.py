"""Data-plane results as ``camserve.v1`` response messages (the gRPC side of the server).

The per-object conversions shared with the client (images, predictions, explanations,
float maps) are in :mod:`camserve.wire`; this module builds whole responses from the
:mod:`camserve.serving.dataplane` result types. Nothing here works element by element: float
maps go as bytes (:func:`camserve.wire.floatmap_fields`), and nested messages are built from
plain values in one constructor call (protobuf copies a message passed in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from camserve import wire
from camserve.proto import pb

if TYPE_CHECKING:
    from camserve.dense import DenseResult
    from camserve.serving.dataplane import DenseScoresResult, ExplainResult, ModelDescription, PredictResult


def predict_response(result: PredictResult, top_k: int) -> Any:
    """A PredictResponse: every class's score of every image as one float map of bytes, and
    the ``top_k`` best classes per image (0: none)."""
    return wire.predict_response_to_proto(result.scores, top_k, result.class_names, result.model, result.version)


def explain_response(
    result: ExplainResult,
    *,
    raw: bool = False,
    heatmap: bool = False,
    heatmap_png: bool = False,
    overlay: bool = False,
    request_id: str = "",
) -> Any:
    """An ExplainResponse; maps and overlays only when asked for (overlays and heatmap PNGs
    are PNG encoding work: call it off the event loop). Each image carries its size as sent
    and each box also in that image's pixels (``image_box``)."""
    inputs = result.prepared.inputs
    input_size = (int(inputs.shape[1]), int(inputs.shape[2]))
    images = []
    for i, per_image in enumerate(result.explanations):
        pixels = result.prepared.pixels[i]
        size = input_size if pixels is None else (int(pixels.shape[0]), int(pixels.shape[1]))
        pngs: list[bytes | None] = list(result.overlays(i)) if overlay else [None] * len(per_image)
        explanations = [
            wire.explanation_fields(
                e,
                raw=raw,
                heatmap=heatmap,
                heatmap_png=heatmap_png,
                overlay_png=png,
                image_box=None if e.box is None or size == input_size else wire.scale_box(e.box, input_size, size),
            )
            for e, png in zip(per_image, pngs)
        ]
        images.append({"explanations": explanations, "image_height": size[0], "image_width": size[1]})
    return pb.ExplainResponse(
        model={"name": result.model, "version": int(result.version)},
        layer=result.layer,
        images=images,
        request_id=request_id,
    )


def dense_response(result: DenseScoresResult) -> Any:
    return dense_to_proto(
        result.result, result.model, result.version, result.class_names, result.detections, result.background_class
    )


def dense_to_proto(
    result: DenseResult,
    model: str,
    version: int,
    class_names: tuple[str, ...] | list[str],
    detections: Sequence[Any] | None = None,
    background_class: str | None = None,
) -> Any:
    """A :func:`camserve.dense.dense_scores` result (and :func:`camserve.dense.detect`'s
    detections) as a DenseScoresResponse."""
    sy, sx = (int(v) for v in result.strides)
    return pb.DenseScoresResponse(
        model={"name": model, "version": int(version)},
        stride=sy if sy == sx else 0,
        strides=[sy, sx],
        window=[int(v) for v in result.window],
        exact=bool(result.exact),
        mode=str(result.mode),
        class_names=list(class_names),
        scales=[
            {
                "scale": float(level.scale),
                "scores": wire.floatmap_fields(level.scores),
                "boxes": wire.floatmap_fields(level.boxes),
            }
            for level in result
        ],
        detections=[wire.detection_fields(d) for d in detections or ()],
        background_class=background_class or "",
        margin=int(result[0].margin) if len(result) else 0,
    )


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
