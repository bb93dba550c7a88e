"""add_multi_lora_: the multi-adapter LoRA term added in place into an existing base output.

The serving pattern: one fused GEMM computes q, k and v for every row, then each projection's
LoRA term goes into its column slice of that output, without a copy. Both backends, against the
per-row float64 reference; rows of no adapter must keep their bits.
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels.ops.multi_lora_linear import add_multi_lora_op

from ..helpers import DEVICE, skip_unless_backend_serves
from ..tolerance import assert_close

K, N, L, R = 40, 24, 4, 12


def make_case(m: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g)
    w_qkv = torch.randn(3 * N, K, generator=g) / K**0.5
    a = torch.randn(L, R, K, generator=g) / K**0.5
    b = torch.randn(L, N, R, generator=g) / R**0.5
    scales = torch.tensor([0.5, 2.0, -1.0, 1.5])
    ids = torch.randint(-1, L, (m,), generator=g)
    ranks = torch.tensor([12, 1, 8, 5], dtype=torch.int32)
    cast = [t.to(DEVICE, dtype) for t in (x, w_qkv, a, b)]
    return (*cast, scales.to(DEVICE), ids.to(DEVICE), ranks.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["qkv_slice", "transposed", "contiguous"])
def test_add_into_strided_output(backend, dtype, layout):
    skip_unless_backend_serves(backend, dtype)
    m = 37
    x, w_qkv, a, b, scales, ids, ranks = make_case(m, dtype)
    qkv = x @ w_qkv.T                                                  # (M, 3N)
    if layout == "qkv_slice":
        out = qkv[:, N:2 * N]                                          # k's columns: strides (3N, 1)
    elif layout == "transposed":
        out = (x @ w_qkv[N:2 * N].T).T.contiguous().T                  # (M, N) with strides (1, M)
    else:
        out = (x @ w_qkv[N:2 * N].T).contiguous()
    base = out.clone()
    before_ptr = out.data_ptr()
    batch = lora_kernels.AdapterBatch(ids, L, ranks=ranks)
    with torch.no_grad():
        returned = lora_kernels.add_multi_lora_(out, x, a, b, scales, batch)
    assert returned is out and out.data_ptr() == before_ptr
    if layout == "qkv_slice":   # the other projections' columns are untouched
        assert torch.equal(qkv[:, :N], (x @ w_qkv.T)[:, :N]) and torch.equal(qkv[:, 2 * N:], (x @ w_qkv.T)[:, 2 * N:])
    none = ids < 0
    assert torch.equal(out[none], base[none])
    zero_w = torch.zeros(N, K, dtype=torch.float64, device=DEVICE)
    lora64 = lora_kernels.reference.multi_lora_linear_reference(
        x.double(), zero_w, None, a.double(), b.double(), scales.double(), ids, ranks)
    lora_plain = lora_kernels.reference.multi_lora_linear_reference(x, zero_w.to(dtype), None, a, b, scales, ids, ranks)
    assert_close(out, base.double() + lora64, base + lora_plain, f"add_multi_lora_ {layout}")


def test_matches_multi_lora_linear(backend):
    skip_unless_backend_serves(backend, torch.float32)
    x, w_qkv, a, b, scales, ids, _ = make_case(50, torch.float32, seed=1)
    w = w_qkv[:N]
    out = torch.nn.functional.linear(x, w)
    lora_kernels.add_multi_lora_(out, x, a, b, scales, ids)
    assert torch.equal(out, lora_kernels.multi_lora_linear(x, w, None, a, b, scales, ids))


def test_3d_input_and_output(backend):
    skip_unless_backend_serves(backend, torch.float32)
    x, w_qkv, a, b, scales, ids, _ = make_case(24, torch.float32, seed=2)
    x3, out3 = x.reshape(2, 12, K), (x @ w_qkv[:N].T).reshape(2, 12, N)
    expected = lora_kernels.multi_lora_linear(x, w_qkv[:N], None, a, b, scales, ids).reshape(2, 12, N)
    lora_kernels.add_multi_lora_(out3, x3, a, b, scales, ids)
    assert torch.equal(out3, expected)


def test_refuses_autograd_and_unviewable_outputs():
    x, w_qkv, a, b, scales, ids, _ = make_case(8, torch.float32)
    out = x @ w_qkv[:N].T
    with pytest.raises(ValueError, match="inference-only"):
        lora_kernels.add_multi_lora_(out, x, a.requires_grad_(), b, scales, ids)
    a.requires_grad_(False)
    with pytest.raises(ValueError, match="leading dims of x"):
        lora_kernels.add_multi_lora_(out[:4], x, a, b, scales, ids)
    wide = torch.zeros(2, 4 * 2, N).transpose(0, 1)[:, :, :]          # (8, 2, N): rows not one stride
    with pytest.raises(ValueError, match="cannot be viewed"):
        lora_kernels.add_multi_lora_(wide, x.reshape(4, 2, K).transpose(0, 1).reshape(8, 1, K).expand(8, 2, K),
                                     a, b, scales, torch.cat([ids, ids]))
    with pytest.raises(ValueError, match="lora_b"):
        lora_kernels.add_multi_lora_(out[:, :N - 1], x, a, b, scales, ids)


def test_opcheck():
    lora_kernels.set_backend("torch")
    x, w_qkv, a, b, scales, ids, ranks = make_case(9, torch.float32)
    batch = lora_kernels.AdapterBatch(ids, L, ranks=ranks)
    out = x @ w_qkv[:N].T
    torch.library.opcheck(add_multi_lora_op, (out, x, a, b, scales, *batch.tensors()))
