"""Launchers of the multi-adapter LoRA kernels: allocate, pick tiles by shape, launch (the public
launchers under their inputs' device: _device.on_device_of).

Inputs arrive validated by the op layer (lora_kernels.ops.multi_lora_linear): x (M, K) with last
stride 1, weight (N, K), bias (N,) | None, lora_a (L, R, K), lora_b (L, N, R), scales (L,) fp32,
and batch: metadata.BatchTensors (the torch backend takes the same arguments). The kernels find
their rows through the batch's tile maps and take its row_tile as BLOCK_M. The base GEMM is
torch's (cuBLAS); the LoRA term is added into its output in place by the expand kernel, so rows of
no adapter are F.linear's output bit for bit.
Grids depend on shapes only: nothing is read back from the device.
Each kernel is launched by keyword from its argument builder (segmented_shrink_arguments, ...), which
tests/test_aot_compile.py calls too; precision, split reductions and the weight-gradient tiles come from
_common.py, shared with the single-adapter launcher.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton

from .kernels.multi_lora_linear import (
    segmented_expand_kernel,
    segmented_rows_matmul_kernel,
    segmented_shrink_kernel,
)
from ._common import (
    MAX_SPLITS, RowsConfig, base_gemm, dot_precision, fp32_dot, lora_precision, or_stand_in, rank_block, rows_compute_dtype,
    rows_config, split_reduction, stride_or_zero, sum_splits,
)
from ._device import on_device_of

if TYPE_CHECKING:   # the type only: metadata sits above the backends
    from ..metadata import BatchTensors

# The expand loops over an adapter's rank in 16-wide steps (tl.dot's minimum): a rank-8 adapter
# in a stack padded to 64 does one step, not four.
EXPAND_BLOCK_R = 16


@dataclass(frozen=True, kw_only=True)
class SegmentedConfig:
    block_m: int       # rows per tile: the batch's row_tile (its tile map was built for it)
    block_k: int       # shrink: reduction step
    block_r: int       # shrink: rank tile
    block_n: int       # expand: output columns per program
    num_warps: int
    num_stages: int    # shrink
    expand_stages: int


@functools.lru_cache(maxsize=1024)
def segmented_config(row_tile: int, rank: int, fp32_dot: str | None = None) -> SegmentedConfig:
    """Tiles of the segmented shrink and expand for a batch's row tile (metadata.row_tile, from its
    rows and active segments: 16 for decode-like batches, so a one-row segment wastes 15 masked rows
    rather than 63; 64 for long segments, prefill and training).
    The expand on 64-row tiles: 8 warps, 64 columns, 2 stages. Its unrolled split sum keeps up to
    MAX_SPLITS = 8 (64, 16) fp32 tiles and their addresses live: 64x128 tiles with 3 stages (the
    runtime split loop's config: 96-110 registers) needed 200-255 registers and spilled 8-24 B at 8
    splits (sm_80 and sm_90, aligned and unspecialized; 1 stage still spilled 8-16 B); 64x64 with 2
    stages: 96-181 registers, none (AOT cubins).
    fp32_dot (_common.fp32_dot of the inputs) "ieee": the shrink's dot runs as FMA, which holds the
    (BM, BLOCK_K) and (BLOCK_K, BR) operand slices in registers: 128- and 64-deep steps spilled
    8 B-3.9 KB per thread (AOT cubins, sm_80 / sm_90; 3.9 KB unspecialized); 32- and 16-deep: 47-174
    registers, none. The expand's tiles do not depend on it.
    fp32_dot "tf32", 64-row tiles: the shrink in 2 stages (of 64-deep fp32 steps: as many bytes in
    flight as 4 of 16-bit ones): with 3, the backward shrink at rank tile 32 spilled 8 B at 64
    registers (sm_80, aligned); with 2, 64 registers and none."""
    if row_tile <= 16:
        return SegmentedConfig(block_m=row_tile, block_k=32 if fp32_dot == "ieee" else 128,
                               block_r=rank_block(rank, 64), block_n=64, num_warps=4, num_stages=3, expand_stages=3)
    return SegmentedConfig(block_m=row_tile, block_k=16 if fp32_dot == "ieee" else 64, block_r=rank_block(rank, 64),
                           block_n=64, num_warps=8, num_stages=2 if fp32_dot == "tf32" else 3, expand_stages=2)


# The kernels' keyword arguments, one function per kernel, from the tensors of its launch: the launchers
# below launch with them, and tests/test_aot_compile.py builds its compile signatures from them (with
# meta tensors of its representative sizes), so both see an argument added or renamed.
# Segments: tiles (T, 2) int32 tile map, rows (M,) int32 position -> row of x, seg_starts (S + 1,) int32,
# seg_adapters (S,) int32 | None (None: segment s is adapter s), ranks (L,) int32 | None (None: every
# adapter has the stack's rank R).

def segmented_shrink_arguments(
    x: torch.Tensor,                 # (M, K)
    a: torch.Tensor,                 # (L, R, K), any strides
    partials: torch.Tensor,          # (S_k, M, R) fp32, written
    tiles: torch.Tensor, rows: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None, k_per_split: int, cfg: SegmentedConfig,
) -> dict:
    """segmented_shrink_kernel's arguments: partials[s][rows] = x[rows, k in split s] · a[j, :, k in split s]ᵀ."""
    return dict(
        x_ptr=x, a_ptr=a, out_ptr=partials, tiles_ptr=tiles, rows_ptr=rows, seg_starts_ptr=seg_starts,
        seg_adapters_ptr=or_stand_in(seg_adapters, seg_starts), ranks_ptr=or_stand_in(ranks, seg_starts),
        K=x.shape[1], R=a.shape[1], k_per_split=k_per_split,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_al=a.stride(0), stride_ar=a.stride(1),
        stride_ak=a.stride(2),
        stride_os=partials.stride(0), stride_om=partials.stride(1),
        SEGMENT_IS_ADAPTER=seg_adapters is None, HAS_RANKS=ranks is not None,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype),
    )


