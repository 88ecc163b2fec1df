"""The client's side of the messages: the options of the calls (:class:`ExplainOptions`,
:class:`DenseOptions`, documented once for both clients), request builders and what the
answers become (:class:`PredictResult`, Explanations, :class:`DenseReply`). The conversions
themselves are :mod:`camserve.wire`'s, shared with the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, TypedDict, Unpack

import numpy as np
from google.protobuf import json_format

from camserve import wire
from camserve.errors import InvalidArgument
from camserve.proto import pb

__all__ = [
    "DenseOptions",
    "DenseReply",
    "ExplainCall",
    "ExplainOptions",
    "HeatmapSize",
    "PredictResult",
    "ScaleScores",
    "dense_request",
    "dense_result",
    "explain_request",
    "explain_result",
    "image_sizes",
    "model_dict",
    "predict_request",
    "predict_result",
]

#: Where heatmaps and boxes come back: at the model's input size, as the server computes them,
#: or at each image's own size.
HeatmapSize = Literal["input", "image"]


class ExplainOptions(TypedDict, total=False):
    """The options of ``explain``, ``explain_with_overlays`` and ``explain_many`` (sync and
    async clients); every key may be left out (default in brackets).

    - ``methods``: method names as ``model()`` lists them (cam, gradcam, gradcam++, hirescam,
      xgradcam, layercam, scorecam, eigencam, ablationcam, kpcacam, fem, gradcamelementwise,
      eigengradcam, finercam, shapleycam, guidedbackprop, guided_gradcam, smoothgrad,
      integrated_gradients) or one name [``("gradcam",)``].
    - ``targets``: None (the ``top_k`` best classes of each image), one target for all
      images, or per image a target or a list of them; a target is a class (index or name)
      or a :mod:`camserve.targets` object (``ClassTarget(c, probability=True)``,
      ``RegressionTarget``, ``MultiLabelTarget``, ``SegmentationTarget``, ``SimilarityTarget``) [None].
    - ``top_k``: how many best classes to explain when ``targets`` is None [1].
    - ``layer``: the layer to explain, or a list of layers whose maps are fused; None: the
      model's default [None].
    - ``aug_smooth``: average the maps of 6 augmented views (flips × brightness) [False].
    - ``eigen_smooth``: the first principal component of the weighted activations [False].
    - ``version``: the model version; 0: the newest [0].
    - ``raw``: send the map at the layer's resolution (else ``Explanation.raw`` is None) [True].
    - ``heatmap``: True: the [0, 1] heatmap as float32; ``"png"``: sent as an 8-bit grayscale
      PNG (a quarter of the bytes or less, for drawing) and decoded to float32 in [0, 1], in
      steps of 1/255; False: none (``Explanation.heatmap`` is None) [True].
    - ``heatmap_size``: ``"input"``: heatmaps and boxes at the model's input size, as the
      server computes them; ``"image"``: heatmaps resized bilinearly to each image's size as
      sent and boxes in that image's pixels (the server's ``image_box``) ["input"].
    - ``timeout``: the call's deadline in seconds, retries included; None: the client's [None].
    """

    methods: Sequence[str] | str
    targets: Any
    top_k: int
    layer: str | Sequence[str] | None
    aug_smooth: bool
    eigen_smooth: bool
    version: int
    raw: bool
    heatmap: bool | Literal["png"]
    heatmap_size: HeatmapSize
    timeout: float | None


class DenseOptions(TypedDict, total=False):
    """The options of ``dense`` (sync and async clients); every key may be left out.

    - ``stride``: output stride in input pixels; None or 0: the network's total stride.
    - ``scales``: pyramid scales [``(1.0,)``].
    - ``mode``: ``"fcn"`` (one pass through the fully convolutional model) or ``"crops"``
      (the classifier on every window) ["fcn"].
    - ``version``: the model version; 0: the newest [0].
    - ``timeout``: the call's deadline in seconds; None: the client's [None].
    - ``detect``: also find objects (:attr:`DenseReply.detections`: window and tight box
      each); then ``scales`` and ``stride`` left out take the model's ``[dense]`` settings
      [False].
    - ``threshold``, ``iou``, ``nms`` (``"agnostic"``, ``"per_class"``, ``"auto"``),
      ``tight_boxes``, ``margin``: detection settings; left out: the model's [dense] values.
    """

    stride: int | None
    scales: Sequence[float]
    mode: str
    version: int
    timeout: float | None
    detect: bool
    threshold: float
    iou: float
    nms: str
    tight_boxes: bool
    margin: int


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
    #: with ``detect``: the objects found, best first (window ``box`` and ``tight_box``)
    detections: list[wire.WireDetection] = dataclasses.field(default_factory=list)
    background_class: str | None = None
    #: zeros added on every side of each scaled image (windows start at -margin there)
    margin: int = 0

    def __iter__(self) -> Iterator[ScaleScores]:
        return iter(self.scales)

    def __getitem__(self, i: int) -> ScaleScores:
        return self.scales[i]

    def __len__(self) -> int:
        return len(self.scales)


def predict_request(images: Any, model: str, version: int = 0, top_k: int = 0) -> pb.PredictRequest:
    return pb.PredictRequest(model=wire.model_spec(model, version), images=wire.images_to_proto(images), top_k=top_k)


def check_options(options: Mapping[str, Any], kind: type) -> None:
    """TypeError for a keyword that ``kind`` (a TypedDict of options) does not define, as for a
    function's unknown keyword argument: a misspelt option must not pass unnoticed."""
    unknown = sorted(set(options) - set(kind.__annotations__))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {unknown}; {kind.__name__} allows {sorted(kind.__annotations__)}"
        )


