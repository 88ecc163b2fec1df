"""The Open Inference Protocol over camserve's data plane, independent of the transport.

A request (:class:`InferRequest`: model, version, parameters, input tensors, requested
outputs) becomes :meth:`DataPlane.predict <camserve.serving.dataplane.DataPlane.predict>`
and/or :meth:`~camserve.serving.dataplane.DataPlane.explain` calls (the same batcher, limits
and checks as camserve.v1), and their results become output tensors. The gRPC servicer
(:mod:`camserve.oip.grpc_service`) and the REST routes (:mod:`camserve.http.oip`) only convert
their messages to and from these values.

Input: one tensor named :data:`INPUT_NAME` (``images``), one of

- ``UINT8 [N, H, W, 3]`` RGB pixels of any size (resized and preprocessed as the model's
  ``config.toml`` says),
- ``FP32 [N, H, W, C]`` already preprocessed inputs of the model's input size,
- ``BYTES [N]`` encoded images (PNG, JPEG, BMP, WebP; header checked before decoding).

Outputs (:data:`OUTPUTS`): ``scores`` ``FP32 [N, classes]`` (with the classification
extension's output parameter, ``classification`` as Triton's clients send their
``class_count``: ``BYTES [N, class_count]`` ``"score:index:label"``, best first); the explanation outputs ``heatmap`` ``FP32 [N, T, M, H, W]`` (in [0, 1], the
model's input size), ``raw`` ``FP32 [N, T, M, h, w]`` (the layer's resolution), ``targets``
``INT32 [N, T]`` (the class of each target row) and ``boxes`` ``INT32 [N, T, M, 4]`` (x0, y0,
x1, y1; -1 where a map is all zero), for T targets and M methods. Request parameters
(:data:`EXPLAIN_PARAMETERS`) choose the explanation: ``method`` (e.g. ``"gradcam"`` or
``"gradcam,cam"``), ``target`` (a class index or name, or several separated by commas;
``prob:CLASS``, ``regression:INDEX[:-1]`` and ``multilabel[:THRESHOLD]`` as in
:func:`camserve.targets.from_text`; default: the ``top_k`` best classes), ``top_k``,
``layer`` (several separated by commas are fused), ``aug_smooth`` and ``eigen_smooth``
(booleans). Triton's ``timeout`` (microseconds, an integer >= 0; 0: none) sets the request's
deadline, the sooner of it and the transport's (:func:`request_deadline`). No outputs requested means
``scores``, plus every explanation output when an explanation parameter is given.

>>> parse_version(""), parse_version("2")
(0, 2)
>>> classification(np.array([[0.1, 0.7, 0.2]], np.float32), ("a", "b", "c"), 2).tolist()
[[b'0.700000:1:b', b'0.200000:2:c']]
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from camserve import __version__, wire
from camserve.errors import InvalidArgument
from camserve.oip.tensors import Tensor
from camserve.proto import pb
from camserve.serving.budget import Outputs
from camserve.targets import from_text

if TYPE_CHECKING:
    from camserve.serving.dataplane import DataPlane, ExplainResult, ImageInput, ModelDescription

__all__ = [
    "EXPLAIN_OUTPUTS",
    "EXPLAIN_PARAMETERS",
    "EXTENSIONS",
    "INPUT_NAME",
    "OUTPUTS",
    "InferRequest",
    "InferResult",
    "RequestedOutput",
    "classification",
    "infer",
    "max_elements",
    "model_metadata",
    "model_ready",
    "parse_version",
    "request_deadline",
    "server_metadata",
    "server_ready",
]

SERVER_NAME = "camserve"
#: Protocol extensions camserve implements (Triton's names).
EXTENSIONS = ("classification", "binary_tensor_data", "parameters")
PLATFORM = "keras"

INPUT_NAME = "images"
INPUT_DATATYPES = {
    "UINT8": "[N, H, W, 3] RGB pixels, any size (resized)",
    "FP32": "[N, H, W, C] preprocessed inputs of the model's input size",
    "BYTES": "[N] encoded images (PNG, JPEG, BMP, WebP)",
}
OUTPUTS = ("scores", "heatmap", "raw", "targets", "boxes")
EXPLAIN_OUTPUTS = frozenset(OUTPUTS[1:])
EXPLAIN_PARAMETERS = ("method", "target", "top_k", "layer", "aug_smooth", "eigen_smooth")
#: Request parameters of Triton's clients that camserve accepts and ignores.
IGNORED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "headers", "binary_data_output"}
)
#: Triton's request timeout parameter, in microseconds (0: none).
TIMEOUT_PARAMETER = "timeout"
KNOWN_PARAMETERS = frozenset({*EXPLAIN_PARAMETERS, TIMEOUT_PARAMETER, *IGNORED_PARAMETERS})
#: Requested-output parameters: the classification extension's (``classification`` on the
#: wire, as Triton's clients send it; ``class_count`` accepted too) and REST's binary data flag.
OUTPUT_PARAMETERS = ("classification", "class_count", "binary_data")


@dataclasses.dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class InferRequest:
    """One inference request; ``version`` as the protocol sends it ("" : the newest)."""

    model: str
    version: str = ""
    id: str = ""
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: Sequence[Tensor] = ()
    outputs: Sequence[RequestedOutput] = ()


@dataclasses.dataclass(frozen=True)
class InferResult:
    model: str
    version: str
    id: str
    outputs: list[Tensor]


# ---------------------------------------------------------------------------- checks


def max_elements(config: Any) -> int:
    """The most elements an input tensor may have under a server's limits (``max_images``
    images of ``max_pixels`` pixels, at most 4 channels), checked before it is read.

    >>> from camserve.serving.config import ServerConfig
    >>> max_elements(ServerConfig(max_images=2, max_pixels=100))
    800
    """
    return int(config.max_images * config.max_pixels * 4)


def parse_version(version: str) -> int:
    """A protocol version string as camserve's version number (0: the newest)."""
    if version in ("", None):
        return 0
    text = str(version)
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise InvalidArgument(f"model version must be a positive integer (or empty for the newest), got {text[:40]!r}")
    return int(text)


