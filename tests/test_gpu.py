"""CUDA only: the Triton backend on real-model shapes, bf16 included (the interpreter cannot run
bf16), against the float64 reference. Skipped without a GPU; the CPU grid runs everywhere."""

from __future__ import annotations

import pytest
import torch

import lora_kernels

from .helpers import DEVICE
from .test_lora_linear import check_against_reference, make_params, make_x

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (M, K, N, r): Llama-3-8B q/o, k/v, gate/up and down projections, SmolLM2; decode to prefill
SHAPES = [
    (1, 4096, 4096, 16),
    (16, 4096, 1024, 8),
    (77, 4096, 14336, 64),
    (1024, 14336, 4096, 16),
    (2048, 576, 1536, 128),
    (333, 4095, 130, 12),
    (64, 576, 576, 256),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_K{}_N{}_r{}".format(*s))
def test_triton_real_model_shapes(dtype, shape):
    lora_kernels.set_backend("triton")
    m, k, n, r = shape
    gen = torch.Generator().manual_seed(m + r)
    x = make_x(m, k, "3d", dtype, gen)
    w, bias, a, b = make_params(n, k, r, dtype, True, gen)
    check_against_reference(x, w, bias, a, b, 2.0)


def test_triton_dropout_bf16():
    lora_kernels.set_backend("triton")
    gen = torch.Generator().manual_seed(0)
    x = make_x(512, 1024, "2d", torch.bfloat16, gen)
    w, bias, a, b = make_params(2048, 1024, 16, torch.bfloat16, False, gen)
    torch.manual_seed(0)
    y1 = lora_kernels.lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.1)
    torch.manual_seed(0)
    y2 = lora_kernels.lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.1)
    assert torch.equal(y1, y2) and y1.device.type == "cuda" and torch.isfinite(y1).all()
    assert DEVICE.type == "cuda"


# (M, K, N, L, r_max, ranks or None, ids distribution): decode over many adapters, prefill over few
MULTI_CASES = [
    (64, 4096, 4096, 64, 16, None, "row_per_adapter"),
    (64, 4096, 1024, 8, 16, None, "random"),
    (1024, 4096, 14336, 4, 64, [64, 8, 16, 1], "zipf"),
    (777, 576, 1536, 8, 64, [8, 64, 12, 1, 16, 32, 0, 64], "base_mixed"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: "M{}_K{}_N{}_L{}_r{}_{}".format(*c[:5], c[6]))
def test_triton_multi_real_model_shapes(dtype, case):
    from .test_multi_lora_linear import check_against_reference as check_multi
    from .test_multi_lora_linear import ids_for, make_stacks

    lora_kernels.set_backend("triton")
    m, k, n, num_adapters, r_max, ranks, dist = case
    gen = torch.Generator().manual_seed(m + num_adapters)
    ids = ids_for(dist, m, num_adapters, gen).to(DEVICE)
    x = make_x(m, k, "3d", dtype, gen)
    w, bias, a, b, scales = make_stacks(num_adapters, n, k, r_max, dtype, True, gen, ranks)
    batch = lora_kernels.AdapterBatch(ids, num_adapters, ranks=ranks)
    check_multi(x, w, bias, a, b, scales, ids, adapters=batch, ranks=ranks)


def bf16_multi_inputs(m, k, n, num_adapters, r, gen):
    """weight (N, K), lora_a (L, r, K), lora_b (L, N, r) bf16, scales (L,) fp32, x (M, K) bf16, ids (M,)."""
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE, torch.bfloat16)
    a = (torch.randn(num_adapters, r, k, generator=gen) / k**0.5).to(DEVICE, torch.bfloat16)
    b = torch.randn(num_adapters, n, r, generator=gen).to(DEVICE, torch.bfloat16)
    scales = torch.rand(num_adapters, generator=gen).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    ids = torch.randint(-1, num_adapters, (m,), generator=gen).to(DEVICE)
    return w, a, b, scales, x, ids


def test_triton_multi_cuda_graph_capture_and_replay():
    """The AdapterBatch build and the op need no host sync (the id check is off during capture):
    a decode step captures in a CUDA graph, and replays with new ids and new inputs correctly."""
    lora_kernels.set_backend("triton")
    m, k, n, num_adapters, r = 64, 1024, 2048, 16, 16
    gen = torch.Generator().manual_seed(5)
    w, a, b, scales, x, ids = bf16_multi_inputs(m, k, n, num_adapters, r, gen)

    def step():
        batch = lora_kernels.AdapterBatch(ids, num_adapters)
        return lora_kernels.multi_lora_linear(x, w, None, a, b, scales, batch)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):   # warm up: compile the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        x.copy_(torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16))
        ids.copy_(torch.randint(-1, num_adapters, (m,), generator=g).to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, step()), f"replay {seed} differs from an eager run"


def test_triton_multi_bf16_bitwise_deterministic_and_row_order_free():
    lora_kernels.set_backend("triton")
    m, k, n, num_adapters, r = 512, 4096, 1024, 8, 16
    gen = torch.Generator().manual_seed(6)
    w, a, b, scales, x, ids = bf16_multi_inputs(m, k, n, num_adapters, r, gen)
    y1 = lora_kernels.multi_lora_linear(x, w, None, a, b, scales, ids)
    y2 = lora_kernels.multi_lora_linear(x, w, None, a, b, scales, ids)
    assert torch.equal(y1, y2)
    perm = torch.randperm(m, generator=gen).to(DEVICE)
    # the base GEMM (cuBLAS) may round a row differently at another position; compare the LoRA
    # term alone, which our kernels compute per row, through add_multi_lora_ on a zero base
    zeros = torch.zeros(m, n, device=DEVICE, dtype=torch.bfloat16)
    lora = lora_kernels.add_multi_lora_(zeros.clone(), x, a, b, scales, ids)
    lora_perm = lora_kernels.add_multi_lora_(zeros.clone(), x[perm], a, b, scales, ids[perm])
    assert torch.equal(lora[perm], lora_perm)
