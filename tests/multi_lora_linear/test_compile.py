"""multi_lora_linear under torch.compile, torch.library.opcheck and the profiler.

The ops ``lora_kernels::multi_lora_linear`` / ``lora_kernels::multi_lora_linear_backward`` must be
traced as single nodes with no graph break, whether the AdapterBatch is built outside the compiled
region (the serving pattern: once per batch) or inside it from raw ids; their fake impls must agree
with the real ones (opcheck). Torch backend, tiny shapes.
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels.ops.multi_lora_linear import multi_lora_linear_backward_op, multi_lora_linear_op

M, K, N, L, R = 9, 16, 12, 3, 4
IDS = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 1])
RANKS = torch.tensor([4, 2, 3], dtype=torch.int32)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    lora_kernels.set_backend("torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w, bias = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    a = torch.randn(L, R, K, generator=g).requires_grad_()
    b = torch.randn(L, N, R, generator=g).requires_grad_()
    scales = torch.rand(L, generator=g)
    return x, w, bias, a, b, scales


def op_args(batch, need_hidden=True):
    x, w, bias, a, b, scales = make_inputs()
    return (x, w, bias, a, b, scales, *batch.tensors(), need_hidden)


@pytest.mark.parametrize("ranks", [None, RANKS], ids=["full_rank", "true_ranks"])
@pytest.mark.parametrize("segments", [False, True], ids=["from_ids", "from_segments"])
def test_opcheck_forward(ranks, segments):
    if segments:
        batch = lora_kernels.AdapterBatch.from_segments(torch.tensor([0, 3, 4, 9]), torch.tensor([2, -1, 0]), L,
                                                         ranks=ranks)
    else:
        batch = lora_kernels.AdapterBatch(IDS, L, ranks=ranks)
    torch.library.opcheck(multi_lora_linear_op, op_args(batch))


def test_opcheck_backward():
    batch = lora_kernels.AdapterBatch(IDS, L, ranks=RANKS)
    x, w, bias, a, b, scales = (t.detach() for t in make_inputs())
    hidden = torch.randn(M, R)
    grad_y = torch.randn(M, N)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        torch.library.opcheck(multi_lora_linear_backward_op, (
            grad_y, x, w, a, b, hidden, scales, *batch.tensors(), *need, "torch"))


@pytest.mark.parametrize("prebuilt", [True, False], ids=["prebuilt_batch", "ids_in_graph"])
def test_fullgraph_forward_and_backward_match_eager(prebuilt):
    x, w, bias, a, b, scales = make_inputs()
    batch = lora_kernels.AdapterBatch(IDS, L)

    def layer(x, a, b, ids):
        return lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, batch if prebuilt else ids)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, a, b, IDS)
    grads = torch.autograd.grad(y.square().sum(), (x, a, b))
    y_eager = layer(x, a, b, IDS)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (x, a, b))
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inductor_inference():
    x, w, bias, a, b, scales = (t.detach() for t in make_inputs())
    batch = lora_kernels.AdapterBatch(IDS, L, ranks=RANKS)
    compiled = torch.compile(lambda x: lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, batch),
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, batch))


def test_profiler_names_the_ops():
    x, w, bias, a, b, scales = make_inputs()
    with torch.profiler.profile() as prof:
        y = lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, IDS)
        y.sum().backward()
    names = {event.name for event in prof.events()}
    assert "lora_kernels::multi_lora_linear" in names
    assert "lora_kernels::multi_lora_linear_backward" in names
