"""LoRA dropout: the mask derives from a seed drawn from torch's generator and is regenerated in
backward (never stored). Checked per backend: mask statistics, forward and every gradient against
the float64 reference with that same mask, reproducibility from torch.manual_seed, and activation
checkpointing (which re-runs forward under the restored RNG state). The seed is a tensor the
kernels read when they run (on the GPU: drawn there, no host sync, a new one at each CUDA-graph
replay): checked under the interpreter, and on a GPU under torch.cuda.graph, make_graphed_callables,
torch.compile(mode="reduce-overhead") and the sync debug mode."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import lora_kernels
from lora_kernels import _extension, fallback, lora_linear
from lora_kernels.reference import lora_linear_reference
from lora_kernels.ops import lora_linear as ops_lora_linear

from .helpers import DEVICE, skip_unless_backend_serves
from .test_lora_linear import make_params, make_x
from .tolerance import assert_close

def backend_module(backend: str):
    if backend == "triton":
        from lora_kernels.triton import lora_linear as triton_lora_linear

        return triton_lora_linear
    return fallback


def seed_tensor(backend: str, seed: int) -> torch.Tensor:
    """`seed` as the 0-d int64 tensor lora_linear hands `backend` on DEVICE (where it draws it)."""
    return torch.tensor(seed, dtype=torch.int64, device=DEVICE)


def keep_mask(backend: str, m: int, k: int, p: float, seed: int) -> torch.Tensor:
    """The (M, K) keep-mask `backend` derives from `seed`."""
    return backend_module(backend).dropout_keep_mask(m, k, p, seed_tensor(backend, seed), DEVICE)


def next_seed(torch_seed: int, dtype: torch.dtype = torch.float32) -> int:
    """The dropout seed lora_linear will draw on DEVICE for `dtype` inputs, with the backend now set,
    right after torch.manual_seed(torch_seed): from the CUDA generator for the Triton kernels on a GPU,
    else from the CPU's."""
    torch.manual_seed(torch_seed)
    return int(ops_lora_linear._dropout_seed(0.5, torch.empty(0, device=DEVICE, dtype=dtype)))


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

    seed = next_seed(99, dtype)
    torch.manual_seed(99)
    y = lora_linear(x, w, bias, a, b, scale, dropout_p=p)
    grad_y = torch.randn(y.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, [x, a, b], grad_y)
    check_with_mask((y, *grads), keep_mask(backend, m, k, p, seed), (x, w, bias, a, b), scale, p, grad_y)


def check_with_mask(outputs, keep, inputs, scale, p, grad_y):
    """outputs (y, dx, dA, dB) of lora_linear on inputs (x, w, bias, a, b) against the float64
    reference with the keep-mask `keep`, the baseline being plain torch in the inputs' dtype."""
    x, w, bias, a, b = inputs

    def reference(cast):
        leaves = [cast(t).detach().requires_grad_(True) for t in (x, a, b)]
        out = lora_linear_reference(leaves[0], cast(w), cast(bias), leaves[1], leaves[2], scale,
                                    dropout_mask=keep, dropout_p=p)
        return (out, *torch.autograd.grad(out, leaves, cast(grad_y)))

    for name, t, t64, t_base in zip(["y", "dx", "dA", "dB"], outputs, reference(lambda t: t.double()),
                                    reference(lambda t: t)):
        assert_close(t, t64, t_base, name)


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


# (kept entries, Σ keep · weight) of the (33, 70) keep-mask at p = 0.3: the same seed value must give
# the same mask bit for bit, and the torch backend's mask is still torch's CPU generator's (values
# computed while the seed was still an int argument). Triton's: since all four Philox outputs of a
# call are used (test_triton_mask_is_its_philox_definition).
MASK_FINGERPRINTS = {
    ("torch", 1234): (1657, 811987984), ("torch", 2**31 - 2): (1641, 806051277),
    ("triton", 1234): (1626, 798130698), ("triton", 2**31 - 2): (1589, 786892184),
}


