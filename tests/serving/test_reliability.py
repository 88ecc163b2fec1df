"""Bad input through the raw generated stubs (issue 5 §1, SPEC §6 and §9).

A corpus of malformed requests (images, tensors, names, numbers, sizes, deadlines, tokens),
each answered with its status code and a message naming the problem; property-based requests
and image bytes (hypothesis) that never get INTERNAL and never hang; and afterwards the server
still answers exactly like the in-process library. Complements the basic status paths of
tests/test_server.py (BAD_REQUESTS there), which are not repeated here.

The server runs with a bearer token, so every call also passes the auth interceptor.
"""

from __future__ import annotations

import base64
import re
import struct
import sys
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import grpc
import numpy as np
import pytest
from helpers_serving import CLASSES, RunningServer, local_config, make_repository, metric_value
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fuzz_decode
import load

from camserve import wire
from camserve.imaging import encode_png
from camserve.proto import pb, pb_grpc

TOKEN = "reliability-token"
MAX_IMAGES = 4
MAX_PIXELS = 128 * 128
MAX_MESSAGE_MB = 0.25
MAX_WORK_UNITS = 20_000
METHODS = ["cam", "gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "scorecam", "eigencam", "ablationcam"]
#: What a client may ever get back here: never INTERNAL / UNKNOWN, never a hang.
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
HYPOTHESIS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------ server and calls


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("models"), corrupt=False)


@pytest.fixture(scope="module")
def workload(repo: Path) -> load.Workload:
    return load.Workload(repo, pool=4)


@pytest.fixture(scope="module")
def served(repo: Path):
    cfg = local_config(
        repo,
        max_batch_size=4,
        batch_timeout_ms=2,
        max_images=MAX_IMAGES,
        max_pixels=MAX_PIXELS,
        max_message_mb=MAX_MESSAGE_MB,
        max_work_units=MAX_WORK_UNITS,
        token=TOKEN,
        log_level="ERROR",
    )
    with RunningServer(cfg) as rs:
        yield rs


@pytest.fixture(scope="module")
def stub(served: RunningServer):
    channel = grpc.insecure_channel(served.target)
    yield pb_grpc.CamServiceStub(channel)
    channel.close()


