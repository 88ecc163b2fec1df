"""The v1 REST API in the shape TF Serving and KServe v1 users know.

- ``POST /v1/models/{name}[/versions/{v}]:predict`` — ``{"instances": [...]}`` (or the
  columnar ``{"inputs": [...]}``) → ``{"predictions": [[score per class], ...]}``.
- ``POST /v1/models/{name}[/versions/{v}]:explain`` — the same instances and options →
  ``{"predictions", "explanations", "model", "layer"}``: per image a list of explanations
  (targets outer, methods inner) with ``method``, ``class_index``, ``label``, ``score``,
  ``box`` and ``image_box`` (``[x0, y0, x1, y1]`` in model-input / sent-image pixels, or null),
  and the maps asked for: ``heatmap_png`` (base64 8-bit PNG), ``heatmap`` / ``raw`` (nested
  float lists), ``overlay_png`` (base64 PNG).
- ``GET /v1/models/{name}[/versions/{v}]`` — TF Serving's model status
  (``model_version_status``: version, state AVAILABLE / LOADING / END, status) with KServe
  v1's ``name`` and ``ready``; ``GET .../metadata`` — the model's description (GetModel's
  ModelInfo in the JSON mapping); ``GET /v1/models`` — KServe v1's ``{"models": [names]}``.

An instance is an image: ``{"b64": "<base64 PNG/JPEG/BMP/WebP>"}`` (TF Serving's binary
convention), or a nested list ``[H][W][C]`` (or ``[H][W]``) of numbers: integers 0..255 are RGB
pixels (resized and preprocessed as the model's config says), other numbers a float32 input
already preprocessed to the model's input shape. An object with a single key (TF Serving's
named input, ``{"image": {"b64": ...}}``) stands for its value.

Explain options (body keys beside ``instances``): ``method`` or ``methods`` (default gradcam),
``targets`` (class indices or names, or the text forms ``prob:CLASS``,
``regression:INDEX[:-1]``, ``multilabel[:THRESHOLD]`` of :func:`camserve.targets.from_text`: a
flat list for every image, or one list per image; default: the ``top_k`` predicted classes),
``top_k``, ``layer`` (a name, or a list of names whose maps are fused), ``aug_smooth`` and
``eigen_smooth`` (booleans), ``heatmap``
(``"png"`` default, ``"float"``, ``"both"``, ``"none"``), ``raw`` and ``overlay`` (booleans),
``predictions`` (false: no class scores, which saves a pass).

>>> instance_to_image([[0, 255], [128, 7]]).tensor.shape
[2, 2, 1]
>>> instance_to_image({"b64": "iVBORw0KGgo="}).WhichOneof("source")
'encoded'
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from aiohttp import web

from camserve import wire
from camserve.errors import InvalidArgument, NotFound
from camserve.http.app import CONTEXT_KEY, HttpContext, deadline_of, read_json
from camserve.http.rpc_json import message_to_json
from camserve.proto import pb
from camserve.serving import convert
from camserve.serving.budget import Outputs, ResponseTooLarge
from camserve.serving.servicer import explain_answer
from camserve.targets import from_text

NAME = r"{name:[^/:]+}"
VERSION = r"/versions/{version:[^/:]+}"
VERBS = ("predict", "explain")
HEATMAP_CHOICES = ("png", "float", "both", "none")
#: What the repository says of a model still on its way (any other reason: it failed).
LOADING_REASONS = ("", "loading", "warming up")
PREDICT_KEYS = {"instances", "inputs", "signature_name"}
EXPLAIN_KEYS = PREDICT_KEYS | {
    "method",
    "methods",
    "targets",
    "top_k",
    "layer",
    "heatmap",
    "raw",
    "overlay",
    "predictions",
    "aug_smooth",
    "eigen_smooth",
}


def version_of(request: web.Request) -> int:
    """The version in the path (0: none given, the newest); 400 for anything but a number >= 1."""
    text = request.match_info.get("version")
    if text is None:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"version {text[:40]!r} in the path is not a version number; versions are 1, 2, ...")
    return int(text)


def instance_to_image(instance: Any, what: str = "instance") -> pb.Image:
    """One JSON instance as a wire Image (see the module docstring); 400 naming what is wrong."""
    if isinstance(instance, dict):
        if set(instance) == {"b64"}:
            text = instance["b64"]
            if not isinstance(text, str):
                raise InvalidArgument(f"{what}: 'b64' must be a base64 string of an encoded image")
            try:
                return pb.Image(encoded=base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                raise InvalidArgument(f"{what}: 'b64' is not valid base64 (RFC 4648, standard alphabet)") from None
        if len(instance) == 1:
            key, value = next(iter(instance.items()))
            return instance_to_image(value, f"{what}[{str(key)[:40]!r}]")
        raise InvalidArgument(
            f"{what}: an object instance must be {{'b64': ...}} or have a single named input; got keys "
            f"{sorted(str(k)[:40] for k in instance)[:10]}"
        )
    if not isinstance(instance, list):
        raise InvalidArgument(
            f"{what}: a JSON {type(instance).__name__}; send an image as {{'b64': ...}} or a nested list [H][W][C]"
        )
    try:
        a = np.asarray(instance)
    except ValueError:
        a = np.asarray([], dtype=object)
    if a.dtype == object or a.dtype.kind not in "iuf" or a.ndim not in (2, 3) or a.size == 0:
        raise InvalidArgument(
            f"{what}: a nested list must be a non-empty rectangular [H][W][C] or [H][W] of numbers "
            f"(integers 0..255: pixels; other numbers: a preprocessed float32 input)"
        )
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise InvalidArgument(f"{what}: integer pixels must be in 0..255, got {a.min()}..{a.max()}")
        return wire.image_to_proto(a.astype(np.uint8))
    with np.errstate(over="ignore"):
        return wire.image_to_proto(a.astype(np.float32))


def images_of(body: Any, allowed: set[str]) -> list[pb.Image]:
    """The instances of a request body (``instances``, or the columnar ``inputs``)."""
    if not isinstance(body, dict):
        raise InvalidArgument(f"the body is a JSON {type(body).__name__}; send an object {{'instances': [...]}}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown keys {[k[:40] for k in unknown[:10]]}; allowed: {sorted(allowed)}")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidArgument("send exactly one of 'instances' (a list of images) or 'inputs' (columnar)")
    instances = body.get("instances", body.get("inputs"))
    if isinstance(instances, dict) and len(instances) == 1:  # columnar, one named input
        instances = next(iter(instances.values()))
    if not isinstance(instances, list):
        raise InvalidArgument("'instances' must be a list of images ({'b64': ...} or nested lists)")
    return [instance_to_image(x, f"instance {i}") for i, x in enumerate(instances)]


def _option(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidArgument(f"{key!r} must be a JSON {names}, got {type(value).__name__}")
    return value


def methods_of(body: dict[str, Any]) -> list[str]:
    """``method`` (one name) or ``methods`` (a list of names); none: the default.

    >>> methods_of({"method": "cam"}), methods_of({"methods": ["gradcam", "scorecam"]}), methods_of({})
    (['cam'], ['gradcam', 'scorecam'], [])
    """
    if "method" in body and "methods" in body:
        raise InvalidArgument("send 'method' (one name) or 'methods' (a list), not both")
    if "method" in body:
        return [_option(body, "method", str, "")]
    methods = _option(body, "methods", list, [])
    if not all(isinstance(m, str) for m in methods):
        raise InvalidArgument("'methods' must be a list of method names, e.g. ['gradcam', 'scorecam']")
    return methods


def targets_of(body: dict[str, Any]) -> list[list[Any]] | None:
    """``targets``: None, a flat list of targets for every image, or one list per image (text
    forms read by :func:`camserve.targets.from_text`).

    >>> targets_of({"targets": ["star", 2]}), targets_of({"targets": [[0], [1, 2]]}), targets_of({})
    ([['star', 2]], [[0], [1, 2]], None)
    """
    if "targets" not in body:
        return None
    targets = body["targets"]

    def is_class(t: Any) -> bool:
        return isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool))

    def read(ts: list[Any]) -> list[Any]:
        return [from_text(t) if isinstance(t, str) else t for t in ts]

    if is_class(targets):
        return [read([targets])]
    if isinstance(targets, list) and all(is_class(t) for t in targets):
        return [read(targets)]
    if isinstance(targets, list) and all(isinstance(t, list) and all(map(is_class, t)) for t in targets):
        return [read(t) for t in targets]
    raise InvalidArgument(
        "'targets' must be a class (index or name), a list of classes for every image, or one list per image"
    )


def _map(m: Any) -> list[Any]:
    return wire.floatmap_to_array(m).tolist()


def _box(b: Any) -> list[int]:
    return [b.x0, b.y0, b.x1, b.y1]


def explanations_json(response: Any) -> list[list[dict[str, Any]]]:
    """An ExplainResponse's explanations as JSON values, per image.

    >>> one = pb.Explanation(method="cam", class_index=1, label="square", box=pb.Box(x0=1, y0=2, x1=5, y1=6))
    >>> explanations_json(pb.ExplainResponse(images=[pb.ImageExplanations(explanations=[one])]))[0][0]["box"]
    [1, 2, 5, 6]
    """
    images = []
    for image in response.images:
        out = []
        for e in image.explanations:
            item: dict[str, Any] = {
                "method": e.method,
                "class_index": e.class_index,
                "label": e.label,
                "score": e.score,
                "box": _box(e.box) if e.HasField("box") else None,
                "image_box": _box(e.image_box) if e.HasField("image_box") else None,
            }
            if e.heatmap_png:
                item["heatmap_png"] = base64.b64encode(e.heatmap_png).decode()
            if e.HasField("heatmap"):
                item["heatmap"] = _map(e.heatmap)
            if e.HasField("raw"):
                item["raw"] = _map(e.raw)
            if e.overlay_png:
                item["overlay_png"] = base64.b64encode(e.overlay_png).decode()
            out.append(item)
        images.append(out)
    return images


async def predict(request: web.Request) -> web.Response:
    """``:predict``: the instances' class scores."""
    ctx = request.app[CONTEXT_KEY]
    images = images_of(await read_json(request), PREDICT_KEYS)
    result = await ctx.dataplane.predict(
        request.match_info["name"], version_of(request), images, deadline=deadline_of(request)
    )
    return web.json_response({"predictions": result.scores.tolist()})


