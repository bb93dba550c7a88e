"""The C++ extension (csrc/, lora_kernels._C): the ops' schemas, CPU kernels and CPU autograd in C++.

With it loaded, every other test runs its CPU calls through C++; these check what is C++'s own:
the dispatcher routes CPU calls to the C++ kernels (not to a Python one), their results equal the
Python torch backend's bit for bit (same ATen calls, same order), a backend other than torch
requested for CPU tensors (use_backend / set_backend in any thread, LORA_KERNELS_BACKEND) is handed
to Python, Python's errors cross C++ with their type, and threads share the ops. CI runs the suite
with the extension built (LORA_KERNELS_BUILD_EXT=1: then it must load) and the op tests again
without it (LORA_KERNELS_EXTENSION=0).
"""

import contextlib
import os
import threading

import pytest
import torch

import lora_kernels
from lora_kernels import _extension, fallback
from lora_kernels._backend import triton_unavailable_reason
from lora_kernels.reference import lora_linear_reference, multi_lora_linear_reference

LOADED = _extension.module is not None
needs_extension = pytest.mark.skipif(not LOADED, reason=lora_kernels.extension_status())
CPU = torch.device("cpu")
OPS = ("lora_linear", "lora_linear_backward", "multi_lora_linear", "multi_lora_linear_backward", "add_multi_lora_")


def test_status_says_which_ops_serve():
    status = lora_kernels.extension_status()
    if os.environ.get("LORA_KERNELS_BUILD_EXT") == "1" and os.environ.get("LORA_KERNELS_EXTENSION") != "0":
        assert LOADED, f"LORA_KERNELS_BUILD_EXT=1 (a build that must succeed) but: {status}"
    assert status.startswith("C++ extension loaded from" if LOADED else "pure Python: C++ extension ")
    if os.environ.get("LORA_KERNELS_EXTENSION") == "0":
        assert status == "pure Python: C++ extension not loaded: LORA_KERNELS_EXTENSION=0"


@needs_extension
@pytest.mark.parametrize("op", OPS)
def test_dispatcher_routes_cpu_calls_to_the_cpp_kernels(op):
    """The dispatcher's table: the schema and CPU kernel from csrc/library.cpp, CPU autograd from
    csrc/autograd.cpp; Python adds the fake (Meta) kernel and the other devices' kernels."""
    registrations = dict(line.split(": registered at ", 1) for line in torch._C._dispatch_dump(
        f"lora_kernels::{op}").splitlines() if ": registered at " in line)
    assert "csrc/library.cpp" in registrations["debug"]
    assert "csrc/library.cpp" in registrations["CPU"]
    assert "torch/library.py" in registrations["CompositeExplicitAutograd[alias]"]
    if op in ("lora_linear", "multi_lora_linear"):
        assert "csrc/autograd.cpp" in registrations["AutogradCPU"]


def _single_inputs(dtype, m=7, k=33, n=11, r=12, bias=True, leading=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=gen) * 0.3).to(dtype)
    bb = (torch.randn(n, r, generator=gen) * 0.3).to(dtype)
    return x, w, b, a, bb


def _run_single(inputs, grads, dropout_p, seed, python):
    """(y, the grads of the inputs named in `grads`) of one lora_linear call, forward and backward."""
    tensors = [t.detach().clone().requires_grad_(name in grads) if t is not None else None
               for t, name in zip(inputs, ("x", "weight", "bias", "lora_a", "lora_b"))]
    torch.manual_seed(seed)   # the dropout seed
    with _extension.python_eager_calls() if python else contextlib.nullcontext():
        y = lora_kernels.lora_linear(*tensors, 0.75, dropout_p=dropout_p)
        if grads:
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
            y.backward(dy)
    return [y.detach()] + [t.grad for t, name in zip(tensors, ("x", "weight", "bias", "lora_a", "lora_b"))
                           if name in grads and t is not None]


