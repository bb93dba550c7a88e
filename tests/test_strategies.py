"""Both strategies of the single-adapter op on the Triton backend: ``split`` (torch's GEMM,
then the shrink and an in-place expand) and ``fused`` (our GEMM with the LoRA term as its accumulator's
initial value; split_k > 1: fp32 partials over K ranges that the expand kernel sums in a fixed order).
Under tuning.forced_plan each one must agree with the float64 reference in the forward and every
gradient (dX, dA, dB), with and without bias and dropout, at odd sizes, and give the same bits on a
repeat; each must run the kernels it names; an untuned device runs split. The tuner's search space
(fused_candidates) runs and agrees too. Interpreted on CPU: fp32 and fp16 (bf16 arithmetic is wrong
under the interpreter)."""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels import lora_linear, tuning
from lora_kernels.reference import lora_linear_reference
from lora_kernels.tuning import MatmulConfig, Plan

from .helpers import DEVICE, skip_unless_backend_serves
from .test_dropout import keep_mask, next_seed
from .test_lora_linear import make_params, make_x
from .tolerance import assert_close

triton_launch = pytest.importorskip("lora_kernels.triton.lora_linear", reason="needs triton")

# Small explicit tiles keep the interpreter fast; split_k 3 leaves a short last K range, and at K = 20
# (two 16-deep steps) split_k 8 leaves six empty ones, which store zeros.
PLANS = {
    "split": Plan("split"),
    "fused": Plan("fused"),   # the heuristic's tiles
    "fused-splitk2": Plan("fused", MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16,
                                                group_m=2, num_warps=1, num_stages=1, split_k=2)),
    "fused-splitk3": Plan("fused", MatmulConfig(block_m=16, block_n=32, block_k=16, block_r=16,
                                                group_m=8, num_warps=2, num_stages=1, split_k=3)),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# (M, K, N, r, x layout)
SHAPES = [(37, 67, 11, 12, "2d"), (1, 67, 11, 1, "2d"), (24, 20, 40, 8, "3d")]


@pytest.fixture(autouse=True)
def triton_backend():
    skip_unless_backend_serves("triton", torch.float32)
    lora_kernels.set_backend("triton")


class LaunchCounter:
    """Stands in for a @triton.jit kernel of the launcher module: counts its launches, then runs it
    (or raises, fail=True)."""

    def __init__(self, kernel, fail: bool = False):
        self.kernel, self.fail, self.launches = kernel, fail, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.fail:
                raise AssertionError(f"{self.kernel.fn.__name__} launched")
            self.launches += 1
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """{"fused": LaunchCounter, "expand": LaunchCounter} in place of the launcher's two kernels."""
    counters = {"fused": LaunchCounter(triton_launch.lora_fused_matmul_kernel),
                "expand": LaunchCounter(triton_launch.lora_expand_kernel)}
    monkeypatch.setattr(triton_launch, "lora_fused_matmul_kernel", counters["fused"])
    monkeypatch.setattr(triton_launch, "lora_expand_kernel", counters["expand"])
    return counters


def run_layer(x, w, bias, a, b, scale, p, grad_y):
    """(y, dX, dA, dB) of lora_linear, the dropout seed drawn after torch.manual_seed(5)."""
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    torch.manual_seed(5)
    y = lora_linear(x, w, bias, a, b, scale, dropout_p=p)
    return (y.detach(), *torch.autograd.grad(y, (x, a, b), grad_y))