def _images(inputs: Sequence[Tensor]) -> list[ImageInput]:
    """The request's images from its one input tensor."""
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        names = [t.name for t in inputs]
        raise InvalidArgument(
            f"inputs {names}: send exactly one input named {INPUT_NAME!r}, with datatype "
            + "; ".join(f"{k} {v}" for k, v in INPUT_DATATYPES.items())
        )
    t = inputs[0]
    what = f"input {t.name!r} ({t.datatype} {t.shape})"
    if t.datatype not in INPUT_DATATYPES:
        raise InvalidArgument(f"{what}: datatype {t.datatype} not allowed; allowed: {INPUT_DATATYPES}")
    a = t.array
    if t.datatype == "BYTES":
        if a.ndim == 2 and a.shape[1] == 1:  # [N, 1], as Triton's image examples send
            a = a[:, 0]
        if a.ndim != 1:
            raise InvalidArgument(f"{what}: BYTES images must have shape [N] (or [N, 1]): one encoded image each")
        return [pb.Image(encoded=bytes(e)) for e in a.tolist()]
    if a.ndim != 4:
        raise InvalidArgument(f"{what}: shape must be {INPUT_DATATYPES[t.datatype]}")
    if any(s == 0 for s in a.shape):
        raise InvalidArgument(f"{what}: shape has an empty dimension")
    if t.datatype == "UINT8":
        if a.shape[3] != 3:
            raise InvalidArgument(f"{what}: UINT8 images must be RGB, shape [N, H, W, 3]")
        return [wire.WireImage(a[i], preprocessed=False) for i in range(a.shape[0])]
    if not np.all(np.isfinite(a)):
        raise InvalidArgument(f"{what}: NaN or Inf values; only finite values are allowed")
    return [wire.WireImage(a[i].astype(np.float32, copy=False), preprocessed=True) for i in range(a.shape[0])]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"parameter {name!r} must be a non-empty string, got {value!r:.80}")
    return value.strip()


