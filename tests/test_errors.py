"""The one error hierarchy, and the package rules that keep the layout readable."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import camserve
from camserve import errors

PACKAGE = Path(camserve.__file__).resolve().parent
GENERATED = PACKAGE / "proto"


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="camserve."):
        if info.name.startswith("camserve.proto") or info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def _hand_written() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if GENERATED not in p.parents)


def test_kinds_carry_distinct_status_codes():
    codes = [k.code for k in errors.KINDS]
    http = [k.http_status for k in errors.KINDS]
    assert len(set(codes)) == len(codes) and "INTERNAL" not in codes
    assert len(set(http)) == len(http) and all(400 <= s < 600 for s in http)
    for kind in errors.KINDS:
        assert issubclass(kind, errors.CamserveError)
        assert errors.kind_of(kind("x")) is kind


def test_unexpected_exceptions_have_no_kind():
    for exc in (ValueError("x"), KeyError("x"), IndexError(0), RuntimeError("x"), errors.CamserveError("x")):
        assert errors.kind_of(exc) is None


def test_bad_input_kinds_stay_builtin_compatible():
    with pytest.raises(ValueError):
        raise errors.InvalidArgument("top_k must be >= 1")
    with pytest.raises(LookupError):
        raise errors.NotFound("no model 'x'")


def test_every_exception_class_in_camserve_derives_from_camserve_error():
    """Classes found by reading the source (so nothing hides behind a lazy import)."""
    defined: list[tuple[str, str]] = []
    for path in _hand_written():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.bases:
                defined.append(
                    (path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", "."), node.name)
                )
    exceptions = []
    for module_name, cls_name in defined:
        module = importlib.import_module(module_name.removesuffix(".__init__"))
        cls = getattr(module, cls_name, None)
        if inspect.isclass(cls) and issubclass(cls, BaseException):
            exceptions.append(cls)
            assert issubclass(cls, errors.CamserveError), f"{module_name}.{cls_name} does not derive from CamserveError"
    assert len(exceptions) >= 10  # the scan found the package's exceptions (kinds, UnknownLayer, QueueFull, ...)


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_no_hand_written_module_is_too_long():
    too_long = {str(p.relative_to(PACKAGE)): n for p in _hand_written() if (n := len(p.read_text().splitlines())) > 520}
    assert not too_long, f"modules over 520 lines (split them by concern): {too_long}"
