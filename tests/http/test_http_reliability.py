"""The bad-input corpus of tests/serving/test_reliability.py over HTTP (issue 10 item 6).

Every gRPC case is sent as JSON to ``/camserve.v1.CamService/{Method}`` on the same kind of
server (same limits, same token) and must get the HTTP status of its gRPC code with a JSON
error body whose message matches the same patterns (requests over ``max_message_mb`` are
refused as 413 before their body is read, where gRPC says RESOURCE_EXHAUSTED). HTTP's own bad
input follows (malformed JSON, nesting bombs, NaN literals, base64, bad v1 instances), and
afterwards the server still answers like the in-process library, with no 500 counted.
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from helpers_serving import RunningServer, metric_value
from http_calls import call

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import load
import test_reliability as grpc_twin

from camserve.proto import pb

TOKEN = grpc_twin.TOKEN
RPC = "/camserve.v1.CamService"
HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "DEADLINE_EXCEEDED": 504,
}
RESPONSES = {
    "Predict": pb.PredictResponse,
    "Explain": pb.ExplainResponse,
    "DenseScores": pb.DenseScoresResponse,
    "ListModels": pb.ListModelsResponse,
    "GetModel": pb.GetModelResponse,
}
LIMIT = int(grpc_twin.MAX_MESSAGE_MB * 2**20)
TOO_LARGE = rf"^the request body is \d+ bytes, more than the {LIMIT} bytes allowed \(max_message_mb=0\.25\)$"


# The gRPC corpus's own repository, workload and server (same limits and token; its HTTP port is on).
repo, workload, served = grpc_twin.repo, grpc_twin.workload, grpc_twin.served


@pytest.fixture(scope="module")
def port(served: RunningServer) -> int:
    return served.server.http.port


def expected(c: grpc_twin.Case) -> tuple[int, tuple[str, ...]]:
    """The HTTP status and message patterns of a gRPC corpus case."""
    if any("larger than max" in p for p in c.patterns):  # gRPC's own size check; HTTP's is 413, before reading
        return 413, (TOO_LARGE,)
    return HTTP_STATUS[c.code], tuple(p.replace("send metadata", "send the header") for p in c.patterns)


def send(port: int, method: str, request: Any, token: Any = TOKEN, timeout: float = 30.0):
    body = (
        [json_format.MessageToDict(r) for r in request]
        if method == "ExplainStream"
        else json_format.MessageToDict(request)
    )
    # gRPC's 1 ms deadlines become 1 µs here: with no client library to end the call, the
    # deadline must have passed by the time the server looks at it.
    headers = (("Connect-Timeout-Ms", "0.001"),) if timeout < 0.01 else ()
    return call(port, "POST", f"{RPC}/{method}", body, token=token, headers=headers)


@pytest.mark.parametrize("name", list(grpc_twin.CORPUS))
def test_the_grpc_corpus_over_http_gets_its_status_and_message(port: int, name: str) -> None:
    c = grpc_twin.CORPUS[name]
    status, patterns = expected(c)
    answer = send(port, c.method, c.request, token=c.token, timeout=c.timeout)
    assert answer.status == status, f"{name}: {answer.status}: {answer.body[:500]!r}"
    if status == 200:
        return
    error = answer.error
    assert error["code"] == ("RESOURCE_EXHAUSTED" if status == 413 else c.code), error
    for pattern in patterns:
        assert re.search(pattern, error["message"]), f"{name}: {error['message'][:500]!r} does not match {pattern!r}"


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


B64_TRUNCATED_PNG = base64.b64encode(grpc_twin.PNG[: len(grpc_twin.PNG) // 2]).decode()
B64_GIANT_PNG = base64.b64encode(grpc_twin._png_declaring(100000, 100000)).decode()

#: HTTP's own bad input: (method, path, body, status, code, pattern).
HTTP_CORPUS: dict[str, tuple[str, str, Any, int, str, str]] = {
    "not json": ("POST", f"{RPC}/Predict", b"model=gap", 400, "INVALID_ARGUMENT", r"not valid JSON"),
    "not utf-8": ("POST", f"{RPC}/Predict", b'{"a": "\xff\xfe"}', 400, "INVALID_ARGUMENT", r"not UTF-8|not valid JSON"),
    "nesting bomb": ("POST", "/v1/models/gap:predict", _nested(100_000), 400, "INVALID_ARGUMENT", r"nested"),
    "nesting bomb to an rpc": ("POST", f"{RPC}/Explain", _nested(50_000), 400, "INVALID_ARGUMENT", r"nested"),
    "a json array for a message": ("POST", f"{RPC}/GetModel", [1, 2], 400, "INVALID_ARGUMENT", r"body is a JSON list"),
    "string for an int field": (
        "POST",
        f"{RPC}/Predict",
        {"model": {"name": "gap"}, "topK": "many"},
        400,
        "INVALID_ARGUMENT",
        r"not a valid camserve\.v1\.PredictRequest.*topK",
    ),
    "version past int64": (
        "POST",
        f"{RPC}/GetModel",
        {"model": {"name": "gap", "version": 2**70}},
        400,
        "INVALID_ARGUMENT",
        r"GetModelRequest",
    ),
    "bad base64 bytes": (
        "POST",
        f"{RPC}/Predict",
        {"model": {"name": "gap"}, "images": [{"encoded": "***"}]},
        400,
        "INVALID_ARGUMENT",
        r"PredictRequest|empty image",  # protobuf's JSON parser drops what is not base64
    ),
    "stream body not an array": ("POST", f"{RPC}/ExplainStream", {}, 400, "INVALID_ARGUMENT", r"JSON array"),
    "bad 2nd stream request": (
        "POST",
        f"{RPC}/ExplainStream",
        [{}, {"methods": 3}],
        400,
        "INVALID_ARGUMENT",
        r"^request 2 of the stream: ExplainStream: the body is not a valid camserve\.v1\.ExplainRequest",
    ),
    "NaN literal in an instance": (
        "POST",
        "/v1/models/gap:predict",
        b'{"instances": [[[NaN, 0.5, 0.5]]]}',
        400,
        "INVALID_ARGUMENT",
        r"NaN or Inf",
    ),
    "float overflowing float32": (
        "POST",
        "/v1/models/gap:predict",
        {"instances": [[[1e300, 0.5, 0.5]]]},
        400,
        "INVALID_ARGUMENT",
        r"NaN or Inf",
    ),
    "truncated png as b64": (
        "POST",
        "/v1/models/gap:predict",
        {"instances": [{"b64": B64_TRUNCATED_PNG}]},
        400,
        "INVALID_ARGUMENT",
        r"^image: corrupt or truncated PNG",
    ),
    "giant png header as b64": (
        "POST",
        "/v1/models/gap:explain",
        {"instances": [{"b64": B64_GIANT_PNG}]},
        400,
        "INVALID_ARGUMENT",
        r"100000x100000 = 10000000000 pixels exceeds the limit",
    ),
    "booleans as pixels": ("POST", "/v1/models/gap:predict", {"instances": [[[True]]]}, 400, "INVALID_ARGUMENT", r"numbers"),
    "ragged instance": ("POST", "/v1/models/gap:predict", {"instances": [[[1, 2], [3]]]}, 400, "INVALID_ARGUMENT", r"rectangular"),
    "4-d instance": ("POST", "/v1/models/gap:predict", {"instances": [[[[[1]]]]]}, 400, "INVALID_ARGUMENT", r"\[H\]\[W\]\[C\]"),
    "two b64 keys": ("POST", "/v1/models/gap:predict", {"instances": [{"b64": "", "x": 1}]}, 400, "INVALID_ARGUMENT", r"single named input"),
    "too many images": (
        "POST",
        "/v1/models/gap:predict",
        {"instances": [[[0]]] * 5},
        400,
        "INVALID_ARGUMENT",
        r"5 images in one request; at most 4",
    ),
    "timeout header not a number": (
        "POST",
        "/v1/models/gap:predict",
        {"instances": [[[0]]]},
        400,
        "INVALID_ARGUMENT",
        r"Connect-Timeout-Ms must be a positive number",
    ),
}  # fmt: skip


def _headers(name: str) -> tuple[tuple[str, str], ...]:
    return (("Connect-Timeout-Ms", "soon"),) if name == "timeout header not a number" else ()


@pytest.mark.parametrize("name", list(HTTP_CORPUS))
def test_http_bad_input_gets_its_status_and_a_json_error(port: int, name: str) -> None:
    method, path, body, status, code, pattern = HTTP_CORPUS[name]
    answer = call(port, method, path, body, token=TOKEN, headers=_headers(name))
    assert answer.status == status, f"{name}: {answer.status}: {answer.body[:300]!r}"
    assert answer.error["code"] == code and re.search(pattern, answer.error["message"]), answer.error


def test_a_request_line_too_long_is_refused_by_the_http_parser(port: int) -> None:
    answer = call(port, "GET", "/v1/models/" + "m" * 200_000, token=TOKEN)
    assert answer.status == 400 and b"Got more than 8190 bytes" in answer.body  # aiohttp's own, before any route


def test_after_both_corpora_the_server_answers_like_in_process(served, port: int, workload) -> None:
    for name, c in grpc_twin.CORPUS.items():  # again, in a row (the parametrized tests may run alone)
        assert send(port, c.method, c.request, token=c.token, timeout=c.timeout).status != 500, name
    for name, (method, path, body, *_) in HTTP_CORPUS.items():
        assert call(port, method, path, body, token=TOKEN, headers=_headers(name)).status != 500, name
    for i, kind in enumerate(load.MIXED * 2):
        work = load.Work(kind, i)
        method, request = workload.request(work.kind, work.index)
        answer = send(port, method, request)
        assert answer.status == 200, answer.body[:300]
        assert workload.check(work, json_format.ParseDict(answer.json(), RESPONSES[method]())) is None
    assert served.server.batcher.depth == 0
    text = served.metrics_text()
    assert metric_value(text, "camserve_http_requests_total", status="500") == 0
    assert metric_value(text, "camserve_http_requests_total", status="400") > 0
    assert metric_value(text, "camserve_queue_depth") == 0
