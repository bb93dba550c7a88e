"""lora_linear under torch.compile, torch.library.opcheck and the profiler.

The ops are registered as ``lora_kernels::lora_linear`` / ``lora_kernels::lora_linear_backward``:
dynamo must trace them as single nodes (no graph break, no decomposition), their fake impls must
agree with the real ones (opcheck), and the profiler must name them. CPU, torch backend unless
stated; shapes tiny so the whole file stays well inside a 2-core CI budget.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import lora_kernels
from .helpers import skip_unless_backend_serves
from .tolerance import assert_close

REPO_ROOT = Path(__file__).resolve().parents[1]
K, N, R = 16, 12, 4
LORA_OP = torch.ops.lora_kernels.lora_linear.default
LORA_BACKWARD_OP = torch.ops.lora_kernels.lora_linear_backward.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def torch_backend():
    lora_kernels.set_backend("torch")


class TinyLoRA(nn.Module):
    """Frozen base layer + trainable adapter; forward is lora_kernels.lora_linear only."""

    def __init__(self, bias: bool = True, dropout_p: float = 0.0, scale: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(N, K, generator=g) / K**0.5, requires_grad=False)
        self.bias = nn.Parameter(torch.randn(N, generator=g), requires_grad=False) if bias else None
        self.lora_a = nn.Parameter(torch.randn(R, K, generator=g) / K**0.5)
        self.lora_b = nn.Parameter(torch.randn(N, R, generator=g))   # non-zero: every gradient is exercised
        self.scale = scale
        self.dropout_p = dropout_p

    def forward(self, x):
        return lora_kernels.lora_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.scale,
                                        dropout_p=self.dropout_p)


def _compiled_versions(fn) -> int:
    """How many compiled versions dynamo holds for fn's code: 1 + the number of recompiles.
    (Counting backend calls would also count dynamo's internal analysis restarts.)"""
    return len(_debug_get_cache_entry_list(fn.__code__))


def _forward_backward(fn, module: TinyLoRA, x: torch.Tensor):
    """y and the gradients of (x, lora_a, lora_b) for a fixed upstream gradient."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    grad_out = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    y.backward(grad_out)
    return y.detach(), x.grad, module.lora_a.grad.clone(), module.lora_b.grad.clone()


def _assert_matches_eager(compiled, module, x):
    expected = _forward_backward(module, module, x)
    actual = _forward_backward(compiled, module, x)
    for name, a, e in zip(("y", "grad_x", "grad_lora_a", "grad_lora_b"), actual, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")
    ref = lora_kernels.reference.lora_linear_reference(x.double(), module.weight.double(), module.bias.double(),
                                                       module.lora_a.double(), module.lora_b.double(), module.scale)
    baseline = lora_kernels.reference.lora_linear_reference(x, module.weight, module.bias, module.lora_a, module.lora_b,
                                                            module.scale)
    assert_close(actual[0], ref, baseline.detach(), "y")


# ---------------------------------------------------------------------------------------------
# (a) torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(torch_backend, compile_backend):
    module = TinyLoRA()
    compiled = torch.compile(module, backend=compile_backend, fullgraph=True)
    _assert_matches_eager(compiled, module, torch.randn(5, K))
    _assert_matches_eager(compiled, module, torch.randn(5, K))     # the second call reuses the graph
    assert _compiled_versions(TinyLoRA.forward) == 1


def test_compile_no_graph_break_explain(torch_backend):
    explanation = torch._dynamo.explain(TinyLoRA())(torch.randn(5, K))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_graphs_hold_the_registered_ops(torch_backend):
    """Dynamo sees lora_kernels::lora_linear as one node (not traced through into aten), and the
    AOT backward graph calls lora_kernels::lora_linear_backward."""
    forward_targets, backward_targets = set(), set()

    def fw_compiler(gm, _inputs):
        forward_targets.update(node.target for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    def bw_compiler(gm, _inputs):
        backward_targets.update(node.target for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    module = TinyLoRA()
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler),
                             fullgraph=True)
    _assert_matches_eager(compiled, module, torch.randn(5, K))
    assert LORA_OP in forward_targets, sorted(map(str, forward_targets))
    assert LORA_BACKWARD_OP in backward_targets, sorted(map(str, backward_targets))
    assert torch.ops.aten.mm.default not in forward_targets, "the op was decomposed into aten GEMMs"


@pytest.mark.parametrize("dynamic", [True, None])
def test_compile_dynamic_shapes(torch_backend, dynamic):
    """Two different M (and a 3-D x) through one compiled module; dynamic=None is automatic
    dynamic: one recompile at most, then a symbolic M."""
    module = TinyLoRA()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for shape in [(5, K), (9, K), (13, K)]:
        _assert_matches_eager(compiled, module, torch.randn(shape))
    versions = _compiled_versions(TinyLoRA.forward)
    assert versions <= (1 if dynamic else 2), f"{versions} compiled versions for 3 values of M"
    _assert_matches_eager(compiled, module, torch.randn(2, 3, K))


def test_compile_first_call_in_fresh_process_no_recompile():
    """In a fresh process whose first lora_linear call is compiled (dynamic=True), a second M must
    not recompile: nothing lazily initialised by the first call may invalidate the first graph."""
    code = textwrap.dedent(f"""
        import torch, lora_kernels
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        lora_kernels.set_backend("torch")
        weight, lora_a, lora_b = torch.randn({N}, {K}), torch.randn({R}, {K}), torch.randn({N}, {R})

        def fn(x):
            return lora_kernels.lora_linear(x, weight, None, lora_a, lora_b, 0.5)

        compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)
        for m in (5, 9):
            x = torch.randn(m, {K})
            torch.testing.assert_close(compiled(x), fn(x))
        versions = len(_debug_get_cache_entry_list(fn.__code__))
        assert versions == 1, f"{{versions}} compiled versions for 2 values of M with dynamic=True"
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "TORCH_LOGS": "recompiles"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_compile_without_bias(torch_backend):
    module = TinyLoRA(bias=False)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, K)
    expected = _forward_backward(module, module, x)
    actual = _forward_backward(compiled, module, x)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_compile_scale_changes_are_honoured(torch_backend):
    """A changed python-float scale must change the compiled result (no stale constant)."""
    module = TinyLoRA()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, K)
    for scale in (0.5, 2.0, 3.0):
        module.scale = scale
        torch.testing.assert_close(compiled(x), module(x))


