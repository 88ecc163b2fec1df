from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class FloatMap(_message.Message):
    __slots__ = ("shape", "values", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: int
    y0: int
    x1: int
    y1: int
    def __init__(self, x0: _Optional[int] = ..., y0: _Optional[int] = ..., x1: _Optional[int] = ..., y1: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "images", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    images: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("scores", "top")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "predictions", "scores")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    scores: FloatMap
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., scores: _Optional[_Union[FloatMap, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("index", "name", "regression", "segmentation", "similarity", "multi_label", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    MULTI_LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    regression: RegressionTarget
    segmentation: SegmentationTarget
    similarity: SimilarityTarget
    multi_label: MultiLabelTarget
    probability: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., regression: _Optional[_Union[RegressionTarget, _Mapping]] = ..., segmentation: _Optional[_Union[SegmentationTarget, _Mapping]] = ..., similarity: _Optional[_Union[SimilarityTarget, _Mapping]] = ..., multi_label: _Optional[_Union[MultiLabelTarget, _Mapping]] = ..., probability: _Optional[bool] = ...) -> None: ...

class RegressionTarget(_message.Message):
    __slots__ = ("index", "negative")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    index: int
    negative: bool
    def __init__(self, index: _Optional[int] = ..., negative: _Optional[bool] = ...) -> None: ...

class SegmentationTarget(_message.Message):
    __slots__ = ("class_index", "class_name", "mask")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    class_name: str
    mask: FloatMap
    def __init__(self, class_index: _Optional[int] = ..., class_name: _Optional[str] = ..., mask: _Optional[_Union[FloatMap, _Mapping]] = ...) -> None: ...

class SimilarityTarget(_message.Message):
    __slots__ = ("reference",)
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    reference: FloatMap
    def __init__(self, reference: _Optional[_Union[FloatMap, _Mapping]] = ...) -> None: ...

class MultiLabelTarget(_message.Message):
    __slots__ = ("threshold",)
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    def __init__(self, threshold: _Optional[float] = ...) -> None: ...

class TargetList(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    def __init__(self, targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "images", "methods", "targets", "top_k", "layer", "return_raw", "return_heatmap", "return_overlay", "request_id", "return_heatmap_png", "layers", "aug_smooth", "eigen_smooth")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RETURN_RAW_FIELD_NUMBER: _ClassVar[int]
    RETURN_HEATMAP_FIELD_NUMBER: _ClassVar[int]
    RETURN_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    AUG_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    EIGEN_SMOOTH_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    images: _containers.RepeatedCompositeFieldContainer[Image]
    methods: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedCompositeFieldContainer[TargetList]
    top_k: int
    layer: str
    return_raw: bool
    return_heatmap: bool
    return_overlay: bool
    request_id: str
    return_heatmap_png: bool
    layers: _containers.RepeatedScalarFieldContainer[str]
    aug_smooth: bool
    eigen_smooth: bool
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., methods: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[_Union[TargetList, _Mapping]]] = ..., top_k: _Optional[int] = ..., layer: _Optional[str] = ..., return_raw: _Optional[bool] = ..., return_heatmap: _Optional[bool] = ..., return_overlay: _Optional[bool] = ..., request_id: _Optional[str] = ..., return_heatmap_png: _Optional[bool] = ..., layers: _Optional[_Iterable[str]] = ..., aug_smooth: _Optional[bool] = ..., eigen_smooth: _Optional[bool] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("method", "class_index", "label", "score", "raw", "heatmap", "box", "overlay_png", "image_box", "heatmap_png")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BOX_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    method: str
    class_index: int
    label: str
    score: float
    raw: FloatMap
    heatmap: FloatMap
    box: Box
    overlay_png: bytes
    image_box: Box
    heatmap_png: bytes
    def __init__(self, method: _Optional[str] = ..., class_index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., raw: _Optional[_Union[FloatMap, _Mapping]] = ..., heatmap: _Optional[_Union[FloatMap, _Mapping]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., overlay_png: _Optional[bytes] = ..., image_box: _Optional[_Union[Box, _Mapping]] = ..., heatmap_png: _Optional[bytes] = ...) -> None: ...

class ImageExplanations(_message.Message):
    __slots__ = ("explanations", "image_height", "image_width")
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    image_height: int
    image_width: int
    def __init__(self, explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "layer", "images", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    layer: str
    images: _containers.RepeatedCompositeFieldContainer[ImageExplanations]
    request_id: str
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., layer: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageExplanations, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DenseScoresRequest(_message.Message):
    __slots__ = ("model", "image", "stride", "scales", "mode", "detect", "threshold", "iou", "nms", "tight_boxes", "margin")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DETECT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    NMS_FIELD_NUMBER: _ClassVar[int]
    TIGHT_BOXES_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    image: Image
    stride: int
    scales: _containers.RepeatedScalarFieldContainer[float]
    mode: str
    detect: bool
    threshold: float
    iou: float
    nms: str
    tight_boxes: bool
    margin: int
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., stride: _Optional[int] = ..., scales: _Optional[_Iterable[float]] = ..., mode: _Optional[str] = ..., detect: _Optional[bool] = ..., threshold: _Optional[float] = ..., iou: _Optional[float] = ..., nms: _Optional[str] = ..., tight_boxes: _Optional[bool] = ..., margin: _Optional[int] = ...) -> None: ...

class DenseDetection(_message.Message):
    __slots__ = ("class_index", "label", "score", "box", "tight_box", "scale")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    TIGHT_BOX_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    score: float
    box: _containers.RepeatedScalarFieldContainer[float]
    tight_box: _containers.RepeatedScalarFieldContainer[float]
    scale: float
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Iterable[float]] = ..., tight_box: _Optional[_Iterable[float]] = ..., scale: _Optional[float] = ...) -> None: ...

class ScaleScores(_message.Message):
    __slots__ = ("scale", "scores", "boxes")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    scale: float
    scores: FloatMap
    boxes: FloatMap
    def __init__(self, scale: _Optional[float] = ..., scores: _Optional[_Union[FloatMap, _Mapping]] = ..., boxes: _Optional[_Union[FloatMap, _Mapping]] = ...) -> None: ...

class DenseScoresResponse(_message.Message):
    __slots__ = ("model", "scales", "stride", "exact", "class_names", "strides", "window", "mode", "detections", "background_class", "margin")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_CLASS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    scales: _containers.RepeatedCompositeFieldContainer[ScaleScores]
    stride: int
    exact: bool
    class_names: _containers.RepeatedScalarFieldContainer[str]
    strides: _containers.RepeatedScalarFieldContainer[int]
    window: _containers.RepeatedScalarFieldContainer[int]
    mode: str
    detections: _containers.RepeatedCompositeFieldContainer[DenseDetection]
    background_class: str
    margin: int
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., scales: _Optional[_Iterable[_Union[ScaleScores, _Mapping]]] = ..., stride: _Optional[int] = ..., exact: _Optional[bool] = ..., class_names: _Optional[_Iterable[str]] = ..., strides: _Optional[_Iterable[int]] = ..., window: _Optional[_Iterable[int]] = ..., mode: _Optional[str] = ..., detections: _Optional[_Iterable[_Union[DenseDetection, _Mapping]]] = ..., background_class: _Optional[str] = ..., margin: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "available", "reason", "class_names", "input_height", "input_width", "channels", "preprocessing", "default_layer", "target_layers", "methods", "available_versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LAYER_FIELD_NUMBER: _ClassVar[int]
    TARGET_LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    available: bool
    reason: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    input_height: int
    input_width: int
    channels: int
    preprocessing: str
    default_layer: str
    target_layers: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    available_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., available: _Optional[bool] = ..., reason: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., channels: _Optional[int] = ..., preprocessing: _Optional[str] = ..., default_layer: _Optional[str] = ..., target_layers: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ..., available_versions: _Optional[_Iterable[int]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...
