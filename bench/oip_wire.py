"""CPU time of the protocol adapters per single-image Predict-like request: camserve.v1 against
the Open Inference Protocol (gRPC with raw_input_contents, REST binary, REST JSON), from the
request's bytes to the images the data plane takes, and from the scores to the answer's bytes.
No model, no network: only what each front end adds on the host.

    python bench/oip_wire.py                       # 64 and 224 px RGB, 5 classes
    python bench/oip_wire.py --count 2000 --repeats 7 --out bench/results/oip_wire.md

CPU time is ``time.process_time()`` over ``--count`` requests, the median of ``--repeats``
runs, per request, every path measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import cpu_name, cpu_per_call

from camserve import wire
from camserve.http import oip as rest
from camserve.oip import grpc_service, inference
from camserve.oip.grpc_service import oip_pb
from camserve.oip.tensors import Tensor
from camserve.proto import pb
from camserve.serving import convert
from camserve.serving.inputs import decode_image
from camserve.serving.results import PredictResult

MAX_PIXELS = 16 * 2**20
CLASSES = ("circle", "square", "triangle", "star", "cross")


def paths(size: int) -> dict[str, Callable[[], Any]]:
    """name -> one request's adapter work (parse, images, answer bytes)."""
    pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    scores = np.random.default_rng(1).random((1, len(CLASSES)), dtype=np.float32)
    result = PredictResult("m", 1, CLASSES, scores)
    oip_result = inference.InferResult("m", "1", "", [Tensor("scores", "FP32", scores)])

    v1 = pb.PredictRequest(model=pb.ModelSpec(name="m"), images=[wire.image_to_proto(pixels[0])]).SerializeToString()

    def camserve_v1() -> bytes:
        req = pb.PredictRequest.FromString(v1)
        [decode_image(m, MAX_PIXELS) for m in req.images]
        return convert.predict_response(result, 0).SerializeToString()

    g = oip_pb.ModelInferRequest(model_name="m")
    g.inputs.add(name="images", datatype="UINT8", shape=list(pixels.shape))
    g.raw_input_contents.append(pixels.tobytes())
    oip_grpc = g.SerializeToString()

    def oip_grpc_path() -> bytes:
        req = grpc_service.infer_request(oip_pb.ModelInferRequest.FromString(oip_grpc), MAX_PIXELS * 4)
        [decode_image(m, MAX_PIXELS) for m in inference._images(req.inputs)]
        return grpc_service.infer_response(oip_result).SerializeToString()

    tensor = {"name": "images", "datatype": "UINT8", "shape": list(pixels.shape)}
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()
    binary = head + pixels.tobytes()
    as_json = json.dumps({"inputs": [{**tensor, "data": pixels.reshape(-1).tolist()}]}).encode()

    def rest_path(body: bytes, header: str | None, binary_out: bool) -> Callable[[], bytes]:
        def run() -> bytes:
            req = rest.infer_request(body, header, "m", "", MAX_PIXELS * 4)
            [decode_image(m, MAX_PIXELS) for m in inference._images(req.inputs)]
            return bytes(rest.infer_response(oip_result, binary_out, 1 << 30).body)

        return run

    return {
        "camserve.v1 Predict (gRPC)": camserve_v1,
        "OIP ModelInfer (gRPC, raw_input_contents)": oip_grpc_path,
        "OIP REST infer, binary tensors": rest_path(binary, str(len(head)), True),
        "OIP REST infer, JSON tensors": rest_path(as_json, None, False),
    }


def machine() -> str:
    """The CPU's model name and core count, without importing TensorFlow."""
    return f"{cpu_name()}, {os.cpu_count()} cores visible"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--out", default="", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    lines = [
        f"machine: {machine()}, shared with other jobs; Python {platform.python_version()}; "
        f"`python bench/oip_wire.py --count {args.count} --repeats {args.repeats}`",
        "",
        "| request (1 RGB image, 5 class scores back) | "
        + " | ".join(f"{s} px: µs CPU" for s in args.sizes.split(","))
        + " |",
        "|---|" + "---:|" * len(args.sizes.split(",")),
    ]
    table: dict[str, list[float]] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        for name, fn in paths(size).items():
            fn()  # warm
            count = max(10, args.count // 20) if "JSON" in name and size > 64 else args.count
            table.setdefault(name, []).append(cpu_per_call(fn, count, args.repeats, warmup=0))
    for name, values in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text("# Open Inference Protocol adapters: CPU per request\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
