"""pytest-benchmark view of bench_lora_linear.py: the same providers, one small shape.

    pytest bench/ --benchmark-only

The test command (`pytest tests bench --benchmark-disable`) runs it as a smoke test of the main job,
each provider timed once. Each provider is checked against
the float64 reference before it is timed, exactly as in bench_lora_linear.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_linear as bench  # noqa: E402  (puts the repo root on sys.path too)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPE, RANK, TOKENS = bench.SMOL_UP, 16, 256       # SmolLM2-135M gate/up: K=576, N=1536


@pytest.fixture(scope="module")
def weights():
    return bench.make_weights(SHAPE, RANK, DTYPE, DEVICE)


@pytest.fixture(scope="module")
def activations():
    return bench.make_activations(TOKENS, SHAPE.k, SHAPE.n, DTYPE, DEVICE)


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("name", bench.PROVIDERS)
def test_lora_linear(benchmark, weights, activations, name, mode):
    try:
        provider = bench.MAKERS[name](weights, 0.0)
    except ImportError as e:
        pytest.skip(f"{name}: {e}")
    x, grad_y = activations
    error = bench.check(name, provider, mode, bench.Reference(weights, x, grad_y))
    assert error is None, f"{name} {mode}: {error}"
    step = bench.step_fn(provider, mode, x, grad_y)
    if DEVICE.type == "cuda":
        inner = step

        def step():
            out = inner()
            torch.cuda.synchronize()
            return out

    benchmark.group = f"lora_linear {mode} M={TOKENS} K={SHAPE.k} N={SHAPE.n} r={RANK} {DTYPE}"
    benchmark.extra_info.update(provider=name, mode=mode, m=TOKENS, k=SHAPE.k, n=SHAPE.n, r=RANK)
    benchmark(step)
