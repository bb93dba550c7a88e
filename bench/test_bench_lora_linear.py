"""pytest-benchmark view of bench_lora_linear.py: the same providers, one small shape.

    pytest bench/ --benchmark-only

The test command (`pytest tests bench --benchmark-disable`) runs it as a smoke test of the main job,
each provider timed once. Each provider is checked against
the float64 reference before it is timed, exactly as in bench_lora_linear.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_linear as bench  # noqa: E402  (puts the repo root on sys.path too)
import harness  # noqa: E402
import providers as lora  # noqa: E402
import lora_kernels  # noqa: E402
from lora_kernels import _extension  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPE, RANK, TOKENS = lora.SMOL_UP, 16, 256       # SmolLM2-135M gate/up: K=576, N=1536


@pytest.fixture(scope="module")
def weights():
    return lora.make_weights(SHAPE, RANK, DTYPE, DEVICE)


@pytest.fixture(scope="module")
def activations():
    return lora.make_activations(TOKENS, SHAPE.k, SHAPE.n, DTYPE, DEVICE)


@pytest.mark.parametrize("mode", lora.MODES)
@pytest.mark.parametrize("name", bench.PROVIDERS)
def test_lora_linear(benchmark, weights, activations, name, mode):
    try:
        provider = lora.SINGLE[name](weights, 0.0)
    except ImportError as e:
        pytest.skip(f"{name}: {e}")
    x, grad_y = activations
    error = lora.check(name, provider, mode, lora.Reference(weights, x, grad_y))
    assert error is None, f"{name} {mode}: {error}"
    benchmark.group = f"lora_linear {mode} M={TOKENS} K={SHAPE.k} N={SHAPE.n} r={RANK} {DTYPE}"
    benchmark.extra_info.update(provider=name, mode=mode, m=TOKENS, k=SHAPE.k, n=SHAPE.n, r=RANK)
    benchmark(harness.synchronized(lora.step_fn(provider, mode, x, grad_y), DEVICE))


# ----------------------------------------------------------------------------- ours_python and --overhead


def _route_seen(provider, mode, x, grad_y):
    """Runs one step of provider; returns y's grad_fn class name (None in fwd) and whether the extension
    served eager calls (_extension.eager_module()) in the forward and, in fwd_bwd, in the backward."""
    seen, inner = {}, provider.forward

    def forward(x):
        seen["forward"] = _extension.eager_module() is not None
        y = inner(x)
        seen["grad_fn"] = type(y.grad_fn).__name__ if y.grad_fn is not None else None
        if y.requires_grad:     # runs in the backward, before y's node
            y.register_hook(lambda g: seen.__setitem__("backward", _extension.eager_module() is not None))
        return y

    provider.forward = forward
    lora.step_fn(provider, mode, x, grad_y)()
    return seen


@pytest.mark.parametrize("mode", lora.MODES)
def test_ours_python_takes_the_python_route_in_forward_and_backward(weights, activations, mode):
    x, grad_y = activations
    seen = _route_seen(lora.SINGLE["ours_python"](weights, 0.0), mode, x, grad_y)
    assert seen["forward"] is False
    if mode == "fwd_bwd":       # the Python autograd.Function's node, and the switch still on in the backward
        assert (seen["grad_fn"], seen["backward"]) == ("_LoRALinearFunctionBackward", False)
    # outside the provider's steps the switch is back: ours goes through C++ when the extension is loaded
    assert (_extension.eager_module() is not None) == (_extension.module is not None)
    if _extension.module is not None and DEVICE.type == "cpu" and mode == "fwd_bwd":
        assert _route_seen(lora.SINGLE["ours"](weights, 0.0), mode, x, grad_y)["grad_fn"] == "CppFunction"


def test_overhead_preset_writes_its_table_with_the_extension_status(tmp_path, monkeypatch, capsys):
    """--overhead: fp32, its own groups (here shrunk to a tiny shape) and file stem; the stamp says which
    route ours took; the µs columns are (provider − lean) · 1000."""
    groups = bench.overhead_groups()
    assert [(g.shape, g.ranks, g.tokens, g.modes) for g in groups] == [
        (shape, (16,), (1, 4, 16, 64), ("fwd", "fwd_bwd")) for shape in (lora.SMOL_QO, lora.LLAMA_QO)]
    assert bench.parse_args(["--overhead", "--device", "cpu"]).dtype == "fp32"
    monkeypatch.setattr(bench, "overhead_groups", lambda: [bench.Group(lora.Shape("tiny", 32, 24), (4,), (2,))])
    argv = ["--overhead", "--device", "cpu", "--providers", "ours,ours_python,lean_torch", "--min-run-time", "0.01",
            "--results-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    assert "ours_py−lean µs" in capsys.readouterr().out
    result = json.loads((tmp_path / "lora_linear_overhead-cpu.json").read_text())
    assert result["environment"]["lora_kernels_extension"] == lora_kernels.extension_status()
    assert result["environment"]["dtype"] == "float32"
    assert [row["mode"] for row in result["rows"]] == ["fwd", "fwd_bwd"]
    for row in result["rows"]:
        assert row["errors"] is None, row["errors"]
        for name in ("ours", "ours_python"):
            key = "ours_minus_lean_us" if name == "ours" else "ours_python_minus_lean_us"
            assert row[key] == pytest.approx((row[f"{name}_ms"] - row["lean_torch_ms"]) * 1000)


# ----------------------------------------------------------------------------- what ran, per row


def test_default_configs_time_kv_at_mid_size_m():
    """Issue 12: k/v (4096 -> 1024) at 32 and 128 rows, where a GEMM without split-K leaves SMs idle."""
    for device in (torch.device("cpu"), torch.device("cuda")):      # the configurations are data: no device touched
        kv = [g for g in bench.default_groups(device) if g.shape == lora.LLAMA_KV]
        assert {32, 128} <= {m for g in kv for m in g.tokens if 16 in g.ranks and 0.0 in g.dropouts}, device


def test_torch_backend_rows_say_torch():
    plan = bench.ours_plan("torch", torch.device("cpu"), torch.float32, "fwd_bwd", 64, lora.LLAMA_KV, 16, 0.0)
    assert plan == {"strategy": "torch", "config": None, "dx_strategy": "torch", "dx_config": None, "plan": "torch"}
    assert "dx_strategy" not in bench.ours_plan("torch", torch.device("cpu"), torch.float32, "fwd", 64,
                                                lora.LLAMA_KV, 16, 0.0)


def test_triton_rows_look_up_forward_and_dx_with_their_own_n_and_k(monkeypatch):
    """forward: (M, N = out_features, K = in_features); dX: (M, N = in_features, K = out_features)."""
    calls = []
    fused = bench.tuning.MatmulConfig(block_m=64, block_n=128, block_k=64, block_r=16,
                                      group_m=8, num_warps=8, num_stages=4, split_k=4)

    def plan_for(op, device, dtype, m, n, k, rank):
        calls.append((op, m, n, k, rank))
        return bench.tuning.Plan("fused", fused) if op == "dx" else bench.tuning.SPLIT

    monkeypatch.setattr(bench.tuning, "plan_for", plan_for)
    plan = bench.ours_plan("triton", torch.device("cuda"), torch.bfloat16, "fwd_bwd", 32, lora.LLAMA_KV, 16, 0.0)
    assert calls == [("forward", 32, 1024, 4096, 16), ("dx", 32, 4096, 1024, 16)]
    assert plan["strategy"] == "split" and plan["config"] is None
    assert plan["dx_strategy"] == "fused" and plan["dx_config"] == {
        "block_m": 64, "block_n": 128, "block_k": 64, "block_r": 16, "group_m": 8, "num_warps": 8, "num_stages": 4,
        "split_k": 4}
    assert plan["plan"] == "split; dX fused 64×128×64 r16 g8 w8 s4 k4"


def test_triton_rows_record_the_forced_plan_and_the_heuristic_tiles_of_a_fused_plan_without_config():
    from lora_kernels.triton.lora_linear import fp32_dot, fused_matmul_config

    cuda = torch.device("cuda")     # a forced plan is returned before any device table is read
    with bench.tuning.forced_plan("split"):
        plan = bench.ours_plan("triton", cuda, torch.bfloat16, "fwd", 128, lora.LLAMA_QO, 16, 0.0)
    assert plan == {"strategy": "split", "config": None, "plan": "split"}
    with bench.tuning.forced_plan("fused"):
        plan = bench.ours_plan("triton", cuda, torch.bfloat16, "fwd_bwd", 4096, lora.LLAMA_QO, 16, 0.1)
    forward = fused_matmul_config(4096, 4096, 4096, 16, fp32_dot(torch.bfloat16), epilogue_dropout=False)
    dx = fused_matmul_config(4096, 4096, 4096, 16, fp32_dot(torch.bfloat16), epilogue_dropout=True)
    assert forward != dx, "the dX call under dropout has its own tiles: the test would not tell them apart"
    assert (plan["strategy"], plan["dx_strategy"]) == ("fused", "fused")
    assert plan["config"] == vars(forward) and plan["dx_config"] == vars(dx)
    assert plan["plan"] == (f"{bench.plan_text('fused', vars(forward))}; dX {bench.plan_text('fused', vars(dx))}")


def test_rows_and_table_carry_the_plan():
    group = bench.Group(lora.SMOL_QO, (16,), (4,))
    rows = bench.run([group], ("ours", "lean_torch"), torch.device("cpu"), torch.float32, min_run_time=0.01)
    assert [(row["mode"], row["plan"], row["strategy"]) for row in rows] == [("fwd", "torch", "torch"),
                                                                             ("fwd_bwd", "torch", "torch")]
    assert rows[1]["dx_strategy"] == "torch"
    columns = harness.visible_columns(rows, ("ours", "lean_torch"), bench.TABLE_COLUMNS, bench.CUDA_COLUMNS, "cpu")
    assert "ours plan" in bench.harness.markdown_table(rows, columns).splitlines()[0]
