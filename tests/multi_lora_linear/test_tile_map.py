"""The multi-adapter tile map and what the Triton kernels do with it.

* metadata.tile_map against a Python model of the tiling (each segment cut into row_tile-row tiles in
  order, (-1, 0) past the last one, T = min(cdiv(M, row_tile) + S, M) entries), on its own and as
  AdapterBatch builds it (segment_tiles, adapter_tiles), with empty and one-row segments, all rows in
  one segment, more segments than rows and no rows at all;
* multi_lora_linear (forward and every gradient) with those batches, from ids and from segments,
  against the float64 reference, with 1, 5 and MAX_SPLITS = 8 K-splits of the rank partials (the
  expand sums them in an unrolled loop);
* unchecked malformed metadata (out-of-range ids; non-monotone or out-of-range segment_starts):
  the Triton backend gives the torch backend's result, with every input a view into NaN padding, so
  a read outside an input would show;
* the Triton weight gradients allocate fp32 partials for the active adapters only (256 slots, 2 in
  use), and every result is bit-identical on repeat.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lora_kernels
from lora_kernels import AdapterBatch, multi_lora_linear
from lora_kernels.metadata import set_check_adapter_ids
from lora_kernels.metadata import tile_map

from ..helpers import DEVICE, skip_unless_backend_serves
from ..test_lora_linear import make_x
from ..tolerance import assert_same_maths
from .test_forward_backward import check_against_reference, make_stacks

FP32, FP16 = torch.float32, torch.float16


@pytest.fixture(autouse=True)
def _restore_id_check():
    yield
    set_check_adapter_ids(None)


def model_tile_map(starts: list[int], num_rows: int, block_m: int) -> list[list[int]]:
    """The tiling in plain Python: [segment, first position] of every row tile in order, then [-1, 0]
    up to T = min(cdiv(M, block_m) + S, M) entries."""
    num_segments = len(starts) - 1
    num_tiles = min(-(-num_rows // block_m) + num_segments, num_rows)
    tiles = [[s, p] for s in range(num_segments) for p in range(starts[s], starts[s + 1], block_m)]
    assert len(tiles) <= num_tiles
    return tiles + [[-1, 0]] * (num_tiles - len(tiles))


def _starts(lengths: list[int]) -> list[int]:
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return starts


# segment lengths: every kind of tiling the map must get right
LENGTHS = {
    "empty_segments": [0, 0, 5, 0, 0, 35, 0],
    "one_row_segments": [1] * 20,
    "one_segment": [100],
    "ragged": [17, 1, 0, 16, 15, 33, 64, 65, 2],
    "more_segments_than_rows": [0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0],
    "no_rows": [0, 0, 0],
    "no_rows_no_segments": [],
}


@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize("case", LENGTHS)
def test_tile_map_matches_the_model(case, block_m):
    starts = _starts(LENGTHS[case])
    tiles = tile_map(torch.tensor(starts, dtype=torch.int32, device=DEVICE), starts[-1], block_m)
    assert tiles.dtype == torch.int32 and tiles.device.type == DEVICE.type and tiles.is_contiguous()
    assert tiles.tolist() == model_tile_map(starts, starts[-1], block_m)


def test_tile_map_of_random_groupings():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        num_rows = int(torch.randint(0, 200, (), generator=gen))
        num_segments = int(torch.randint(0 if num_rows == 0 else 1, 40, (), generator=gen))   # rows need one
        cuts = torch.sort(torch.randint(0, num_rows + 1, (max(num_segments - 1, 0),), generator=gen)).values
        starts = [0, *cuts.tolist(), num_rows] if num_segments else [0]
        block_m = (16, 64)[int(torch.randint(0, 2, (), generator=gen))]
        tiles = tile_map(torch.tensor(starts, dtype=torch.int32, device=DEVICE), num_rows, block_m)
        assert tiles.tolist() == model_tile_map(starts, num_rows, block_m), (starts, block_m)


@pytest.mark.parametrize("case", [c for c in LENGTHS if LENGTHS[c]])
def test_adapter_batch_tile_maps(case):
    """segment_tiles over the caller's segments, adapter_tiles over the by-adapter view, both for the
    batch's row_tile; from ids the two views and maps are one."""
    lengths = LENGTHS[case]
    num_adapters = 4
    seg_adapters = [(3 * s) % (num_adapters + 1) - 1 for s in range(len(lengths))]   # -1 among them
    starts = _starts(lengths)
    batch = AdapterBatch.from_segments(torch.tensor(starts, device=DEVICE), torch.tensor(seg_adapters, device=DEVICE),
                                       num_adapters)
    assert batch.row_tile in (16, 64)
    assert batch.segment_tiles.tolist() == model_tile_map(starts, starts[-1], batch.row_tile)
    assert batch.adapter_tiles.tolist() == model_tile_map(batch.adapter_starts.tolist(), starts[-1], batch.row_tile)
    by_ids = AdapterBatch(batch.adapter_ids, num_adapters)
    assert by_ids.adapter_tiles is by_ids.segment_tiles
    assert by_ids.segment_tiles.tolist() == model_tile_map(by_ids.adapter_starts.tolist(), starts[-1],
                                                           by_ids.row_tile)