def check_against_reference(outputs, x, w, bias, a, b, scale, p, grad_y):
    """outputs (y, dX, dA, dB) against the float64 reference with the kernels' keep-mask, the baseline
    being plain torch in x's dtype."""
    keep = keep_mask("triton", x.numel() // x.shape[-1], x.shape[-1], p, next_seed(5, x.dtype)).reshape(x.shape) \
        if p > 0 else None

    def reference(cast):
        leaves = [cast(t).detach().requires_grad_(True) for t in (x, a, b)]
        out = lora_linear_reference(leaves[0], cast(w), None if bias is None else cast(bias), leaves[1], leaves[2],
                                    scale, dropout_mask=keep, dropout_p=p)
        return (out, *torch.autograd.grad(out, leaves, cast(grad_y)))

    for name, t, t64, t_base in zip(["y", "dX", "dA", "dB"], outputs, reference(lambda t: t.double()),
                                    reference(lambda t: t)):
        assert_close(t, t64, t_base, name)


def problem(shape, dtype, has_bias, seed=0):
    m, k, n, r, layout = shape
    gen = torch.Generator().manual_seed(seed + m + k)
    x = make_x(m, k, layout, dtype, gen)
    w, bias, a, b = make_params(n, k, r, dtype, has_bias, gen)
    grad_y = torch.randn(*x.shape[:-1], n, generator=gen).to(DEVICE, dtype)
    return x, w, bias, a, b, grad_y


# bias and dropout act in different places (the GEMM's epilogue or addmm; the shrink, the dX epilogue and
# dA): two combinations cover each on and off, at half the interpreter time of four
@pytest.mark.parametrize(("has_bias", "p"), [(True, 0.3), (False, 0.0)], ids=["bias-dropout", "nobias-nodrop"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}_{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_strategy_matches_reference_and_repeats(plan, dtype, shape, has_bias, p, launches):
    x, w, bias, a, b, grad_y = problem(shape, dtype, has_bias)
    scale = -1.5
    with tuning.forced_plan(plan):
        first = run_layer(x, w, bias, a, b, scale, p, grad_y)
        again = run_layer(x, w, bias, a, b, scale, p, grad_y)
    check_against_reference(first, x, w, bias, a, b, scale, p, grad_y)
    for name, t1, t2 in zip(["y", "dX", "dA", "dB"], first, again):
        assert torch.equal(t1, t2), f"{name}: a repeat under {plan} gave other bits"
    # forward and dX each ran the plan's kernels: split never our GEMM, fused the expand only for split-K
    split_k = plan.config.split_k if plan.config is not None else 1
    assert launches["fused"].launches == (0 if plan.strategy == "split" else 4)
    assert launches["expand"].launches == (4 if plan.strategy == "split" or split_k > 1 else 0)


def test_split_k_with_empty_ranges_and_every_k_step():
    """split_k 8 over two 16-deep K steps: six ranges are empty and store zeros; the sum is still the
    GEMM (fp32, against the reference), and the same bits on a repeat."""
    x, w, bias, a, b, grad_y = problem((19, 20, 33, 4, "2d"), torch.float32, True)
    with tuning.forced_plan(Plan("fused", MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16,
                                                       group_m=8, num_warps=1, num_stages=1, split_k=8))):
        first = run_layer(x, w, bias, a, b, 0.75, 0.2, grad_y)
        again = run_layer(x, w, bias, a, b, 0.75, 0.2, grad_y)
    check_against_reference(first, x, w, bias, a, b, 0.75, 0.2, grad_y)
    assert all(torch.equal(t1, t2) for t1, t2 in zip(first, again))


def test_untuned_device_runs_split(tmp_path, monkeypatch, launches):
    """No forced plan and no table (an empty user cache, nothing shipped for a CPU): both the forward and
    dX plans are the default, split, and the fused GEMM is never launched."""
    monkeypatch.setenv("LORA_KERNELS_TUNING_DIR", str(tmp_path))
    tuning.clear_tables()
    try:
        x, w, bias, a, b, grad_y = problem(SHAPES[0], torch.float32, True)
        m, k, n, r = x.shape[0], x.shape[1], w.shape[0], a.shape[0]
        for op, dims in (("forward", (m, n, k)), ("dx", (m, k, n))):
            assert tuning.plan_for(op, x.device, x.dtype, *dims, r) == tuning.DEFAULT_PLAN == Plan("split")
        launches["fused"].fail = True
        outputs = run_layer(x, w, bias, a, b, 2.0, 0.0, grad_y)
        assert launches["expand"].launches == 2   # y and dX, each in place after torch's GEMM
        check_against_reference(outputs, x, w, bias, a, b, 2.0, 0.0, grad_y)
    finally:
        tuning.clear_tables()


def test_fused_candidates_cover_the_search_space():
    """The tuner's fused configs for one shape: the heuristic's first, a handful to a score, split-K only
    where the (M, N) tiles leave SMs idle, never a tile the AOT compiles found spilling (128x256)."""
    for op, m, n, k in (("forward", 16, 1024, 4096), ("forward", 128, 1024, 4096), ("forward", 4096, 4096, 4096),
                        ("dx", 32, 4096, 1024), ("dx", 4096, 4096, 14336)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            configs = triton_launch.fused_candidates(op, m, n, k, 16, dtype)
            fp32_dot = triton_launch.fp32_dot(dtype)
            assert configs[0] == triton_launch.fused_matmul_config(m, n, k, 16, fp32_dot)
            assert len(set(configs)) == len(configs) and 3 <= len(configs) <= 20, (op, m, dtype, configs)
            for c in configs:
                assert isinstance(c, MatmulConfig)
                if c.split_k > 1:
                    assert -(-m // c.block_m) * -(-n // c.block_n) < triton_launch.SMS, c
                assert c.block_m * c.block_n <= 128 * 128, c
    split = triton_launch.fused_candidates("forward", 128, 1024, 4096, 16, torch.bfloat16)
    assert {c.split_k for c in split} == {1, 2, 4, 8}, split
    prefill = triton_launch.fused_candidates("forward", 4096, 4096, 4096, 16, torch.bfloat16)
    assert all(c.split_k == 1 for c in prefill) and any(c.block_m * c.block_n == 128 * 128 for c in prefill), prefill


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_every_candidate_runs_and_matches(dtype):
    """Each config of the search space (at a few layer shapes) in the launcher's fused_matmul, with bias,
    the rank partials of two splits and the dX epilogue's dropout: out = x·w + bias + s · mask ⊙ (T·v)
    against float64, every config the tuner may pick."""
    configs = dict.fromkeys(c for op, m in (("forward", 16), ("forward", 128), ("dx", 4096), ("forward", 4096))
                            for c in triton_launch.fused_candidates(op, m, 1024, 4096, 16, dtype))
    m, k, n, r, p, scale = 37, 67, 11, 12, 0.3, 1.5
    gen = torch.Generator().manual_seed(2)
    x, w, bias = (torch.randn(*shape, generator=gen).to(DEVICE, dtype) for shape in ((m, k), (k, n), (n,)))
    t_partials = torch.randn(2, m, r, generator=gen).to(DEVICE)
    v = torch.randn(r, n, generator=gen).to(DEVICE, dtype)
    seed = torch.tensor(77, dtype=torch.int64, device=DEVICE)
    keep = keep_mask("triton", m, n, p, 77)

    def reference(cast, t_cast):
        return cast(x) @ cast(w) + cast(bias) + scale * (keep * (t_cast(t_partials.sum(0)) @ cast(v)) / (1 - p))

    expected64 = reference(torch.Tensor.double, torch.Tensor.double)
    baseline = reference(lambda t: t, lambda t: t.to(dtype))
    for config in configs:
        out, t_sum = triton_launch.fused_matmul(x, w, bias, t_partials, v, scale, True, p, seed, config=config)
        assert torch.equal(t_sum, t_partials[0] + t_partials[1]), config
        try:
            assert_close(out, expected64, baseline, "out")
        except AssertionError as exc:
            raise AssertionError(f"{config}: {exc}") from exc


def test_table_plan_that_cannot_launch_falls_back_to_split(monkeypatch, tmp_path):
    """A fused plan from the device's table whose kernel cannot run on this GPU (out of shared memory or
    registers: a table measured with another Triton, or edited by hand) warns once and serves split for
    that key from then on: the call still returns the right result. A forced plan raises instead."""
    from triton.runtime.errors import OutOfResources

    x = torch.randn(24, 40, device=DEVICE)
    w, bias, a, b = make_params(16, 40, 8, torch.float32, True, torch.Generator().manual_seed(3))
    key = tuning.plan_key("forward", torch.float32, 24, 16, 40, 8)
    table = {key: Plan("fused", MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16,
                                             group_m=8, num_warps=1, num_stages=1))}
    monkeypatch.setattr(tuning, "_tables", {torch.device(DEVICE): table})

    class NoLaunch:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    monkeypatch.setattr(triton_launch, "lora_fused_matmul_kernel", NoLaunch())
    expected = lora_linear_reference(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5)
    with pytest.warns(UserWarning, match="cannot launch"):
        y = lora_linear(x, w, bias, a, b, 0.5)
    assert_close(y, expected, lora_linear_reference(x, w, bias, a, b, 0.5), "y")
    assert table[key] == tuning.SPLIT
    with tuning.forced_plan(Plan("fused", MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16,
                                                       group_m=8, num_warps=1, num_stages=1))), \
            pytest.raises(OutOfResources):
        lora_linear(x, w, bias, a, b, 0.5)
