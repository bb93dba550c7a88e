"""Launchers of the multi-adapter LoRA kernels: allocate, pick tiles by shape, launch (the public
launchers under their inputs' device: _device.on_device_of).

Inputs arrive validated by the op layer (lora_kernels.ops.multi_lora_linear): x (M, K) with last
stride 1, weight (N, K), bias (N,) | None, lora_a (L, R, K), lora_b (L, N, R), scales (L,) fp32,
and an AdapterBatch's tensors. The base GEMM is torch's (cuBLAS); the LoRA term is added into its
output in place by the expand kernel, so rows of no adapter are F.linear's output bit for bit.
Grids depend on shapes only: nothing is read back from the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from .kernels.multi_lora_linear import (
    segmented_expand_kernel,
    segmented_rows_matmul_kernel,
    segmented_shrink_kernel,
)
from ._device import on_device_of
from .lora_linear import (
    _splits, _sum_splits, dot_precision, fp32_dot, lora_precision, rank_block, rows_compute_dtype, rows_config,
)

# Segment lengths scanned per step by every program to find its segment (S <= this: one step).
MAX_BLOCK_S = 1024
# The expand loops over an adapter's rank in 16-wide steps (tl.dot's minimum): a rank-8 adapter
# in a stack padded to 64 does one step, not four.
EXPAND_BLOCK_R = 16


@dataclass(frozen=True)
class SegmentedConfig:
    block_m: int       # rows per tile
    block_k: int       # shrink: reduction step
    block_r: int       # shrink: rank tile
    block_n: int       # expand: output columns per program
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=1024)
def segmented_config(m: int, num_segments: int, rank: int, fp32_dot: str | None = None) -> SegmentedConfig:
    """Decode-like batches (few rows per segment on average) take 16-row tiles, so a one-row
    segment wastes 15 masked rows rather than 63; long segments (prefill, training) take 64.
    At most M segments hold rows, whatever the number of adapter slots: the average uses that.
    8 warps on the 64x128 tiles: the expand needed 163-204 registers a thread with 4 (AOT cubins,
    sm_80/sm_90), 96-110 with 8.
    fp32_dot (lora_linear.fp32_dot of the inputs) "ieee": the shrink's dot runs as FMA, which holds the
    (BM, BLOCK_K) and (BLOCK_K, BR) operand slices in registers: 128- and 64-deep steps spilled
    8 B-3.9 KB per thread (AOT cubins, sm_80 / sm_90; 3.9 KB unspecialized); 32- and 16-deep: 47-174
    registers, none. The expand's tiles do not depend on it."""
    if m <= 64 or m < 32 * min(num_segments, m):
        return SegmentedConfig(16, 32 if fp32_dot == "ieee" else 128, rank_block(rank, 64), 64, 4, 3)
    return SegmentedConfig(64, 16 if fp32_dot == "ieee" else 64, rank_block(rank, 64), 128, 8, 3)


def _block_s(num_segments: int) -> int:
    return min(MAX_BLOCK_S, triton.next_power_of_2(max(num_segments, 1)))


def _row_tiles(m: int, num_segments: int, block_m: int) -> int:
    """Upper bound on the row tiles of any grouping: each segment adds at most one partial tile,
    and every tile holds at least one row (decode over 1,024 adapter slots: 64 tiles, not 1,028)."""
    return min(triton.cdiv(m, block_m) + num_segments, m)


