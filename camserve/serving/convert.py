"""Data-plane results as ``camserve.v1`` response messages (the gRPC side of the server).

The per-object conversions shared with the client (images, predictions, explanations,
float maps) are in :mod:`camserve.wire`; this module builds whole responses from the
:mod:`camserve.serving.dataplane` result types. Nothing here works element by element: float
maps go as bytes (:func:`camserve.wire.floatmap_fields`), and nested messages are built from
plain values in one constructor call (protobuf copies a message passed in). The gRPC server
sends large Explain and DenseScores answers (:data:`BYTES_ANSWER_FROM`) serialized here
(:func:`serialized_explain_response`, :func:`serialized_dense_response`): the same messages,
with each float map copied once, from its array into the answer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from camserve import wire
from camserve.proto import pb
from camserve.protowire import Pieces, encode_varint

if TYPE_CHECKING:
    from camserve.dense import DenseResult
    from camserve.explanation import Explanation
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
    images = [
        {
            "explanations": [
                wire.explanation_fields(
                    e, raw=raw, heatmap=heatmap, heatmap_png=heatmap_png, overlay_png=png, image_box=box
                )
                for e, png, box in explained
            ],
            "image_height": size[0],
            "image_width": size[1],
        }
        for size, explained in _images(result, overlay)
    ]
    return pb.ExplainResponse(
        model={"name": result.model, "version": int(result.version)},
        layer=result.layer,
        images=images,
        request_id=request_id,
    )


#: Answers whose maps are estimated at this size or more are sent serialized here; smaller ones
#: as messages, which protobuf's C code builds and serializes faster than the pieces are
#: joined in Python (one image with raw + heatmap, quiet CPU, message + serialize / bytes:
#: 64 px 9.7 / 11.2 µs, 128 px 13.6 / 13.3 µs, 224 px 25.2 / 16.2 µs).
BYTES_ANSWER_FROM = 64 * 1024

_IMAGES = pb.ExplainResponse.DESCRIPTOR.fields_by_name["images"].number
_EXPLANATIONS = pb.ImageExplanations.DESCRIPTOR.fields_by_name["explanations"].number
_RAW = pb.Explanation.DESCRIPTOR.fields_by_name["raw"].number
_HEATMAP = pb.Explanation.DESCRIPTOR.fields_by_name["heatmap"].number
_DATA = pb.FloatMap.DESCRIPTOR.fields_by_name["data"].number
_SHAPE = pb.FloatMap.DESCRIPTOR.fields_by_name["shape"].number
_HEIGHT = pb.ImageExplanations.DESCRIPTOR.fields_by_name["image_height"].number
_WIDTH = pb.ImageExplanations.DESCRIPTOR.fields_by_name["image_width"].number
_SCALE = {f.name: f.number for f in pb.ScaleScores.DESCRIPTOR.fields}
_DENSE_SCALES = pb.DenseScoresResponse.DESCRIPTOR.fields_by_name["scales"].number


def serialized_explain_response(
    result: ExplainResult,
    *,
    raw: bool = False,
    heatmap: bool = False,
    heatmap_png: bool = False,
    overlay: bool = False,
    request_id: str = "",
) -> bytes:
    """:func:`explain_response` serialized (the same message once parsed), with each float map
    copied once, from its array into the answer, not into ``bytes``, into a message and out."""
    out = Pieces()
    out.raw(_response_head(result.model, int(result.version), result.layer, request_id))
    for (height, width), explained in _images(result, overlay):
        image = Pieces()
        for e, png, box in explained:
            fields = wire.explanation_fields(e, heatmap_png=heatmap_png, overlay_png=png, image_box=box)
            one = Pieces()
            one.raw(pb.Explanation(**fields).SerializeToString())
            if raw and e.raw is not None:
                one.message_field(_RAW, floatmap_pieces(e.raw))
            if heatmap and e.heatmap is not None:
                one.message_field(_HEATMAP, floatmap_pieces(e.heatmap))
            image.message_field(_EXPLANATIONS, one)
        image.varint_field(_HEIGHT, height)
        image.varint_field(_WIDTH, width)
        out.message_field(_IMAGES, image)
    return out.join()


@functools.lru_cache(maxsize=256)
def _response_head(model: str, version: int, layer: str, request_id: str) -> bytes:
    """An ExplainResponse's fields but its images (the same for every answer of a model's
    layer, but ExplainStream's request ids)."""
    head = pb.ExplainResponse(model={"name": model, "version": version}, layer=layer, request_id=request_id)
    return head.SerializeToString()


def floatmap_pieces(a: np.ndarray) -> Pieces:
    """A FloatMap of ``a`` (as :func:`camserve.wire.floatmap_fields`) whose data is ``a``'s own
    memory (converted to little-endian float32 in C order first when it is not that already).

    >>> m = pb.FloatMap.FromString(floatmap_pieces(np.eye(2, dtype=np.float32)).join())
    >>> wire.floatmap_to_array(m).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    a = np.ascontiguousarray(a, wire.MAP_DTYPE)
    p = Pieces()
    p.bytes_field(_SHAPE, b"".join(map(encode_varint, a.shape)))  # packed int64 (sizes are not negative)
    p.bytes_field(_DATA, a.reshape(-1).data.cast("B"))
    return p


def _images(
    result: ExplainResult, overlay: bool
) -> Iterator[tuple[tuple[int, int], list[tuple[Explanation, bytes | None, tuple[int, int, int, int] | None]]]]:
    """Per image: its size as sent and, per explanation, (explanation, PNG overlay or None, box
    in the image's pixels or None when it had the model's input size)."""
    inputs = result.prepared.inputs
    input_size = (int(inputs.shape[1]), int(inputs.shape[2]))
    for i, per_image in enumerate(result.explanations):
        pixels = result.prepared.pixels[i]
        size = input_size if pixels is None else (int(pixels.shape[0]), int(pixels.shape[1]))
        pngs: list[bytes | None] = list(result.overlays(i)) if overlay else [None] * len(per_image)
        yield (
            size,
            [
                (e, png, None if e.box is None or size == input_size else wire.scale_box(e.box, input_size, size))
                for e, png in zip(per_image, pngs)
            ],
        )


def dense_response(result: DenseScoresResult, *, maps: bool = True) -> Any:
    """A DenseScoresResponse (``maps`` False: without its scales, for
    :func:`serialized_dense_response`)."""
    return dense_to_proto(
        result.result,
        result.model,
        result.version,
        result.class_names,
        result.detections,
        result.background_class,
        maps=maps,
    )


def serialized_dense_response(result: DenseScoresResult) -> bytes:
    """:func:`dense_response` serialized (the same message once parsed), each scale's score and
    box maps copied once, from their arrays into the answer."""
    out = Pieces()
    out.raw(dense_response(result, maps=False).SerializeToString())
    for level in result.result:
        one = Pieces()
        one.raw(pb.ScaleScores(scale=float(level.scale)).SerializeToString())
        one.message_field(_SCALE["scores"], floatmap_pieces(level.scores))
        one.message_field(_SCALE["boxes"], floatmap_pieces(level.boxes))
        out.message_field(_DENSE_SCALES, one)
    return out.join()


def dense_to_proto(
    result: DenseResult,
    model: str,
    version: int,
    class_names: tuple[str, ...] | list[str],
    detections: Sequence[Any] | None = None,
    background_class: str | None = None,
    *,
    maps: bool = True,
) -> Any:
    """A :func:`camserve.dense.dense_scores` result (and :func:`camserve.dense.detect`'s
    detections) as a DenseScoresResponse (``maps`` False: without its scales)."""
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
            for level in (result if maps else ())
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
