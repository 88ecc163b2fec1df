"""The examples in every module's docstrings run and give what they show."""

import doctest
import importlib
import pkgutil

import pytest

import camserve

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(camserve.__path__, prefix="camserve.")
    if not info.name.startswith("camserve.proto") and not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