async def explain(request: web.Request) -> web.Response:
    """``:explain``: the instances' explanations (and scores, unless ``predictions`` is false)."""
    ctx = request.app[CONTEXT_KEY]
    body = await read_json(request)
    images = images_of(body, EXPLAIN_KEYS)
    heatmap = _option(body, "heatmap", str, "png")
    if heatmap not in HEATMAP_CHOICES:
        raise InvalidArgument(f"'heatmap' must be one of {list(HEATMAP_CHOICES)}, got {heatmap[:40]!r}")
    outputs = Outputs(
        raw=_option(body, "raw", bool, False),
        heatmap=heatmap in ("float", "both"),
        heatmap_png=heatmap in ("png", "both"),
        overlay=_option(body, "overlay", bool, False),
    )
    with_scores = _option(body, "predictions", bool, True)
    layer = _option(body, "layer", (str, list), "")
    if isinstance(layer, list) and not all(isinstance(n, str) for n in layer):
        raise InvalidArgument("'layer' must be a layer name or a list of layer names (fused)")
    name, version, deadline = request.match_info["name"], version_of(request), deadline_of(request)
    explained = ctx.dataplane.explain(
        name,
        version,
        images,
        layer=layer if isinstance(layer, str) else "",
        layers=() if isinstance(layer, str) else layer,
        aug_smooth=_option(body, "aug_smooth", bool, False),
        eigen_smooth=_option(body, "eigen_smooth", bool, False),
        methods=methods_of(body),
        targets=targets_of(body),
        top_k=_option(body, "top_k", int, 0),
        outputs=outputs,
        deadline=deadline,
    )
    scores = ctx.dataplane.predict(name, version, images, deadline=deadline) if with_scores else None
    if scores is not None:
        scored, result = await asyncio.gather(scores, explained)
    else:
        scored, result = None, await explained
    response = await explain_answer(ctx.dataplane, result, outputs)
    answer: dict[str, Any] = {
        "model": {"name": result.model, "version": result.version},
        "layer": result.layer,
        "explanations": explanations_json(response),
    }
    if scored is not None:
        answer["predictions"] = scored.scores.tolist()
    return json_answer(answer, ctx.config.max_message_bytes)


