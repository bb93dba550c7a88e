"""Bad input fails loudly: ValueError / TypeError / NotImplementedError with a message naming the
offending tensor, its shape/dtype/device and what was expected. Nothing is silently broadcast,
truncated, or computed with the wrong backend. Also: backend selection (set_backend and
LORA_KERNELS_BACKEND) and the import contract (importing lora_kernels never imports triton)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_kernels
from lora_kernels import lora_linear
from lora_kernels._backend import resolve_backend

REPO_ROOT = Path(__file__).resolve().parents[1]
M, K, N, R = 4, 8, 6, 2
CPU = torch.device("cpu")


def _inputs(dtype=torch.float32):
    """Valid x (M, K), weight (N, K), bias (N,), lora_a (r, K), lora_b (N, r)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (M, K), "weight": (N, K), "bias": (N,), "lora_a": (R, K), "lora_b": (N, R)}
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


def _call(scale=1.0, dropout_p=0.0, **overrides):
    args = _inputs()
    args.update(overrides)
    return lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], scale,
                       dropout_p=dropout_p)


def _shape(*dims) -> str:
    """Regex for a shape as the messages print it: tuple(t.shape)."""
    return re.escape(str(tuple(dims)))


def test_valid_inputs_do_not_raise():
    """The baseline every case below perturbs in exactly one place."""
    assert _call().shape == (M, N)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------

def test_x_in_features_mismatch():
    with pytest.raises(ValueError, match=rf"x \(shape {_shape(M, K + 1)}.*K={K}.*weight \(shape {_shape(N, K)}"):
        _call(x=torch.randn(M, K + 1))


def test_lora_a_wrong_k():
    with pytest.raises(ValueError, match=rf"lora_a \(shape {_shape(R, K + 1)}.*must have shape {_shape(R, K)}"):
        _call(lora_a=torch.randn(R, K + 1))


def test_lora_b_rank_mismatch_with_lora_a():
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(N, R + 1)}.*must have shape {_shape(N, R)}"):
        _call(lora_b=torch.randn(N, R + 1))


def test_lora_b_wrong_n():
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(N + 1, R)}.*must have shape {_shape(N, R)}"):
        _call(lora_b=torch.randn(N + 1, R))


def test_lora_a_lora_b_swapped_orientation():
    """lora_a given as (K, r) (transposed) must not be accepted, even with lora_b matching it."""
    # lora_a's row count is taken as the rank (K here), so its shape must then be (K, K)
    with pytest.raises(ValueError, match=rf"lora_a \(shape {_shape(K, R)}.*must have shape {_shape(K, K)}"):
        _call(lora_a=torch.randn(K, R), lora_b=torch.randn(N, K))


def test_bias_wrong_length():
    with pytest.raises(ValueError, match=rf"bias \(shape {_shape(N + 1)}.*must have shape {_shape(N)}"):
        _call(bias=torch.randn(N + 1))


@pytest.mark.parametrize("length", [1, N - 1])
def test_bias_is_not_broadcast(length):
    """A length-1 bias would broadcast in plain torch; here it is an error, as is a short one."""
    with pytest.raises(ValueError, match=rf"bias \(shape {_shape(length)}.*must have shape {_shape(N)}"):
        _call(bias=torch.randn(length))


def test_bias_2d():
    with pytest.raises(ValueError, match=rf"bias \(shape {_shape(1, N)}.*must be 1-D"):
        _call(bias=torch.randn(1, N))


def test_weight_1d():
    with pytest.raises(ValueError, match=rf"weight \(shape {_shape(K)}.*must be 2-D"):
        _call(weight=torch.randn(K))


def test_lora_a_3d():
    with pytest.raises(ValueError, match=rf"lora_a \(shape {_shape(1, R, K)}.*must be 2-D"):
        _call(lora_a=torch.randn(1, R, K))


def test_x_0d():
    with pytest.raises(ValueError, match=r"x \(shape \(\), dtype torch.float32, device cpu\) must have at least 1 dim"):
        _call(x=torch.tensor(1.0))


def test_rank_zero_lora_a():
    with pytest.raises(ValueError, match=rf"lora_a \(shape {_shape(0, K)}.*r >= 1"):
        _call(lora_a=torch.randn(0, K), lora_b=torch.randn(N, 0))


