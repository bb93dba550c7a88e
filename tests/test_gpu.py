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
