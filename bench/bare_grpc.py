"""A bare ``grpc.aio`` server answering camserve's method names with canned responses: the floor
of what any Python gRPC server spends per request (issue 9, SPEC §8.4). Used by
``bench/serve.py``; not a test.

    python bench/bare_grpc.py --port 50123 --responses DIR

``DIR`` holds ``<Method>__<model>.bin`` files: serialized responses (captured from a real
``camserve serve``). Each request is parsed into its request message (as a real server must),
the model name looked up, and the canned response message serialized back: the same bytes on
the wire as the real answer, with no model, no validation, no decoding, no batching.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc

SERVICE = "camserve.v1.CamService"


def message_types() -> dict[str, tuple[type, type]]:
    """Method name -> (request type, response type) of camserve's unary methods."""
    from camserve.proto import pb

    return {
        "Predict": (pb.PredictRequest, pb.PredictResponse),
        "Explain": (pb.ExplainRequest, pb.ExplainResponse),
        "DenseScores": (pb.DenseScoresRequest, pb.DenseScoresResponse),
    }


def load_responses(folder: Path) -> dict[tuple[str, str], bytes]:
    """(method, model name) -> serialized response, from ``<Method>__<model>.bin`` files."""
    found = {}
    for path in sorted(folder.glob("*__*.bin")):
        method, model = path.stem.split("__", 1)
        found[(method, model)] = path.read_bytes()
    return found


def handler(responses: dict[tuple[str, str], bytes], delay: float = 0.0) -> grpc.GenericRpcHandler:
    types = message_types()
    canned = {key: types[key[0]][1].FromString(data) for key, data in responses.items() if key[0] in types}

    def unary(method: str, request_type: type, response_type: type) -> grpc.RpcMethodHandler:
        async def answer(request, context: grpc.aio.ServicerContext):
            if delay:  # a paced floor: answers after a wait, as a server whose model takes that long
                await asyncio.sleep(delay)
            reply = canned.get((method, request.model.name))
            if reply is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no canned {method} answer for {request.model.name!r}")
            return reply

        return grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
        )

    return grpc.method_handlers_generic_handler(
        SERVICE, {method: unary(method, req, resp) for method, (req, resp) in types.items()}
    )


async def serve(
    port: int, responses: dict[tuple[str, str], bytes], host: str = "127.0.0.1", delay: float = 0.0
) -> None:
    limit = 64 * 1024 * 1024
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    )
    server.add_generic_rpc_handlers((handler(responses, delay),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"listening on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--responses", type=Path, required=True, help="folder of <Method>__<model>.bin responses")
    p.add_argument("--delay-ms", type=float, default=0.0, help="answer each call after this wait (a paced floor)")
    args = p.parse_args(argv)
    import camserve

    print(f"camserve from {camserve.__file__}", file=sys.stderr, flush=True)
    asyncio.run(serve(args.port, load_responses(args.responses), args.host, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
