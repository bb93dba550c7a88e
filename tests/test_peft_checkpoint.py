"""A patched PEFT model as a checkpoint and as a PEFT model that keeps changing.

- torch.save / pickle: a patched (or register_fused_peft) model loads in a fresh process, as plain
  PEFT, even where lora_kernels cannot be imported; patch_peft puts it back on the fused path.
- copy.deepcopy, copy.copy, nn.DataParallel's replicas: the copy stays patched and runs on its own
  state (a patch is the module's class, not a method bound to the original).
- Adapters added after patch_peft (add_adapter, load_adapter) are patched as they are created; a
  warning names the layers that stay on PEFT's forward.
- Another library wrapping PEFT's lora.Linear.forward after patch_peft does not loop.

The base model is built from torch's own modules only, so a fresh process can unpickle it without
this test module (which imports lora_kernels).
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels.nn import peft as fused_peft

from .tolerance import assert_same_maths

peft = pytest.importorskip("peft")

K, H, OUT = 24, 32, 16
TARGETS = ["q_proj", "v_proj"]
REPO_ROOT = Path(lora_kernels.__file__).resolve().parents[1]   # the lora_kernels under test, for subprocesses

# Put first on sys.meta_path of a fresh process, it makes `import lora_kernels` impossible there.
BLOCK_LORA_KERNELS = textwrap.dedent("""
    import sys
    class BlockLoraKernels:
        def find_spec(self, name, path=None, target=None):
            if name == "lora_kernels" or name.startswith("lora_kernels."):
                raise ImportError(f"{name} is blocked in this process")
            return None
    sys.meta_path.insert(0, BlockLoraKernels())
""")


def base_model():
    return nn.Sequential(OrderedDict(q_proj=nn.Linear(K, H), act=nn.Tanh(), v_proj=nn.Linear(H, H),
                                      relu=nn.ReLU(), out=nn.Linear(H, OUT)))


def lora_config(**config):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False,
                              **config})


def peft_model(seed=0, config=None):
    torch.manual_seed(seed)
    return peft.get_peft_model(base_model(), config or lora_config()).eval()


def run_python(script: str, *, block_lora_kernels: bool) -> str:
    """Runs `script` in a fresh interpreter (lora_kernels importable from the tree under test, or not
    at all); returns its stdout, fails the test with its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    code = (BLOCK_LORA_KERNELS if block_lora_kernels else "") + textwrap.dedent(script)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"fresh process failed:\n{done.stderr[-4000:]}"
    return done.stdout


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def fused_calls(monkeypatch):
    """Counts the fused op calls the patched layers make."""
    calls = []
    original = fused_peft.lora_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_peft, "lora_linear", counting)
    return calls


# --- save and load --------------------------------------------------------------------------------

def test_saved_patched_model_loads_as_plain_peft_without_lora_kernels(tmp_path):
    """torch.save and pickle of a patched model: the file names nothing of lora_kernels and loads in a
    fresh process where lora_kernels cannot be imported, as plain PEFT with PEFT's exact outputs."""
    model = peft_model()
    x = torch.randn(5, K)
    expected = model(x)                                   # plain PEFT, before the patch
    assert lora_kernels.patch_peft(model) == 2
    torch.save(model, tmp_path / "model.pt")
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(model))
    torch.save({"x": x, "expected": expected, "state": model.state_dict()}, tmp_path / "io.pt")
    assert b"lora_kernels" not in (tmp_path / "model.pkl").read_bytes()
    out = run_python(f"""
        import pickle, torch, peft
        io = torch.load({str(tmp_path / "io.pt")!r})
        for model in (torch.load({str(tmp_path / "model.pt")!r}, weights_only=False),
                      pickle.loads(open({str(tmp_path / "model.pkl")!r}, "rb").read())):
            assert "lora_kernels" not in sys.modules
            layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
            assert [type(m) for m in layers] == [peft.tuners.lora.Linear] * 2
            assert type(model.base_model) is peft.tuners.lora.LoraModel
            assert not any({{"forward", "inject_adapter", "_enable_peft_forward_hooks"}} & set(vars(m))
                           for m in model.modules()), "a method stored in a module's __dict__"
            assert all(torch.equal(v, io["state"][k]) for k, v in model.state_dict().items())
            assert list(model.state_dict()) == list(io["state"])
            assert torch.equal(model(io["x"]), io["expected"]), "outputs differ from PEFT's"
            with model.disable_adapter():
                model(io["x"])
        print("loaded")
    """, block_lora_kernels=True)
    assert out.strip() == "loaded"