def segmented_expand_arguments(
    out: torch.Tensor,               # (M, N), updated in place; any strides
    t_partials: torch.Tensor,        # (S_k, M, R) fp32
    v: torch.Tensor,                 # (L, R, N), any strides
    scales: torch.Tensor,            # (L,) fp32
    t_sum: torch.Tensor | None,      # (M, R) fp32, written
    tiles: torch.Tensor, rows: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None, cfg: SegmentedConfig,
) -> dict:
    """segmented_expand_kernel's arguments: out[rows] += scales[j] · (Σ_s t_partials[s][rows]) · v[j]."""
    return dict(
        t_ptr=t_partials, v_ptr=v, out_ptr=out, t_sum_ptr=or_stand_in(t_sum, t_partials), tiles_ptr=tiles,
        rows_ptr=rows, seg_starts_ptr=seg_starts, seg_adapters_ptr=or_stand_in(seg_adapters, seg_starts),
        ranks_ptr=or_stand_in(ranks, seg_starts), scales_ptr=scales,
        N=out.shape[1], R=t_partials.shape[2],
        stride_ts=t_partials.stride(0), stride_tm=t_partials.stride(1),
        stride_vl=v.stride(0), stride_vr=v.stride(1), stride_vn=v.stride(2),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_sm=stride_or_zero(t_sum, 0),
        SEGMENT_IS_ADAPTER=seg_adapters is None, HAS_RANKS=ranks is not None, STORE_T_SUM=t_sum is not None,
        NUM_T_SPLITS=t_partials.shape[0],
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=EXPAND_BLOCK_R,
        LORA_DOT_PRECISION=lora_precision(out.dtype),
    )


def segmented_rows_matmul_arguments(
    left: torch.Tensor,              # (M, P)
    right: torch.Tensor,             # (M, Q)
    partials: torch.Tensor,          # (splits, A, P, Q) fp32, written
    active: torch.Tensor,            # (A,) int32: the active adapters
    sorted_rows: torch.Tensor, adapter_starts: torch.Tensor, ranks: torch.Tensor | None,
    scales: torch.Tensor,            # (L,) fp32
    rank: int, rank_on_p: bool, cfg: RowsConfig,
) -> dict:
    """segmented_rows_matmul_kernel's arguments: partials[s, a] = scales[j] · leftᵀ · right over the rows
    of adapter j = active[a] in split s, rank-masked on P (rank_on_p) or Q."""
    return dict(
        l_ptr=left, r_ptr=right, out_ptr=partials, active_ptr=active, rows_ptr=sorted_rows,
        adapter_starts_ptr=adapter_starts, ranks_ptr=or_stand_in(ranks, adapter_starts), scales_ptr=scales,
        P=left.shape[1], Q=right.shape[1], R=rank, num_splits=partials.shape[0],
        stride_lm=left.stride(0), stride_lp=left.stride(1), stride_rm=right.stride(0), stride_rq=right.stride(1),
        stride_os=partials.stride(0), stride_oa=partials.stride(1), stride_op=partials.stride(2),
        HAS_RANKS=ranks is not None, RANK_ON_P=rank_on_p,
        BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m,
        DOT_PRECISION=lora_precision(rows_compute_dtype(left, right)),
    )