def json_answer(value: Any, limit: int) -> web.Response:
    """``value`` as a JSON answer, or RESOURCE_EXHAUSTED when it is over ``limit`` bytes (as
    gRPC's answers: float maps as JSON numbers take about five times the bytes of the binary
    float32 the data plane's estimate counted before compute).

    >>> json_answer({"predictions": [[0.5]]}, 100).text
    '{"predictions": [[0.5]]}'
    """
    body = json.dumps(value)
    if len(body) > limit:  # ASCII (json.dumps escapes the rest): characters are bytes
        raise ResponseTooLarge(
            f"the answer is {len(body)} bytes of JSON, more than the largest the server sends "
            f"(max_message_mb={limit / 2**20:g}); ask for heatmap 'png' instead of floats, raw false, or fewer "
            "images, targets or methods"
        )
    return web.Response(text=body, content_type="application/json")


async def call(request: web.Request) -> web.StreamResponse:
    """``POST /v1/models/{name}[/versions/{v}]:{verb}``: the verb's handler."""
    verb = request.match_info["verb"]
    version_of(request)  # a bad path is the first thing to say
    if verb == "predict":
        return await predict(request)
    if verb == "explain":
        return await explain(request)
    raise NotFound(f"unknown verb ':{verb[:40]}'; allowed: {[':' + v for v in VERBS]}")