@pytest.mark.parametrize("seed", [1234, 2**31 - 2])
def test_mask_of_a_seed_value_unchanged(backend, seed):
    skip_unless_backend_serves(backend, torch.float32)
    m, k = 33, 70
    weight = (torch.arange(m * k, dtype=torch.int64).reshape(m, k) * 7919) % 1000003
    keep = keep_mask(backend, m, k, 0.3, seed).cpu()
    assert (int(keep.sum()), int((keep * weight).sum())) == MASK_FINGERPRINTS[backend, seed]


def philox_keep_mask(m: int, k: int, p: float, seed: int) -> torch.Tensor:
    """The Triton kernels' keep-mask by its definition, in numpy: element (m, k) is kept iff
    uniform(output k % 4 of Philox4x32-10(key = seed's low and high words; counter (k // 4, m, 0, 0)))
    >= p, uniform(u) = (u as int32, ~u when negative) x 4.6566127342e-10 in fp32 (Triton's
    tl.philox and tl.uint_to_uniform_float)."""
    np = pytest.importorskip("numpy")
    low = np.uint64(0xFFFFFFFF)
    rows, groups = np.meshgrid(np.arange(m, dtype=np.uint64), np.arange(-(-k // 4), dtype=np.uint64), indexing="ij")
    c0, c1, c2, c3 = groups, rows, np.zeros_like(rows), np.zeros_like(rows)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_a, prod_b = round_a * c0, round_b * c2            # 32 x 32 bits: exact in uint64
        c0, c2 = (prod_b >> np.uint64(32)) ^ c1 ^ k0, (prod_a >> np.uint64(32)) ^ c3 ^ k1
        c1, c3 = prod_b & low, prod_a & low
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & low, (k1 + np.uint64(0xBB67AE85)) & low
    bits = np.stack([c0, c1, c2, c3], axis=-1).reshape(m, -1)[:, :k].astype(np.uint32).view(np.int32)
    uniform = np.where(bits < 0, ~bits, bits).astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(uniform >= np.float32(p))


@pytest.mark.parametrize("seed", [1234, 2**31 - 2, 2**40 + 77])
def test_triton_mask_is_its_philox_definition(seed):
    """All four outputs of one Philox call serve four adjacent columns: the mask of the kernels is
    philox_keep_mask's, bit for bit (the seed's high word is the key's second half)."""
    skip_unless_backend_serves("triton", torch.float32)
    m, k, p = 37, 150, 0.3
    keep = keep_mask("triton", m, k, p, seed).cpu()
    assert torch.equal(keep, philox_keep_mask(m, k, p, seed))


def test_backends_read_the_seed_tensor_when_they_run(backend):
    """A captured CUDA graph replays the launches with the same seed tensor, which each replay refills
    on the device: the mask must follow the tensor's value at run time (a new value, a new mask; the
    old value back, the old output back bit for bit), in forward and backward alike."""
    skip_unless_backend_serves(backend, torch.float32)
    m, k, n, r, p, scale = 20, 48, 24, 4, 0.5, 1.5
    gen = torch.Generator().manual_seed(8)
    x = make_x(m, k, "2d", torch.float32, gen)
    w, bias, a, b = make_params(n, k, r, torch.float32, True, gen)
    grad_y = torch.randn(m, n, generator=gen).to(DEVICE)
    ops = backend_module(backend)

    def run(seed):
        y, hidden = ops.lora_linear_forward(x, w, bias, a, b, scale, p, seed)
        return (y, *ops.lora_linear_backward(grad_y, x, w, a, b, hidden, scale, p, seed, True, True, True))

    seed = seed_tensor(backend, 1234)
    first = run(seed)
    seed.fill_(4321)
    refilled = run(seed)
    seed.fill_(1234)
    restored = run(seed)
    fresh = run(seed_tensor(backend, 4321))
    for name, t1, t2, t3, t4 in zip(["y", "dx", "dA", "dB"], first, refilled, restored, fresh):
        assert not torch.equal(t1, t2), f"{name}: a new seed value left the mask unchanged"
        assert torch.equal(t2, t4), f"{name}: the refilled seed tensor did not act as a fresh one"
        assert torch.equal(t1, t3), f"{name}: the restored seed did not give the first output back"


def test_seed_drawn_on_the_inputs_device():
    """The seed lives on x's device whatever the backend: on a GPU, CUDA's generator draws it (the
    Triton kernels read it there: no host sync, a new seed at each graph replay); on the CPU, the CPU
    generator, as always. No GPU needed: a meta tensor stands in for a CUDA one."""
    for device in ("cpu", "meta"):
        x = torch.empty(3, 8, device=device)
        for backend in ("torch", "triton"):
            with lora_kernels.use_backend(backend):
                seed = ops_lora_linear._dropout_seed(0.5, x)
                assert (seed.shape, seed.dtype, seed.device) == ((), torch.int64, x.device), (device, backend)
                assert ops_lora_linear._dropout_seed(0.0, x) is None


def test_compiled_call_draws_the_seed_eager_draws(backend):
    """torch.compile(fullgraph=True) with dropout: where the seed lives is decided at trace time (dynamo
    cannot read use_backend's ContextVar), with no graph break; the compiled call draws what an eager one
    draws after the same torch.manual_seed, and a new seed at every call."""
    skip_unless_backend_serves(backend, torch.float32)
    gen = torch.Generator().manual_seed(10)
    x = make_x(6, 16, "2d", torch.float32, gen)
    w, bias, a, b = make_params(8, 16, 4, torch.float32, True, gen)

    def layer(x_in):
        return lora_linear(x_in, w, bias, a, b, 0.5, dropout_p=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    assert torch.equal(y, layer(x))
    assert not torch.equal(compiled(x), y), "two compiled calls drew the same dropout mask"
    torch._dynamo.reset()


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (int(t), t.item(): a sync when t is on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_triton_path_never_reads_the_seed_on_the_host(backend):
    """A dropout forward and backward on the Triton backend reads no tensor on the host (on a GPU that
    would be a sync per layer and break CUDA-graph capture); the torch backend reads int(seed), which
    shows the count works (its Python kernel: the C++ one reads it inside the op, out of the mode's sight)."""
    skip_unless_backend_serves(backend, torch.float32)
    gen = torch.Generator().manual_seed(9)
    x = make_x(12, 32, "2d", torch.float32, gen).requires_grad_(True)
    w, bias, a, b = make_params(16, 32, 4, torch.float32, True, gen)
    a.requires_grad_(True)
    b.requires_grad_(True)
    with HostReads() as reads, _extension.python_eager_calls():
        y = lora_linear(x, w, bias, a, b, 2.0, dropout_p=0.5)
        torch.autograd.grad(y.square().sum(), (x, a, b))
    assert (reads.count == 0) == (backend == "triton"), f"{reads.count} host reads on the {backend} backend"


# ---- on a GPU: CUDA graphs replay new masks, and nothing syncs ---------------------------------------

def graph_case(m=64, k=256, n=192, r=16):
    """(x, w, bias, a, b, grad_y) fp32 on DEVICE, x, a and b requiring grad."""
    gen = torch.Generator().manual_seed(7)
    x = make_x(m, k, "2d", torch.float32, gen).requires_grad_(True)
    w, bias, a, b = make_params(n, k, r, torch.float32, True, gen)
    grad_y = torch.randn(m, n, generator=gen).to(DEVICE)
    return x, w, bias, a.requires_grad_(True), b.requires_grad_(True), grad_y


def lora_layer(dropout_p: float) -> torch.nn.Module:
    """A LoRALinear (256 -> 192, r = 16) on the GPU in training mode, B nonzero (PEFT's init zeroes it,
    which would hide the LoRA branch and its mask)."""
    torch.manual_seed(0)
    layer = lora_kernels.LoRALinear.from_linear(torch.nn.Linear(256, 192, device=DEVICE), r=16, lora_alpha=32,
                                                lora_dropout=dropout_p)
    torch.nn.init.normal_(layer.lora_B.weight)
    return layer.train()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replays_draw_new_masks(monkeypatch):
    """torch.cuda.graph of a forward and backward with dropout: each replay draws a new seed on the
    device, and within a replay y and every gradient match the float64 reference with the mask the
    kernels regenerate from that replay's seed (read back after the replay)."""
    lora_kernels.set_backend("triton")
    x, w, bias, a, b, grad_y = graph_case()
    p, scale = 0.3, 1.5
    seeds = []
    draw = ops_lora_linear._dropout_seed

    def recording_draw(dropout_p, x2d):
        seeds.append(draw(dropout_p, x2d))
        return seeds[-1]

    monkeypatch.setattr(ops_lora_linear, "_dropout_seed", recording_draw)

    def step():
        y = lora_linear(x, w, bias, a, b, scale, dropout_p=p)
        return (y, *torch.autograd.grad(y, (x, a, b), grad_y))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):   # warm up: compile the kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    seed = seeds[-1]          # the captured draw: refilled on the device by each replay
    assert seed.device.type == "cuda"
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append([t.clone() for t in outputs])
        keep = keep_mask("triton", x.shape[0], x.shape[1], p, int(seed))
        check_with_mask(outputs, keep, (x, w, bias, a, b), scale, p, grad_y)
    for name, first, second in zip(["y", "dx", "dA", "dB"], *replays):
        assert not torch.equal(first, second), f"{name}: two replays used one dropout mask"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_make_graphed_callables_draws_new_masks():
    lora_kernels.set_backend("triton")
    layer = lora_layer(0.5)
    x = torch.randn(64, 256, device=DEVICE, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    runs = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        y = graphed(x)
        y.square().sum().backward()
        runs.append((y.detach().clone(), layer.lora_A.weight.grad.clone()))
    (y1, grad_a1), (y2, grad_a2) = runs
    assert torch.isfinite(y1).all() and torch.isfinite(grad_a1).all()
    assert not torch.equal(y1, y2), "two replays of the graphed forward used one dropout mask"
    assert not torch.equal(grad_a1, grad_a2), "two replays of the graphed backward used one dropout mask"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_compile_reduce_overhead_runs_as_cuda_graphs(dropout_p):
    """torch.compile(mode="reduce-overhead"): no CPU tensor in the graph (the seed is drawn inside it on
    the GPU, and is None without dropout), so Inductor does not skip CUDA graphs; with dropout every call
    draws a new mask, without it every call gives the eager output."""
    from torch._dynamo.utils import counters

    lora_kernels.set_backend("triton")
    torch._dynamo.reset()
    counters.clear()
    layer = lora_layer(dropout_p)
    compiled = torch.compile(layer, mode="reduce-overhead")
    x = torch.randn(16, 256, device=DEVICE)
    outputs = []
    with torch.no_grad():
        for _ in range(4):   # warm-up, recording, then replays
            torch.compiler.cudagraph_mark_step_begin()
            outputs.append(compiled(x).clone())
        eager = layer(x)
    torch._dynamo.reset()
    assert counters["inductor"]["cudagraph_skips"] == 0, "Inductor skipped CUDA graphs"
    for i in range(len(outputs)):
        if dropout_p == 0.0:
            torch.testing.assert_close(outputs[i], eager)
        else:
            for j in range(i):
                assert not torch.equal(outputs[i], outputs[j]), f"calls {j} and {i} used one dropout mask"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropout_forward_and_backward_never_sync():
    lora_kernels.set_backend("triton")
    x, w, bias, a, b, grad_y = graph_case()

    def step():
        y = lora_linear(x, w, bias, a, b, 1.5, dropout_p=0.3)
        return torch.autograd.grad(y, (x, a, b), grad_y)

    step()   # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