def explain_request(
    images: Any, model: str, *, overlay: bool = False, request_id: str = "", **options: Unpack[ExplainOptions]
) -> pb.ExplainRequest:
    """The ExplainRequest of ``images`` (see :func:`camserve.wire.images_to_proto`) with
    :class:`ExplainOptions` (``heatmap_size`` and ``timeout`` shape the call, not the request)."""
    check_options(options, ExplainOptions)
    msgs = wire.images_to_proto(images)
    methods = options.get("methods", ("gradcam",))
    heatmap = options.get("heatmap", True)
    if heatmap not in (True, False, "png"):
        raise InvalidArgument(f"heatmap must be True, False or 'png', got {heatmap!r}")
    return pb.ExplainRequest(
        model=wire.model_spec(model, options.get("version", 0)),
        images=msgs,
        methods=[methods] if isinstance(methods, str) else list(methods),
        targets=wire.targets_to_proto(options.get("targets"), len(msgs)),
        top_k=options.get("top_k", 1),
        layer=layer if isinstance(layer := options.get("layer") or "", str) else "",
        layers=[] if isinstance(layer, str) else list(layer),
        aug_smooth=bool(options.get("aug_smooth", False)),
        eigen_smooth=bool(options.get("eigen_smooth", False)),
        return_raw=options.get("raw", True),
        return_heatmap=heatmap is True,
        return_heatmap_png=heatmap == "png",
        return_overlay=overlay,
        request_id=request_id,
    )


def dense_request(image: Any, model: str, **options: Unpack[DenseOptions]) -> pb.DenseScoresRequest:
    """The DenseScoresRequest of one image with :class:`DenseOptions` (``timeout`` aside)."""
    check_options(options, DenseOptions)
    msgs = wire.images_to_proto(image)
    if len(msgs) != 1:
        raise InvalidArgument(f"DenseScores takes one image; got {len(msgs)}")
    detect = bool(options.get("detect", False))
    given = {k: options[k] for k in ("threshold", "iou", "tight_boxes", "margin") if options.get(k) is not None}
    return pb.DenseScoresRequest(
        model=wire.model_spec(model, options.get("version", 0)),
        image=msgs[0],
        stride=int(options.get("stride") or 0),
        scales=list(options.get("scales", () if detect else (1.0,))),
        mode=options.get("mode", "fcn"),
        detect=detect,
        nms=options.get("nms") or "",
        **given,
    )


