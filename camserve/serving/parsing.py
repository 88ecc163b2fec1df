"""Request parsing under camserve's control: the handlers of a service get the request's bytes
from gRPC and parse them here, so that a malformed message is the client's error
(INVALID_ARGUMENT, naming the RPC and the message type expected) rather than gRPC's UNKNOWN.
The :class:`~camserve.serving.gate.ServiceGate` checks the token before it hands the bytes here,
so a call without it is refused unparsed. Streamed requests are parsed one by one as they are
read. Other services (health, reflection) keep gRPC's own parsing.

A request with raw image tensors of :data:`DETACH_MIN_BYTES` or more is parsed without their
bytes (:func:`camserve.protowire.detach_tensor_data`): the handler gets a
:class:`WithTensorData`, whose images are :class:`camserve.wire.TensorImage` views of the
request's bytes; parsing would copy each image into the message, and reading it copy it again.

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

from camserve import wire
from camserve.errors import InvalidArgument
from camserve.protowire import detach_tensor_data
from camserve.serving.status import behavior_of, with_behavior

#: Requests whose raw image tensors hold this many bytes or more are parsed without them
#: (below it, the two copies cost less than scanning the request in Python).
DETACH_MIN_BYTES = 32 * 1024
IMAGE_TYPE = "camserve.v1.Image"


class WithTensorData:
    """A parsed request whose raw image tensors stayed in the request's bytes: every attribute
    is the message's (``message``), but its images field (``images``, or ``image``), where an
    image whose tensor data was detached is a :class:`camserve.wire.TensorImage` on those bytes.

    >>> from camserve.proto import pb
    >>> tensor = {"dtype": "uint8", "shape": [1, 1, 3], "data": b"RGB"}
    >>> data = pb.PredictRequest(top_k=2, images=[{"tensor": tensor}]).SerializeToString()
    >>> request = request_parser("Predict", pb.PredictRequest.FromString, min_bytes=1)(data)
    >>> request.top_k, bytes(request.images[0].data)
    (2, b'RGB')
    """

    __slots__ = ("_field", "_images", "message")

    def __init__(self, message: Any, field: str, views: list[memoryview | None]) -> None:
        self.message = message
        self._field = field
        held = getattr(message, field)
        if field == "image":  # a single Image
            self._images: Any = held if views[0] is None else wire.TensorImage(held.tensor, views[0])
        else:
            self._images = [m if v is None else wire.TensorImage(m.tensor, v) for m, v in zip(held, views)]

    def __getattr__(self, name: str) -> Any:
        if name == self._field:
            return self._images
        return getattr(self.message, name)


def request_parser(
    method: str, deserialize: Callable[[bytes], Any], *, min_bytes: int = DETACH_MIN_BYTES
) -> Callable[..., Any]:
    """``parse(data, index=None)``: ``deserialize(data)`` (a :class:`WithTensorData` when the
    message type has an Image field and ``data`` at least ``min_bytes`` of raw tensors), or
    InvalidArgument naming ``method``, the message type and, in a stream, which message
    (``index``, from 1) failed."""
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else "request message"
    images = [
        f
        for f in (message_type.fields if message_type is not None else ())
        if f.message_type is not None and f.message_type.full_name == IMAGE_TYPE
    ]
    image_field = images[0] if len(images) == 1 else None

    def parse(data: bytes, index: int | None = None) -> Any:
        try:
            if image_field is not None and len(data) >= min_bytes:
                split = detach_tensor_data(
                    data, image_field.number, repeated=image_field.is_repeated, min_bytes=min_bytes
                )
                if split is not None:
                    return WithTensorData(deserialize(split[0]), image_field.name, split[1])
            return deserialize(data)
        except DecodeError as e:
            which = "the request" if index is None else f"request message {index} of the stream"
            reason = str(e).rpartition(": ")[2]
            raise InvalidArgument(
                f"{method}: {which} ({len(data)} bytes) is not a valid {type_name} message"
                f"{f' ({reason})' if reason else ''}; send one serialized {type_name}"
            ) from None

    return parse


def serialized_as_given(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A response serializer that sends ``bytes`` as they are (an answer the handler serialized
    itself, e.g. :func:`camserve.serving.convert.serialized_explain_response`) and serializes
    messages with ``serialize``.

    >>> from camserve.proto import pb
    >>> write = serialized_as_given(pb.ModelSpec.SerializeToString)
    >>> write(b"as is"), write(pb.ModelSpec(name="m")) == pb.ModelSpec(name="m").SerializeToString()
    (b'as is', True)
    """
    if serialize is None:
        return None

    def write(response: Any) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return write


def parsing(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with no deserializer (gRPC hands over the bytes) and a behaviour that parses
    them first (:func:`request_parser`), message by message for streamed requests; a handler
    that already takes bytes is returned as it is. Its responses may be messages or bytes
    (:func:`serialized_as_given`). ``method``: the short name, for errors."""
    if handler.request_deserializer is None:  # already bytes
        return handler
    parse = request_parser(method, handler.request_deserializer)
    write = serialized_as_given(handler.response_serializer)
    behavior = behavior_of(handler)
    if handler.request_streaming:

        async def messages(raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            index = 0
            async for data in raw:
                index += 1
                yield parse(data, index)

        def streamed(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return behavior(messages(request_iterator), context)

        return with_behavior(handler, streamed, request_deserializer=None, response_serializer=write)

    if handler.response_streaming:

        def unary_stream(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            return behavior(parse(data), context)

        return with_behavior(handler, unary_stream, request_deserializer=None, response_serializer=write)

    async def unary(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(parse(data), context)

    return with_behavior(handler, unary, request_deserializer=None, response_serializer=write)