def _assert_bits_equal(cpp, python, what):
    assert len(cpp) == len(python), what
    for index, (c, p) in enumerate(zip(cpp, python)):
        assert c.dtype == p.dtype and c.shape == p.shape, (what, index, c.dtype, p.dtype, c.shape, p.shape)
        assert torch.equal(c, p) or (c.isnan() == p.isnan()).all() and torch.equal(c.nan_to_num(), p.nan_to_num()), (
            f"{what}: output {index} differs from the Python backend's: max |diff| "
            f"{(c.double() - p.double()).abs().max().item():.3e}")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grads", [(), ("x", "lora_a", "lora_b"), ("lora_b",), ("lora_a",), ("x",),
                                   ("x", "weight", "bias", "lora_a", "lora_b")])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_single_adapter_equals_the_python_backend_bit_for_bit(dtype, grads, dropout_p):
    for inputs in (_single_inputs(dtype), _single_inputs(dtype, m=1, k=8, n=6, r=1, bias=False),
                   _single_inputs(dtype, m=5, leading=(2,), r=4), _single_inputs(dtype, m=0)):
        cpp = _run_single(inputs, grads, dropout_p, 3, python=False)
        python = _run_single(inputs, grads, dropout_p, 3, python=True)
        _assert_bits_equal(cpp, python, f"lora_linear {dtype} grads={grads} p={dropout_p} x {tuple(inputs[0].shape)}")


@needs_extension
def test_strided_x_and_scale_zero_with_inf():
    x, w, b, a, bb = _single_inputs(torch.float32, m=6, k=40)
    x_strided = x[:, ::2]                                     # last stride 2: the op copies it
    w, a = w[:, ::2].contiguous(), a[:, ::2].contiguous()
    a[0, 0] = float("inf")
    for scale in (0.0, -1.5):
        cpp = lora_kernels.lora_linear(x_strided, w, b, a, bb, scale)
        with _extension.python_eager_calls():
            python = lora_kernels.lora_linear(x_strided, w, b, a, bb, scale)
        _assert_bits_equal([cpp], [python], f"strided x, scale {scale}")


def _multi_inputs(dtype, m=19, k=24, n=10, num_adapters=4, max_rank=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    a = (torch.randn(num_adapters, max_rank, k, generator=gen) * 0.3).to(dtype)
    bb = (torch.randn(num_adapters, n, max_rank, generator=gen) * 0.3).to(dtype)
    scales = torch.tensor([0.5, 2.0, 0.0, -1.0][:num_adapters])
    return x, w, b, a, bb, scales


def _batches(m, num_adapters, max_rank):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, num_adapters, (m,), generator=gen)
    return {
        "mixed": lora_kernels.AdapterBatch(ids, num_adapters),
        "mixed ranks": lora_kernels.AdapterBatch(ids, num_adapters, ranks=[max_rank, 1, 0, 3]),
        "one adapter": lora_kernels.AdapterBatch(torch.full((m,), 1), num_adapters),
        "no adapter": lora_kernels.AdapterBatch(torch.full((m,), -1), num_adapters),
    }


def _run_multi(inputs, batch, grads, python):
    names = ("x", "weight", "bias", "lora_a", "lora_b")
    tensors = [t.detach().clone().requires_grad_(name in grads) for t, name in zip(inputs[:5], names)]
    with _extension.python_eager_calls() if python else contextlib.nullcontext():
        y = lora_kernels.multi_lora_linear(*tensors, inputs[5], batch)
        if grads:
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    return [y.detach()] + [t.grad for t, name in zip(tensors, names) if name in grads]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grads", [(), ("x", "lora_a", "lora_b"), ("lora_b",), ("x",), ("lora_a", "weight", "bias")])
def test_multi_adapter_equals_the_python_backend_bit_for_bit(dtype, grads):
    inputs = _multi_inputs(dtype)
    for name, batch in _batches(inputs[0].shape[0], 4, 6).items():
        _assert_bits_equal(_run_multi(inputs, batch, grads, python=False),
                           _run_multi(inputs, batch, grads, python=True), f"multi {dtype} {name} grads={grads}")


@needs_extension
def test_rows_of_no_adapter_are_f_linear_bit_for_bit():
    x, w, b, a, bb, scales = _multi_inputs(torch.float32)
    ids = torch.tensor([-1, 0, -1, 3] * 4 + [-1, 1, 2])
    y = lora_kernels.multi_lora_linear(x, w, b, a, bb, scales, ids)
    base = torch.nn.functional.linear(x, w, b)
    assert torch.equal(y[ids == -1], base[ids == -1])


