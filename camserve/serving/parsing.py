"""Request parsing under camserve's control: the handlers of a service get the request's bytes
from gRPC and parse them here, so that a malformed message is the client's error
(INVALID_ARGUMENT, naming the RPC and the message type expected) rather than gRPC's UNKNOWN.
The :class:`~camserve.serving.gate.ServiceGate` checks the token before it hands the bytes here,
so a call without it is refused unparsed. Streamed requests are parsed one by one as they are
read. Other services (health, reflection) keep gRPC's own parsing.

>>> from camserve.proto import pb
>>> parse = request_parser("Predict", pb.PredictRequest.FromString)
>>> parse(pb.PredictRequest(top_k=3).SerializeToString()).top_k
3
>>> parse(b"\\xff\\xff\\xff")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
camserve.errors.InvalidArgument: Predict: the request (3 bytes) is not a valid camserve.v1.PredictRequest message (...); send one serialized camserve.v1.PredictRequest
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from camserve.errors import InvalidArgument
from camserve.serving.status import behavior_of, with_behavior


def request_parser(method: str, deserialize: Callable[[bytes], Any]) -> Callable[..., Any]:
    """``parse(data, index=None)``: ``deserialize(data)``, or InvalidArgument naming ``method``,
    the message type and, in a stream, which message (``index``, from 1) failed."""
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else "request message"

    def parse(data: bytes, index: int | None = None) -> Any:
        try:
            return deserialize(data)
        except DecodeError as e:
            which = "the request" if index is None else f"request message {index} of the stream"
            reason = str(e).rpartition(": ")[2]
            raise InvalidArgument(
                f"{method}: {which} ({len(data)} bytes) is not a valid {type_name} message"
                f"{f' ({reason})' if reason else ''}; send one serialized {type_name}"
            ) from None

    return parse


def parsing(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with no deserializer (gRPC hands over the bytes) and a behaviour that parses
    them first (:func:`request_parser`), message by message for streamed requests; a handler
    that already takes bytes is returned as it is. ``method``: the short name, for errors."""
    if handler.request_deserializer is None:  # already bytes
        return handler
    parse = request_parser(method, handler.request_deserializer)
    behavior = behavior_of(handler)
    if handler.request_streaming:

        async def messages(raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            index = 0
            async for data in raw:
                index += 1
                yield parse(data, index)

        def streamed(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return behavior(messages(request_iterator), context)

        return with_behavior(handler, streamed, request_deserializer=None)

    if handler.response_streaming:

        def unary_stream(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            return behavior(parse(data), context)

        return with_behavior(handler, unary_stream, request_deserializer=None)

    async def unary(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(parse(data), context)

    return with_behavior(handler, unary, request_deserializer=None)