def _int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"parameter {name!r} must be an integer >= {low}, got {value!r:.80}")
    try:
        n = int(value)
    except ValueError:
        raise InvalidArgument(f"parameter {name!r} must be an integer >= {low}, got {value!r:.80}") from None
    if n < low:
        raise InvalidArgument(f"parameter {name!r} must be an integer >= {low}, got {n}")
    return n


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise InvalidArgument(f"parameter {name!r} must be a boolean (true or false), got {value!r:.80}")


def _targets(value: Any) -> list[Any]:
    """``target``: an index, a name, or several separated by commas (or a JSON list); the text
    forms of :func:`camserve.targets.from_text` too."""
    items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else [value]
    out: list[Any] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise InvalidArgument(f"parameter 'target' takes class indices or names, got {item!r:.80}")
        if isinstance(item, str):
            item = from_text(item) if item.strip() else ""
        if item == "":
            raise InvalidArgument("parameter 'target' has an empty entry; give class indices or names")
        out.append(item)
    return out


def request_deadline(parameters: dict[str, Any], deadline: float | None, now: float | None = None) -> float | None:
    """The request's deadline (a ``time.monotonic()`` instant): the sooner of the transport's
    ``deadline`` and Triton's ``timeout`` parameter (microseconds from ``now``; 0 or absent:
    none).

    >>> request_deadline({"timeout": 2_000_000}, None, now=10.0), request_deadline({"timeout": 0}, 11.0, now=10.0)
    (12.0, 11.0)
    >>> request_deadline({"timeout": 500_000}, 11.0, now=10.0)
    10.5
    """
    if TIMEOUT_PARAMETER not in parameters:
        return deadline
    value = parameters[TIMEOUT_PARAMETER]
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, bool) or not (isinstance(value, int) or (text and text.isascii() and text.isdigit())):
        raise InvalidArgument(
            f"parameter {TIMEOUT_PARAMETER!r} must be an integer number of microseconds >= 0 (0: no timeout), "
            f"got {value!r:.80}"
        )
    micros = int(value)
    if micros < 0:
        raise InvalidArgument(
            f"parameter {TIMEOUT_PARAMETER!r} must be an integer number of microseconds >= 0 (0: no timeout), "
            f"got {micros}"
        )
    if micros == 0:
        return deadline
    own = (time.monotonic() if now is None else now) + micros / 1e6
    return own if deadline is None else min(own, deadline)


@dataclasses.dataclass(frozen=True)
class _Explanation:
    methods: tuple[str, ...] = ("gradcam",)
    targets: list[Any] | None = None
    top_k: int = 1
    layer: str = ""
    aug_smooth: bool = False
    eigen_smooth: bool = False


def _explanation(parameters: dict[str, Any]) -> _Explanation | None:
    """The explanation the request parameters ask for (None: none asked)."""
    unknown = sorted(k for k in parameters if k not in KNOWN_PARAMETERS)
    if unknown:
        raise InvalidArgument(
            f"unknown request parameters {unknown}; camserve takes {[*EXPLAIN_PARAMETERS, TIMEOUT_PARAMETER]} (and "
            f"ignores Triton's "
            f"{sorted(IGNORED_PARAMETERS)})"
        )
    if not any(k in parameters for k in EXPLAIN_PARAMETERS):
        return None
    methods: tuple[str, ...] = ("gradcam",)
    if "method" in parameters:
        methods = tuple(dict.fromkeys(m.strip() for m in _text(parameters["method"], "method").split(",")))
    return _Explanation(
        methods=methods,
        targets=_targets(parameters["target"]) if "target" in parameters else None,
        top_k=_int(parameters["top_k"], "top_k") if "top_k" in parameters else 1,
        layer=_text(parameters["layer"], "layer") if "layer" in parameters else "",
        aug_smooth=_flag(parameters["aug_smooth"], "aug_smooth") if "aug_smooth" in parameters else False,
        eigen_smooth=_flag(parameters["eigen_smooth"], "eigen_smooth") if "eigen_smooth" in parameters else False,
    )


