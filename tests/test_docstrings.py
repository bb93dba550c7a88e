"""The examples in the public docstrings run and print what they say (torch backend, CPU)."""

import doctest
import importlib

import pytest

import lora_kernels

MODULES = ["lora_kernels.metadata", "lora_kernels.ops.lora_linear", "lora_kernels.ops.multi_lora_linear",
           "lora_kernels.nn.lora_linear", "lora_kernels.nn.multi_lora_linear", "lora_kernels.nn.peft", "lora_kernels.merging",
           "lora_kernels.io"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    lora_kernels.set_backend("torch")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
