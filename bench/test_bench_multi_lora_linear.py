"""pytest-benchmark view of bench_multi_lora_linear.py: the same providers at one tiny shape, the batch
generators' unit checks, and one tiny end-to-end run of the script.

    pytest bench/ --benchmark-only

The test command (`pytest tests bench --benchmark-disable`) runs it as a smoke test of the main job,
each provider timed once. Each provider is checked against
the float64 reference (lora_kernels.reference.multi_lora_linear_reference; shared: lora_linear_reference, every
row on adapter 0) before it is timed, exactly as in bench_multi_lora_linear.py. lean_torch appears as
its three variants (lean_loop, lean_gather, lean_dense).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_multi_lora_linear as bench  # puts the repo root on sys.path too
import harness
import providers as lora

import lora_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# 64 decode requests over 8 adapters, 25 % without one; every adapter at rank 16, or the mixed-rank stack
SHAPE, WORKLOAD, ADAPTERS, POPULARITY = bench.layer_shape(256, 256), lora.decode(64), 8, "none25"
RANKS = {"16": lora.Ranks(16), "mixed": lora.MIXED}
PROVIDER_NAMES = tuple(lora.MULTI)   # base, ours, shared, peft, peft_layer, lean_loop, lean_gather, lean_dense


@pytest.fixture(scope="module", params=list(RANKS), ids=lambda label: f"r={label}")
def stack(request):
    return lora.make_stack(SHAPE, ADAPTERS, RANKS[request.param], DTYPE, DEVICE)


@pytest.fixture(scope="module")
def adapter_ids():
    return lora.make_adapter_ids(WORKLOAD, POPULARITY, ADAPTERS, DEVICE)


@pytest.fixture(scope="module")
def activations():
    return lora.make_activations(WORKLOAD.requests, SHAPE.k, SHAPE.n, DTYPE, DEVICE)


def _group(what: str, stack) -> str:
    return (f"multi_lora_linear {what} M={WORKLOAD.requests} K={SHAPE.k} N={SHAPE.n} r={stack.label} L={ADAPTERS} "
            f"{POPULARITY} {DTYPE}")


@pytest.mark.parametrize("mode", lora.MODES)
@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_multi_lora_linear(benchmark, stack, adapter_ids, activations, name, mode):
    batch = lora_kernels.AdapterBatch(adapter_ids, ADAPTERS, ranks=stack.ranks_tensor())
    try:
        provider = lora.MULTI[name](stack, adapter_ids, batch)
    except ImportError as e:
        pytest.skip(f"{name}: {e}")
    if mode not in provider.modes:
        pytest.skip(f"{name}: no {mode} (PEFT rejects mixed adapter batches in training mode)")
    x, grad_y = activations
    ref = (lora.shared_reference(stack, x, grad_y) if name == "shared"
           else lora.MultiReference(stack, adapter_ids, x, grad_y))
    error = lora.check(name, provider, mode, ref)
    assert error is None, f"{name} {mode}: {error}"
    benchmark.group = _group(mode, stack)
    benchmark.extra_info.update(provider=name, mode=mode, m=WORKLOAD.requests, k=SHAPE.k, n=SHAPE.n, r=stack.label,
                                L=ADAPTERS, popularity=POPULARITY)
    benchmark(harness.synchronized(lora.step_fn(provider, mode, x, grad_y), DEVICE))


def test_adapter_batch_build(benchmark, stack, adapter_ids):
    """What ours pays once per batch (every layer reuses the AdapterBatch)."""
    ranks = stack.ranks_tensor()
    batch = lora_kernels.AdapterBatch(adapter_ids, ADAPTERS, ranks=ranks)
    assert int(batch.counts.sum()) == int((adapter_ids >= 0).sum())
    benchmark.group = _group("AdapterBatch build", stack)
    benchmark.extra_info.update(m=WORKLOAD.requests, L=ADAPTERS, popularity=POPULARITY, r=stack.label)
    benchmark(harness.synchronized(lambda: lora_kernels.AdapterBatch(adapter_ids, ADAPTERS, ranks=ranks), DEVICE))


# ----------------------------------------------------------------------------- batch generators


def _used(ids: torch.Tensor) -> set[int]:
    return set(ids[ids >= 0].tolist())


@pytest.mark.parametrize("popularity", lora.POPULARITIES)
def test_popularity_is_seeded_and_in_range(popularity):
    ids = lora.request_adapters(popularity, 200, 16)
    assert ids.shape == (200,) and ids.dtype == torch.int64
    assert torch.equal(ids, lora.request_adapters(popularity, 200, 16))
    assert _used(ids) <= set(range(16))
    assert set(ids.tolist()) <= set(range(-1, 16))


def test_identical_uses_adapter_0_only():
    assert set(lora.request_adapters("identical", 64, 64).tolist()) == {0}


@pytest.mark.parametrize(("requests", "adapters"), [(1, 64), (16, 64), (64, 64), (256, 64), (5, 1)])
def test_distinct_uses_min_of_requests_and_adapters(requests, adapters):
    ids = lora.request_adapters("distinct", requests, adapters)
    assert len(_used(ids)) == min(requests, adapters)
    counts = torch.bincount(ids, minlength=adapters)
    assert int(counts.max() - counts[counts > 0].min()) <= 1          # spread evenly


def test_uniform_spreads_over_all_adapters():
    counts = torch.bincount(lora.request_adapters("uniform", 8000, 8), minlength=8)
    assert (counts - 1000).abs().max() < 150


def test_zipf_popularity_falls_with_the_adapter_index():
    requests, adapters = 20000, 16
    counts = torch.bincount(lora.request_adapters("zipf", requests, adapters), minlength=adapters)
    weights = (torch.arange(adapters, dtype=torch.float64) + 1) ** -lora.ZIPF_EXPONENT
    expected = weights / weights.sum()
    assert int(counts.argmax()) == 0
    assert all(counts[j] > counts[j + 1] for j in range(4)), counts.tolist()     # the head, strictly
    assert (counts / requests - expected).abs().max() < 0.02


@pytest.mark.parametrize(("requests", "adapters"), [(64, 64), (100, 8), (16, 64), (7, 2)])
def test_skewed_has_one_hot_adapter(requests, adapters):
    ids = lora.request_adapters("skewed", requests, adapters)
    assert int((ids == 0).sum()) == round(lora.SKEWED_HOT_SHARE * requests)
    assert _used(ids[ids != 0]) <= set(range(1, adapters))
    assert set(lora.request_adapters("skewed", requests, 1).tolist()) == {0}


def test_none25_leaves_a_quarter_without_adapter():
    ids = lora.request_adapters("none25", 64, 8)
    assert int((ids == -1).sum()) == 16
    assert _used(ids) <= set(range(8))


def test_decode_is_one_row_per_request():
    workload = lora.decode(37)
    assert lora.request_lengths(workload).tolist() == [1] * 37
    ids = lora.make_adapter_ids(workload, "zipf", 8, torch.device("cpu"))
    assert torch.equal(ids, lora.request_adapters("zipf", 37, 8))


def test_prefill_rows_are_contiguous_per_request():
    workload = lora.prefill(12, 3, 9)
    lengths = lora.request_lengths(workload)
    assert lengths.shape == (12,) and int(lengths.min()) >= 3 and int(lengths.max()) <= 9
    assert len(set(lengths.tolist())) > 1                              # ragged
    ids = lora.make_adapter_ids(workload, "distinct", 64, torch.device("cpu"))   # request i -> adapter i
    assert ids.numel() == int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    for request, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        assert ids[start:start + length].tolist() == [request] * length


def test_mixed_ranks_cycle_8_16_32_64():
    stack = lora.make_stack(SHAPE, 6, lora.MIXED, torch.float32, torch.device("cpu"))
    assert stack.ranks == [8, 16, 32, 64, 8, 16] and stack.max_rank == 64 and stack.label == "mixed"
    assert stack.ranks_tensor().tolist() == stack.ranks
    for j, rank in enumerate(stack.ranks):     # past each true rank: large garbage (a provider reading it fails)
        assert stack.lora_a[j, :rank].abs().max() < 1
        assert rank == 64 or stack.lora_a[j, rank:].abs().max() > 5


def test_command_line_lists():
    assert bench.rank_list("16,mixed") == (lora.Ranks(16), lora.MIXED)
    assert [(s.k, s.n) for s in bench.shape_list("576,4096x1024")] == [(576, 576), (4096, 1024)]


def test_main_end_to_end(tmp_path, capsys):
    """The script at a tiny size: decode and prefill over the mixed-rank stack, checked and timed."""
    status = bench.main(["--device", "cpu", "--no-out", "--shapes", "64", "--ranks", "mixed", "--adapters", "4",
                         "--decode-requests", "6", "--prefill-requests", "3", "--prefill-lengths", "2,5",
                         "--popularity", "distinct", "--no-padding", "--providers", "base,ours,shared,lean_torch",
                         "--lean-variants", "loop", "--repeats", "1", "--min-run-time", "0.01"])
    out = capsys.readouterr().out
    assert status == 0
    assert "ours/shared ×" in out and "| decode " in out and "| prefill " in out and "ours plan" in out
    assert "errors" not in out


def test_rows_record_the_strategy_and_row_tile_of_ours():
    """torch backend: "torch"; Triton: the segmented kernels and the batch's row tile (64 decode rows: 16;
    a prefill of 4 requests of 64 rows: 64)."""
    assert bench.ours_plan("torch", None) == {"strategy": "torch", "row_tile": None, "plan": "torch"}
    decode = lora_kernels.AdapterBatch(torch.arange(64) % 8, 8)
    prefill = lora_kernels.AdapterBatch(torch.arange(256) // 64, 8)
    assert bench.ours_plan("triton", decode) == {"strategy": "segmented", "row_tile": 16,
                                                 "plan": "segmented, row tile 16"}
    assert bench.ours_plan("triton", prefill)["plan"] == "segmented, row tile 64"


def test_flops_and_bytes_count_true_ranks():
    m, k, n = 3, 5, 7
    # two rows on a rank-2 adapter, one on a rank-4 one: Σr over rows = 8, over used adapters = 6
    assert lora.flops("fwd", m, k, n, 8) == 2 * m * k * n + 2 * 8 * (k + n)
    assert lora.flops("fwd_bwd", m, k, n, 8) == 4 * m * k * n + 6 * 8 * (k + n)
    weights = n * k + n + 6 * (k + n)
    assert lora.min_bytes("fwd", m, k, n, 6, 2) == 2 * (m * k + weights + m * n)
    assert lora.min_bytes("fwd_bwd", m, k, n, 6, 4) == 4 * (2 * m * k + weights + 6 * (k + n) + 2 * m * n)


def test_goals_table_judges_the_ratio_it_shows():
    """The distinct-vs-shared goal is judged at L = 64, and the ratio shown is the one at L = 64 even
    when a larger L was run too."""
    def row(num_adapters, ours_ms, shared_ms=1.0):
        return {"shape": "s", "r": "16", "mode": "fwd", "workload": "decode", "requests": 64, "m": 64,
                "popularity": "distinct", "padding_case": False, "num_adapters": num_adapters, "base_ms": 1.0,
                "ours_ms": ours_ms, "shared_ms": shared_ms, "overhead_pct": (ours_ms - 1) * 100,
                "ours_over_shared": ours_ms / shared_ms}

    rows = [row(1, 1.1), row(8, 1.1), row(64, 1.1), row(128, 1.6)]
    (entry,) = bench.goals_table(rows)
    assert entry["distinct_L"] == bench.GOAL_DISTINCT_L == 64
    assert entry["ours_over_shared"] == pytest.approx(1.1)
    assert entry["goal_met"] == "yes"
    rows[2] = row(64, 1.1, shared_ms=0.8)   # overhead 10 %, but 1.375x one shared adapter: missed
    assert bench.goals_table(rows)[0]["goal_met"] == "no"
