"""Responses built from data-plane results (camserve.serving.convert): maps as bytes, boxes
also in the pixels of the image as sent, heatmaps as 8-bit PNG when asked, Predict's scores as
one map. Results are built by hand here, so each field is checked against an independent
computation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from camserve import wire
from camserve.explanation import Explanation
from camserve.proto import pb
from camserve.serving import convert
from camserve.serving.dataplane import ExplainResult, PredictResult, Prepared

MODEL = 64  # the model's input size (height = width)


def _explanation(seed: int, box: tuple[int, int, int, int] | None) -> Explanation:
    rng = np.random.default_rng(seed)
    heat = rng.random((MODEL, MODEL), dtype=np.float32)
    return Explanation("gradcam", 1, "b", 0.75, rng.random((4, 4), dtype=np.float32), heat, box)


def _result(pixels: list[np.ndarray | None], boxes: list[tuple[int, int, int, int] | None]) -> ExplainResult:
    inputs = np.zeros((len(pixels), MODEL, MODEL, 3), np.float32)
    explanations = [[_explanation(i, box)] for i, box in enumerate(boxes)]
    return ExplainResult("m", 2, "conv", explanations, Prepared(inputs, pixels))


def _sent(resp: pb.ExplainResponse) -> pb.ExplainResponse:
    return pb.ExplainResponse.FromString(resp.SerializeToString())


def test_image_box_by_hand_for_a_non_square_image_the_server_resized() -> None:
    # 64 x 64 model, a 200 x 120 (width x height) image: x scales by 200/64 = 3.125 and y by
    # 120/64 = 1.875; the image box covers whole pixels (floor at the start, ceil at the end).
    image = np.zeros((120, 200, 3), np.uint8)
    resp = _sent(convert.explain_response(_result([image], [(10, 20, 33, 50)])))
    (img,) = resp.images
    assert (img.image_height, img.image_width) == (120, 200)
    e = img.explanations[0]
    assert (e.box.x0, e.box.y0, e.box.x1, e.box.y1) == (10, 20, 33, 50)
    assert (e.image_box.x0, e.image_box.y0, e.image_box.x1, e.image_box.y1) == (31, 37, 104, 94)


def test_image_box_equals_box_for_preprocessed_tensors_and_is_absent_without_a_box() -> None:
    resp = _sent(convert.explain_response(_result([None, np.zeros((30, 30, 3), np.uint8)], [(1, 2, 3, 4), None])))
    first, second = resp.images
    assert (first.image_height, first.image_width) == (MODEL, MODEL)  # a tensor has the input's size
    assert first.explanations[0].image_box == first.explanations[0].box
    assert first.explanations[0].HasField("image_box")
    assert (second.image_height, second.image_width) == (30, 30)
    assert not second.explanations[0].HasField("box") and not second.explanations[0].HasField("image_box")


def test_maps_are_bytes_of_the_library_arrays() -> None:
    result = _result([np.zeros((MODEL, MODEL, 3), np.uint8)], [(0, 0, 8, 8)])
    resp = _sent(convert.explain_response(result, raw=True, heatmap=True, request_id="r7"))
    e, want = resp.images[0].explanations[0], result.explanations[0][0]
    assert resp.request_id == "r7" and resp.layer == "conv" and wire.model_from_proto(resp.model) == ("m", 2)
    assert e.heatmap.data == want.heatmap.astype("<f4").tobytes() and len(e.heatmap.values) == 0
    assert e.raw.data == want.raw.astype("<f4").tobytes() and list(e.raw.shape) == [4, 4]
    assert not e.heatmap_png and not e.overlay_png
    bare = convert.explain_response(result)
    assert not bare.images[0].explanations[0].HasField("heatmap")


def test_heatmap_png_only_when_asked_and_within_one_step() -> None:
    result = _result([np.zeros((90, 50, 3), np.uint8)], [(0, 0, 8, 8)])
    resp = _sent(convert.explain_response(result, heatmap_png=True))
    e = resp.images[0].explanations[0]
    assert not e.HasField("heatmap") and e.heatmap_png.startswith(b"\x89PNG")
    gray = cv2.imdecode(np.frombuffer(e.heatmap_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (MODEL, MODEL) and gray.dtype == np.uint8  # at the model's input size
    heat = result.explanations[0][0].heatmap
    assert float(np.abs(gray / 255.0 - heat).max()) <= 1 / 255


OUTPUTS = [
    {},
    {"raw": True},
    {"heatmap": True, "request_id": "r9"},
    {"raw": True, "heatmap": True, "heatmap_png": True},
    {"raw": True, "heatmap": True, "overlay": True},
]


@pytest.mark.parametrize("outputs", OUTPUTS, ids=lambda o: "+".join(o) or "none")
def test_the_answer_as_bytes_parses_to_the_answer_as_a_message(outputs) -> None:
    """The gRPC server sends serialized_explain_response: joined from pieces, the float maps from the
    arrays' own memory; it must read back as the message explain_response builds."""
    images = [np.full((90, 50, 3), 7, np.uint8), None, np.zeros((MODEL, MODEL, 3), np.uint8)]
    result = _result(images, [(0, 0, 8, 8), None, (3, 4, 30, 40)])
    result.explanations[1].append(_explanation(9, (1, 1, 2, 2)))  # two explanations for one image
    data = convert.serialized_explain_response(result, **outputs)
    assert pb.ExplainResponse.FromString(data) == convert.explain_response(result, **outputs)


