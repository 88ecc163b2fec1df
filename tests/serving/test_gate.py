"""camserve.serving.gate: handlers wrapped once per method (not per call), unknown methods not
remembered, the token checked from the call's metadata before the wrapped handler is handed out.
End-to-end behaviour (codes, counting, parsing): test_auth, test_parsing, test_status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from camserve import errors
from camserve.serving.gate import Registrar, ServiceGate
from camserve.serving.status import CallStatus

SERVICE = "camserve.v1.CamService"


def _details(method: str, metadata=()) -> SimpleNamespace:
    return SimpleNamespace(method=method, invocation_metadata=metadata)


def _gate(token: str = "", records: list | None = None) -> tuple[ServiceGate, list]:
    seen: list = []

    async def predict(request, context):
        seen.append(request)
        return request

    registrar = Registrar()
    registrar.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"Predict": grpc.unary_unary_rpc_method_handler(predict, request_deserializer=bytes.upper)}
            ),
            grpc.method_handlers_generic_handler(
                "other.Service", {"Echo": grpc.unary_unary_rpc_method_handler(predict)}
            ),
        )
    )
    registrar.add_registered_method_handlers(SERVICE, {})
    status = CallStatus(record=None if records is None else (lambda *a: records.append(a)))
    return ServiceGate(registrar.handlers, status=status, services=(SERVICE,), token=token), seen


def test_a_method_is_wrapped_once_and_parses_its_own_bytes() -> None:
    gate, seen = _gate()
    first = gate.service(_details(f"/{SERVICE}/Predict"))
    assert first is gate.service(_details(f"/{SERVICE}/Predict"))  # the same object: no per-call work
    assert first.request_deserializer is None  # gRPC hands over the bytes; the gate's parsing reads them
    context = SimpleNamespace(invocation_metadata=lambda: ())
    assert asyncio.run(first.unary_unary(b"abc", context)) == b"ABC" and seen == [b"ABC"]
    other = gate.service(_details("/other.Service/Echo"))
    assert (
        other.request_deserializer is None and other.unary_unary.__name__ == "predict"
    )  # not camserve's: as registered


def test_unknown_methods_are_unimplemented_and_not_remembered() -> None:
    gate, _ = _gate()
    for i in range(100):
        assert gate.service(_details(f"/{SERVICE}/Nope{i}")) is None
    gate.service(_details(f"/{SERVICE}/Predict"))
    assert list(gate._wrapped) == [f"/{SERVICE}/Predict"]


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "Bearer k"),) * 2])
def test_without_the_token_the_handler_refuses_before_parsing(metadata) -> None:
    records: list = []
    gate, seen = _gate(token="k", records=records)
    handler = gate.service(_details(f"/{SERVICE}/Predict", metadata))
    assert handler.request_deserializer is None

    class Aborted(Exception):
        pass

    async def abort(code, message):
        raise Aborted(code, message)

    context = SimpleNamespace(abort=abort, invocation_metadata=lambda: metadata, peer=lambda: "test")
    with pytest.raises(Aborted) as e:
        asyncio.run(handler.unary_unary(b"never parsed", context))
    assert e.value.args[0] == grpc.StatusCode[errors.Unauthenticated.code] and seen == []
    assert [(m, c) for m, c, _ in records] == [("Predict", "UNAUTHENTICATED")]
    passed = gate.service(_details(f"/{SERVICE}/Predict", (("authorization", "Bearer k"),)))
    assert passed is gate.service(_details(f"/{SERVICE}/Predict", (("authorization", "bearer k"),)))