def test_compile_scale_as_0d_tensor(torch_backend):
    """A 0-d tensor scale is read on the host (documented); not fullgraph, but it must be right."""
    module = TinyLoRA()
    compiled = torch.compile(module, backend="aot_eager")
    x = torch.randn(5, K)
    for value in (0.5, 2.0):
        module.scale = torch.tensor(value)
        torch.testing.assert_close(compiled(x), module(x))


def test_compile_triton_interpreted(backend):
    """The same fullgraph compile with each kernel backend (Triton runs interpreted on CPU)."""
    skip_unless_backend_serves(backend, torch.float32)
    module = TinyLoRA()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    _assert_matches_eager(compiled, module, torch.randn(5, K))


# ---------------------------------------------------------------------------------------------
# (b) opcheck
# ---------------------------------------------------------------------------------------------

def _op_inputs(bias: bool, requires_grad: bool = True, m: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, K, generator=g).requires_grad_(requires_grad)
    weight = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    lora_a = torch.randn(R, K, generator=g).requires_grad_(requires_grad)
    lora_b = torch.randn(N, R, generator=g).requires_grad_(requires_grad)
    return x, weight, b, lora_a, lora_b


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_opcheck_lora_linear(backend, bias, dropout_p):
    skip_unless_backend_serves(backend, torch.float32)
    x, weight, b, lora_a, lora_b = _op_inputs(bias)
    seed = torch.zeros((), dtype=torch.int64) if dropout_p == 0.0 else torch.tensor(1234, dtype=torch.int64)
    torch.library.opcheck(LORA_OP, (x, weight, b, lora_a, lora_b, 0.5, dropout_p, seed))


def test_opcheck_lora_linear_weight_requires_grad(torch_backend):
    """The rare caller who trains the base layer too: weight and bias gradients through the op."""
    x, weight, b, lora_a, lora_b = _op_inputs(bias=True)
    weight.requires_grad_(True)
    b.requires_grad_(True)
    torch.library.opcheck(LORA_OP, (x, weight, b, lora_a, lora_b, 0.5, 0.0, torch.zeros((), dtype=torch.int64)))