@needs_extension
def test_add_multi_lora_into_a_column_slice_equals_the_python_backend():
    x, w, _, a, bb, scales = _multi_inputs(torch.float32)
    batch = _batches(x.shape[0], 4, 6)["mixed ranks"]
    outs = []
    for python in (False, True):
        qkv = torch.nn.functional.linear(x, torch.cat([w, w, w]))           # (M, 3N): fused projections
        with _extension.python_eager_calls() if python else contextlib.nullcontext():
            lora_kernels.add_multi_lora_(qkv[:, 10:20], x, a, bb, scales, batch)
        outs.append(qkv)
    _assert_bits_equal([outs[0]], [outs[1]], "add_multi_lora_")


class _Counted:
    """Wraps a module function; counts its calls."""

    def __init__(self, monkeypatch, module, name):
        self.calls, self._fn = 0, getattr(module, name)
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._fn(*args, **kwargs)


@needs_extension
def test_cpu_calls_run_no_python_kernel(monkeypatch):
    """Every route a CPU call can take to the registered ops (eager, with and without grad; the op through
    torch.ops; the profiler's) runs no Python kernel: the torch backend's Python functions are not called."""
    counted = [_Counted(monkeypatch, fallback, name) for name in (
        "lora_linear_forward", "lora_linear_backward", "multi_lora_linear_forward", "multi_lora_linear_backward",
        "multi_lora_add_")]
    x, w, b, a, bb = _single_inputs(torch.float32)
    a.requires_grad_()
    lora_kernels.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.2).sum().backward()
    with torch.no_grad():
        lora_kernels.lora_linear(x, w, b, a, bb, 0.5)
    with torch.profiler.profile():
        lora_kernels.lora_linear(x, w, b, a, bb, 0.5).sum().backward()
    mx, mw, mb, ma, mbb, scales = _multi_inputs(torch.float32)
    ma.requires_grad_()
    batch = _batches(mx.shape[0], 4, 6)["mixed"]
    lora_kernels.multi_lora_linear(mx, mw, mb, ma, mbb, scales, batch).sum().backward()
    with torch.no_grad():
        lora_kernels.add_multi_lora_(torch.zeros(mx.shape[0], 10), mx, ma, mbb, scales, batch)
    assert [c.calls for c in counted] == [0] * 5
    with _extension.python_eager_calls():   # the check can fail: the Python route does call them
        lora_kernels.lora_linear(x, w, b, a, bb, 0.5).sum().backward()
    assert counted[0].calls == 1 and counted[1].calls == 1


@needs_extension
def test_a_triton_block_in_another_thread_hands_cpu_calls_to_python(monkeypatch):
    """C++ cannot read use_backend's ContextVar: while a use_backend("triton") block is open anywhere,
    the C++ CPU kernels hand calls to Python, which resolves this thread's choice (torch here)."""
    forward = _Counted(monkeypatch, fallback, "lora_linear_forward")
    x, w, b, a, bb = _single_inputs(torch.float32)
    expected = torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.0, None)[0]
    assert forward.calls == 0
    entered, release = threading.Event(), threading.Event()

    def hold_a_triton_block():
        with lora_kernels.use_backend("triton"):
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold_a_triton_block)
    holder.start()
    try:
        assert entered.wait(30)
        y = torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.0, None)[0]
        assert forward.calls == 1
        assert torch.equal(y, expected)
    finally:
        release.set()
        holder.join()
    torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.0, None)
    assert forward.calls == 1   # the block closed: C++ again


@needs_extension
@pytest.mark.skipif(triton_unavailable_reason(CPU, torch.float32) is not None,
                    reason=str(triton_unavailable_reason(CPU, torch.float32)))
@pytest.mark.parametrize("how", ["use_backend", "set_backend", "environment"])
def test_triton_requested_for_cpu_tensors_reaches_the_triton_kernels(monkeypatch, how):
    """Through the registered op (as torch.compile and the profiler call it) and its C++ autograd."""
    from lora_kernels.triton import backend as triton_backend

    forward = _Counted(monkeypatch, triton_backend, "lora_linear_forward")
    backward = _Counted(monkeypatch, triton_backend, "lora_linear_backward")
    x, w, b, a, bb = _single_inputs(torch.float32, m=4, k=16, n=8, r=2)
    a.requires_grad_()
    if how == "environment":
        monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
        context = contextlib.nullcontext()
    elif how == "set_backend":
        lora_kernels.set_backend("triton")
        context = contextlib.nullcontext()
    else:
        context = lora_kernels.use_backend("triton")
    try:
        with context:
            y = torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.0, None)[0]
            y.sum().backward()
    finally:
        lora_kernels.set_backend("auto")
    assert (forward.calls, backward.calls) == (1, 1)
    with lora_kernels.use_backend("torch"):
        expected = lora_kernels.lora_linear(x, w, b, a.detach(), bb, 0.5)
    torch.testing.assert_close(y, expected)