def test_weight_transposed_raises_instead_of_wrong_answer():
    """x (M, K) with weight accidentally stored as (K, N), K != N: must raise, not compute x W0."""
    assert K != N
    weight_t = torch.randn(N, K).T.contiguous()          # (K, N)
    with pytest.raises(ValueError, match=rf"x \(shape {_shape(M, K)}.*K={N}.*weight \(shape {_shape(K, N)}"):
        _call(weight=weight_t)


def test_weight_transposed_with_matching_lora_still_raises():
    """Even when lora_a / lora_b are transposed consistently with weight, x's K decides."""
    with pytest.raises(ValueError, match=r"x \(shape"):
        _call(weight=torch.randn(K, N), lora_a=torch.randn(R, N), lora_b=torch.randn(K, R))


# ---------------------------------------------------------------------------------------------
# dtypes, devices, types
# ---------------------------------------------------------------------------------------------

def test_x_int64():
    with pytest.raises(TypeError, match=rf"x \(shape {_shape(M, K)}, dtype torch\.int64.*floating point"):
        _call(x=torch.ones(M, K, dtype=torch.int64))


def test_weight_int32():
    with pytest.raises(TypeError, match=rf"weight \(shape {_shape(N, K)}, dtype torch\.int32.*floating point"):
        _call(weight=torch.ones(N, K, dtype=torch.int32))


def test_mixed_dtypes():
    with pytest.raises(TypeError, match=r"lora_a \(.*dtype torch\.float16.*x has torch\.float32"):
        _call(lora_a=torch.randn(R, K, dtype=torch.float16))


def test_mixed_dtypes_bias():
    with pytest.raises(TypeError, match=r"bias \(.*dtype torch\.bfloat16.*x has torch\.float32"):
        _call(bias=torch.randn(N, dtype=torch.bfloat16))


def test_mixed_devices():
    """A 'meta' tensor stands in for a second device (there is no GPU here)."""
    with pytest.raises(ValueError, match=r"lora_a \(.*device meta\).*is on meta but x is on cpu"):
        _call(lora_a=torch.randn(R, K, device="meta"))


def test_mixed_devices_x_elsewhere():
    with pytest.raises(ValueError, match=r"device.*x is on meta"):
        _call(x=torch.randn(M, K, device="meta"))


def test_meta_scale_is_a_clear_error():
    x, w, bias = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    a, b = torch.randn(R, K), torch.randn(N, R)
    with pytest.raises(ValueError, match=r"scale \(shape \(\), dtype torch.float32, device meta\) is a meta tensor"):
        lora_kernels.lora_linear(x, w, bias, a, b, torch.tensor(2.0, device="meta"))
    with pytest.raises(ValueError, match=r"scale \(.*device meta\) is a meta tensor"):   # with meta inputs too
        lora_kernels.lora_linear(x.to("meta"), w.to("meta"), bias.to("meta"), a.to("meta"), b.to("meta"),
                                 torch.tensor(2.0, device="meta"))


def test_non_tensor_x():
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        _call(x=torch.randn(M, K).tolist())


def test_non_tensor_lora_b():
    with pytest.raises(TypeError, match=r"lora_b must be a torch\.Tensor, got list"):
        _call(lora_b=torch.randn(N, R).tolist())


# ---------------------------------------------------------------------------------------------
# dropout_p and scale
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_p_out_of_range(p):
    with pytest.raises(ValueError, match=rf"dropout_p must be in \[0, 1\), got {re.escape(str(p))}"):
        _call(dropout_p=p)


@pytest.mark.parametrize("p", ["0.1", None, True])
def test_dropout_p_not_a_number(p):
    with pytest.raises(TypeError, match=rf"dropout_p .*got {type(p).__name__}"):
        _call(dropout_p=p)


@pytest.mark.parametrize("seed", [None, torch.zeros(1, dtype=torch.int64), torch.zeros((), dtype=torch.int32)],
                         ids=["none", "1d", "int32"])
def test_registered_op_with_dropout_needs_a_0d_int64_seed(backend, seed):
    """lora_linear draws the seed itself; a direct call of the registered op must pass it, as a 0-d
    int64 tensor (a 1-element one was silently read as its first element by the Triton launcher)."""
    from lora_kernels.ops.lora_linear import lora_linear_op

    x, w, b, a, bb = (_inputs()[name] for name in ("x", "weight", "bias", "lora_a", "lora_b"))
    with pytest.raises(ValueError, match=r"dropout_p=0.5 needs seed, a 0-d int64 tensor; got "):
        lora_linear_op(x.reshape(-1, x.shape[-1]), w, b, a, bb, 1.0, 0.5, seed)