def call(
    stub: Any, method: str, request: Any, timeout: float = 30.0, token: str | tuple[str, ...] | None = TOKEN
) -> tuple[str, str, Any]:
    """(status name, details, response) of one raw call; ExplainStream takes a list of requests
    and answers the list of responses. ``token``: a tuple sends one authorization header each."""
    tokens = token if isinstance(token, tuple) else (token,) if token else ()
    metadata = tuple(("authorization", t if t.lower().startswith("bearer") else f"Bearer {t}") for t in tokens)
    try:
        if method == "ExplainStream":
            return "OK", "", list(stub.ExplainStream(iter(request), timeout=timeout, metadata=metadata))
        return "OK", "", getattr(stub, method)(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        return e.code().name, e.details() or "", None


def serves_correctly(served: RunningServer, stub: Any, workload: load.Workload) -> None:
    """Health SERVING, every request kind answered like the in-process library, queue empty."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(served.target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    for i, kind in enumerate(load.MIXED * 2):
        work = load.Work(kind, i)
        code, details, response = call(stub, *workload.request(work.kind, work.index))
        assert code == "OK", details
        assert workload.check(work, response) is None, workload.check(work, response)
    assert served.server.batcher.depth == 0
    text = served.metrics_text()
    assert metric_value(text, "camserve_queue_depth") == 0
    assert metric_value(text, "camserve_errors_total", code="INTERNAL") == 0
    assert metric_value(text, "camserve_errors_total", code="UNKNOWN") == 0


# ------------------------------------------------------------------ corpus inputs


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


PNG = encode_png(_rgb(40, 48))
JPEG = _jpeg(_rgb(40, 48))


def _flip(data: bytes, start: int, n: int = 24) -> bytes:
    b = bytearray(data)
    for i in range(start, start + n):
        b[i] ^= 0xFF
    return bytes(b)


def _png_declaring(w: int, h: int) -> bytes:
    """A small PNG whose IHDR claims w x h (its CRC no longer matches: never decoded)."""
    return PNG[:16] + struct.pack(">II", w, h) + PNG[24:]


def _sof(data: bytes) -> int:
    return data.index(b"\xff\xc0")


def _jpeg_declaring(w: int, h: int) -> bytes:
    i = _sof(JPEG)
    return JPEG[: i + 5] + struct.pack(">HH", h, w) + JPEG[i + 9 :]


def _bmp_v3_declaring(w: int, h: int) -> bytes:
    return b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + struct.pack("<IiiHH", 40, w, h, 1, 24) + bytes(40)


def _bmp_os2_declaring(w: int, h: int) -> bytes:
    """A BITMAPCOREHEADER (OS/2) BMP: unsigned 16-bit width and height."""
    return b"BM" + struct.pack("<IHHI", 38, 0, 0, 26) + struct.pack("<IHHHH", 12, w, h, 1, 24) + bytes(12)


def _webp_declaring(w: int, h: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def _tensor(dtype: str, shape: list[int], data: bytes) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))


def _float(shape: tuple[int, ...], bad: float | None = None) -> pb.Image:
    a = np.random.default_rng(1).random(shape, dtype=np.float32)
    if bad is not None:
        a.flat[7] = bad
    return wire.image_to_proto(a)


GAP, FC = pb.ModelSpec(name="gap"), pb.ModelSpec(name="fc")
GOOD = wire.image_to_proto(_rgb(32, 32, 3))
DENSE_GOOD = wire.image_to_proto(_rgb(40, 48, 4))


def predict(*images: pb.Image, **kw: Any) -> pb.PredictRequest:
    kw.setdefault("model", GAP)
    return pb.PredictRequest(images=list(images) or [GOOD], **kw)


def explain(*images: pb.Image, **kw: Any) -> pb.ExplainRequest:
    kw.setdefault("model", GAP)
    return pb.ExplainRequest(images=list(images) or [GOOD], **kw)


def dense(image: pb.Image | None = None, **kw: Any) -> pb.DenseScoresRequest:
    kw.setdefault("model", FC)
    return pb.DenseScoresRequest(image=image or DENSE_GOOD, **kw)


def targets(*ts: int | str) -> list[pb.TargetList]:
    return [pb.TargetList(targets=[pb.Target(index=t) if isinstance(t, int) else pb.Target(name=t) for t in ts])]


class Case(NamedTuple):
    method: str
    request: Any
    code: str
    patterns: tuple[str, ...]  # regular expressions the details must all match
    token: str | tuple[str, ...] | None = TOKEN
    timeout: float = 30.0


def case(method: str, request: Any, code: str, *patterns: str, **kw: Any) -> Case:
    return Case(method, request, code, patterns, **kw)


LIMIT = rf"exceeds the limit of {MAX_PIXELS} pixels per image"
INV, NF = "INVALID_ARGUMENT", "NOT_FOUND"
#: The client library or the server (whichever notices first) ends a call whose deadline passed.
DEADLINE = (
    r"^Deadline Exceeded$|^the request.s deadline (had already passed when it arrived|passed while it waited in the queue"
    r"|passed while it was computed(; the computation was stopped)?)$"
)

CORPUS: dict[str, Case] = {
    # ---- encoded images: truncated, corrupt, not images, empty
    "truncated png": case(
        "Predict",
        predict(pb.Image(encoded=PNG[: len(PNG) // 2])),
        INV,
        r"^image: corrupt or truncated PNG \(\d+ bytes\)",
    ),
    "truncated jpeg": case(
        "Predict", predict(pb.Image(encoded=JPEG[: len(JPEG) // 2])), INV, r"corrupt or truncated JPEG"
    ),
    "jpeg cut before its frame header": case(
        "Explain",
        explain(pb.Image(encoded=JPEG[:20])),
        INV,
        r"corrupt or truncated JPEG \(20 bytes\): no readable size in its header",
    ),
    "png signature only": case(
        "Predict", predict(pb.Image(encoded=PNG[:8])), INV, r"corrupt or truncated PNG \(8 bytes\): no readable size"
    ),
    "corrupt png data": case(
        "Predict", predict(pb.Image(encoded=_flip(PNG, len(PNG) // 2))), INV, r"corrupt or truncated PNG"
    ),
    "corrupt jpeg header": case(
        "Explain",
        explain(pb.Image(encoded=JPEG[: _sof(JPEG) + 4] + b"\x03" + JPEG[_sof(JPEG) + 5 :])),
        INV,
        r"corrupt or truncated JPEG",
    ),
    "truncated jpeg for dense": case(
        "DenseScores", dense(pb.Image(encoded=_jpeg(_rgb(60, 60))[:300])), INV, r"corrupt or truncated JPEG"
    ),
    "pdf bytes": case(
        "Predict",
        predict(pb.Image(encoded=b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj")),
        INV,
        r"not an image \(\d+ bytes starting b'%PDF-1.4'\); accepted formats: PNG, JPEG, BMP, WebP",
    ),
    "random bytes": case(
        "Explain", explain(pb.Image(encoded=np.random.default_rng(9).bytes(512))), INV, r"not an image"
    ),
    "second image not an image": case(
        "Explain", explain(GOOD, pb.Image(encoded=b"<html>")), INV, r"^image 1: not an image"
    ),
    "text starting BM": case("Predict", predict(pb.Image(encoded=b"BMW and other cars " * 3)), INV, r"BMP"),
    "empty image for dense": case(
        "DenseScores", dense(pb.Image(encoded=b"")), INV, r"empty image: expected PNG, JPEG, BMP or WebP"
    ),
    "image without source": case(
        "Explain", explain(pb.Image()), INV, r"set `encoded` \(PNG, JPEG, BMP, WebP bytes\) or `tensor`"
    ),
    # ---- headers declaring giant images (refused before decoding)
    "png 100000x100000 for explain": case(
        "Explain",
        explain(pb.Image(encoded=_png_declaring(100000, 100000))),
        INV,
        r"PNG header\) of 100000x100000 = 10000000000 pixels " + LIMIT,
    ),
    "png 100000x100000 for dense": case(
        "DenseScores",
        dense(pb.Image(encoded=_png_declaring(100000, 100000))),
        INV,
        r"100000x100000 = 10000000000 pixels " + LIMIT,
    ),
    "jpeg 65535x65535": case(
        "Predict",
        predict(pb.Image(encoded=_jpeg_declaring(65535, 65535))),
        INV,
        r"JPEG header\) of 65535x65535 = 4294836225 pixels " + LIMIT,
    ),
    "bmp 100000x100000": case(
        "Predict",
        predict(pb.Image(encoded=_bmp_v3_declaring(100000, -100000))),
        INV,
        r"BMP header\) of 100000x100000 = 10000000000 pixels " + LIMIT,
    ),
    "os/2 bmp 65535x65535": case(
        "Predict",
        predict(pb.Image(encoded=_bmp_os2_declaring(65535, 65535))),
        INV,
        r"BMP header\) of 65535x65535 = 4294836225 pixels " + LIMIT,
    ),
    "webp 16384x16384": case(
        "Predict",
        predict(pb.Image(encoded=_webp_declaring(16384, 16384))),
        INV,
        r"WEBP header\) of 16384x16384 = 268435456 pixels " + LIMIT,
    ),
    "tensor 100000x100000": case(
        "Predict",
        predict(_tensor("uint8", [100000, 100000, 3], b"")),
        INV,
        r"\(tensor\) of 100000x100000 = 10000000000 pixels " + LIMIT,
    ),
    # ---- tensors: NaN / Inf, dtypes, shapes
    "inf tensor": case(
        "Predict", predict(_float((32, 32, 3), np.inf)), INV, r"1 values are NaN or Inf; only finite values are allowed"
    ),
    "-inf tensor for explain": case("Explain", explain(_float((32, 32, 3), -np.inf)), INV, r"NaN or Inf"),
    "nan tensor for dense": case("DenseScores", dense(_float((40, 48, 3), np.nan)), INV, r"NaN or Inf"),
    "float64 tensor": case(
        "Predict",
        predict(_tensor("float64", [32, 32, 3], bytes(32 * 32 * 3 * 8))),
        INV,
        r"dtype 'float64' not allowed; allowed: \['uint8', 'float32'\]",
    ),
    "empty dtype": case(
        "Explain", explain(_tensor("", [32, 32, 3], bytes(3072))), INV, r"dtype '' not allowed; allowed"
    ),
    "2-d tensor": case(
        "Predict",
        predict(_tensor("uint8", [32, 32], bytes(1024))),
        INV,
        r"shape \[32, 32\] has 2 dimensions, expected 3",
    ),
    "4-d tensor": case(
        "Predict", predict(_tensor("float32", [1, 32, 32, 3], bytes(12288))), INV, r"has 4 dimensions, expected 3"
    ),
    "data shorter than shape": case(
        "Predict",
        predict(_tensor("uint8", [32, 32, 3], bytes(100))),
        INV,
        r"100 data bytes do not match shape \[32, 32, 3\] of uint8 \(3072 bytes expected\)",
    ),
    "negative dimension": case(
        "DenseScores", dense(_tensor("uint8", [-40, 48, 3], b"")), INV, r"empty or negative dimension"
    ),
    "shape whose int64 product wraps": case(
        "Predict",
        predict(_tensor("uint8", [4, 4, 2**60], b"")),
        INV,
        r"0 data bytes do not match shape \[4, 4, 1152921504606846976\]",
    ),
    "uint8 with 2 channels": case(
        "Predict",
        predict(_tensor("uint8", [8, 8, 2], bytes(128))),
        INV,
        r"uint8 tensor has 2 channels; allowed: 1 \(grey\), 3 \(RGB\), 4 \(RGBA\)",
    ),
    "float of the wrong size for explain": case(
        "Explain", explain(_float((31, 32, 3))), INV, r"model 'gap' takes preprocessed inputs of shape \[32, 32, 3\]"
    ),
    "float with 2 channels for dense": case(
        "DenseScores", dense(_float((40, 48, 2))), INV, r"float32 tensor has 2 channels; model 'fc' takes 3"
    ),
    # ---- images smaller than a dense window
    "uint8 smaller than the window": case(
        "DenseScores",
        dense(wire.image_to_proto(_rgb(20, 48))),
        INV,
        r"image of 48x20 is smaller than the model's window 32x32; send at least that size",
    ),
    "float smaller than the window": case(
        "DenseScores", dense(_float((31, 40, 3))), INV, r"smaller than the model's window 32x32"
    ),
    # ---- unknown model / version / layer / class / method
    "unknown model for explain": case(
        "Explain", explain(model=pb.ModelSpec(name="nope")), NF, r"unknown model 'nope'; available: \['fc', 'gap'\]"
    ),
    "unknown model for dense": case(
        "DenseScores", dense(model=pb.ModelSpec(name="resnet")), NF, r"unknown model 'resnet'"
    ),
    "unknown version for explain": case(
        "Explain",
        explain(model=pb.ModelSpec(name="gap", version=3)),
        NF,
        r"model 'gap' has no version 3; available: \[1, 2\]",
    ),
    "unknown version for dense": case(
        "DenseScores", dense(model=pb.ModelSpec(name="fc", version=2)), NF, r"has no version 2; available: \[1\]"
    ),
    "unknown version for get": case(
        "GetModel", pb.GetModelRequest(model=pb.ModelSpec(name="gap", version=7)), NF, r"no version 7"
    ),
    "negative version": case(
        "Predict",
        predict(model=pb.ModelSpec(name="gap", version=-1)),
        INV,
        r"model.version must be >= 0 \(0: newest\), got -1",
    ),
    "layer that is not 4-d": case(
        "Explain",
        explain(layer="predictions"),
        NF,
        r"unknown layer 'predictions'; layers with a 4-D output \(3\), last ones: .*last_conv",
    ),
    "class name of the wrong case": case(
        "Explain", explain(targets=targets("Circle")), NF, r"unknown class 'Circle'; use"
    ),
    "negative class index": case(
        "Explain", explain(targets=targets(-1)), NF, r"class index -1 out of range; the model has classes 0..3"
    ),
    "more targets than classes": case(
        "Explain", explain(targets=targets(0, 1, 2, 3, 0)), INV, r"image 0 has 5 targets; at most 4"
    ),
    "empty method name": case("Explain", explain(methods=[""]), INV, r"unknown method ''; allowed: cam, gradcam"),
    "method of the wrong case": case(
        "Explain", explain(methods=["gradcam", "GradCAM"]), INV, r"unknown method 'GradCAM'"
    ),
    "unknown method in a stream": case(
        "ExplainStream",
        [explain(request_id="s1", methods=["magic"])],
        INV,
        r"request 's1': unknown method 'magic'; allowed",
    ),
    # ---- strides, top-k, counts
    "stride not dividing the total stride": case(
        "DenseScores",
        dense(model=GAP, stride=4),
        INV,
        r"stride 4 along y does not divide the total stride 2; allowed in mode='fcn': \[1, 2\]",
    ),
    "huge stride": case(
        "DenseScores", dense(stride=2**31 - 1), INV, r"stride 2147483647 along y does not divide the total stride"
    ),
    "negative stride": case(
        "DenseScores", dense(stride=-2), INV, r"stride must be >= 0 \(0: the network's total stride\), got -2"
    ),
    "predict top_k -1": case(
        "Predict", predict(top_k=-1), INV, r"top_k must be between 0 and 4 \(the class count\), got -1"
    ),
    "predict top_k int32 max": case(
        "Predict", predict(top_k=2**31 - 1), INV, r"top_k must be between 0 and 4 .*got 2147483647"
    ),
    "explain top_k 5": case(
        "Explain", explain(top_k=5), INV, r"top_k must be between 1 and 4 \(the class count\), got 5"
    ),
    "too many images for explain": case(
        "Explain", explain(*[GOOD] * 5), INV, r"5 images in one request; at most 4 are allowed \(max_images\)"
    ),
    "too many images in a stream": case(
        "ExplainStream", [explain(*[GOOD] * 5, request_id="big")], INV, r"request 'big': 5 images"
    ),
    # ---- oversize messages (max_message_mb = 0.25)
    "oversize request": case(
        "Predict",
        predict(pb.Image(encoded=b"\x89PNG" + bytes(300 * 1024))),
        "RESOURCE_EXHAUSTED",
        r"larger than max \(\d+ vs\. 262144\)",
    ),
    "oversize tensor for dense": case(
        "DenseScores", dense(_float((200, 200, 3))), "RESOURCE_EXHAUSTED", r"larger than max"
    ),
    "oversize response": case(
        "Explain",
        explain(*[GOOD] * 4, methods=METHODS[:6], top_k=4, return_raw=True, return_heatmap=True),
        "RESOURCE_EXHAUSTED",
        r"^the answer \(4 images × 4 targets × 6 methods with raw, heatmap\) would be about \d+ bytes, more than the "
        r"largest message the server sends \(max_message_mb=0.25: 262144 bytes\); ask for fewer maps",
    ),
    # ---- work and answers beyond the budget (refused before compute)
    "dense windows over the work budget": case(
        "DenseScores",
        dense(wire.image_to_proto(_rgb(128, 128)), stride=1, scales=[1.0, 0.9, 0.8]),
        INV,
        r"^this request needs 21506 work units \(21506 windows of 32x32 at stride 1 over 3 scales \(4 shifted passes",
        r"max_work_units=20000 allows for one request; use a coarser stride",
    ),
    "dense answer over the message limit": case(
        "DenseScores",
        dense(wire.image_to_proto(_rgb(128, 128)), stride=1),
        "RESOURCE_EXHAUSTED",
        r"^the answer \(scores and boxes of 9409 windows\) would be about \d+ bytes, more than the largest message",
    ),
    "overlays over the message limit": case(
        "Explain",
        explain(wire.image_to_proto(_rgb(128, 128)), methods=METHODS[:2], top_k=4, return_overlay=True),
        "RESOURCE_EXHAUSTED",
        r"^the answer \(1 image × 4 targets × 2 methods with overlay\) would be about \d+ bytes",
    ),
    # ---- deadlines of 1 ms
    "1 ms predict": case("Predict", predict(), "DEADLINE_EXCEEDED", DEADLINE, timeout=0.001),
    "1 ms explain": case("Explain", explain(methods=["scorecam"]), "DEADLINE_EXCEEDED", DEADLINE, timeout=0.001),
    "1 ms dense": case("DenseScores", dense(stride=1), "DEADLINE_EXCEEDED", DEADLINE, timeout=0.001),
    # ---- very long names: the message still names the problem and what is allowed
    "100k-character model name": case(
        "Predict",
        predict(model=pb.ModelSpec(name="m" * 100_000)),
        NF,
        r"^invalid model name 'mmm+\.\.\. \[\d+ characters cut\] \.\.\.m+': use letters, digits",
    ),
    "50k-character layer": case(  # refused by its length, before any look-up (issue 9 item 4)
        "Explain", explain(layer="L" * 50_000), INV, r"^layer name of 50000 characters is too long: at most 256"
    ),
    "unknown layer": case("Explain", explain(layer="last_con"), NF, r"^unknown layer 'last_con' \(did you mean"),
    "30k non-ascii class name": case(
        "Explain", explain(targets=targets("é" * 30_000)), NF, r"^unknown class 'ééé", r"characters cut"
    ),
    "50k-character method": case(
        "Explain", explain(methods=["x" * 50_000]), INV, r"^unknown method 'xxx", r"allowed: cam, gradcam"
    ),
    "50k-character mode": case(
        "DenseScores", dense(mode="z" * 50_000), INV, r"^mode must be 'fcn' or 'crops', got 'zzz"
    ),
    # ---- bearer token
    "wrong token": case("Predict", predict(), "UNAUTHENTICATED", r"^invalid bearer token$", token="not-the-token"),
    "no token": case(
        "DenseScores",
        dense(),
        "UNAUTHENTICATED",
        r"missing bearer token: send metadata 'authorization: Bearer <token>'",
        token=None,
    ),
    "lower-case scheme (accepted: RFC 7235 schemes are case-insensitive)": case(
        "Explain", explain(), "OK", token=f"bearer {TOKEN}"
    ),
    "upper-case scheme (accepted)": case("Predict", predict(), "OK", token=f"BEARER {TOKEN}"),
    "two authorization headers": case(
        "Predict",
        predict(),
        "UNAUTHENTICATED",
        r"^2 'authorization' headers: send exactly one, 'authorization: Bearer <token>'$",
        token=(TOKEN, TOKEN),
    ),
    "two authorization headers, the right one last": case(
        "ExplainStream", [explain()], "UNAUTHENTICATED", r"^2 'authorization' headers", token=("nope", TOKEN)
    ),
    "three authorization headers on a stream": case(
        "ExplainStream", [explain()], "UNAUTHENTICATED", r"^3 'authorization' headers", token=(TOKEN,) * 3
    ),
    "wrong token on a stream": case(
        "ExplainStream", [explain()], "UNAUTHENTICATED", r"invalid bearer token", token="x"
    ),
    "wrong token for models": case(
        "ListModels", pb.ListModelsRequest(), "UNAUTHENTICATED", r"invalid bearer token", token=TOKEN + "x"
    ),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_gets_its_status_and_a_message_naming_the_problem(stub, name: str) -> None:
    c = CORPUS[name]
    code, details, _ = call(stub, c.method, c.request, timeout=c.timeout, token=c.token)
    assert code == c.code, f"{name}: {code}: {details[:500]}"
    assert len(details.encode()) < 8192, "a status message too long for gRPC's trailers"
    for pattern in c.patterns:
        assert re.search(pattern, details), f"{name}: {details[:500]!r} does not match {pattern!r}"


def test_after_the_whole_corpus_the_server_answers_like_in_process(served, stub, workload) -> None:
    for name, c in CORPUS.items():  # again, all in a row (the parametrized test may run alone)
        code, details, _ = call(stub, c.method, c.request, timeout=c.timeout, token=c.token)
        assert code not in ("INTERNAL", "UNKNOWN"), f"{name}: {details}"
    serves_correctly(served, stub, workload)


# ------------------------------------------------------------------ malformed protobuf bytes

_VALID_PREDICT = predict().SerializeToString()
_VALID_EXPLAIN = explain().SerializeToString()
_NOT_A = r"is not a valid camserve\.v1\.{} message \(.+\); send one serialized camserve\.v1\.{}$"

#: Raw bytes sent as the request (through a generic channel, no serializer): (method, list of
#: messages (ExplainStream) or bytes, token, code, patterns).
RAW_CORPUS: dict[str, tuple[str, Any, str | None, str, str]] = {
    "0xff bytes to Predict": (
        "Predict",
        b"\xff\xff\xff",
        TOKEN,
        INV,
        r"^Predict: the request \(3 bytes\) " + _NOT_A.format(*["PredictRequest"] * 2),
    ),
    "truncated Explain": (
        "Explain",
        _VALID_EXPLAIN[:-7],
        TOKEN,
        INV,
        r"^Explain: the request .*" + _NOT_A.format(*["ExplainRequest"] * 2),
    ),
    "invalid wire type to DenseScores": (
        "DenseScores",
        b"\x0e\x01",
        TOKEN,
        INV,
        r"^DenseScores: " + ".*" + _NOT_A.format(*["DenseScoresRequest"] * 2),
    ),
    "end group without start to GetModel": (
        "GetModel",
        b"\x0c",
        TOKEN,
        INV,
        r"^GetModel: .*" + _NOT_A.format(*["GetModelRequest"] * 2),
    ),
    "bad UTF-8 model name to Predict": (
        "Predict",
        b"\x0a\x03\x0a\x01\xff",
        TOKEN,
        INV,
        r"^Predict: .*\(String field had bad UTF-8\)",
    ),
    "length past the end to ListModels": ("ListModels", b"\x0a\x7f", TOKEN, INV, r"^ListModels: .*ListModelsRequest"),
    "garbage in the 2nd message of a stream": (
        "ExplainStream",
        [_VALID_EXPLAIN, b"\xff" * 64],
        TOKEN,
        INV,
        r"^ExplainStream: request message 2 of the stream \(64 bytes\) is not a valid camserve\.v1\.ExplainRequest",
    ),
    "truncated 1st message of a stream": (
        "ExplainStream",
        [_VALID_EXPLAIN[:40]],
        TOKEN,
        INV,
        r"^ExplainStream: request message 1 of the stream",
    ),
    "garbage without the token (checked first)": (
        "Predict",
        b"\xff\xff\xff",
        None,
        "UNAUTHENTICATED",
        r"^missing bearer token",
    ),
    "garbage with a wrong token (checked first)": (
        "Explain",
        b"\xff" * 1000,
        "x",
        "UNAUTHENTICATED",
        r"^invalid bearer token$",
    ),
    "garbage stream without the token": ("ExplainStream", [b"\xff"], None, "UNAUTHENTICATED", r"^missing bearer token"),
}


def raw_call(channel: grpc.Channel, method: str, request: Any, token: str | None) -> tuple[str, str]:
    """(status name, details) of one call whose request is sent as the bytes given."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    path = f"/camserve.v1.CamService/{method}"
    try:
        if method == "ExplainStream":
            list(channel.stream_stream(path)(iter(request), timeout=30, metadata=metadata))
        else:
            channel.unary_unary(path)(request, timeout=30, metadata=metadata)
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""
    return "OK", ""


@pytest.fixture(scope="module")
def raw_channel(served: RunningServer):
    with grpc.insecure_channel(served.target) as channel:
        yield channel


@pytest.mark.parametrize("name", list(RAW_CORPUS))
def test_malformed_protobuf_bytes_get_invalid_argument_after_the_token_check(raw_channel, name: str) -> None:
    method, request, token, expected, pattern = RAW_CORPUS[name]
    code, details = raw_call(raw_channel, method, request, token)
    assert code == expected, f"{name}: {code}: {details[:500]}"
    assert re.search(pattern, details), f"{name}: {details[:500]!r} does not match {pattern!r}"


def test_after_the_raw_corpus_the_server_answers_like_in_process(served, stub, raw_channel, workload) -> None:
    for name, (method, request, token, _, _) in RAW_CORPUS.items():
        code, details = raw_call(raw_channel, method, request, token)
        assert code not in ("INTERNAL", "UNKNOWN"), f"{name}: {details}"
    serves_correctly(served, stub, workload)


# ------------------------------------------------------------------ fixed decoding bugs (regressions)


def test_os2_bmp_header_size_is_unsigned() -> None:
    """BITMAPCOREHEADER sizes are unsigned 16-bit, as OpenCV reads them: 0xFFFF is 65535, not
    1 (which let a 65535-wide image past the pixel check before OpenCV allocated it)."""
    assert wire.encoded_size(_bmp_os2_declaring(65535, 2)) == ("bmp", 65535, 2)
    ok_bmp = b"BM" + struct.pack("<IHHI", 62, 0, 0, 26) + struct.pack("<IHHHH", 12, 3, 3, 1, 24) + bytes(36)
    assert wire.encoded_size(ok_bmp) == ("bmp", 3, 3)
    assert wire.decode_image_proto(pb.Image(encoded=ok_bmp), 100).array.shape == (3, 3, 3)


def test_decoder_refusals_are_image_errors() -> None:
    """OpenCV raises (not returns None) for sizes over its own limit; that is the client's
    image, so it must be an ImageError (INVALID_ARGUMENT), never a cv2.error (INTERNAL)."""
    from camserve.imaging import ImageError, decode_image

    with pytest.raises(ImageError, match=r"BMP \(38 bytes\) refused by the decoder"):
        decode_image(_bmp_os2_declaring(65535, 65535))


def test_tensor_element_count_does_not_wrap() -> None:
    with pytest.raises(wire.InvalidArgument, match=r"0 data bytes do not match shape \[4, 4, 1152921504606846976\]"):
        wire.tensor_to_array(pb.Tensor(dtype="uint8", shape=[4, 4, 2**60]), ndim=3)


# ------------------------------------------------------------------ property-based


ENCODED_SEEDS = [v[1:] for v in fuzz_decode.seeds().values() if v[:1] == b"\x00"]


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """A valid small image, a mutated or truncated one, or random bytes."""
    how = draw(st.sampled_from(["seed", "mutated", "truncated", "random"]))
    if how == "random":
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(ENCODED_SEEDS)))
    if how == "truncated":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if how == "mutated":
        for pos, val in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8)
        ):
            data[pos] = val
    return bytes(data)


