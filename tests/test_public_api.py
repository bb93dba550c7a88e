"""The public API: the top level holds the ops, the modules, AdapterBatch, backend control and PEFT
patching; adapter files, merging and the reference live in namespaces; the names of 0.1 that moved
still resolve, with a DeprecationWarning naming the new place (README, "Public API")."""

import importlib
import io as stdlib_io
import subprocess
import sys
import warnings

import pytest

import lora_kernels

TOP_LEVEL = {
    "lora_linear", "multi_lora_linear", "add_multi_lora_", "AdapterBatch",                 # ops
    "LoRALinear", "MultiLoRALinear", "use_adapters", "wrap_multi_lora",                     # modules
    "get_backend", "set_backend", "use_backend", "extension_status",                        # backend control
    "patch_peft", "unpatch_peft", "register_fused_peft",                                    # PEFT patching
}

# (module, 0.1 name) -> (module, 0.2 name)
MOVED = {
    ("lora_kernels", "load_adapter"): ("lora_kernels.io", "read_adapter"),
    ("lora_kernels", "save_adapter"): ("lora_kernels.io", "write_adapter"),
    ("lora_kernels", "AdapterWeights"): ("lora_kernels.io", "AdapterWeights"),
    ("lora_kernels", "LayerAdapter"): ("lora_kernels.io", "LayerAdapter"),
    ("lora_kernels", "delta_weight"): ("lora_kernels.merging", "dense_delta"),
    ("lora_kernels", "merge_linear"): ("lora_kernels.merging", "merge_linear"),
    ("lora_kernels", "merge_cat"): ("lora_kernels.merging", "merge_cat"),
    ("lora_kernels", "merge_svd"): ("lora_kernels.merging", "merge_svd"),
    ("lora_kernels", "set_check_adapter_ids"): ("lora_kernels.metadata", "set_check_adapter_ids"),
    ("lora_kernels", "lora_linear_reference"): ("lora_kernels.reference", "lora_linear_reference"),
    ("lora_kernels", "multi_lora_linear_reference"): ("lora_kernels.reference", "multi_lora_linear_reference"),
    ("lora_kernels.merging", "delta_weight"): ("lora_kernels.merging", "dense_delta"),
    ("lora_kernels.adapter_io", "load_adapter"): ("lora_kernels.io", "read_adapter"),
    ("lora_kernels.adapter_io", "save_adapter"): ("lora_kernels.io", "write_adapter"),
    ("lora_kernels.adapter_io", "AdapterWeights"): ("lora_kernels.io", "AdapterWeights"),
    ("lora_kernels.adapter_io", "LayerAdapter"): ("lora_kernels.io", "LayerAdapter"),
    ("lora_kernels.adapter_io", "CONFIG_NAME"): ("lora_kernels.io", "CONFIG_NAME"),
    ("lora_kernels.adapter_io", "lora_scaling"): ("lora_kernels.reference", "lora_scaling"),
}


def test_top_level_is_the_ops_modules_batch_backend_control_and_peft_patching():
    assert set(lora_kernels.__all__) == TOP_LEVEL
    for name in TOP_LEVEL:
        assert getattr(lora_kernels, name) is not None


def test_namespaces_are_reachable_after_import_lora_kernels():
    assert lora_kernels.io.read_adapter is importlib.import_module("lora_kernels.io").read_adapter
    assert lora_kernels.merging.merge_svd is importlib.import_module("lora_kernels.merging").merge_svd
    assert lora_kernels.reference.lora_linear_reference is not None
    assert sys.modules["io"] is stdlib_io and lora_kernels.io.__name__ == "lora_kernels.io"   # shadows nothing


@pytest.mark.parametrize("old,new", list(MOVED.items()), ids=lambda v: ".".join(v))
def test_moved_name_warns_and_resolves_to_the_new_one(old, new):
    old_module, old_name = old
    new_module, new_name = new
    module = importlib.import_module(old_module)
    with pytest.warns(DeprecationWarning) as record:
        value = getattr(module, old_name)
    assert value is getattr(importlib.import_module(new_module), new_name)
    message = str(record[0].message)
    assert f"{old_module}.{old_name} is deprecated" in message and f"use {new_module}.{new_name}" in message
    assert record[0].filename == __file__   # attributed to the caller's line, not to lora_kernels


def test_from_import_of_a_moved_name_warns():
    with pytest.warns(DeprecationWarning, match="use lora_kernels.io.read_adapter"):
        from lora_kernels import load_adapter
    assert load_adapter is lora_kernels.io.read_adapter


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lora_kernels.io import read_adapter, write_adapter  # noqa: F401
        from lora_kernels.merging import dense_delta, merge_cat, merge_linear, merge_svd  # noqa: F401
        from lora_kernels.metadata import set_check_adapter_ids  # noqa: F401
        from lora_kernels.reference import lora_linear_reference, multi_lora_linear_reference  # noqa: F401


@pytest.mark.parametrize("module", ["lora_kernels", "lora_kernels.merging", "lora_kernels.adapter_io"])
def test_unknown_names_raise_attribute_error(module):
    with pytest.raises(AttributeError, match=f"module '{module}' has no attribute 'no_such_name'"):
        getattr(importlib.import_module(module), "no_such_name")
    with pytest.raises(ImportError):
        exec(f"from {module} import no_such_name", {})


def test_the_0_1_module_adapter_io_is_reachable_from_the_package_and_its_names_warn():
    code = ("import warnings, lora_kernels; warnings.simplefilter('error'); shim = lora_kernels.adapter_io; "
            "assert shim.__name__ == 'lora_kernels.adapter_io'")   # a fresh process: not imported before
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.warns(DeprecationWarning, match="use lora_kernels.io.read_adapter"):
        assert lora_kernels.adapter_io.load_adapter is lora_kernels.io.read_adapter
    namespace = {}
    with pytest.warns(DeprecationWarning):
        exec("from lora_kernels.adapter_io import *", namespace)
    assert namespace["save_adapter"] is lora_kernels.io.write_adapter


def test_configs_take_keywords_only():
    from lora_kernels.tuning import MatmulConfig

    config = MatmulConfig(block_m=16, block_n=32, block_k=64, block_r=16, group_m=8, num_warps=4, num_stages=3)
    assert config.split_k == 1
    with pytest.raises(TypeError):
        MatmulConfig(16, 32, 64, 16, 8, 4, 3)