def test_saved_patched_model_patches_again_after_loading(tmp_path):
    """With lora_kernels installed, patch_peft after loading puts every layer back on the fused path
    (the loaded model carries no stale "already patched" state), mixed-batch training included."""
    model = peft_model()
    model.add_adapter("other", lora_config(r=2, lora_alpha=2))
    lora_kernels.patch_peft(model)
    x, names = torch.randn(4, K), ["default", "other", "__base__", "other"]
    expected = model(x, adapter_names=names)
    torch.save(model, tmp_path / "model.pt")
    torch.save({"x": x, "names": names, "expected": expected}, tmp_path / "io.pt")
    out = run_python(f"""
        import torch, lora_kernels
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        result = lora_kernels.patch_peft(model)
        assert result == 2 and result.fallbacks == {{}}, (int(result), result.fallbacks)
        fused_class = lora_kernels.nn.peft.fused_lora_linear_class()
        assert all(type(model.base_model.model.get_submodule(name)) is fused_class for name in ("q_proj", "v_proj"))
        assert torch.equal(model(io["x"], adapter_names=io["names"]), io["expected"])
        model.train()
        model(io["x"], adapter_names=io["names"]).sum().backward()     # PEFT alone refuses this
        assert lora_kernels.unpatch_peft(model) == 2
        print("patched")
    """, block_lora_kernels=False)
    assert out.strip() == "patched"


def test_registered_fused_model_saves_and_loads_as_plain_peft(tmp_path):
    """register_fused_peft models (FusedLoraLinear layers, and the class in the config's custom
    modules) pickle as PEFT's lora.Linear: the file loads without lora_kernels, same outputs."""
    config = lora_config()
    lora_kernels.register_fused_peft(config)
    model = peft_model(config=config)
    assert {type(m).__name__ for m in lora_layers(model).values()} == {"FusedLoraLinear"}
    x = torch.randn(3, K)
    expected = peft_model()(x)                            # the same model built by plain PEFT
    assert_same_maths(model(x), expected)
    torch.save(model, tmp_path / "model.pt")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    out = run_python(f"""
        import copy, torch, peft
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        assert [type(m) for m in layers] == [peft.tuners.lora.Linear] * 2
        assert model.peft_config["default"]._custom_modules == {{torch.nn.Linear: peft.tuners.lora.Linear}}
        assert torch.equal(model(io["x"]), io["expected"])
        more = copy.deepcopy(model.peft_config["default"])
        more.target_modules = ["out"]
        model.add_adapter("more", more)                # the loaded config's custom modules still work
        assert type(model.base_model.model.out) is peft.tuners.lora.Linear
        print("loaded")
    """, block_lora_kernels=True)
    assert out.strip() == "loaded"
    clone = copy.deepcopy(model)                          # a copy in this process keeps the fused class
    assert {type(m).__name__ for m in lora_layers(clone).values()} == {"FusedLoraLinear"}
    assert clone.peft_config["default"]._custom_modules == {nn.Linear: fused_peft.fused_lora_linear_class()}
    assert torch.equal(clone(x), model(x))


def test_deepcopy_stays_patched_and_independent(monkeypatch):
    model = peft_model()
    model.add_adapter("other", lora_config(r=2, lora_alpha=2))
    lora_kernels.patch_peft(model)
    clone = copy.deepcopy(model)
    for name, layer in lora_layers(clone).items():
        assert type(layer) is fused_peft.fused_lora_linear_class() and "forward" not in vars(layer), name
    x, names = torch.randn(4, K), ["default", "other", "__base__", "other"]
    assert torch.equal(clone(x, adapter_names=names), model(x, adapter_names=names))
    calls = fused_calls(monkeypatch)
    clone(x)
    assert len(calls) == 2                                 # the copy's layers run fused
    clone.train()
    clone(x, adapter_names=names).sum().backward()         # the copy's LoraModel is patched too
    with torch.no_grad():
        clone.base_model.model.q_proj.lora_B["default"].weight.add_(1.0)
    assert not torch.equal(clone(x), model(x))             # the copy owns its weights
    clone.add_adapter("late", lora_config(target_modules=["out"]))   # the copy's hook patches the copy
    assert type(clone.base_model.model.out) is fused_peft.fused_lora_linear_class()
    assert type(model.base_model.model.out) is nn.Linear


def test_loaded_pickle_of_patched_model_has_no_method_in_instance_dicts():
    """A pickled patched model loads with clean instance dicts: no forward (nor LoraModel method)
    stored per instance, which would bind PEFT's forward to that one layer and shadow any later
    class-level patch (patch_peft, or another library's)."""
    model = peft_model()
    model.add_adapter("other", lora_config(r=2, lora_alpha=2))
    lora_kernels.patch_peft(model)
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded.base_model) is peft.tuners.lora.LoraModel
    assert [type(m) for m in lora_layers(loaded).values()] == [peft.tuners.lora.Linear] * 2
    for name, module in loaded.named_modules():
        assert not {"forward", "inject_adapter", "_enable_peft_forward_hooks"} & set(vars(module)), name
    x = torch.randn(3, K)
    assert torch.equal(loaded(x), model(x))