@given(st.one_of(st.binary(max_size=300), image_bytes().map(lambda b: b"\x00" + b)))
# Found by the fuzzer before the fixes: an int64 wrap of a tensor's element count, and an OS/2
# BMP whose size was read as signed (cv2.error from OpenCV's own size check).
@example(base64.b64decode("AwEDAAT/////////+AQAAAAAMQCEvzwbdb94AA=="))
@example(base64.b64decode("AEJNPgAAAAAAmD8AAAAADAAAAPzc/P//BAEAAAAAAAAAAAA="))
@settings(max_examples=400, **HYPOTHESIS)
def test_decoding_path_property(data: bytes) -> None:
    """The fuzz target's property (bench/fuzz_decode.py): only InvalidArgument escapes, decoded
    images respect the pixel limit and their header, tensors decode to their declared shape."""
    fuzz_decode.check(data)


int32 = st.integers(-(2**31), 2**31 - 1)
names = st.one_of(st.sampled_from(["gap", "fc", "nope", "", "../gap", "gap/1", "GAP", "."]), st.text(max_size=12))
versions = st.one_of(st.sampled_from([0, 1, 2, 3, -1]), st.integers(-(2**63), 2**63 - 1))


@st.composite
def images(draw: st.DrawFn) -> pb.Image:
    kind = draw(st.sampled_from(["encoded", "uint8", "float", "raw"]))
    if kind == "encoded":
        return pb.Image(encoded=draw(image_bytes()))
    if kind == "uint8":
        h, w, c = draw(st.integers(1, 48)), draw(st.integers(1, 48)), draw(st.sampled_from([1, 3, 4, 2, 5]))
        return wire.image_to_proto(_rgb(h, w, draw(st.integers(0, 9)))[:, :, :1].repeat(c, axis=2))
    if kind == "float":
        value = draw(st.floats(width=32))
        a = np.random.default_rng(draw(st.integers(0, 9))).random((32, 32, 3), dtype=np.float32)
        a.flat[draw(st.integers(0, a.size - 1))] = value
        return wire.image_to_proto(a)
    return pb.Image(tensor=fuzz_decode.tensor_from_bytes(draw(st.binary(max_size=60))))