class ExplainCall:
    """One explanation call, shared by both clients: its ``request``, its ``timeout`` (None:
    the client's) and :meth:`result`, what its answer becomes."""

    def __init__(
        self,
        images: Any,
        model: str,
        options: ExplainOptions,
        *,
        overlay: bool = False,
        request_id: str = "",
    ) -> None:
        self.heatmap_size = options.get("heatmap_size", "input")
        if self.heatmap_size not in ("input", "image"):
            raise InvalidArgument(f"heatmap_size must be 'input' or 'image', got {self.heatmap_size!r}")
        self.request = explain_request(images, model, overlay=overlay, request_id=request_id, **options)
        self.timeout = options.get("timeout")
        self.overlay = overlay

    def result(self, resp: pb.ExplainResponse) -> list[list[Any]]:
        """Per image, the Explanations (with ``overlay``: (Explanation, overlay PNG) pairs)."""
        return explain_result(resp, self.overlay, self.heatmap_size, self.request)


def predict_result(resp: pb.PredictResponse) -> PredictResult:
    return PredictResult(
        scores=wire.predictions_from_proto(resp),
        top=[wire.top_from_proto(p) for p in resp.predictions],
        model=wire.model_from_proto(resp.model),
    )


def explain_result(
    resp: pb.ExplainResponse,
    overlays: bool = False,
    heatmap_size: HeatmapSize = "input",
    request: pb.ExplainRequest | None = None,
) -> list[list[Any]]:
    """Per image, the Explanations (or, with ``overlays``, (Explanation, overlay PNG bytes)
    pairs). ``heatmap_size`` "image": heatmaps and boxes at each image's size, which the
    server reports (or, for servers before that, :func:`image_sizes` of the ``request``)."""
    sizes: list[tuple[int, int] | None] = [None] * len(resp.images)
    if heatmap_size == "image":
        sizes = [(img.image_height, img.image_width) if img.image_height > 0 else None for img in resp.images]
        if None in sizes:
            sent = image_sizes(request) if request is not None else []
            sizes = [s if s is not None else (sent[i] if i < len(sent) else None) for i, s in enumerate(sizes)]
            if None in sizes:
                raise InvalidArgument(
                    "heatmap_size='image': the server did not report an image's size and it is unknown here"
                )
    out: list[list[Any]] = []
    for img, size in zip(resp.images, sizes):
        if overlays:
            out.append([(wire.explanation_from_proto(e, size), e.overlay_png) for e in img.explanations])
        else:
            out.append([wire.explanation_from_proto(e, size) for e in img.explanations])
    return out


def image_sizes(request: pb.ExplainRequest) -> list[tuple[int, int] | None]:
    """(height, width) of each image of a request as sent: a tensor's shape, or what an encoded
    image's header declares (None when unreadable). The server reports the size it decoded
    (EXIF orientation applied) in each answer; this is the fallback for servers before that."""
    out: list[tuple[int, int] | None] = []
    for m in request.images:
        if m.WhichOneof("source") == "tensor":
            shape = list(m.tensor.shape)
            out.append((int(shape[0]), int(shape[1])) if len(shape) >= 2 else None)
            continue
        try:
            _, w, h = wire.encoded_size(m.encoded)
        except InvalidArgument:
            out.append(None)
            continue
        out.append((h, w))
    return out


def dense_result(resp: pb.DenseScoresResponse) -> DenseReply:
    return DenseReply(
        scales=[
            ScaleScores(
                s.scale,
                wire.floatmap_to_array(s.scores, "ScaleScores.scores"),
                wire.floatmap_to_array(s.boxes, "ScaleScores.boxes"),
            )
            for s in resp.scales
        ],
        stride=int(resp.stride),
        exact=bool(resp.exact),
        class_names=list(resp.class_names),
        model=wire.model_from_proto(resp.model),
        strides=(int(resp.strides[0]), int(resp.strides[1])) if len(resp.strides) == 2 else (resp.stride, resp.stride),
        window=(int(resp.window[0]), int(resp.window[1])) if len(resp.window) == 2 else (0, 0),
        mode=resp.mode,
        detections=wire.detections_from_proto(resp.detections),
        background_class=resp.background_class or None,
        margin=int(resp.margin),
    )


def model_dict(info: pb.ModelInfo) -> dict[str, Any]:
    """A ModelInfo as a plain dict with every field present."""
    return json_format.MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
