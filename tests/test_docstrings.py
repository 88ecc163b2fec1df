"""The examples in the public modules' docstrings run and give what they show."""

import doctest
import importlib

import pytest

MODULES = [
    "imaging",
    "errors",
    "explanation",
    "serving.repository",
    "explain.explainer",
    "explain.methods",
    "keras_graph",
    "datasets.shapes",
    "dense.scores",
    "dense.fcn",
    "wire",
    "serving.batching",
    "client",
    "evaluation",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"camserve.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of camserve.{name} failed"