@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, True), (False, False, True)],
                         ids=lambda need: "".join(n for n, on in zip("xab", need) if on))
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_opcheck_lora_linear_backward(backend, need, dropout_p):
    skip_unless_backend_serves(backend, torch.float32)
    need_x, need_a, need_b = need
    x, weight, _, lora_a, lora_b = _op_inputs(bias=False, requires_grad=False)
    seed = torch.tensor(99, dtype=torch.int64)
    g = torch.Generator().manual_seed(2)
    grad_y = torch.randn(x.shape[0], N, generator=g)
    lora_hidden = torch.randn(x.shape[0], R, generator=g)
    # what the autograd context saves for these needs (None for the rest), as in the op's setup_context
    args = (grad_y,
            x if need_a else None,
            weight if need_x else None,
            lora_a if need_x else None,
            lora_b if (need_x or need_a) else None,
            lora_hidden if need_b else None,
            0.5, dropout_p, seed, need_x, need_a, need_b, backend)
    torch.library.opcheck(LORA_BACKWARD_OP, args)


@pytest.mark.parametrize("trainable", ["b", "a", "ab", "xb"])
def test_backward_with_some_inputs_frozen(backend, trainable):
    """Each subset of (x, lora_a, lora_b) requiring grad, eagerly (what the opcheck backward cases
    above feed the op): the gradients asked for match the float64 reference."""
    skip_unless_backend_serves(backend, torch.float32)
    x, weight, b, lora_a, lora_b = _op_inputs(bias=True, requires_grad=False)
    leaves = {"x": x, "a": lora_a, "b": lora_b}
    for name in trainable:
        leaves[name].requires_grad_(True)
    y = lora_kernels.lora_linear(x, weight, b, lora_a, lora_b, 0.5)
    grad_out = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    y.backward(grad_out)
    leaves64 = {name: t.detach().double().requires_grad_(name in trainable) for name, t in leaves.items()}
    ref = lora_kernels.reference.lora_linear_reference(leaves64["x"], weight.double(), b.double(), leaves64["a"],
                                                       leaves64["b"], 0.5)
    ref.backward(grad_out.double())
    leaves32 = {name: t.detach().requires_grad_(name in trainable) for name, t in leaves.items()}   # plain torch
    plain = lora_kernels.reference.lora_linear_reference(leaves32["x"], weight, b, leaves32["a"], leaves32["b"], 0.5)
    plain.backward(grad_out)
    for name in trainable:
        assert_close(leaves[name].grad, leaves64[name].grad, leaves32[name].grad, f"grad of {name}")


# ---------------------------------------------------------------------------------------------
# (c) profiler
# ---------------------------------------------------------------------------------------------

def test_profiler_names_the_ops(torch_backend):
    module = TinyLoRA()
    x = torch.randn(5, K, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(x).sum().backward()
    names = {event.name for event in prof.events()}
    assert "lora_kernels::lora_linear" in names, sorted(n for n in names if "lora" in n)
    assert "lora_kernels::lora_linear_backward" in names, sorted(n for n in names if "lora" in n)


def test_profiler_names_the_op_without_autograd(torch_backend):
    """Inference (no_grad) calls show up by name too."""
    module = TinyLoRA()
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        module(torch.randn(5, K))
    assert "lora_kernels::lora_linear" in {event.name for event in prof.events()}


# ---------------------------------------------------------------------------------------------
# (d) dropout under torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_with_dropout(torch_backend, compile_backend):
    module = TinyLoRA(dropout_p=0.5)
    compiled = torch.compile(module, backend=compile_backend)
    x = torch.randn(2, 3, K)

    torch.manual_seed(0)
    y, grad_x, grad_a, grad_b = _forward_backward(compiled, module, x)
    assert y.shape == (2, 3, N)
    for name, t in (("y", y), ("grad_x", grad_x), ("grad_lora_a", grad_a), ("grad_lora_b", grad_b)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"

    no_dropout = TinyLoRA(dropout_p=0.0)(x).detach()
    assert not torch.equal(y, no_dropout), "dropout_p=0.5 changed nothing"
    # a fresh seed every call (the compiled graph must not bake one in), reproducible by manual_seed
    y_next = compiled(x).detach()
    assert not torch.equal(y, y_next), "two compiled calls drew the same dropout mask"
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x).detach(), y, rtol=0, atol=0)
