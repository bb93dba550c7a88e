"""CUDA only: hazards that only a GPU shows. Skipped without a GPU; the CPU side of
each is in tests/test_host_syncs.py (counted syncs, a fake torch.cuda) and tests/test_fp32_precision.py.

* a layer on a second device (device_map="auto"): the kernels launch there, not on the current device;
* torch's fp32_precision API: fp32 results under "ieee" and "tf32" within their tolerance of float64;
* a mixed-batch PEFT forward and AdapterBatch construction with the id check off never synchronise
  (torch.cuda.set_sync_debug_mode("error")); with it on, once.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lora_kernels
from lora_kernels import AdapterBatch, lora_linear, multi_lora_linear
from lora_kernels.metadata import set_check_adapter_ids

from .multi_lora_linear.test_forward_backward import check_against_reference as check_multi_against_reference
from .multi_lora_linear.test_forward_backward import ids_for, make_stacks
from .test_lora_linear import check_against_reference, make_params, make_x
from .tolerance import assert_same_maths

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _triton_backend():
    lora_kernels.set_backend("triton")
    yield
    set_check_adapter_ids(None)
    torch.cuda.set_sync_debug_mode(0)


# ---- a layer on cuda:1 while cuda:0 is current ----------------------------------------------------

def _both_ops(device: torch.device) -> list[torch.Tensor]:
    """lora_linear and multi_lora_linear forward and backward on `device`, cuda:0 current throughout;
    outputs and gradients, on the host."""
    gen = torch.Generator().manual_seed(0)
    m, k, n, r, num_adapters = 64, 256, 192, 8, 3
    host = {"x": torch.randn(m, k, generator=gen), "w": torch.randn(n, k, generator=gen) / k**0.5,
            "bias": torch.randn(n, generator=gen), "a": torch.randn(r, k, generator=gen) / k**0.5,
            "b": torch.randn(n, r, generator=gen), "stack_a": torch.randn(num_adapters, r, k, generator=gen) / k**0.5,
            "stack_b": torch.randn(num_adapters, n, r, generator=gen), "grad_y": torch.randn(m, n, generator=gen)}
    t = {name: v.to(device, torch.float16) for name, v in host.items()}
    for name in ("x", "a", "b", "stack_a", "stack_b"):
        t[name].requires_grad_(True)
    scales = torch.tensor([0.5, -1.0, 2.0], device=device)
    ids = torch.randint(-1, num_adapters, (m,), generator=gen).to(device)
    with torch.cuda.device(0):
        y = lora_linear(t["x"], t["w"], t["bias"], t["a"], t["b"], 2.0)
        single = torch.autograd.grad(y, [t["x"], t["a"], t["b"]], t["grad_y"])
        y_multi = multi_lora_linear(t["x"], t["w"], t["bias"], t["stack_a"], t["stack_b"], scales,
                                    AdapterBatch(ids, num_adapters))
        multi = torch.autograd.grad(y_multi, [t["x"], t["stack_a"], t["stack_b"]], t["grad_y"])
        assert torch.cuda.current_device() == 0
    results = [y, *single, y_multi, *multi]
    assert all(r.device == device for r in results)
    torch.cuda.synchronize(device)      # an illegal address from a launch on the wrong device surfaces here
    return [r.detach().cpu() for r in results]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_launches_there():
    expected = _both_ops(torch.device("cuda", 0))
    for got, want in zip(_both_ops(torch.device("cuda", 1)), expected):
        assert_same_maths(got, want)


# ---- torch's fp32_precision API -------------------------------------------------------------------

@pytest.fixture
def restore_precision():
    saved = (torch.get_float32_matmul_precision(), torch.backends.fp32_precision,
             torch.backends.cuda.matmul.fp32_precision)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.fp32_precision = saved[1]
    torch.backends.cuda.matmul.fp32_precision = saved[2]


def _within_tf32_error(y, x, w, bias, a_rows, b_rows, scale_rows):
    """RMS(y - float64 reference) <= 3 · 2⁻¹⁰ · RMS(reference). tf32 keeps 10 mantissa bits of each
    operand; Triton truncates them (cuBLAS rounds). Truncating x, W0, A, B and T in float64 gives 1.26 ·
    2⁻¹⁰ at this test's shapes, while a scale off by 1 % gives 8.3 · 2⁻¹⁰ and a dropped LoRA term 834
    (measured on CPU). a_rows (M, r, K), b_rows (M, N, r), scale_rows (M,): each row's adapter (zeros
    for none)."""
    x64, w64 = x.double(), w.double()
    hidden = torch.einsum("mk,mrk->mr", x64, a_rows.double())
    ref = x64 @ w64.T + bias.double() + scale_rows.double()[:, None] * torch.einsum("mr,mnr->mn", hidden, b_rows.double())
    relative_rms = ((y.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert relative_rms <= 3 * 2**-10, f"relative RMS error {relative_rms / 2**-10:.2f} · 2⁻¹⁰, bound 3 · 2⁻¹⁰"


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="this torch has no fp32_precision API")
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_precision_api(restore_precision, precision):
    """Set through the new API alone (allow_tf32's getter then raises): the kernels follow it. "ieee":
    fp32 results and gradients within twice plain torch's float64 error. "tf32": outputs within tf32's
    own error (Triton truncates the operands where cuBLAS rounds them, so "twice cuBLAS's error" is not
    the contract there), and different from the "ieee" run (the setting took effect)."""
    from lora_kernels.triton import lora_linear as launch

    torch.backends.cuda.matmul.fp32_precision = precision
    assert launch.dot_precision(torch.float32) == precision
    gen = torch.Generator().manual_seed(0)
    m, k, n, r, num_adapters = 256, 1024, 512, 16, 4
    x = make_x(m, k, "2d", torch.float32, gen)
    w, bias, a, b = make_params(n, k, r, torch.float32, True, gen)
    w_s, bias_s, a_s, b_s, scales = make_stacks(num_adapters, n, k, r, torch.float32, True, gen)
    ids = ids_for("random", m, num_adapters, gen).to(x.device)
    if precision == "ieee":
        check_against_reference(x, w, bias, a, b, 2.0)
        check_multi_against_reference(x, w_s, bias_s, a_s, b_s, scales, ids)
        return
    with torch.no_grad():
        y = lora_linear(x, w, bias, a, b, 2.0)
        y_multi = multi_lora_linear(x, w_s, bias_s, a_s, b_s, scales, ids)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        y_exact = lora_linear(x, w, bias, a, b, 2.0)
    _within_tf32_error(y, x, w, bias, a.expand(m, r, k), b.expand(m, n, r), torch.full((m,), 2.0, device=x.device))
    has = ids >= 0
    rows = ids.clamp(min=0)
    _within_tf32_error(y_multi, x, w_s, bias_s, a_s[rows] * has[:, None, None], b_s[rows], scales[rows] * has)
    assert not torch.equal(y, y_exact), "fp32_precision='tf32' ran the same maths as 'ieee'"


# ---- no host sync per batch with the id check off, one with it on --------------------------------

def _peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    targets = [str(i) for i in range(4)]
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=targets, init_lora_weights=False),
                                adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    lora_kernels.patch_peft(model)
    return model.cuda().eval()


def test_mixed_batch_and_unchecked_batches_never_sync():
    model = _peft_model()
    x = torch.randn(4, 5, 64, device="cuda")
    ids = torch.tensor([0, 2, -1, 1, 2, 0], device="cuda")
    starts, adapters = torch.tensor([0, 2, 3, 6], device="cuda"), torch.tensor([1, -1, 2], device="cuda")
    ranks = torch.tensor([4, 2, 1], device="cuda")
    with torch.no_grad():
        model(x, adapter_names=["one", "__base__", "two", "one"])      # compiles the kernels
        set_check_adapter_ids(False)
        torch.cuda.set_sync_debug_mode("error")
        y = model(x, adapter_names=["two", "one", "__base__", "two"])
        AdapterBatch(ids, 3, ranks=[4, 2, 1])                              # a list: a copy, not a sync
        AdapterBatch(ids, 3, ranks=ranks).with_ranks(ranks)
        AdapterBatch.from_segments(starts, adapters, 3, num_rows=6, ranks=ranks)
        torch.cuda.set_sync_debug_mode(0)
    assert y.shape == (4, 5, 64) and torch.isfinite(y).all()


def test_checked_batch_syncs_once():
    ids = torch.tensor([0, 2, -1, 1, 2, 0], device="cuda")
    starts, adapters = torch.tensor([0, 2, 3, 6], device="cuda"), torch.tensor([1, -1, 2], device="cuda")
    ranks = torch.tensor([4, 2, 1], device="cuda")
    set_check_adapter_ids(True)
    for build in (lambda: AdapterBatch(ids, 3, ranks=ranks),
                  lambda: AdapterBatch.from_segments(starts, adapters, 3, ranks=ranks)):   # num_rows read too
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            batch = build()
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
        assert batch.max_rank == 4
