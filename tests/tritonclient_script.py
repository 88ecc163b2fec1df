"""Drive a camserve server with unmodified ``tritonclient`` (grpc and http); print JSON results.

Runs in its own virtual environment (tritonclient pins protobuf < 7, camserve needs 7), built
by the ``tritonclient_python`` fixture of tests/serving/test_oip_tritonclient.py, which then
compares what this prints with Keras and the in-process Explainer. It imports nothing from
camserve.

    python tests/tritonclient_script.py --grpc 127.0.0.1:8001 --http 127.0.0.1:8000 \\
        --model gap --pixels pixels.npy --png a.png --png b.png --token s3cret
    python tests/tritonclient_script.py --descriptors     # tritonclient's own .proto, as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# tritonclient is imported in main() and drive(): camserve's tests import this module for
# descriptors() in an environment without tritonclient.


def _error(call: Any) -> list[str]:
    """[status, message] of the InferenceServerException that ``call()`` raises."""
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as e:
        return [str(e.status()), str(e.message())]
    return ["no error", ""]


def drive(module: Any, url: str, model: str, pixels: np.ndarray, pngs: list[bytes], token: str) -> dict[str, Any]:
    """Everything tritonclient's ``module`` (tritonclient.grpc or .http) gets from ``url``."""
    is_grpc = module.__name__.endswith("grpc")
    headers = {"authorization": f"Bearer {token}"} if token else None  # gRPC metadata keys are lower case
    client = module.InferenceServerClient(url)
    out: dict[str, Any] = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(model, headers=headers),
    }
    server = client.get_server_metadata(headers=headers, **({"as_json": True} if is_grpc else {}))
    meta = client.get_model_metadata(model, headers=headers, **({"as_json": True} if is_grpc else {}))
    out["server"] = {"name": server["name"], "extensions": list(server["extensions"])}
    out["metadata"] = {
        "name": meta["name"],
        "versions": list(meta["versions"]),
        "inputs": [[t["name"], t["datatype"], [int(s) for s in t["shape"]]] for t in meta["inputs"]],
    }

    images = module.InferInput("images", list(pixels.shape), "UINT8")
    images.set_data_from_numpy(pixels)
    result = client.infer(model, [images], headers=headers, request_id="triton-1")
    out["scores"] = result.as_numpy("scores").tolist()
    out["id"] = result.get_response(**({"as_json": True} if is_grpc else {})).get("id", "")

    files = module.InferInput("images", [len(pngs)], "BYTES")
    files.set_data_from_numpy(np.array(pngs, dtype=object))
    out["scores_png"] = client.infer(model, [files], headers=headers).as_numpy("scores").tolist()

    top2 = module.InferRequestedOutput("scores", class_count=2)
    classified = client.infer(model, [images], outputs=[top2], headers=headers).as_numpy("scores")
    out["classification"] = [[s.decode() for s in row] for row in classified]

    heatmap = module.InferRequestedOutput("heatmap")
    explained = client.infer(
        model, [images], outputs=[heatmap], parameters={"method": "gradcam", "target": 1}, headers=headers
    )
    out["heatmap"] = explained.as_numpy("heatmap").tolist()

    wrong = module.InferInput("images", list(pixels.shape), "INT32")
    wrong.set_data_from_numpy(pixels.astype(np.int32))
    out["errors"] = {
        "unknown_model": _error(lambda: client.infer("no_such_model", [images], headers=headers)),
        "bad_datatype": _error(lambda: client.infer(model, [wrong], headers=headers)),
        "no_token": _error(lambda: client.infer(model, [images])),
        "model_config": _error(lambda: client.get_model_config(model, headers=headers)),
    }
    out["live_after_errors"] = client.is_server_live(headers=headers)
    client.close()
    return out


def descriptors(file: Any) -> dict[str, Any]:
    """Every message's fields (name: [number, type, repeated, message type]) and every
    method's (input, output, client streaming, server streaming) of a proto file descriptor.
    camserve's tests compute the same for its own .proto and compare."""
    messages: dict[str, Any] = {}

    def walk(types: Any) -> None:
        for m in types:
            messages[m.full_name] = {
                f.name: [f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else ""]
                for f in m.fields
            }
            walk(m.nested_types)

    walk(file.message_types_by_name.values())
    methods = {
        f"{s.full_name}/{m.name}": [
            m.input_type.full_name,
            m.output_type.full_name,
            m.client_streaming,
            m.server_streaming,
        ]
        for s in file.services_by_name.values()
        for m in s.methods
    }
    return {"messages": messages, "methods": methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--descriptors", action="store_true", help="print tritonclient's own proto descriptors only")
    parser.add_argument("--grpc")
    parser.add_argument("--http")
    parser.add_argument("--model")
    parser.add_argument("--pixels", help=".npy file, uint8 [N, H, W, 3]")
    parser.add_argument("--png", action="append", default=[], help="an encoded image file (repeat)")
    parser.add_argument("--token", default="")
    args = parser.parse_args(argv)
    if args.descriptors:
        from tritonclient.grpc import service_pb2

        json.dump(descriptors(service_pb2.DESCRIPTOR), sys.stdout)
        return 0
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    pixels = np.load(args.pixels)
    pngs = [Path(p).read_bytes() for p in args.png]
    report = {
        "grpc": drive(grpcclient, args.grpc, args.model, pixels, pngs, args.token),
        "http": drive(httpclient, args.http, args.model, pixels, pngs, args.token),
    }
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
