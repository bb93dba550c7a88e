"""patch_peft: a PEFT model's LoRA linear layers on the fused ops, with PEFT's own results.

Each test builds a PEFT model, records what PEFT computes, patches, and compares: same outputs
(fp32: 1e-5; bf16: bf16's own rounding), same parameters and state_dict, same training.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from torch import nn

import lora_kernels
from .tolerance import assert_same_maths

peft = pytest.importorskip("peft")

K, H, OUT = 24, 32, 16


class MLP(nn.Module):
    """Attention-like names, so target_modules read as they do on real models."""

    def __init__(self, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(K, H, bias=bias)
        self.v_proj = nn.Linear(H, H, bias=bias)
        self.out = nn.Linear(H, OUT, bias=bias)

    def forward(self, x):
        return self.out(torch.relu(self.v_proj(torch.tanh(self.q_proj(x)))))


def peft_model(seed=0, bias=True, **config):
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False,
              **config}
    return peft.get_peft_model(MLP(bias), peft.LoraConfig(**config))


def assert_patched_matches(model, x, **forward_kwargs):
    expected = model(x, **forward_kwargs)
    assert lora_kernels.patch_peft(model) == 2
    got = model(x, **forward_kwargs)
    assert_same_maths(got, expected)                 # fp32 1e-5, bf16 3e-2: tests/tolerance.py
    return got


@pytest.mark.parametrize("config", [
    {}, {"use_rslora": True}, {"lora_bias": True}, {"lora_dropout": 0.1}, {"r": 1, "lora_alpha": 3},
], ids=["plain", "rslora", "lora_bias", "dropout_in_eval", "rank1"])
@pytest.mark.parametrize("bias", [True, False])
def test_one_adapter_matches_peft(config, bias):
    model = peft_model(bias=bias, **config).eval()
    assert_patched_matches(model, torch.randn(3, 5, K))


def test_two_active_adapters_summed():
    model = peft_model()
    model.add_adapter("second", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    assert_patched_matches(model.eval(), torch.randn(7, K))


def test_state_dict_unchanged_and_unpatch_restores():
    model = peft_model().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, K)
    expected = model(x)
    result = lora_kernels.patch_peft(model)
    assert result == 2 and result.fallbacks == {}
    assert lora_kernels.patch_peft(model) == 2                         # idempotent
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    layer = model.base_model.model.q_proj
    assert type(layer) is lora_kernels.nn.peft.fused_lora_linear_class() and "forward" not in vars(layer)
    assert lora_kernels.unpatch_peft(model) == 2
    assert type(layer) is peft.tuners.lora.Linear and type(model.base_model) is peft.tuners.lora.LoraModel
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_disabled_and_merged_adapters_take_the_base_path():
    model = peft_model().eval()
    x = torch.randn(4, K)
    with model.disable_adapter():
        base = model(x)
    lora_kernels.patch_peft(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    unmerged = model(x)
    model.merge_adapter()
    assert_same_maths(model(x), unmerged)
    model.unmerge_adapter()
    assert_same_maths(model(x), unmerged)


def test_mixed_adapter_batch_inference():
    model = peft_model()
    model.add_adapter("other", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    model.eval()
    x = torch.randn(6, 3, K)
    names = ["default", "__base__", "other", "other", "default", "__base__"]
    got = assert_patched_matches(model, x, adapter_names=names)
    for i, name in enumerate(names):          # each sample as a run with its adapter alone
        if name == "__base__":
            with model.disable_adapter():
                alone = model(x[i:i + 1])
        else:
            model.base_model.set_adapter(name)
            alone = model(x[i:i + 1])
        assert_same_maths(got[i:i + 1], alone)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(x, adapter_names=["nope"] * 6)
    with pytest.raises(ValueError, match="adapter_names has 5 names but the input has 6 samples"):
        model(x, adapter_names=["default"] * 5)


def test_training_twenty_steps_agree_with_peft():
    torch.manual_seed(0)
    x_fit, target_fit = torch.randn(32, K), torch.randn(32, OUT)
    data = [(x_fit, target_fit)] * 20          # one batch, refit: the loss must fall
    losses = {}
    for patched in (False, True):
        model = peft_model(seed=1).train()
        if patched:
            assert lora_kernels.patch_peft(model) == 2
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[patched] = []
        for x, target in data:
            loss = nn.functional.mse_loss(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[patched].append(loss.item())
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-5)
    assert losses[True][-1] < losses[True][0]


def test_fp32_adapters_with_bf16_model():
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP().to(torch.bfloat16),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False),
                                autocast_adapter_dtype=True).eval()
    assert model.base_model.model.q_proj.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, K, dtype=torch.bfloat16)
    # PEFT computes the LoRA term in fp32 then rounds; we compute it in bf16 with fp32 accumulation
    assert_patched_matches(model, x)                 # bf16: SAME_MATHS[bf16] = 3e-2, as before


def test_dora_layers_reported_as_fallbacks():
    model = peft_model(use_dora=True).eval()
    x = torch.randn(3, K)
    expected = model(x)
    result = lora_kernels.patch_peft(model)
    assert result == 0 and set(result.fallbacks) == {"base_model.model.q_proj", "base_model.model.v_proj"}
    assert all("variants" in why for why in result.fallbacks.values())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_deepcopy_of_a_patched_model():
    model = peft_model().eval()
    lora_kernels.patch_peft(model)
    clone = copy.deepcopy(model)
    x = torch.randn(2, K)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    assert clone.base_model.model.q_proj.forward.__self__ is clone.base_model.model.q_proj


def test_mixed_batch_trains_each_adapter_on_its_own_rows():
    """PEFT refuses adapter_names in training; patched, a mixed batch trains, and each adapter gets
    the gradient its own rows alone would give it."""
    model = peft_model()
    model.add_adapter("other", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    model.train()
    x = torch.randn(5, 3, K)
    names = ["other", "default", "__base__", "default", "other"]
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=names)
    lora_kernels.patch_peft(model)
    model.base_model.set_adapter(["default", "other"])              # both trainable
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mixed = dict(zip(params, torch.autograd.grad(model(x, adapter_names=names).square().sum(), list(params.values()))))
    assert model.training
    for adapter in ("default", "other"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.base_model.set_adapter(adapter)
        own = {n: p for n, p in model.named_parameters() if f".{adapter}." in n}
        alone = torch.autograd.grad(model(x[rows]).square().sum(), list(own.values()))
        for (name, _), grad in zip(own.items(), alone):
            torch.testing.assert_close(mixed[name], grad, rtol=1e-4, atol=1e-5)
    assert lora_kernels.unpatch_peft(model) == 2
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=names)


def test_registered_custom_module_route():
    """register_fused_peft: PEFT creates the LoRA layers on the fused path itself; same parameters,
    state_dict and outputs as plain PEFT, and a saved adapter loads into plain PEFT."""
    def build(fused):
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if fused:
            lora_kernels.register_fused_peft(config)
        return peft.get_peft_model(MLP(), config)

    plain, fused = build(False), build(True)
    layers = [m for m in fused.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert {type(m).__name__ for m in layers} == {"FusedLoraLinear"} and len(layers) == 2
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(6, K)
    assert_same_maths(fused(x), plain(x))
    assert lora_kernels.patch_peft(fused) == 2 and "forward" not in vars(layers[0])
    for model in (plain, fused):
        model(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    with tempfile.TemporaryDirectory() as tmp:
        fused.save_pretrained(tmp)
        base = MLP()
        base_weights = {k.replace(".base_layer", ""): v for k, v in plain.base_model.model.state_dict().items()
                        if "lora_" not in k}
        base.load_state_dict(base_weights)
        reloaded = peft.PeftModel.from_pretrained(base, tmp)          # plain PEFT, adapter from the file
        assert_same_maths(reloaded(x), plain(x))


class Halve(nn.Module):
    """A deterministic stand-in for a dropout module the fused path does not know."""

    def forward(self, x):
        return x * 0.5


# Where the fused path cannot give PEFT's answer: PEFT's own forward (or a clear error), never a
# different answer.

MIXED_NAMES = ["default", "other", "__base__", "other"]


def two_adapter_model():
    """peft_model with dropout and a second adapter, "other", in eval mode (x: (4, K), MIXED_NAMES)."""
    model = peft_model(lora_dropout=0.1)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    return model.eval()


def test_forward_hook_on_a_base_layer_runs_peft_forward():
    model = two_adapter_model()
    x = torch.randn(4, K)
    model.base_model.model.q_proj.base_layer.register_forward_hook(lambda m, i, out: out * 2)
    expected, expected_mixed = model(x), model(x, adapter_names=MIXED_NAMES)
    lora_kernels.patch_peft(model)
    assert_same_maths(model(x), expected)
    assert_same_maths(model(x, adapter_names=MIXED_NAMES), expected_mixed)


def test_unknown_dropout_module_in_a_mixed_batch_runs_peft_forward():
    model = two_adapter_model()
    x = torch.randn(4, K)
    model.base_model.model.q_proj.lora_dropout["other"] = Halve()    # a "dropout" module we do not know
    expected_mixed = model(x, adapter_names=MIXED_NAMES)
    lora_kernels.patch_peft(model)
    assert_same_maths(model(x, adapter_names=MIXED_NAMES), expected_mixed)


def test_autocast_runs_peft_forward():
    model = two_adapter_model()
    x = torch.randn(4, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_autocast = model(x)
    lora_kernels.patch_peft(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x), expected_autocast, rtol=0, atol=0)


def test_gradient_checkpointing_with_a_mixed_training_batch_raises():
    model = two_adapter_model()
    x = torch.randn(4, K)
    lora_kernels.patch_peft(model)
    model.train()
    model.base_model.model.gradient_checkpointing = True
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(x, adapter_names=MIXED_NAMES)