model_specs = st.one_of(
    st.builds(pb.ModelSpec, name=st.sampled_from(["gap", "fc"])),
    st.builds(pb.ModelSpec, name=st.sampled_from(["gap", "fc"]), version=st.sampled_from([0, 1, 2])),
    st.builds(pb.ModelSpec, name=names, version=versions),
)
target_lists = st.lists(
    st.builds(
        lambda ts: pb.TargetList(targets=ts),
        st.lists(
            st.one_of(
                st.builds(pb.Target, index=st.one_of(st.integers(-2, 5), int32)),
                st.builds(pb.Target, name=st.one_of(st.sampled_from(list(CLASSES)), st.text(max_size=6))),
                st.just(pb.Target()),
            ),
            max_size=5,
        ),
    ),
    max_size=3,
)
explain_requests = st.builds(
    pb.ExplainRequest,
    model=model_specs,
    images=st.lists(images(), max_size=MAX_IMAGES + 1),
    methods=st.one_of(
        st.lists(st.sampled_from(METHODS), max_size=2),
        st.lists(st.one_of(st.sampled_from(METHODS + ["", "GRADCAM"]), st.text(max_size=8)), max_size=3),
    ),
    targets=st.one_of(st.just([]), target_lists),
    top_k=st.one_of(st.integers(-1, 6), int32),
    layer=st.one_of(
        st.sampled_from(["", "last_conv", "conv2d_1", "max_pooling2d_1", "predictions"]), st.text(max_size=8)
    ),
    return_raw=st.booleans(),
    return_heatmap=st.booleans(),
    return_overlay=st.booleans(),
    request_id=st.text(max_size=8),
)
# Mostly valid requests (so that batching and compute are exercised, not only the checks) ...
good_specs = st.builds(pb.ModelSpec, name=st.sampled_from(["gap", "fc"]), version=st.sampled_from([0, 1]))
good_images = st.one_of(
    st.sampled_from(ENCODED_SEEDS).map(lambda b: pb.Image(encoded=b)),
    st.builds(
        lambda h, w, seed: wire.image_to_proto(_rgb(h, w, seed)),
        st.integers(1, 64),
        st.integers(1, 64),
        st.integers(0, 9),
    ),
    st.builds(
        lambda seed, scale: wire.image_to_proto(
            (np.random.default_rng(seed).standard_normal((32, 32, 3)) * scale).astype(np.float32)
        ),
        st.integers(0, 9),
        st.sampled_from([1.0, 1e-30, 1e30]),
    ),
)
dense_images = st.builds(
    lambda h, w, seed: wire.image_to_proto(_rgb(h, w, seed)),
    st.integers(32, 64),
    st.integers(32, 64),
    st.integers(0, 9),
)
good_targets = st.one_of(
    st.just([]),
    st.lists(st.sampled_from(list(CLASSES) + [0, 1, 2, 3]), min_size=1, max_size=4).map(lambda ts: targets(*ts)),
)
good_explain = st.builds(
    pb.ExplainRequest,
    model=good_specs,
    images=st.lists(good_images, min_size=1, max_size=MAX_IMAGES),
    methods=st.lists(st.sampled_from(METHODS), max_size=2),
    targets=good_targets,
    top_k=st.integers(0, 4),
    layer=st.sampled_from(["", "last_conv", "conv2d_1", "max_pooling2d_1"]),
    return_raw=st.booleans(),
    return_heatmap=st.booleans(),
    return_overlay=st.booleans(),
    request_id=st.text(max_size=4),
)
good = st.one_of(
    st.tuples(
        st.just("Predict"),
        st.builds(
            pb.PredictRequest,
            model=good_specs,
            images=st.lists(good_images, min_size=1, max_size=MAX_IMAGES),
            top_k=st.integers(0, 4),
        ),
    ),
    st.tuples(st.just("Explain"), good_explain),
    st.tuples(st.just("ExplainStream"), st.lists(good_explain, min_size=1, max_size=3)),
    st.tuples(
        st.just("DenseScores"),
        st.builds(
            pb.DenseScoresRequest,
            model=good_specs,
            image=dense_images,
            stride=st.sampled_from([0, 1, 2]),
            scales=st.lists(st.sampled_from([1.0, 0.8, 1.5]), max_size=2),
            mode=st.sampled_from(["", "fcn", "crops"]),
        ),
    ),
)
# ... and wild ones.
wild = st.one_of(
    st.tuples(
        st.just("Predict"),
        st.builds(
            pb.PredictRequest,
            model=model_specs,
            images=st.lists(images(), max_size=MAX_IMAGES + 1),
            top_k=st.one_of(st.integers(-1, 5), int32),
        ),
    ),
    st.tuples(st.just("Explain"), explain_requests),
    st.tuples(st.just("ExplainStream"), st.lists(explain_requests, min_size=1, max_size=3)),
    st.tuples(
        st.just("DenseScores"),
        st.builds(
            pb.DenseScoresRequest,
            model=model_specs,
            image=images(),
            stride=st.one_of(st.integers(-1, 5), int32),
            scales=st.lists(st.floats(width=32), max_size=3),
            mode=st.sampled_from(["", "fcn", "crops", "FCN"]),
        ),
    ),
    st.tuples(st.just("GetModel"), st.builds(pb.GetModelRequest, model=model_specs)),
)
requests = st.one_of(good, wild)