def segmented_shrink(
    x: torch.Tensor,                 # (M, K)
    a: torch.Tensor,                 # (L, R, K), any strides
    rows: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None,
) -> torch.Tensor:
    """fp32 partials (S_k, M, R) of x[rows] · a[j]ᵀ, split over K; rows of no adapter are left unwritten."""
    m, k = x.shape
    rank = a.shape[1]
    num_segments = seg_starts.shape[0] - 1
    cfg = segmented_config(m, num_segments, rank, fp32_dot(x.dtype))
    rank_tiles = triton.cdiv(rank, cfg.block_r)
    # splits sized for the tiles that do work (about cdiv(M, BLOCK_M)), not the grid's bound
    splits, k_per_split = _splits(k, cfg.block_k, triton.cdiv(m, cfg.block_m) * rank_tiles)
    partials = torch.empty((splits, m, rank), device=x.device, dtype=torch.float32)
    grid = (_row_tiles(m, num_segments, cfg.block_m), rank_tiles, splits)
    segmented_shrink_kernel[grid](
        x, a, partials, rows, seg_starts, seg_adapters if seg_adapters is not None else seg_starts,
        ranks if ranks is not None else seg_starts,
        k, rank, num_segments, k_per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
        partials.stride(0), partials.stride(1),
        SEGMENT_IS_ADAPTER=seg_adapters is None, HAS_RANKS=ranks is not None,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, BLOCK_S=_block_s(num_segments),
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return partials


def segmented_expand_(
    out: torch.Tensor,               # (M, N), updated in place; any strides
    t_partials: torch.Tensor,        # (S_k, M, R) fp32
    v: torch.Tensor,                 # (L, R, N), any strides
    scales: torch.Tensor,            # (L,) fp32
    rows: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None,
    store_t_sum: bool,
) -> torch.Tensor | None:
    """out[rows] += scales[j] · (Σ_s t_partials[s][rows]) · v[j]; returns the reduced (M, R) fp32
    intermediate (zero on rows of no adapter and past each rank) when store_t_sum, else None."""
    m, n = out.shape
    splits, _, rank = t_partials.shape
    num_segments = seg_starts.shape[0] - 1
    cfg = segmented_config(m, num_segments, rank, fp32_dot(out.dtype))
    t_sum = torch.zeros((m, rank), device=out.device, dtype=torch.float32) if store_t_sum else None
    grid = (_row_tiles(m, num_segments, cfg.block_m), triton.cdiv(n, cfg.block_n))
    segmented_expand_kernel[grid](
        t_partials, v, out, t_sum if store_t_sum else t_partials, rows, seg_starts,
        seg_adapters if seg_adapters is not None else seg_starts, ranks if ranks is not None else seg_starts,
        scales,
        n, rank, num_segments, splits,
        t_partials.stride(0), t_partials.stride(1),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        t_sum.stride(0) if store_t_sum else 0,
        SEGMENT_IS_ADAPTER=seg_adapters is None, HAS_RANKS=ranks is not None, STORE_T_SUM=store_t_sum,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=EXPAND_BLOCK_R, BLOCK_S=_block_s(num_segments),
        LORA_DOT_PRECISION=lora_precision(out.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return t_sum


def segmented_rows_matmul(
    left: torch.Tensor,              # (M, P)
    right: torch.Tensor,             # (M, Q)
    scales: torch.Tensor,            # (L,) fp32
    sorted_rows: torch.Tensor, adapter_starts: torch.Tensor, ranks: torch.Tensor | None,
    rank: int, rank_on_p: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """(L, P, Q) in out_dtype: scales[j] · leftᵀ · right over adapter j's rows, rank-masked on P or Q."""
    m, p = left.shape
    q = right.shape[1]
    num_adapters = adapter_starts.shape[0] - 1
    compute_dtype = rows_compute_dtype(left, right)
    # the single-adapter weight-gradient tiles: one side is the rank (small)
    cfg = rows_config(p, q, fp32_dot(compute_dtype))
    tiles_pq = triton.cdiv(p, cfg.block_p) * triton.cdiv(q, cfg.block_q)
    # split each adapter's rows as if one adapter had every row (a skewed training batch: 8 slots,
    # one in use, would otherwise run on 1/8 of the programs), but keep the fp32 partials no larger
    # than the rows read: at many adapters (decode-sized batches, 1,024 slots) one split
    splits, _ = _splits(m, cfg.block_m, tiles_pq)
    splits = max(1, min(splits, (m * (p + q)) // (num_adapters * p * q)))
    partials = torch.empty((splits, num_adapters, p, q), device=left.device, dtype=torch.float32)
    segmented_rows_matmul_kernel[(num_adapters, tiles_pq, splits)](
        left, right, partials, sorted_rows, adapter_starts, ranks if ranks is not None else adapter_starts, scales,
        p, q, rank, splits,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partials.stride(0), partials.stride(1), partials.stride(2),
        HAS_RANKS=ranks is not None, RANK_ON_P=rank_on_p,
        BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m,
        DOT_PRECISION=lora_precision(compute_dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _sum_splits(partials).to(out_dtype)


def _base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear's own GEMM: rows of no adapter keep exactly this value."""
    return torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T


@on_device_of("out")
def multi_lora_add_(
    out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    segment_rows: torch.Tensor, segment_starts: torch.Tensor, segment_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None, store_hidden: bool = False,
) -> torch.Tensor | None:
    """out[rows of j] += scales[j] · (x A[j]ᵀ) B[j]ᵀ in place (out (M, N), any strides: a column
    slice of a fused qkv output, a transposed view); returns T (M, R) fp32 when store_hidden."""
    segments = (segment_rows, segment_starts, segment_adapters, ranks)
    t_partials = segmented_shrink(x, lora_a, *segments)                             # (S_k, M, R)
    return segmented_expand_(out, t_partials, lora_b.transpose(1, 2), scales, *segments,
                             store_t_sum=store_hidden)


@on_device_of("x")
def multi_lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
    segment_rows: torch.Tensor, segment_starts: torch.Tensor, segment_adapters: torch.Tensor | None,
    ranks: torch.Tensor | None, need_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and, when need_hidden, T = x A[j]ᵀ (M, R) fp32 for dB (else an empty (M, 0))."""
    y = _base(x, weight, bias)                                                       # (M, N)
    hidden = multi_lora_add_(y, x, lora_a, lora_b, scales, segment_rows, segment_starts, segment_adapters,
                             ranks, store_hidden=need_hidden)
    return y, hidden if need_hidden else x.new_empty((x.shape[0], 0), dtype=torch.float32)


@on_device_of("grad_y")
def multi_lora_linear_backward(
    grad_y: torch.Tensor,            # (M, N), last stride 1
    x: torch.Tensor | None,          # (M, K), for dA
    weight: torch.Tensor,            # (N, K)
    lora_a: torch.Tensor,            # (L, R, K)
    lora_b: torch.Tensor,            # (L, N, R)
    lora_hidden: torch.Tensor | None,   # (M, R) fp32 T = x A[j]ᵀ, for dB
    scales: torch.Tensor, sorted_rows: torch.Tensor, adapter_starts: torch.Tensor,
    ranks: torch.Tensor | None, need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Over adapter j's rows: dU = dY·B[j] (M, R);  dX = dY·W0 + s_j·dU·A[j];  dA[j] = s_j·dUᵀ·X;
    dB[j] = s_j·dYᵀ·T. The segments are the adapters themselves (the by-adapter view)."""
    max_rank = lora_a.shape[1]
    segments = (sorted_rows, adapter_starts, None, ranks)
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        du_partials = segmented_shrink(grad_y, lora_b.transpose(1, 2), *segments)      # (S_k, M, R)
        if need_x:
            grad_x = grad_y @ weight                                                      # (M, K)
            grad_u = segmented_expand_(grad_x, du_partials, lora_a, scales, *segments, store_t_sum=need_a)
        else:
            grad_u = _sum_splits(du_partials)   # entries of no adapter / past a rank: never read
        if need_a:
            grad_a = segmented_rows_matmul(grad_u, x, scales, sorted_rows, adapter_starts, ranks,
                                           max_rank, rank_on_p=True, out_dtype=grad_y.dtype)   # (L, R, K)
    if need_b:
        grad_b = segmented_rows_matmul(grad_y, lora_hidden, scales, sorted_rows, adapter_starts, ranks,
                                       max_rank, rank_on_p=False, out_dtype=grad_y.dtype)      # (L, N, R)
    return grad_x, grad_a, grad_b