def _outputs(request: InferRequest, explaining: bool, classes: int) -> list[RequestedOutput]:
    """The outputs to send, checked (names, parameters, class_count)."""
    if not request.outputs:
        return [RequestedOutput(n) for n in (OUTPUTS if explaining else OUTPUTS[:1])]
    seen: set[str] = set()
    for out in request.outputs:
        if out.name not in OUTPUTS:
            raise InvalidArgument(f"unknown output {out.name!r}; outputs: {list(OUTPUTS)}")
        if out.name in seen:
            raise InvalidArgument(f"output {out.name!r} requested twice")
        seen.add(out.name)
        unknown = sorted(set(out.parameters) - set(OUTPUT_PARAMETERS))
        if unknown:
            raise InvalidArgument(
                f"output {out.name!r}: unknown parameters {unknown}; allowed: {list(OUTPUT_PARAMETERS)}"
            )
        k = _class_count(out)
        if k and out.name != "scores":
            raise InvalidArgument(f"classification (class_count) applies to the 'scores' output only, not {out.name!r}")
        if k > classes:
            raise InvalidArgument(f"class_count must be between 1 and {classes} (the class count), got {k}")
    return list(request.outputs)


def _class_count(out: RequestedOutput) -> int:
    """The classification extension's class count of an output (0: none asked)."""
    for key in ("classification", "class_count"):
        if key in out.parameters:
            return _int(out.parameters[key], "class_count")
    return 0


# ---------------------------------------------------------------------------- outputs


