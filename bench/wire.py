"""CPU time of the wire conversions per answer: the server building and serializing a response
from a data-plane result (camserve.serving.convert), and the client parsing it and converting it
to numpy (camserve.client's *_result), without the model or gRPC.

    python bench/wire.py                          # this checkout
    python bench/wire.py --code /tmp/camserve_base --label before

Answers as bench/serve.py's requests get them: one image, gradcam, return_raw and
return_heatmap (a 64 px model with a 16 x 16 layer: shapes_gap; a 224 px one with a 14 x 14
layer: gap224), the same with the heatmap as an 8-bit PNG (return_heatmap_png) where the
checkout has it, and Predict with top_k=1 over 5, 10 and 1000 classes. The maps are random
float32 of those shapes, the heatmap the raw map resized bilinearly and normalised (smooth,
like a CAM: what a PNG compresses). CPU time is
``time.process_time()`` over ``--count`` answers, the median of ``--repeats`` runs, per answer.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from common import cpu_per_call

CASES = {  # name: (input size, layer size)
    "64 px (shapes_gap)": (64, 16),
    "224 px (gap224)": (224, 14),
}
PREDICT_CLASSES = (5, 10, 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, default=None, help="import camserve from this checkout")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.code is not None:
        sys.path.insert(0, str(args.code.resolve()))

    import camserve
    from camserve import client
    from camserve.explanation import Explanation
    from camserve.proto import pb
    from camserve.serving import convert
    from camserve.serving.dataplane import ExplainResult, PredictResult, Prepared

    rng = np.random.default_rng(0)
    print(
        f"camserve from `{Path(camserve.__file__).parent.parent}` ({args.label}); {args.count} answers x {args.repeats}"
    )
    print()
    print("| answer | bytes | server: build + serialize | client: parse + to numpy |")
    print("|---|---|---|---|")
    for name, (size, layer) in CASES.items():
        raw = rng.random((layer, layer), dtype=np.float32)
        heat = cv2.resize(raw, (size, size), interpolation=cv2.INTER_LINEAR)  # smooth, like a CAM
        heat = (heat - heat.min()) / (heat.max() - heat.min())
        e = Explanation("gradcam", 1, "c1", 0.5, raw, heat, (3, 4, size // 2, size // 2))
        pixels = np.zeros((size, size, 3), np.uint8)
        result = ExplainResult("m", 1, "last_conv", [[e]], Prepared(pixels[None], [pixels]))

        def server(result: Any = result) -> bytes:
            return convert.explain_response(result, raw=True, heatmap=True).SerializeToString()

        data = server()

        def client_side(data: bytes = data) -> Any:
            return client.explain_result(pb.ExplainResponse.FromString(data))

        got = client_side()[0][0]
        assert np.array_equal(got.heatmap, heat) and np.array_equal(got.raw, raw)
        s, c = cpu_per_call(server, args.count, args.repeats), cpu_per_call(client_side, args.count, args.repeats)
        print(f"| Explain, {name}, raw + heatmap | {len(data)} | {s:.1f} µs | {c:.1f} µs |")
        if "heatmap_png" not in inspect.signature(convert.explain_response).parameters:
            continue  # a checkout before heatmap PNGs

        def png_server(result: Any = result) -> bytes:
            return convert.explain_response(result, raw=True, heatmap_png=True).SerializeToString()

        data = png_server()

        def png_client(data: bytes = data) -> Any:
            return client.explain_result(pb.ExplainResponse.FromString(data))

        assert np.abs(png_client()[0][0].heatmap - heat).max() <= 1 / 255
        s, c = cpu_per_call(png_server, args.count, args.repeats), cpu_per_call(png_client, args.count, args.repeats)
        print(f"| Explain, {name}, raw + heatmap PNG | {len(data)} | {s:.1f} µs | {c:.1f} µs |")
    for classes in PREDICT_CLASSES:
        scores = rng.random((1, classes), dtype=np.float32)
        presult = PredictResult("m", 1, tuple(f"c{i}" for i in range(classes)), scores)

        def pserver(presult: Any = presult) -> bytes:
            return convert.predict_response(presult, 1).SerializeToString()

        data = pserver()

        def pclient(data: bytes = data) -> Any:
            return client.predict_result(pb.PredictResponse.FromString(data))

        assert np.array_equal(pclient().scores, scores)
        s, c = cpu_per_call(pserver, args.count, args.repeats), cpu_per_call(pclient, args.count, args.repeats)
        print(f"| Predict, {classes} classes, top_k=1 | {len(data)} | {s:.1f} µs | {c:.1f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
