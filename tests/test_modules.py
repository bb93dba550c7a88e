"""LoRALinear and MultiLoRALinear: state, PEFT equivalence, merging, hot-swap, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_kernels import LoRALinear, MultiLoRALinear, use_adapters, wrap_multi_lora

from .helpers import DEVICE, skip_unless_backend_serves
from .tolerance import assert_same_maths

K, N = 24, 20


def make_linear(bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias).to(DEVICE, dtype)


def trained(layer: LoRALinear, seed=1) -> LoRALinear:
    """Non-zero B, as after training: the LoRA term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))
    return layer


# ---------------------------------------------------------------------------------------------
# LoRALinear
# ---------------------------------------------------------------------------------------------

def test_from_linear_state_and_initialisation():
    base = make_linear()
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.base_layer is base and not base.weight.requires_grad and not base.bias.requires_grad
    assert list(layer.state_dict()) == ["base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"]
    assert layer.lora_A.weight.shape == (4, K) and layer.lora_B.weight.shape == (N, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(5, K, device=DEVICE)
    assert torch.equal(layer(x), base(x))                     # B = 0: starts as the base layer
    assert layer.scaling == 2.0
    assert LoRALinear.from_linear(make_linear(), r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(backend, bias):
    skip_unless_backend_serves(backend, torch.float32)
    layer = trained(LoRALinear.from_linear(make_linear(bias), r=6, lora_alpha=12))
    x = torch.randn(2, 7, K, device=DEVICE)
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert_same_maths(layer(x), expected)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_linear(use_rslora):
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 8)).to(DEVICE)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["0", "2"], use_rslora=use_rslora,
                             init_lora_weights=False, lora_dropout=0.1)
    peft_model = peft.get_peft_model(model, config).eval()
    x = torch.randn(9, K, device=DEVICE)
    expected = peft_model(x)
    ours = nn.Sequential(nn.Linear(K, N), nn.ReLU(), nn.Linear(N, 8)).to(DEVICE)
    for index in ("0", "2"):
        peft_layer = peft_model.base_model.model.get_submodule(index)
        layer = LoRALinear.from_linear(getattr(ours, index), r=4, lora_alpha=16, lora_dropout=0.1,
                                       use_rslora=use_rslora)
        layer.load_state_dict({"base_layer.weight": peft_layer.base_layer.weight,
                               "base_layer.bias": peft_layer.base_layer.bias,
                               "lora_A.weight": peft_layer.lora_A["default"].weight,   # no transposes
                               "lora_B.weight": peft_layer.lora_B["default"].weight})
        assert layer.scaling == peft_layer.scaling["default"]
        setattr(ours, index, layer)
    assert_same_maths(ours.eval()(x), expected)


def test_merge_unmerge_round_trip():
    layer = trained(LoRALinear.from_linear(make_linear(), r=4, lora_alpha=8))
    x = torch.randn(6, K, device=DEVICE)
    unmerged, weight = layer(x), layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_same_maths(layer(x), unmerged)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)
    assert_same_maths(layer(x), unmerged)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    layer = trained(LoRALinear.from_linear(make_linear(), r=4, lora_alpha=8))
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged


def test_training_changes_only_lora_parameters_and_dropout_only_in_train():
    layer = trained(LoRALinear.from_linear(make_linear(), r=4, lora_alpha=8, lora_dropout=0.5))
    x = torch.randn(16, K, device=DEVICE)
    layer.eval()
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert_same_maths(layer(x), expected)   # eval: no dropout
    layer.train()
    assert not torch.allclose(layer(x), expected, rtol=1e-3, atol=1e-3)    # train: dropout on the branch
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x).square().mean().backward()
    opt.step()
    for name, p in layer.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("base_layer"), name


def test_fp32_adapter_with_bf16_activations():
    base = make_linear(dtype=torch.bfloat16)
    layer = trained(LoRALinear.from_linear(base, r=4, lora_alpha=8))
    layer.lora_A.float()
    layer.lora_B.float()
    x = torch.randn(5, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_autocast_runs_in_the_autocast_dtype():
    layer = trained(LoRALinear.from_linear(make_linear(), r=4, lora_alpha=8))
    x = torch.randn(5, K, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_same_maths(y.float(), layer(x), dtype=torch.bfloat16)


def test_merged_then_disabled_gives_the_base_layer():
    """disable_adapter on a merged layer: the base layer's output, not the adapted one."""
    layer = trained(LoRALinear.from_linear(make_linear(), r=4, lora_alpha=8))
    x = torch.randn(5, K, device=DEVICE)
    base = layer.base_layer(x)
    layer.merge()
    layer.disable_adapter = True
    assert_same_maths(layer(x), base)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear.from_linear(make_linear(), r=0, lora_alpha=2)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear.from_linear(make_linear(), r=2, lora_alpha=2, lora_dropout=1.0)


# ---------------------------------------------------------------------------------------------
# MultiLoRALinear
# ---------------------------------------------------------------------------------------------

def adapters(ranks, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, K, generator=g).to(DEVICE), torch.randn(N, r, generator=g).to(DEVICE), 0.5 + i)
            for i, r in enumerate(ranks)]


def per_row_expected(base, loaded, ids, x):
    """Each row through its slot's adapter alone (slot -> (A, B, s)); -1 and empty slots: base."""
    y = base(x).clone()
    for i, j in enumerate(ids.tolist()):
        if j in loaded:
            a, b, s = loaded[j]
            y[i] = y[i] + s * (x[i] @ a.T) @ b.T
    return y