@needs_extension
def test_python_errors_cross_cpp_with_their_type(monkeypatch):
    x, w, b, a, bb = (t.double() if t is not None else None for t in _single_inputs(torch.float32))
    with lora_kernels.use_backend("triton"), pytest.raises(NotImplementedError, match="float64"):
        torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.0, None)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND='bogus'"):
        torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.0, None)
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    with pytest.raises(ValueError, match="needs seed, a 0-d int64 tensor"):
        torch.ops.lora_kernels.lora_linear(x, w, b, a, bb, 0.5, 0.5, None)


@needs_extension
def test_threads_share_the_ops():
    """Eight threads calling forward and backward at once get the results of a serial run."""
    inputs = [_single_inputs(torch.float32, m=16, k=64, n=32, r=8, seed=s) for s in range(8)]

    def step(args):
        x, w, b, a, bb = args
        a = a.clone().requires_grad_()
        y = lora_kernels.lora_linear(x, w, b, a, bb, 0.5)
        y.sum().backward()
        return y.detach(), a.grad

    expected = [step(args) for args in inputs]
    results = [None] * len(inputs)

    def worker(index):
        for _ in range(20):
            results[index] = step(inputs[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _gradient_penalty(call, leaves, trainable):
    """d/dθ |dL/dθ|² with L = |call(leaves)|², θ the leaves named in `trainable` (create_graph=True)."""
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(call(*leaves).square().sum(), wanted, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in grads), wanted)


@pytest.mark.parametrize("trainable", [("lora_a", "lora_b"), ("x", "lora_a"), ("x", "weight"), ("lora_a",)])
@pytest.mark.parametrize("op", ["single", "multi"])
def test_second_derivatives_with_some_inputs_frozen(op, trainable):
    """create_graph=True with only some inputs requiring grad (LoRA training: x frozen), against the float64
    reference: the compositions return None for the gradients not asked for, "no gradient" to autograd."""
    names = ("x", "weight", "bias", "lora_a", "lora_b")
    if op == "single":
        inputs = [t.double() for t in _single_inputs(torch.float32, m=4, k=6, n=5, r=3)]
        ours = lambda *t: lora_kernels.lora_linear(*t, 0.5)                                 # noqa: E731
        reference = lambda *t: lora_linear_reference(*t, 0.5)                             # noqa: E731
    else:
        *tensors, scales = _multi_inputs(torch.float32, m=6, k=6, n=5)
        inputs, ids = [t.double() for t in tensors], torch.tensor([0, -1, 1, 3, 0, 2])
        ours = lambda *t: lora_kernels.multi_lora_linear(*t, scales, ids)                   # noqa: E731
        reference = lambda *t: multi_lora_linear_reference(*t, scales.double(), ids)      # noqa: E731

    def leaves():
        return [t.clone().requires_grad_(name in trainable) for t, name in zip(inputs, names)]

    expected = _gradient_penalty(reference, leaves(), trainable)
    for got, want in zip(_gradient_penalty(ours, leaves(), trainable), expected):
        torch.testing.assert_close(got, want)


def _direct_backward_args(**changes):
    x, w, _, a, bb = _single_inputs(torch.float32, m=4, k=6, n=5, r=3)
    args = dict(grad_y=torch.ones(4, 5), x=x, weight=w, lora_a=a, lora_b=bb, lora_hidden=torch.zeros(4, 3),
                scale=0.5, dropout_p=0.0, seed=None, need_x=True, need_a=True, need_b=True, backend="torch")
    args.update(changes)
    return tuple(args.values())


@pytest.mark.parametrize("changes, match", [
    (dict(dropout_p=0.5), "needs seed, a 0-d int64 tensor; got None"),
    (dict(dropout_p=0.5, seed=torch.tensor(3, dtype=torch.int32)), "got shape \\[\\], dtype Int"),
    (dict(x=None), "x is None but dA"),
    (dict(lora_hidden=None), "lora_hidden is None but dB"),
    (dict(lora_b=None), "lora_b is None but dX"),
    (dict(dropout_p=1.0), "dropout_p must be in \\[0, 1\\)"),
])
@needs_extension
def test_direct_backward_calls_missing_inputs_raise(changes, match):
    """A direct call of the registered backward op without what a requested gradient reads: an error
    naming it (C++ must never read through a missing tensor)."""
    with pytest.raises(ValueError, match=match):
        torch.ops.lora_kernels.lora_linear_backward(*_direct_backward_args(**changes))


def test_direct_multi_calls_with_a_short_batch_raise():
    """scales or ranks shorter than the stack, on a direct call of the registered op: an error, never a
    read past their end (both definitions)."""
    x, w, b, a, bb, scales = _multi_inputs(torch.float32)
    batch = lora_kernels.AdapterBatch(torch.zeros(x.shape[0], dtype=torch.long), 4).tensors()
    with pytest.raises(ValueError, match="scales"):
        torch.ops.lora_kernels.multi_lora_linear(x, w, b, a, bb, scales[:1], *batch, False)
    short_ranks = list(batch)
    short_ranks[5] = torch.tensor([1, 2])            # BatchTensors.ranks
    with pytest.raises(ValueError, match="ranks"):
        torch.ops.lora_kernels.multi_lora_linear(x, w, b, a, bb, scales, *short_ranks, False)


def test_a_triton_block_left_in_another_context_still_closes():
    """A generator holding a use_backend("triton") block, closed in another context: the block counts as
    closed (else the C++ kernels would hand every later CPU call to Python: correct, but slow)."""
    import contextvars

    def holder():
        with lora_kernels.use_backend("triton"):
            yield

    generator = holder()
    contextvars.copy_context().run(next, generator)
    with pytest.raises(ValueError):   # ContextVar.reset from another context: Python's own error
        generator.close()
    from lora_kernels import _backend

    assert _backend._triton_blocks == 0


def test_inputs_python_must_see_take_the_python_route(monkeypatch):
    """Where Python's route shows the ops one by one or names an error, the C++ fast path declines: a
    TorchFunctionMode sees the calls, a K = 0 x gives Python's ValueError, LORA_KERNELS_BACKEND with
    inner spaces is Python's error, a torch.jit.trace replays another batch size."""
    x, w, b, a, bb = _single_inputs(torch.float32, m=3, leading=(2,))

    class Count(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        lora_kernels.lora_linear(x, w, b, a, bb, 0.5)
    assert Count.calls > 0
    with pytest.raises(ValueError, match="cannot be flattened"):
        lora_kernels.lora_linear(torch.zeros(2, 3, 0), w[:, :0], b, a[:, :0], bb, 0.5)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "tor ch")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        lora_kernels.lora_linear(x, w, b, a, bb, 0.5)
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    traced = torch.jit.trace(lambda t: lora_kernels.lora_linear(t, w, b, a, bb, 0.5), (x,), check_trace=False)
    x_other = torch.randn(5, 4, x.shape[-1])
    torch.testing.assert_close(traced(x_other), lora_kernels.lora_linear(x_other, w, b, a, bb, 0.5))


@pytest.mark.skipif(triton_unavailable_reason(CPU, torch.float32) is not None,
                    reason=str(triton_unavailable_reason(CPU, torch.float32)))
def test_a_context_copied_from_a_triton_block_keeps_its_choice(monkeypatch):
    """A context copied inside a use_backend("triton") block (an asyncio task outliving it) keeps the
    choice after the block closed, as documented: its calls reach the Triton kernels."""
    import contextvars

    from lora_kernels.triton import backend as triton_backend

    forward = _Counted(monkeypatch, triton_backend, "lora_linear_forward")
    with lora_kernels.use_backend("triton"):
        copied = contextvars.copy_context()
    x, w, b, a, bb = _single_inputs(torch.float32, m=4, k=16, n=8, r=2)
    copied.run(lora_kernels.lora_linear, x, w, b, a, bb, 0.5)
    assert forward.calls == 1