def _sane(method: str, request: Any, response: Any) -> None:
    if method == "Predict":
        assert len(response.predictions) == len(request.images)
    elif method == "Explain":
        assert len(response.images) == len(request.images) and response.layer
    elif method == "ExplainStream":
        assert sorted(r.request_id for r in response) == sorted(q.request_id for q in request)
    elif method == "DenseScores":
        assert len(response.scales) == max(1, len(request.scales))


@given(requests)
@settings(max_examples=200, **HYPOTHESIS)
def test_random_requests_never_internal_never_hang(stub, method_request: tuple[str, Any]) -> None:
    method, request = method_request
    code, details, response = call(stub, method, request, timeout=60)
    assert code in ALLOWED, f"{method}: {code}: {details[:300]}"
    if code == "OK":
        _sane(method, request, response)
    else:
        assert details, f"{code} without a message"


@given(image_bytes(), st.sampled_from(["Predict", "Explain", "DenseScores"]))
@settings(max_examples=60, **HYPOTHESIS)
def test_random_image_bytes_are_decoded_or_refused(stub, data: bytes, method: str) -> None:
    img = pb.Image(encoded=data)
    request = {"Predict": predict(img), "Explain": explain(img), "DenseScores": dense(img, mode="crops", stride=8)}[
        method
    ]
    code, details, response = call(stub, method, request)
    assert code in ("OK", "INVALID_ARGUMENT"), f"{code}: {details[:300]}"
    if code == "INVALID_ARGUMENT":
        assert re.search(r"image|PNG|JPEG|BMP|WEBP|window", details), details
    elif method == "Predict":
        assert np.isfinite(wire.predictions_from_proto(response)).all()


def test_server_healthy_after_the_property_tests(served, stub, workload) -> None:
    serves_correctly(served, stub, workload)