def test_maps_that_are_not_little_endian_float32_in_c_order_are_converted_in_the_bytes() -> None:
    heat = np.asfortranarray(np.random.default_rng(4).random((MODEL, MODEL)))  # float64, column-major
    result = ExplainResult(
        "m",
        1,
        "conv",
        [[Explanation("cam", 0, "a", 0.5, heat[:4, :4].astype(">f4"), heat, None)]],
        Prepared(np.zeros((1, MODEL, MODEL, 3), np.float32), [None]),
    )
    e = pb.ExplainResponse.FromString(convert.serialized_explain_response(result, raw=True, heatmap=True)).images[0]
    np.testing.assert_array_equal(wire.floatmap_to_array(e.explanations[0].heatmap), heat.astype(np.float32))
    np.testing.assert_array_equal(wire.floatmap_to_array(e.explanations[0].raw), heat[:4, :4].astype(np.float32))


def test_predict_response_scores_as_one_map() -> None:
    scores = np.random.default_rng(1).random((2, 5), dtype=np.float32)
    resp = convert.predict_response(PredictResult("m", 1, tuple("abcde"), scores), top_k=2)
    assert resp.scores.data == scores.tobytes() and list(resp.scores.shape) == [2, 5]
    assert [len(p.scores) for p in resp.predictions] == [0, 0]
    assert [[c.index for c in p.top] for p in resp.predictions] == [list(np.argsort(-row)[:2]) for row in scores]


@pytest.mark.parametrize("top_k", [0, 5])
def test_predict_response_lists_top_k_classes(top_k: int) -> None:
    scores = np.array([[0.1, 0.4, 0.2, 0.05, 0.25]], np.float32)
    resp = convert.predict_response(PredictResult("m", 1, tuple("abcde"), scores), top_k=top_k)
    assert [c.label for c in resp.predictions[0].top] == list("becad")[:top_k]


@pytest.mark.parametrize("detected", [False, True])
def test_the_dense_answer_as_bytes_parses_to_the_answer_as_a_message(detected: bool) -> None:
    """Large DenseScores answers go as serialized_dense_response: it must read back as the
    message dense_response builds (scales, maps, detections and the rest)."""
    from camserve.dense.detections import Detection
    from camserve.dense.scores import DenseResult, DenseScores
    from camserve.serving.dataplane import DenseScoresResult

    rng = np.random.default_rng(6)
    levels = [
        DenseScores(
            s,
            rng.random((h, w, 3), dtype=np.float32),
            rng.random((h, w, 4), dtype=np.float32) * 90,
            (8, 8),
            (32, 32),
            (h * 8 + 24, w * 8 + 24),
            margin=4,
        )
        for s, (h, w) in ((1.0, (9, 7)), (0.5, (4, 3)))
    ]
    dense = DenseResult(levels, (8, 8), True, "fcn", (32, 32))
    found = [Detection(2, "c", 0.9, (1, 2, 33, 34), 1.0, (5, 6, 20, 21))] if detected else None
    result = DenseScoresResult("m", 3, ("a", "b", "c"), dense, 0, found, "a" if detected else None)
    data = convert.serialized_dense_response(result)
    assert pb.DenseScoresResponse.FromString(data) == convert.dense_response(result)
    scales = pb.DenseScoresResponse.FromString(data).scales
    np.testing.assert_array_equal(wire.floatmap_to_array(scales[1].scores), levels[1].scores)
