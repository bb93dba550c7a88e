"""Backend choice per thread and per asyncio task (use_backend), the process-global set_backend
beside it, and both inside a torch.compile'd function."""

import asyncio
import contextlib
import threading

import pytest
import torch

import lora_kernels
from lora_kernels import fallback
from lora_kernels._backend import resolve_backend, triton_unavailable_reason

CPU = torch.device("cpu")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g), None,
            torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g))


@pytest.fixture
def served_by(monkeypatch, python_kernels_serve_cpu):
    """A list that receives, for every lora_linear call the torch backend serves, the backend
    requested at that moment in the calling thread (the op reads it when it runs; the C++ extension's
    CPU kernels hand the calls to Python's, which read it)."""
    seen = []
    forward = fallback.lora_linear_forward

    def spy(*args):
        seen.append((threading.current_thread().name, lora_kernels.get_backend()))
        return forward(*args)

    monkeypatch.setattr(fallback, "lora_linear_forward", spy)
    return seen


def test_use_backend_scopes_nests_and_restores(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    lora_kernels.set_backend("torch")
    with lora_kernels.use_backend("triton"):
        assert lora_kernels.get_backend() == "triton"         # over set_backend
        with lora_kernels.use_backend("auto"):
            assert lora_kernels.get_backend() == "auto"       # "auto" scoped is auto, not "fall through"
            assert resolve_backend(CPU, torch.float32) == "torch"
        assert lora_kernels.get_backend() == "triton"
        with pytest.raises(RuntimeError, match="inside"):
            with lora_kernels.use_backend("torch"):
                raise RuntimeError("inside")
        assert lora_kernels.get_backend() == "triton"         # restored after an exception too
    assert lora_kernels.get_backend() == "torch"
    lora_kernels.set_backend("auto")
    assert lora_kernels.get_backend() == "triton"             # back to the environment


def test_use_backend_bogus_changes_nothing():
    with pytest.raises(ValueError, match=r"use_backend\('bogus'\).*auto.*triton.*torch"):
        with lora_kernels.use_backend("bogus"):
            pass
    assert lora_kernels.get_backend() == "auto"


def test_use_backend_is_per_thread(served_by):
    """Two threads hold different scoped choices at the same moment (a barrier lines them up); a
    third, unscoped thread sees the process-global choice. Each call is served as its own thread asked."""
    lora_kernels.set_backend("torch")
    barrier = threading.Barrier(3)
    seen_inside, errors = {}, []

    def worker(choice):
        try:
            with lora_kernels.use_backend(choice) if choice else contextlib.nullcontext():
                barrier.wait()                                  # all three threads are in their scopes
                seen_inside[threading.current_thread().name] = lora_kernels.get_backend()
                if choice != "triton":                          # served by the torch backend on CPU
                    lora_kernels.lora_linear(*_inputs(), 0.5)
                barrier.wait()                                  # nobody leaves before all have looked
        except Exception as e:   # surfaced below: an assert in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,), name=str(c)) for c in ("triton", "auto", None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert seen_inside == {"triton": "triton", "auto": "auto", "None": "torch"}
    assert sorted(served_by) == [("None", "torch"), ("auto", "auto")]
    assert lora_kernels.get_backend() == "torch"


def test_use_backend_is_per_asyncio_task():
    """Tasks interleave on one thread; each keeps its own choice across awaits while the other is
    inside its own scope."""
    async def task(choice, barrier: asyncio.Barrier):
        with lora_kernels.use_backend(choice):
            await barrier.wait()                                # both tasks are in their scopes
            seen = lora_kernels.get_backend()
            await barrier.wait()                                # neither leaves before both have looked
            return seen

    async def main():
        barrier = asyncio.Barrier(2)
        return await asyncio.gather(task("torch", barrier), task("triton", barrier))

    assert asyncio.run(main()) == ["torch", "triton"]
    assert lora_kernels.get_backend() == "auto"


def test_use_backend_reaches_tasks_it_creates_not_threads_it_starts():
    """As documented: asyncio tasks and asyncio.to_thread created inside a block start with a copy of
    the choice (contextvars); a threading.Thread or an executor started inside it does not."""
    import concurrent.futures

    async def inside():
        task = asyncio.create_task(asyncio.sleep(0, lora_kernels.get_backend()))
        return await task, await asyncio.to_thread(lora_kernels.get_backend)

    with lora_kernels.use_backend("torch"):
        assert asyncio.run(inside()) == ("torch", "torch")
        seen = []
        thread = threading.Thread(target=lambda: seen.append(lora_kernels.get_backend()))
        thread.start()
        thread.join(timeout=60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            seen.append(pool.submit(lora_kernels.get_backend).result(timeout=60))
    assert seen == ["auto", "auto"]


@pytest.mark.skipif(triton_unavailable_reason(CPU, torch.float32) is not None,
                    reason=str(triton_unavailable_reason(CPU, torch.float32)))
def test_use_backend_routes_the_op():
    """The scoped choice really picks the implementation (not only get_backend's answer)."""
    args = _inputs()
    with lora_kernels.use_backend("triton"):
        assert resolve_backend(CPU, torch.float32) == "triton"
        with pytest.raises(NotImplementedError, match="float64"):
            lora_kernels.lora_linear(*(t.double() if t is not None else None for t in args), 0.5)
    with lora_kernels.use_backend("torch"):
        lora_kernels.lora_linear(*(t.double() if t is not None else None for t in args), 0.5)


@pytest.mark.parametrize("how", ["set_backend", "use_backend"])
def test_choice_inside_compiled_function_applies_to_later_calls(how, served_by):
    """Inside torch.compile a choice ends the traced graph, so the calls after it see it, as in eager
    mode (traced as a plain side effect it would be replayed after the graph: the ops would run on the
    previous choice). Under fullgraph=True, where a graph break is an error, dynamo says so."""
    x, w, b, a, bb = _inputs()

    def f(x):
        if how == "set_backend":
            lora_kernels.set_backend("torch")
            y = lora_kernels.lora_linear(x, w, b, a, bb, 0.5)
            lora_kernels.set_backend("auto")
        else:
            with lora_kernels.use_backend("torch"):
                y = lora_kernels.lora_linear(x, w, b, a, bb, 0.5)
        return lora_kernels.lora_linear(torch.cat([y, y[:, :2]], 1), w, b, a, bb, 0.5)

    torch._dynamo.reset()
    expected = f(x)
    assert [backend for _, backend in served_by] == ["torch", "auto"]
    served_by.clear()
    compiled = torch.compile(f, backend="eager")
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
    assert [backend for _, backend in served_by] == ["torch", "auto"]
    assert lora_kernels.get_backend() == "auto"
    torch._dynamo.reset()
    with pytest.raises(Exception, match="graph_break"):
        torch.compile(f, backend="eager", fullgraph=True)(x)
    lora_kernels.set_backend("auto")
    torch._dynamo.reset()


@pytest.mark.skipif(triton_unavailable_reason(CPU, torch.float32) is not None,
                    reason=str(triton_unavailable_reason(CPU, torch.float32)))
@pytest.mark.parametrize("create_graph", [False, True])
def test_backward_outside_the_block_uses_the_forward_backend(create_graph):
    """The backward regenerates the dropout mask of the backend that served the forward, wherever it
    runs: here outside the use_backend block (on CUDA it runs on autograd's device thread, which
    never sees the block). On another backend's mask dX and dA were silently wrong (by ~1e3 here)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 32, generator=g, requires_grad=True)
    w = torch.randn(24, 32, generator=g)
    a = torch.randn(4, 32, generator=g, requires_grad=True)
    b = torch.randn(24, 4, generator=g, requires_grad=True)

    def grads(backward_inside: bool):
        torch.manual_seed(1)                                   # the dropout seed: the same mask twice
        with lora_kernels.use_backend("triton"):
            y = lora_kernels.lora_linear(x, w, None, a, b, 0.5, dropout_p=0.5)
            if backward_inside:
                return torch.autograd.grad(y.square().sum(), (x, a, b), create_graph=create_graph)
        return torch.autograd.grad(y.square().sum(), (x, a, b), create_graph=create_graph)

    for name, inside, outside in zip("xab", grads(True), grads(False)):
        torch.testing.assert_close(outside, inside, rtol=0, atol=0, msg=f"grad of {name}")