def version_status(ctx: HttpContext, name: str, version: int = 0) -> dict[str, Any]:
    """TF Serving's GetModelStatus answer for ``name`` (one version, or all on disk), with
    KServe v1's ``name`` and ``ready`` beside it."""
    info = ctx.dataplane.get_model(name, version)
    versions = [version] if version else sorted(info.versions, reverse=True)
    ready = set(info.available_versions)
    states = []
    for v in versions:
        if v in ready:
            state, code, message = "AVAILABLE", "OK", ""
        elif info.reason in LOADING_REASONS:
            state, code, message = "LOADING", "UNAVAILABLE", info.reason or "loading"
        else:
            state, code, message = "END", "UNAVAILABLE", info.reason
        states.append({"version": str(v), "state": state, "status": {"error_code": code, "error_message": message}})
    ready_now = bool(ready) if not version else version in ready
    return {"name": info.name, "ready": ready_now and not ctx.dataplane.draining, "model_version_status": states}


async def status(request: web.Request) -> web.Response:
    """``GET /v1/models/{name}[/versions/{v}]``: :func:`version_status`."""
    ctx = request.app[CONTEXT_KEY]
    return web.json_response(version_status(ctx, request.match_info["name"], version_of(request)))


async def list_models(request: web.Request) -> web.Response:
    """KServe v1's model list: ``{"models": [names]}``."""
    return web.json_response({"models": request.app[CONTEXT_KEY].dataplane.repository.names()})


async def metadata(request: web.Request) -> web.Response:
    """``GET .../metadata``: GetModel's ModelInfo in the protobuf JSON mapping."""
    ctx = request.app[CONTEXT_KEY]
    info = ctx.dataplane.get_model(request.match_info["name"], version_of(request))
    return web.json_response({"model": message_to_json(convert.model_info(info))})


def add_routes(app: web.Application, ctx: HttpContext) -> None:
    """The v1 routes (see the module docstring)."""
    app.router.add_get("/v1/models", list_models)
    for prefix in (f"/v1/models/{NAME}", f"/v1/models/{NAME}{VERSION}"):
        app.router.add_post(prefix + ":{verb:[^/:]+}", call)
        app.router.add_get(prefix, status)
        app.router.add_get(prefix + "/metadata", metadata)


__all__: Sequence[str] = ["add_routes", "images_of", "instance_to_image", "version_status"]