def test_scale_1d_tensor():
    with pytest.raises(ValueError, match=rf"scale \(shape {_shape(1)}.*0-d tensor"):
        _call(scale=torch.ones(1))


def test_scale_requires_grad():
    with pytest.raises(ValueError, match=r"scale \(shape \(\), dtype torch.float32, device cpu\) must not require grad"):
        _call(scale=torch.tensor(1.0, requires_grad=True))


def test_scale_string():
    with pytest.raises(TypeError, match=r"scale must be .*got str"):
        _call(scale="1.0")


def test_scale_0d_tensor_accepted():
    """The accepted forms: a python number and a 0-d tensor give the same result."""
    args = _inputs()
    y_float = _call(scale=0.5, **args)
    y_tensor = _call(scale=torch.tensor(0.5), **args)
    torch.testing.assert_close(y_float, y_tensor, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# backend selection
# ---------------------------------------------------------------------------------------------

def test_set_backend_bogus():
    lora_kernels.set_backend("torch")
    with pytest.raises(ValueError, match=r"set_backend\('bogus'\).*auto.*triton.*torch"):
        lora_kernels.set_backend("bogus")
    assert lora_kernels.get_backend() == "torch", "a rejected set_backend must leave the choice unchanged"


def test_env_backend_bogus(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"LORA_KERNELS_BACKEND='bogus'"):
        _call()
    with pytest.raises(ValueError, match=r"LORA_KERNELS_BACKEND"):
        resolve_backend(CPU, torch.float32)


def test_set_backend_torch_routes_to_fallback(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")       # set_backend overrides the env
    lora_kernels.set_backend("torch")
    assert lora_kernels.get_backend() == "torch"
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert resolve_backend(CPU, dtype) == "torch"
    args = _inputs()
    expected = lora_kernels.reference.lora_linear_reference(*args.values(), 1.0)
    torch.testing.assert_close(_call(**args), expected)


def test_env_backend_torch_routes_to_fallback(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    assert lora_kernels.get_backend() == "torch"
    assert resolve_backend(CPU, torch.float32) == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", " Torch ")      # read at call time, trimmed, any case
    assert resolve_backend(CPU, torch.float32) == "torch"


def test_set_backend_auto_hands_back_to_env(monkeypatch):
    lora_kernels.set_backend("triton")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "torch")
    lora_kernels.set_backend("auto")
    assert lora_kernels.get_backend() == "torch"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_auto_on_cpu_resolves_to_torch(monkeypatch, dtype):
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    lora_kernels.set_backend("auto")
    assert lora_kernels.get_backend() == "auto"
    assert resolve_backend(CPU, dtype) == "torch"


@pytest.mark.parametrize("interpret", [None, "0", ""])
def test_forced_triton_on_cpu_without_interpreter(monkeypatch, interpret):
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    lora_kernels.set_backend("triton")
    with pytest.raises(NotImplementedError, match=r"triton.*float32.*cpu.*TRITON_INTERPRET"):
        _call()


def test_env_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match=r"TRITON_INTERPRET"):
        _call()


def test_forced_triton_bf16_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lora_kernels.set_backend("triton")
    args = _inputs(torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"bfloat16"):
        _call(**args)


def test_forced_triton_float64(monkeypatch):
    """Triton has no float64 kernels: forcing it must refuse, not run the kernels in a lower
    precision (before the check existed this returned an answer off by ~10 under the interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lora_kernels.set_backend("triton")
    args = _inputs(torch.float64)
    with pytest.raises(NotImplementedError, match=r"float64"):
        _call(**args)


def test_validation_precedes_backend_choice(monkeypatch):
    """Shape errors come out the same whichever backend is forced (validation runs first)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lora_kernels.set_backend("triton")
    with pytest.raises(ValueError, match=r"lora_b \("):
        _call(lora_b=torch.randn(N + 1, R))


# ---------------------------------------------------------------------------------------------
# import contract
# ---------------------------------------------------------------------------------------------

def test_import_does_not_import_triton_or_touch_cuda():
    code = ("import lora_kernels, sys; "
            "assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m); "
            "import torch; assert not torch.cuda.is_initialized()")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_dropout_p_that_rounds_to_one_in_float32():
    with pytest.raises(ValueError, match=r"dropout_p=0.99999999.*rounds to 1.0 in float32"):
        _call(dropout_p=0.99999999)