# ---------------------------------------------------------------------------------------------
# the op with those batches against the float64 reference
# ---------------------------------------------------------------------------------------------

# lengths, adapter per segment, true ranks (None: the stack's)
BATCHES = {
    "empty_and_one_row": ([0, 1, 0, 1, 1, 0, 17, 1, 0, 3], [2, 0, -1, 3, 0, 1, 2, -1, 3, 1], [8, 3, 0, 5]),
    "one_segment": ([70], [2], None),   # row_tile 64
    "more_segments_than_rows": ([0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 0, 1], [0, 1, 2, 3, 1, 0, -1, 2, 3, 0, 1, 3], None),
    "no_rows": ([0, 0], [1, 2], None),
}


def _batch(source: str, lengths, seg_adapters, ranks, num_adapters):
    """(ids (M,), the AdapterBatch built from `source`: "ids" or "segments")."""
    seg_adapters = torch.tensor(seg_adapters, device=DEVICE)
    starts = torch.tensor(_starts(lengths), device=DEVICE)
    ids = torch.repeat_interleave(seg_adapters, starts[1:] - starts[:-1])
    if source == "ids":
        return ids, AdapterBatch(ids, num_adapters, ranks=ranks)
    return ids, AdapterBatch.from_segments(starts, seg_adapters, num_adapters, ranks=ranks)


