"""pytest-benchmark view of bench_multi_lora_linear.py: the same providers, one tiny shape.

    pytest bench/ --benchmark-only

Not part of the test suite (`pytest tests` never collects bench/). Each provider is checked against
the float64 reference (lora_kernels.multi_lora_linear_reference) before it is timed, exactly as in
bench_multi_lora_linear.py. lean_torch appears as its three variants (lean_loop, lean_gather, lean_dense).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_multi_lora_linear as bench  # noqa: E402  (puts the repo root on sys.path too)
import lora_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPE, RANK, TOKENS, ADAPTERS, IDS = bench.square_shape(256), 16, 64, 8, "none25"   # 8 adapters, 25 % no adapter
PROVIDER_NAMES = tuple(n for n in bench.MAKERS)     # base, ours, peft, peft_layer, lean_loop, lean_gather, lean_dense


@pytest.fixture(scope="module")
def stack():
    return bench.make_stack(SHAPE, ADAPTERS, RANK, None, DTYPE, DEVICE)


@pytest.fixture(scope="module")
def adapter_ids():
    return bench.make_adapter_ids(IDS, TOKENS, ADAPTERS, DEVICE)


@pytest.fixture(scope="module")
def activations():
    return bench.make_activations(TOKENS, SHAPE.k, SHAPE.n, DTYPE, DEVICE)


def _group(what: str) -> str:
    return f"multi_lora_linear {what} M={TOKENS} K={SHAPE.k} N={SHAPE.n} r={RANK} L={ADAPTERS} ids={IDS} {DTYPE}"


def _synchronized(step):
    if DEVICE.type != "cuda":
        return step

    def synced():
        out = step()
        torch.cuda.synchronize()
        return out
    return synced


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_multi_lora_linear(benchmark, stack, adapter_ids, activations, name, mode):
    batch = lora_kernels.AdapterBatch(adapter_ids, ADAPTERS)
    try:
        provider = bench.MAKERS[name](stack, adapter_ids, batch)
    except ImportError as e:
        pytest.skip(f"{name}: {e}")
    if mode not in provider.modes:
        pytest.skip(f"{name}: no {mode} (PEFT rejects mixed adapter batches in training mode)")
    x, grad_y = activations
    error = bench.check(name, provider, mode, bench.Reference(stack, adapter_ids, x, grad_y))
    assert error is None, f"{name} {mode}: {error}"
    benchmark.group = _group(mode)
    benchmark.extra_info.update(provider=name, mode=mode, m=TOKENS, k=SHAPE.k, n=SHAPE.n, r=RANK, L=ADAPTERS, ids=IDS)
    benchmark(_synchronized(bench.step_fn(provider, mode, x, grad_y)))


def test_adapter_batch_build(benchmark, adapter_ids):
    """What ours pays once per batch (every layer reuses the AdapterBatch)."""
    batch = lora_kernels.AdapterBatch(adapter_ids, ADAPTERS)
    assert int(batch.counts.sum()) == int((adapter_ids >= 0).sum())
    benchmark.group = _group("AdapterBatch build")
    benchmark.extra_info.update(m=TOKENS, L=ADAPTERS, ids=IDS)
    benchmark(_synchronized(lambda: lora_kernels.AdapterBatch(adapter_ids, ADAPTERS)))