def segmented_shrink(
    x: torch.Tensor,                 # (M, K)
    a: torch.Tensor,                 # (L, R, K), any strides
    tiles: torch.Tensor,             # (T, 2) int32 tile map of the segments below
    rows: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None, row_tile: int,
) -> torch.Tensor:
    """fp32 partials (S_k, M, R) of x[rows] · a[j]ᵀ, split over K (S_k <= MAX_SPLITS); rows of no
    adapter are left unwritten."""
    m, k = x.shape
    rank = a.shape[1]
    cfg = segmented_config(row_tile, rank, fp32_dot(x.dtype))
    rank_tiles = triton.cdiv(rank, cfg.block_r)
    # splits sized for the tiles that do work (about cdiv(M, BLOCK_M)), not the grid's bound
    splits, k_per_split = split_reduction(k, cfg.block_k, triton.cdiv(m, cfg.block_m) * rank_tiles)
    partials = torch.empty((splits, m, rank), device=x.device, dtype=torch.float32)
    grid = (tiles.shape[0], rank_tiles, splits)
    segmented_shrink_kernel[grid](
        **segmented_shrink_arguments(x, a, partials, tiles, rows, seg_starts, seg_adapters, ranks, k_per_split, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return partials


def segmented_expand_(
    out: torch.Tensor,               # (M, N), updated in place; any strides
    t_partials: torch.Tensor,        # (S_k, M, R) fp32, S_k <= MAX_SPLITS
    v: torch.Tensor,                 # (L, R, N), any strides
    scales: torch.Tensor,            # (L,) fp32
    tiles: torch.Tensor,             # (T, 2) int32 tile map of the segments below
    rows: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None, row_tile: int,
    store_t_sum: bool,
) -> torch.Tensor | None:
    """out[rows] += scales[j] · (Σ_s t_partials[s][rows]) · v[j]; returns the reduced (M, R) fp32
    intermediate (zero on rows of no adapter and past each rank) when store_t_sum, else None.
    The split sum is unrolled (NUM_T_SPLITS a constexpr): at most MAX_SPLITS variants per config."""
    m, n = out.shape
    splits, _, rank = t_partials.shape
    assert 1 <= splits <= MAX_SPLITS, f"{splits} rank partials: the unrolled sum takes 1 to {MAX_SPLITS}"
    cfg = segmented_config(row_tile, rank, fp32_dot(out.dtype))
    t_sum = torch.zeros((m, rank), device=out.device, dtype=torch.float32) if store_t_sum else None
    grid = (tiles.shape[0], triton.cdiv(n, cfg.block_n))
    segmented_expand_kernel[grid](
        **segmented_expand_arguments(out, t_partials, v, scales, t_sum, tiles, rows, seg_starts, seg_adapters, ranks,
                                     cfg),
        num_warps=cfg.num_warps, num_stages=cfg.expand_stages,
    )
    return t_sum


def segmented_rows_matmul(
    left: torch.Tensor,              # (M, P)
    right: torch.Tensor,             # (M, Q)
    scales: torch.Tensor,            # (L,) fp32
    batch: BatchTensors,             # its by-adapter view and active_adapters (A,)
    rank: int, rank_on_p: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """(L, P, Q) in out_dtype: scales[j] · leftᵀ · right over adapter j's rows, rank-masked on P or Q;
    zeros for the adapters outside batch.active_adapters (no rows). Programs and fp32 partials cover
    the A active adapters only: (splits, A, P, Q), not (splits, L, P, Q) (1,024 slots, r 64, K 4,096:
    1 GiB per split over the slots, 2 MiB for 2 active adapters)."""
    m, p = left.shape
    q = right.shape[1]
    num_adapters = scales.shape[0]
    active = batch.active_adapters
    num_active = active.shape[0]
    grad = torch.zeros((num_adapters, p, q), device=left.device, dtype=out_dtype)
    if num_active == 0:
        return grad
    # the single-adapter weight-gradient tiles: one side is the rank (small)
    cfg = rows_config(p, q, fp32_dot(rows_compute_dtype(left, right)))
    tiles_pq = triton.cdiv(p, cfg.block_p) * triton.cdiv(q, cfg.block_q)
    # split each adapter's rows as if one adapter had every row (a skewed training batch: 8 active
    # adapters, one holding most rows, would otherwise run on 1/8 of the programs), but keep the fp32
    # partials no larger than the rows read: at many active adapters (decode: 64 rows, 64 adapters)
    # one split
    splits, _ = split_reduction(m, cfg.block_m, tiles_pq)
    splits = max(1, min(splits, (m * (p + q)) // (num_active * p * q)))
    partials = torch.empty((splits, num_active, p, q), device=left.device, dtype=torch.float32)
    segmented_rows_matmul_kernel[(num_active, tiles_pq, splits)](
        **segmented_rows_matmul_arguments(left, right, partials, active, batch.sorted_rows, batch.adapter_starts,
                                          batch.ranks, scales, rank, rank_on_p, cfg),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # the active adapters are distinct (a permutation's head): one write each, deterministic
    return grad.index_copy_(0, active.to(torch.int64), sum_splits(partials).to(out_dtype))


def _add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
              scales: torch.Tensor, batch: BatchTensors, store_hidden: bool) -> torch.Tensor | None:
    """multi_lora_add_ over the batch's segments; returns T (M, R) fp32 when store_hidden."""
    segments = (batch.segment_tiles, batch.segment_rows, batch.segment_starts, batch.segment_adapters,
                batch.ranks, batch.row_tile)
    t_partials = segmented_shrink(x, lora_a, *segments)                             # (S_k, M, R)
    return segmented_expand_(out, t_partials, lora_b.transpose(1, 2), scales, *segments,
                             store_t_sum=store_hidden)


@on_device_of("out")
def multi_lora_add_(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    batch: BatchTensors,
) -> None:
    """out[rows of j] += scales[j] · (x A[j]ᵀ) B[j]ᵀ in place (out (M, N), any strides: a column
    slice of a fused qkv output, a transposed view)."""
    _add_lora(out, x, lora_a, lora_b, scales, batch, store_hidden=False)


@on_device_of("x")
def multi_lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, batch: BatchTensors, need_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and, when need_hidden, T = x A[j]ᵀ (M, R) fp32 for dB (else an empty (M, 0)).
    The forward walks the batch's segments (segment_tiles over segment_rows / segment_starts)."""
    y = base_gemm(x, weight, bias)   # (M, N): rows of no adapter keep exactly this value
    hidden = _add_lora(y, x, lora_a, lora_b, scales, batch, store_hidden=need_hidden)
    return y, hidden if need_hidden else x.new_empty((x.shape[0], 0), dtype=torch.float32)


@on_device_of("grad_y")
def multi_lora_linear_backward(
    grad_y: torch.Tensor,            # (M, N), last stride 1
    x: torch.Tensor | None,          # (M, K), for dA
    weight: torch.Tensor,            # (N, K)
    lora_a: torch.Tensor,            # (L, R, K)
    lora_b: torch.Tensor,            # (L, N, R)
    lora_hidden: torch.Tensor | None,   # (M, R) fp32 T = x A[j]ᵀ, for dB
    scales: torch.Tensor, batch: BatchTensors, need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Over adapter j's rows: dU = dY·B[j] (M, R);  dX = dY·W0 + s_j·dU·A[j];  dA[j] = s_j·dUᵀ·X;
    dB[j] = s_j·dYᵀ·T. The segments are the adapters themselves (the by-adapter view: adapter_tiles
    over sorted_rows / adapter_starts); dA and dB have programs for the active adapters only."""
    max_rank = lora_a.shape[1]
    segments = (batch.adapter_tiles, batch.sorted_rows, batch.adapter_starts, None, batch.ranks, batch.row_tile)
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        du_partials = segmented_shrink(grad_y, lora_b.transpose(1, 2), *segments)      # (S_k, M, R)
        if need_x:
            grad_x = grad_y @ weight                                                      # (M, K)
            grad_u = segmented_expand_(grad_x, du_partials, lora_a, scales, *segments, store_t_sum=need_a)
        else:
            grad_u = sum_splits(du_partials)   # entries of no adapter / past a rank: never read
        if need_a:
            grad_a = segmented_rows_matmul(grad_u, x, scales, batch, max_rank, rank_on_p=True,
                                           out_dtype=grad_y.dtype)                        # (L, R, K)
    if need_b:
        grad_b = segmented_rows_matmul(grad_y, lora_hidden, scales, batch, max_rank, rank_on_p=False,
                                       out_dtype=grad_y.dtype)                            # (L, N, R)
    return grad_x, grad_a, grad_b
