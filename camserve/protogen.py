"""Regenerate the Python gRPC code from ``protos/`` (a developer tool; needs grpcio-tools).

    python -m camserve.protogen            # writes camserve/proto/{camserve/v1,inference}/*.py(i)
    python -m camserve.protogen --out DIR  # somewhere else (the staleness test does this)

The generated modules import each other package-relatively (``from . import camserve_pb2``)
so that they live inside the ``camserve`` package.

>>> generate(out_dir=tmp_path)   # doctest: +SKIP
[PosixPath('.../camserve/v1/camserve_pb2.py'), ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = Path(__file__).resolve().parent / "proto"
PROTOS = ("camserve/v1/camserve.proto", "inference/grpc_service.proto")

_IMPORT_RE = re.compile(r"^from (?:camserve\.v1|inference) import (\w+) as (\w+)$", re.M)


def _fix_imports(text: str) -> str:
    return _IMPORT_RE.sub(r"from . import \1 as \2", text)


def generate(out_dir: str | Path = OUT_ROOT, proto_root: str | Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on :data:`PROTOS` into ``out_dir``; returns the files written."""
    import importlib.resources
    import subprocess

    out_dir, proto_root = Path(out_dir), Path(proto_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    for proto in PROTOS:
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto_root / proto),
        ]
        # A child process: protoc's native code crashed when run inside a process that had
        # already loaded TensorFlow (seen in the full test suite).
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed on {proto}: {done.stderr.strip()}")
    written: list[Path] = []
    for proto in PROTOS:
        pkg = out_dir / Path(proto).parent
        # Package markers down to the generated modules.
        d = pkg
        while d != out_dir:
            (d / "__init__.py").touch()
            d = d.parent
        stem = Path(proto).stem
        for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            path = pkg / name
            path.write_text(_fix_imports(path.read_text()))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m camserve.protogen", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT_ROOT), help="output root (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