@pytest.mark.parametrize("dtype", [FP32, FP16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("source", ["ids", "segments"])
@pytest.mark.parametrize("case", BATCHES)
def test_multi_op_on_tiled_batches(backend, case, source, dtype):
    skip_unless_backend_serves(backend, dtype)
    lengths, seg_adapters, ranks = BATCHES[case]
    gen = torch.Generator().manual_seed(1)
    ids, batch = _batch(source, lengths, seg_adapters, ranks, 4)
    x = make_x(sum(lengths), 24, "2d", dtype, gen)
    w, bias, a, b, scales = make_stacks(4, 20, 24, 8, dtype, True, gen, ranks)
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=batch, ranks=ranks)


@pytest.mark.parametrize("k", [160, 256], ids=["5_splits", "8_splits"])
def test_rank_partials_over_k_splits(backend, k):
    """K = N = 160 and 256 (fp32, exact dots: 32-deep steps, a 16-row tile) give the shrinks 5 and
    MAX_SPLITS = 8 K-splits, which the expand sums unrolled, in the forward and for dX."""
    skip_unless_backend_serves(backend, FP32)
    if backend == "triton":
        from lora_kernels.triton import _common
        from lora_kernels.triton.multi_lora_linear import segmented_config

        cfg = segmented_config(16, 8, _common.fp32_dot(FP32))
        assert _common.split_reduction(k, cfg.block_k, 3)[0] == (5 if k == 160 else _common.MAX_SPLITS)
    gen = torch.Generator().manual_seed(2)
    ids, batch = _batch("segments", [5, 0, 20, 1, 14], [1, 3, 0, -1, 1], [8, 2, 0, 5], 4)
    x = make_x(40, k, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(4, k, k, 8, FP32, True, gen, [8, 2, 0, 5])
    check_against_reference(x, w, bias, a, b, scales, ids, adapters=batch, ranks=[8, 2, 0, 5])


# ---------------------------------------------------------------------------------------------
# unchecked malformed metadata: the torch backend's reading, and no read outside the inputs
# ---------------------------------------------------------------------------------------------

def _padded(t: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """t as a view into a NaN-filled buffer `pad` entries larger on each side of its first dim."""
    buffer = torch.full((t.shape[0] + 2 * pad, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    buffer[pad:pad + t.shape[0]] = t
    return buffer[pad:pad + t.shape[0]]


def _run_unchecked(backend: str, make_batch, m: int, seed: int = 3):
    """y and (dx, dA, dB) of multi_lora_linear on `backend` with the batch make_batch() builds while the
    id check is off; x, lora_a and lora_b are views into NaN padding (rows -2, -1, M, M + 1 and adapter
    slots -2, -1, L, L + 1 are NaN)."""
    lora_kernels.set_backend(backend)
    set_check_adapter_ids(False)
    batch = make_batch()
    gen = torch.Generator().manual_seed(seed)
    x = make_x(m, 24, "2d", FP32, gen)
    w, bias, a, b, scales = make_stacks(4, 20, 24, 8, FP32, True, gen)
    x, a, b = (_padded(t).requires_grad_() for t in (x, a, b))
    y = multi_lora_linear(x, w, bias, a, b, scales, batch)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    return (y, *torch.autograd.grad(y, [x, a, b], grad_y))


MALFORMED = {
    # ids past [-1, L): read as -1 (int64 past int32 too)
    "ids_out_of_range": lambda: AdapterBatch(
        torch.tensor([0, 7, -5, 3, 2**40, 1, -1, 4, 2, 3, 3, 9], device=DEVICE), 4),
    # segment_starts falling back, past num_rows and negative; adapters past L
    "starts_non_monotone": lambda: AdapterBatch.from_segments(
        torch.tensor([0, 9, 4, 12, 30, 25], device=DEVICE), torch.tensor([1, 3, 0, 2, 5], device=DEVICE), 4,
        num_rows=20),
    "starts_out_of_range": lambda: AdapterBatch.from_segments(
        torch.tensor([-7, 3, 3, 50, -2, 20], device=DEVICE), torch.tensor([2, 1, 3, 0, 1], device=DEVICE), 4,
        num_rows=20),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_unchecked_malformed_metadata_reads_as_torch_does(case):
    skip_unless_backend_serves("triton", FP32)
    m = 12 if case == "ids_out_of_range" else 20
    expected = _run_unchecked("torch", MALFORMED[case], m)
    actual = _run_unchecked("triton", MALFORMED[case], m)
    for name, got, want in zip(("y", "dx", "dlora_a", "dlora_b"), actual, expected):
        assert torch.isfinite(got).all(), f"{name}: NaN from outside an input"
        assert_same_maths(got, want, name)


# ---------------------------------------------------------------------------------------------
# weight-gradient memory: the active adapters, not the slots; bit-identical on repeat
# ---------------------------------------------------------------------------------------------

_FACTORIES = {"empty", "empty_strided", "zeros", "full", "new_empty", "new_empty_strided", "new_zeros",
              "new_full", "empty_like", "zeros_like", "full_like"}


class _Fp32Allocations(TorchDispatchMode):
    """The numel of every fp32 tensor a factory op creates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in _FACTORIES and isinstance(out, torch.Tensor) and out.dtype == FP32:
            self.sizes.append(out.numel())
        return out


def test_weight_gradient_partials_cover_active_adapters_only():
    """L = 256 slots, 2 in use, fp16 inputs (the (L, r, K) and (L, N, r) gradients themselves are
    fp16): the largest fp32 allocation of the backward is O(active · r · (K + N)) plus O(M · (K + N)),
    not the (splits, L, P, Q) partials of every slot (256 · 8 · 32 = 65,536 for dA)."""
    skip_unless_backend_serves("triton", FP16)
    lora_kernels.set_backend("triton")
    num_adapters, m, k, n, r = 256, 16, 32, 24, 8
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor([7, 200] * (m // 2), device=DEVICE)
    x = make_x(m, k, "2d", FP16, gen).requires_grad_()
    w, bias, a, b, scales = make_stacks(num_adapters, n, k, r, FP16, True, gen)
    a.requires_grad_()
    b.requires_grad_()
    y = multi_lora_linear(x, w, bias, a, b, scales, AdapterBatch(ids, num_adapters))
    grad_y = torch.randn(y.shape, generator=gen).to(DEVICE, FP16)
    with _Fp32Allocations() as allocations:
        grad_x, grad_a, grad_b = torch.autograd.grad(y, [x, a, b], grad_y)
    bound = 4 * (2 * r * (k + n) + m * (r + k + n))
    assert allocations.sizes and max(allocations.sizes) <= bound, (max(allocations.sizes), bound)
    unused = torch.ones(num_adapters, dtype=torch.bool, device=DEVICE)
    unused[[7, 200]] = False
    assert torch.count_nonzero(grad_a[unused]) == 0 and torch.count_nonzero(grad_b[unused]) == 0
    assert grad_a[7].abs().sum() > 0 and grad_b[200].abs().sum() > 0


@pytest.mark.parametrize("source", ["ids", "segments"])
def test_bit_identical_on_repeat(source):
    skip_unless_backend_serves("triton", FP32)
    lora_kernels.set_backend("triton")
    gen = torch.Generator().manual_seed(6)
    _, batch = _batch(source, [5, 0, 20, 1, 14, 30], [1, 3, 0, -1, 1, 2], [8, 2, 0, 5], 4)
    x = make_x(70, 160, "2d", FP32, gen)   # 5 K-splits
    w, bias, a, b, scales = make_stacks(4, 24, 160, 8, FP32, True, gen)
    grad_y = torch.randn(70, 24, generator=gen).to(DEVICE)

    def run():
        leaves = [t.detach().requires_grad_() for t in (x, a, b)]
        y = multi_lora_linear(leaves[0], w, bias, leaves[1], leaves[2], scales, batch)
        return (y, *torch.autograd.grad(y, leaves, grad_y))

    first, second = run(), run()
    for name, u, v in zip(("y", "dx", "dlora_a", "dlora_b"), first, second):
        assert torch.equal(u, v), name