def test_shallow_copy_of_patched_layer_runs_on_its_own_state():
    """copy.copy of a patched layer: the copy's forward reads the copy's flags, so disabling the
    copy's adapters gives the base output (as PEFT does), and the original is unaffected."""
    model = peft_model()
    layer = model.base_model.model.q_proj
    x = torch.randn(4, K)
    expected_lora, expected_base = layer(x), layer.base_layer(x)
    lora_kernels.patch_peft(model)
    shallow = copy.copy(layer)
    shallow._disable_adapters = True
    assert torch.equal(shallow(x), expected_base)
    assert_same_maths(layer(x), expected_lora)


def test_data_parallel_replica_of_patched_layer_runs_on_its_own_modules():
    """nn.DataParallel builds its replicas with _replicate_for_data_parallel (a shallow copy whose
    modules it then replaces by copies on each device): a replica must run on its own modules."""
    model = peft_model()
    lora_kernels.patch_peft(model)
    layer = model.base_model.model.q_proj
    x = torch.randn(4, K)
    before = layer(x)
    replica = layer._replicate_for_data_parallel()
    replica.lora_B = copy.deepcopy(layer.lora_B)           # the replica's own factors, as on another device
    replica.lora_B["default"].weight = nn.Parameter(2 * layer.lora_B["default"].weight.detach())
    with torch.no_grad():
        delta, expected_delta = replica(x) - layer.base_layer(x), 2 * (before - layer.base_layer(x))
    assert_same_maths(delta, expected_delta)               # the replica runs on its doubled lora_B
    assert torch.equal(layer(x), before)                   # the original still runs on its own factors


# --- adapters added after patch_peft --------------------------------------------------------------

def test_adapter_added_after_patch_on_new_modules_is_patched(monkeypatch):
    model, plain = peft_model(), peft_model()
    assert lora_kernels.patch_peft(model) == 2
    for m in (model, plain):
        torch.manual_seed(1)
        m.add_adapter("late", lora_config(r=3, lora_alpha=6, target_modules=["v_proj", "out"]))
        m.base_model.set_adapter(["default", "late"])
    assert type(model.base_model.model.out) is fused_peft.fused_lora_linear_class()
    x = torch.randn(6, K)
    calls = fused_calls(monkeypatch)
    assert_same_maths(model(x), plain(x))
    assert len(calls) == 3                                  # q_proj, v_proj and the new out
    assert lora_kernels.patch_peft(model) == 3              # and patch_peft counts it
    assert lora_kernels.unpatch_peft(model) == 3
    assert torch.equal(model(x), plain(x))


def test_adapter_loaded_after_patch_on_new_modules_is_patched(tmp_path, monkeypatch):
    torch.manual_seed(2)
    donor = peft.get_peft_model(base_model(), lora_config(target_modules=["out"]))
    donor.save_pretrained(tmp_path)
    model, plain = peft_model(), peft_model()
    lora_kernels.patch_peft(model)
    for m in (model, plain):
        m.load_adapter(tmp_path, adapter_name="loaded")
        m.base_model.set_adapter(["default", "loaded"])
    assert type(model.base_model.model.out) is fused_peft.fused_lora_linear_class()
    x = torch.randn(3, K)
    calls = fused_calls(monkeypatch)
    assert_same_maths(model(x), plain(x))
    assert len(calls) == 3


def test_adapter_added_after_patch_that_cannot_fuse_is_reported():
    model = peft_model()
    lora_kernels.patch_peft(model)
    with pytest.warns(UserWarning, match=r"adapter 'dora' runs on PEFT's forward.*model\.out.*variants"):
        model.add_adapter("dora", lora_config(target_modules=["out"], use_dora=True))
    assert set(lora_kernels.patch_peft(model).fallbacks) == {"base_model.model.out"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add_adapter("fine", lora_config(target_modules=["q_proj"]))   # nothing to report: silent


# --- another library's wrapper around PEFT's forward ----------------------------------------

def test_wrapper_around_peft_forward_installed_after_patch_does_not_loop(monkeypatch):
    """A tracing library replaces lora.Linear.forward after patch_peft with a wrapper that routes
    each call through the module's own class's forward when that is another one. The fused forward's
    fallback calls PEFT's forward as it was at patch time, so no RecursionError, and PEFT's results."""
    model = peft_model()
    x = torch.randn(4, K)
    expected = model(x)
    with model.disable_adapter():
        expected_base = model(x)
    lora_kernels.patch_peft(model)
    peft_forward = peft.tuners.lora.layer.Linear.forward
    traced = []

    def tracing_forward(self, *args, **kwargs):
        traced.append(type(self).__name__)
        own = type(self).forward
        return own(self, *args, **kwargs) if own is not tracing_forward else peft_forward(self, *args, **kwargs)

    monkeypatch.setattr(peft.tuners.lora.layer.Linear, "forward", tracing_forward)
    layer = model.base_model.model.q_proj
    torch.testing.assert_close(peft.tuners.lora.layer.Linear.forward(layer, x), layer(x), rtol=0, atol=0)
    with model.disable_adapter():                          # the fused forward falls back to PEFT's
        assert torch.equal(model(x), expected_base)
    assert_same_maths(model(x), expected)
    assert traced == ["FusedLoraLinear"]