def test_multi_slots_rows_and_hot_swap(backend):
    skip_unless_backend_serves(backend, torch.float32)
    layer = MultiLoRALinear(make_linear(), num_slots=4, max_rank=8)
    a0, a1, a2 = adapters([2, 8, 5])
    layer.load_adapter(0, *a0)
    layer.load_adapter(2, *a1)
    layer.load_adapter(3, *a2)
    pointers = [t.data_ptr() for t in (layer.lora_a, layer.lora_b, layer.scales, layer.ranks)]
    x = torch.randn(30, K, device=DEVICE)
    ids = torch.tensor([0, 1, 2, 3, -1] * 6, device=DEVICE)       # slot 1 is empty
    with use_adapters(ids, num_adapters=4):
        y = layer(x)
    expected = per_row_expected(layer.base_layer, {0: a0, 2: a1, 3: a2}, ids, x)
    assert_same_maths(y, expected)
    base = layer.base_layer(x)
    assert torch.equal(y[ids == -1], base[ids == -1]) and torch.equal(y[ids == 1], base[ids == 1])
    # hot swap: slot 2 gets a rank-3 adapter in place, slot 0 is emptied
    (b2,) = adapters([3], seed=9)
    layer.load_adapter(2, *b2)
    layer.unload_adapter(0)
    assert [t.data_ptr() for t in (layer.lora_a, layer.lora_b, layer.scales, layer.ranks)] == pointers
    with use_adapters(ids, num_adapters=4):
        y = layer(x)
    assert_same_maths(y, per_row_expected(layer.base_layer, {2: b2, 3: a2}, ids, x))


def test_wrap_model_one_batch_for_all_layers(backend):
    skip_unless_backend_serves(backend, torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(K, K), nn.Tanh(), nn.Linear(K, N)).to(DEVICE)
    plain = nn.Sequential(nn.Linear(K, K), nn.Tanh(), nn.Linear(K, N)).to(DEVICE)
    plain.load_state_dict(model.state_dict())
    assert wrap_multi_lora(model, ["0", "2"], num_slots=3, max_rank=4) == ["0", "2"]
    g = torch.Generator().manual_seed(4)
    weights = {}
    for index, n in (("0", K), ("2", N)):
        for slot in (0, 2):
            a, b = torch.randn(4, K, generator=g).to(DEVICE), torch.randn(n, 4, generator=g).to(DEVICE)
            model.get_submodule(index).load_adapter(slot, a, b, 0.25)
            weights[index, slot] = (a, b)
    x = torch.randn(12, K, device=DEVICE)
    ids = torch.tensor([0, 2, -1, 1] * 3, device=DEVICE)
    with use_adapters(ids, num_adapters=3):
        y = model(x)
    for row, slot in enumerate(ids.tolist()):      # each row as a model with that slot's adapters
        h = x[row]
        for index, act in (("0", torch.tanh), ("2", None)):
            h_new = plain.get_submodule(index)(h)
            if slot in (0, 2):
                a, b = weights[index, slot]
                h_new = h_new + 0.25 * (h @ a.T) @ b.T
            h = act(h_new) if act else h_new
        assert_same_maths(y[row], h)


def test_multi_errors():
    layer = MultiLoRALinear(make_linear(), num_slots=2, max_rank=4)
    a, b, s = adapters([4])[0]
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\)"):
        layer.load_adapter(2, a, b, s)
    with pytest.raises(ValueError, match="slot must be"):
        layer.unload_adapter(-1)
    with pytest.raises(ValueError, match="does not fit"):
        layer.load_adapter(0, *adapters([5])[0])
    with pytest.raises(ValueError, match=r"lora_a must be \(r, K=24\)"):
        layer.load_adapter(0, a.T, b, s)
    with pytest.raises(RuntimeError, match="use_adapters"):
        layer(torch.randn(3, K, device=DEVICE))
    with pytest.raises(ValueError, match="num_adapters"):
        with use_adapters(torch.tensor([0, 1, 0])):
            pass
    with pytest.raises(ValueError, match="3 rows but x has M=2"):
        with use_adapters(torch.tensor([0, 1, 0], device=DEVICE), num_adapters=2):
            layer(torch.randn(2, K, device=DEVICE))
    with pytest.raises(TypeError, match="nn.Linear"):
        MultiLoRALinear(nn.Conv1d(2, 2, 1), 2, 2)


def test_multi_to_bf16_keeps_scales_fp32_and_runs_under_autocast():
    """.to(bf16) casts MultiLoRALinear's stacks but keeps its scales fp32; under torch.autocast it runs
    in autocast's dtype."""
    multi = MultiLoRALinear(make_linear(), num_slots=2, max_rank=4)
    multi.load_adapter(0, *adapters([4])[0][:2], scale=0.3)
    multi.to(torch.bfloat16)
    assert multi.scales.dtype == torch.float32 and multi.scales[0].item() == pytest.approx(0.3, abs=1e-7)
    assert multi.lora_a.dtype == torch.bfloat16
    with use_adapters(torch.tensor([0, -1, 0], device=DEVICE), num_adapters=2):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            assert multi(torch.randn(3, K, device=DEVICE)).dtype == torch.bfloat16
