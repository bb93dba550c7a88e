"""LoRA dropout: the mask derives from a seed drawn from torch's generator and is regenerated in
backward (never stored). Checked per backend: mask statistics, forward and every gradient against
the float64 reference with that same mask, reproducibility from torch.manual_seed, and activation
checkpointing (which re-runs forward under the restored RNG state)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lora_kernels import fallback, lora_linear, lora_linear_reference
from lora_kernels.ops.lora_linear import SEED_BOUND

from .helpers import DEVICE, skip_unless_backend_serves
from .test_lora_linear import make_params, make_x
from .tolerance import assert_close


def keep_mask(backend: str, m: int, k: int, p: float, seed: int) -> torch.Tensor:
    """The (M, K) keep-mask `backend` derives from `seed`."""
    if backend == "triton":
        from lora_kernels.triton.lora_linear import dropout_keep_mask
    else:
        dropout_keep_mask = fallback.dropout_keep_mask
    return dropout_keep_mask(m, k, p, seed, DEVICE)


def next_seed(torch_seed: int) -> int:
    """The dropout seed lora_linear will draw right after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(SEED_BOUND, (), dtype=torch.int64))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_statistics(backend, p):
    skip_unless_backend_serves(backend, torch.float32)
    m, k = 96, 256
    keep = keep_mask(backend, m, k, p, seed=1234).float()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # rows and columns are not degenerate copies of each other
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    other = keep_mask(backend, m, k, p, seed=1235).float()
    assert (keep != other).float().mean().item() > 0.5 * 2 * p * (1 - p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(37, 50, 24, 12), (1, 130, 11, 1), (200, 17, 64, 16)],
                         ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_forward_and_backward_use_the_same_mask(backend, dtype, shape):
    skip_unless_backend_serves(backend, dtype)
    m, k, n, r = shape
    p, scale = 0.3, 1.5
    gen = torch.Generator().manual_seed(m)
    x = make_x(m, k, "2d", dtype, gen).requires_grad_(True)
    w, bias, a, b = make_params(n, k, r, dtype, True, gen)
    a.requires_grad_(True)
    b.requires_grad_(True)

    seed = next_seed(99)
    torch.manual_seed(99)
    y = lora_linear(x, w, bias, a, b, scale, dropout_p=p)
    grad_y = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, [x, a, b], grad_y)

    keep = keep_mask(backend, m, k, p, seed)

    def reference(cast):
        leaves = [cast(t).detach().requires_grad_(True) for t in (x, a, b)]
        out = lora_linear_reference(leaves[0], cast(w), cast(bias), leaves[1], leaves[2], scale,
                                    dropout_mask=keep, dropout_p=p)
        return out, torch.autograd.grad(out, leaves, cast(grad_y))

    y64, grads64 = reference(lambda t: t.double())
    y_base, grads_base = reference(lambda t: t)
    assert_close(y, y64, y_base, "y")
    for name, g, g64, g_base in zip(["dx", "dA", "dB"], grads, grads64, grads_base):
        assert_close(g, g64, g_base, name)


def test_same_torch_seed_same_result(backend):
    skip_unless_backend_serves(backend, torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = make_x(16, 64, "2d", torch.float32, gen)
    w, bias, a, b = make_params(32, 64, 8, torch.float32, False, gen)
    outputs = []
    for torch_seed in (5, 5, 6):
        torch.manual_seed(torch_seed)
        outputs.append(lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.5))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    no_dropout = lora_linear(x, w, bias, a, b, 2.0)
    assert not torch.equal(outputs[0], no_dropout)


def test_activation_checkpointing(backend):
    """checkpoint() recomputes forward in backward under the restored RNG state: the recomputed
    mask must equal the first one, so gradients equal those without checkpointing."""
    skip_unless_backend_serves(backend, torch.float32)
    gen = torch.Generator().manual_seed(4)
    x0 = make_x(24, 40, "2d", torch.float32, gen)
    w, bias, a0, b0 = make_params(30, 40, 8, torch.float32, True, gen)

    def grads(use_checkpoint: bool):
        x, a, b = (t.detach().clone().requires_grad_(True) for t in (x0, a0, b0))

        def layer(x_in):
            return lora_linear(x_in, w, bias, a, b, 0.5, dropout_p=0.4).square()

        torch.manual_seed(11)
        y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        return torch.autograd.grad(y.sum(), [x, a, b])

    for plain, checkpointed in zip(grads(False), grads(True)):
        assert torch.equal(plain, checkpointed)


def test_dropout_leaves_base_path_untouched(backend):
    """Dropout acts on the LoRA branch only: with B = 0 the output is the base layer, exactly."""
    skip_unless_backend_serves(backend, torch.float32)
    gen = torch.Generator().manual_seed(5)
    x = make_x(10, 20, "2d", torch.float32, gen)
    w, bias, a, b = make_params(12, 20, 4, torch.float32, True, gen)
    y = lora_linear(x, w, bias, a, torch.zeros_like(b), 1.0, dropout_p=0.5)
    y_off = lora_linear(x, w, bias, a, torch.zeros_like(b), 1.0)
    assert torch.equal(y, y_off)
