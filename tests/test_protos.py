"""The committed generated gRPC code matches protos/ (regenerate: python -m camserve.protogen)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from camserve import protogen

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the protos")

# Lines that name the generator's version, not the .proto's content: a developer with another
# grpcio-tools release must not see a spurious failure.
_VERSION_LINES = re.compile(r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|    \d+,)$", re.M)


def _normalise(text: str) -> str:
    return _VERSION_LINES.sub("<version>", text)


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = protogen.generate(out_dir=tmp_path)
    assert fresh, "protogen wrote nothing"
    for path in fresh:
        committed = protogen.OUT_ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} missing: run `python -m camserve.protogen`"
        assert _normalise(committed.read_text()) == _normalise(path.read_text()), (
            f"{committed} is stale: run `python -m camserve.protogen` and commit the result"
        )


def test_generated_code_imports_package_relative() -> None:
    from camserve.proto.camserve.v1 import camserve_pb2, camserve_pb2_grpc

    assert camserve_pb2.DESCRIPTOR.package == "camserve.v1"
    assert "CamService" in camserve_pb2.DESCRIPTOR.services_by_name
    assert hasattr(camserve_pb2_grpc, "CamServiceStub")
    text = (protogen.OUT_ROOT / "camserve/v1/camserve_pb2_grpc.py").read_text()
    assert "from . import camserve_pb2" in text


def test_open_inference_protocol_is_generated_package_relative() -> None:
    from camserve.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc

    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= set(
        service.methods_by_name
    )
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceStub")
    text = (protogen.OUT_ROOT / "inference/grpc_service_pb2_grpc.py").read_text()
    assert "from . import grpc_service_pb2" in text