def classification(scores: np.ndarray, class_names: Sequence[str], k: int) -> np.ndarray:
    """Triton's classification extension: the ``k`` best classes of each row of ``scores`` as
    ``b"score:index:label"`` (best first), an object array ``[N, k]``."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty(order.shape, dtype=object)
    for i, row in enumerate(order):
        for j, c in enumerate(row):
            label = class_names[c] if c < len(class_names) else ""
            out[i, j] = f"{scores[i, c]:f}:{c}{':' + label if label else ''}".encode()
    return out


def _explanation_tensors(result: ExplainResult, methods: tuple[str, ...]) -> dict[str, np.ndarray]:
    """heatmap, raw, targets and boxes of an Explain result (targets outer, methods inner)."""
    m = len(methods)
    per_image = result.explanations
    t = len(per_image[0]) // m
    if any(len(exps) != t * m for exps in per_image):  # the same target count for every image
        raise InvalidArgument("images got different numbers of targets; give one target list for all images")
    heat = np.stack([np.stack([e.heatmap for e in exps]) for exps in per_image]).astype(np.float32, copy=False)
    raw = np.stack([np.stack([e.raw for e in exps]) for exps in per_image]).astype(np.float32, copy=False)
    n = len(per_image)
    boxes = np.array([[e.box if e.box is not None else (-1, -1, -1, -1) for e in exps] for exps in per_image], np.int32)
    targets = np.array([[exps[j * m].class_index for j in range(t)] for exps in per_image], np.int32)
    return {
        "heatmap": heat.reshape(n, t, m, *heat.shape[2:]),
        "raw": raw.reshape(n, t, m, *raw.shape[2:]),
        "boxes": boxes.reshape(n, t, m, 4),
        "targets": targets,
    }


# ---------------------------------------------------------------------------- requests


async def infer(plane: DataPlane, request: InferRequest, deadline: float | None = None) -> InferResult:
    """Answer one inference request (scores and/or explanations) through ``plane``."""
    deadline = request_deadline(request.parameters, deadline)
    version = parse_version(request.version)
    rt = plane.runtime(request.model, version)  # NOT_FOUND / UNAVAILABLE before anything else
    class_names = rt.entry.config.class_names
    images = _images(request.inputs)
    explain = _explanation(request.parameters)
    outputs = _outputs(request, explain is not None, len(class_names))
    names = {o.name for o in outputs}
    if explain is None and names & EXPLAIN_OUTPUTS:
        explain = _Explanation()
    jobs: list[Any] = []
    if "scores" in names:
        jobs.append(plane.predict(rt.name, rt.version, images, deadline=deadline))
    if explain is not None:
        jobs.append(
            plane.explain(
                rt.name,
                rt.version,
                images,
                layer="" if "," in explain.layer else explain.layer,
                layers=[n.strip() for n in explain.layer.split(",")] if "," in explain.layer else (),
                aug_smooth=explain.aug_smooth,
                eigen_smooth=explain.eigen_smooth,
                methods=explain.methods,
                targets=None if explain.targets is None else [explain.targets],
                top_k=explain.top_k,
                outputs=Outputs(raw="raw" in names, heatmap="heatmap" in names),
                deadline=deadline,
            )
        )
    results = await asyncio.gather(*jobs)
    arrays: dict[str, np.ndarray] = {}
    if "scores" in names:
        arrays["scores"] = np.asarray(results[0].scores, np.float32)
    if explain is not None:
        arrays.update(_explanation_tensors(results[-1], explain.methods))
    tensors = []
    for out in outputs:
        a = arrays[out.name]
        k = _class_count(out)
        if k:
            tensors.append(Tensor(out.name, "BYTES", classification(a, class_names, k), dict(out.parameters)))
        else:
            datatype = "FP32" if a.dtype == np.float32 else "INT32"
            tensors.append(Tensor(out.name, datatype, a, dict(out.parameters)))
    return InferResult(rt.name, str(rt.version), request.id, tensors)


# ---------------------------------------------------------------------------- health and metadata


def server_ready(plane: DataPlane) -> bool:
    """At least one model serves and the server is not draining."""
    if plane.draining:
        return False
    return any(plane.runtimes.ready_versions(name) for name in plane.repository.names())


def model_ready(plane: DataPlane, name: str, version: str = "") -> bool:
    """Whether ``name`` (``version``, or any) is ready; NOT_FOUND for an unknown model."""
    v = parse_version(version)
    plane.get_model(name, v)  # NOT_FOUND for an unknown name or a version not on disk
    ready = plane.runtimes.ready_versions(name)
    return bool(ready) and (not v or v in ready) and not plane.draining


def server_metadata() -> dict[str, Any]:
    """``{"name", "version", "extensions"}``.

    >>> server_metadata()["extensions"]
    ['classification', 'binary_tensor_data', 'parameters']
    """
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(plane: DataPlane, name: str, version: str = "") -> dict[str, Any]:
    """``{"name", "versions", "platform", "inputs", "outputs"}`` in the protocol's shape; -1
    is a dimension of any size."""
    v = parse_version(version)
    info: ModelDescription = plane.get_model(name, v)
    cfg = info.config
    classes = len(cfg.class_names) if cfg is not None else -1
    h, w = cfg.input_size if cfg is not None else (-1, -1)
    versions = [v] if v else (info.available_versions or info.versions)
    return {
        "name": info.name,
        "versions": [str(x) for x in versions],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "heatmap", "datatype": "FP32", "shape": [-1, -1, -1, h, w]},
            {"name": "raw", "datatype": "FP32", "shape": [-1, -1, -1, -1, -1]},
            {"name": "targets", "datatype": "INT32", "shape": [-1, -1]},
            {"name": "boxes", "datatype": "INT32", "shape": [-1, -1, -1, 4]},
        ],
    }
