"""Edge cases of the kernels and launchers: behaviours beyond the strategies' own tests (tests/test_strategies.py).

* an unchecked AdapterBatch's active_adapters is the bound min(L, M), so its tail holds adapters
  without rows: their weight gradients must be the zeros the torch backend and a checked batch give,
  whatever their (unread, on a GPU) scale;
* dropout of an inf entry of x is NaN (0 · inf), as in the reference and the torch backend, in y and in
  every gradient, under each strategy;
* a plan table's fused config whose tiles are below tl.dot's 16 is skipped with a warning (it compiled
  in the user's call and failed there, on a GPU);
* the fused plans (heuristic tiles and split-K) with an expanded (stride 0) bias, N = 1, r = 1 and
  K below one K step, against the float64 reference.
(On a GPU, tests/test_gpu.py's 64-bit-offset test runs each strategy.)
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels import AdapterBatch, tuning
from lora_kernels.tuning import MatmulConfig, Plan

from .helpers import DEVICE, skip_unless_backend_serves
from .multi_lora_linear.test_forward_backward import make_stacks
from .test_lora_linear import check_against_reference, make_params, make_x

FP32 = torch.float32


# ---------------------------------------------------------------------------------------------
# multi: weight gradients of the adapters without rows in an unchecked batch
# ---------------------------------------------------------------------------------------------

def test_unchecked_batch_rowless_adapter_gets_zero_weight_gradients_whatever_its_scale():
    """Slots 2 and 3 hold no rows; slot 3's scale is NaN (a GPU's scales are not read back). Unchecked,
    active_adapters is min(L, M) = 4 slots, so both get programs: 0 · NaN must not reach dA[3], dB[3].
    Checked and unchecked batches and the torch backend all give zeros there."""
    skip_unless_backend_serves("triton", FP32)
    from lora_kernels import fallback
    from lora_kernels.triton import multi_lora_linear as triton_multi

    num_adapters, m, k, n, r = 4, 8, 24, 20, 8
    gen = torch.Generator().manual_seed(7)
    ids = torch.tensor([0, 1] * (m // 2), device=DEVICE)
    x = make_x(m, k, "2d", FP32, gen)
    w, _, a, b, scales = make_stacks(num_adapters, n, k, r, FP32, False, gen)
    scales[3] = float("nan")
    grad_y = torch.randn(m, n, generator=gen).to(DEVICE)
    assert AdapterBatch(ids, num_adapters, check=False).active_adapters.shape[0] == num_adapters
    for check in (True, False):
        batch = AdapterBatch(ids, num_adapters, check=check).tensors()
        _, hidden = triton_multi.multi_lora_linear_forward(x, w, None, a, b, scales, batch, True)
        _, grad_a, grad_b = triton_multi.multi_lora_linear_backward(
            grad_y, x, w, a, b, hidden, scales, batch, True, True, True)
        _, want_a, want_b = fallback.multi_lora_linear_backward(
            grad_y, x, w, a, b, hidden, scales, batch, True, True, True)
        for name, got, want in (("dA", grad_a, want_a), ("dB", grad_b, want_b)):
            assert torch.count_nonzero(got[2:]) == 0 and not got[2:].isnan().any(), \
                f"{name} of the slots without rows (check={check}): {got[2:].flatten()[:8].tolist()}"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# single: an inf at a dropped entry of x is 0 · inf = NaN, as in the reference and the torch backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["torch", "split", "fused", "fused-splitk2"])
def test_dropout_of_inf_is_nan_like_the_reference(strategy):
    """x[i, j] = inf where the keep-mask drops it: the reference's dropout(x) = x · mask / (1 - p) has
    NaN there, so T[i], y[i] and every dB entry are NaN and dA[:, j] is NaN. The kernels zeroed the
    dropped entry with a select (y[i] = ±inf from the base GEMM alone, dA and dB finite)."""
    from .test_dropout import keep_mask, next_seed
    from .test_nonfinite import assert_ieee_like

    backend = "torch" if strategy == "torch" else "triton"
    skip_unless_backend_serves(backend, FP32)
    lora_kernels.set_backend(backend)
    plan = {"split": Plan("split"), "fused": Plan("fused"), "torch": Plan("split"),
            "fused-splitk2": Plan("fused", MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16,
                                                        group_m=2, num_warps=1, num_stages=1, split_k=2))}[strategy]
    m, k, n, r, p, scale = 6, 40, 12, 4, 0.5, 1.5
    gen = torch.Generator().manual_seed(13)
    x = make_x(m, k, "2d", FP32, gen)
    w, bias, a, b = make_params(n, k, r, FP32, True, gen)
    grad_y = torch.randn(m, n, generator=gen).to(DEVICE)
    keep = keep_mask(backend, m, k, p, next_seed(5, FP32))
    i, j = (~keep).nonzero()[0].tolist()
    x[i, j] = float("inf")
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    with tuning.forced_plan(plan):
        torch.manual_seed(5)
        y = lora_kernels.lora_linear(leaves[0], w, bias, leaves[1], leaves[2], scale, dropout_p=p)
        outputs = (y.detach(), *torch.autograd.grad(y, leaves, grad_y))

    def reference(cast):
        ref_leaves = [cast(t).detach().requires_grad_() for t in (x, a, b)]
        out = lora_kernels.reference.lora_linear_reference(ref_leaves[0], cast(w), cast(bias), ref_leaves[1],
                                                           ref_leaves[2], scale, dropout_mask=keep, dropout_p=p)
        return (out.detach(), *torch.autograd.grad(out, ref_leaves, cast(grad_y)))

    for name, got, want, base in zip(("y", "dX", "dA", "dB"), outputs, reference(torch.Tensor.double),
                                     reference(lambda t: t)):
        assert_ieee_like(got, want, base, f"{name} ({strategy})")


# ---------------------------------------------------------------------------------------------
# plan tables: a config the kernels cannot compile is skipped, not run
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["block_m", "block_n", "block_k", "block_r"])
def test_plan_table_config_below_dot_minimum_is_skipped(tmp_path, monkeypatch, field):
    """tl.dot takes tiles of at least 16 on every side (a GPU compile fails below: in the user's call,
    long after the table was read); BLOCK_N also cuts into 4-column Philox groups. An entry with such
    a tile is skipped with a warning like any other that cannot serve."""
    from .test_tuning import entry, lookup, table, write_user_table

    monkeypatch.setenv("LORA_KERNELS_TUNING_DIR", str(tmp_path))
    tuning.clear_tables()
    try:
        config = MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16, group_m=8, num_warps=4, num_stages=2)
        write_user_table(table([{**entry(config=config), "config": {**vars(config), field: 8}},
                                entry(n=96, config=config)]))
        with pytest.warns(UserWarning, match="entry 0 skipped"):
            assert lookup() == tuning.SPLIT
        assert lookup(n=96) == Plan("fused", config)
    finally:
        tuning.clear_tables()


# ---------------------------------------------------------------------------------------------
# fused plans at the edges: expanded bias, N = 1, r = 1, K below one step
# ---------------------------------------------------------------------------------------------

FUSED_PLANS = {
    "fused": Plan("fused"),
    "fused-splitk2": Plan("fused", MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16,
                                                group_m=2, num_warps=1, num_stages=1, split_k=2)),
}


@pytest.mark.parametrize("shape", [(5, 40, 1, 1), (17, 9, 24, 3)], ids=["N1_r1", "K_below_step"])
@pytest.mark.parametrize("plan", FUSED_PLANS.values(), ids=FUSED_PLANS.keys())
def test_fused_plans_with_expanded_bias_at_edge_shapes(plan, shape):
    """The split-K route adds the bias in the expand kernel, the plain fused one in the GEMM's epilogue:
    both read it through its stride (0: an expanded scalar), once."""
    skip_unless_backend_serves("triton", FP32)
    lora_kernels.set_backend("triton")
    m, k, n, r = shape
    gen = torch.Generator().manual_seed(12)
    x = make_x(m, k, "3d", FP32, gen)
    w, _, a, b = make_params(n, k, r, FP32, False, gen)
    bias = torch.randn(1, generator=gen).to(DEVICE).expand(n)
    with tuning.forced_plan(plan):
        check_against_reference(x, w, bias, a, b, -0.75, grad_w=True)
