"""Launchers of the single-adapter LoRA kernels: allocate, pick a config by shape, launch.

Inputs arrive validated by the op layer (lora_kernels.ops.lora_linear): x2d (M, K) with last
stride 1, weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r), all on one device, one dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from .kernels.lora_linear import (
    dropout_mask_kernel,
    lora_fused_matmul_kernel,
    lora_rows_matmul_kernel,
    lora_shrink_kernel,
)

# Enough programs to fill an H100 (132 SMs) about twice; the split heuristics aim at it.
TARGET_PROGRAMS = 256
# Split reductions write fp32 partials that every consumer re-reads: keep them few (8 x 16 rows
# x r of rank partials per column block at decode, against 4096 x 32 of W0 it streams).
MAX_SPLITS = 8
# Column blocks wanted at decode sizes: about one per SM of an H100 (132).
DECODE_PROGRAMS = 128


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    group_m: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_r: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowsConfig:
    block_p: int
    block_q: int
    block_m: int
    num_warps: int
    num_stages: int


def rank_block(rank: int, cap: int) -> int:
    """Rank tile: a power of two >= 16 (tl.dot's minimum), at most cap; larger ranks loop."""
    return min(cap, max(16, triton.next_power_of_2(rank)))


@functools.lru_cache(maxsize=1024)
def fused_matmul_config(m: int, n: int, k: int, rank: int) -> MatmulConfig:
    """Heuristic by M: decode sizes are bound by reading W0, so small M tiles and
    column blocks narrow enough for about one program per SM (N = 4096 -> 32 wide, 128 programs);
    prefill/training sizes are compute bound, so large square tiles."""
    if m <= 16:
        block_n = 64
        while block_n > 16 and triton.cdiv(n, block_n) < DECODE_PROGRAMS:
            block_n //= 2
        # BLOCK_K 128: 3 stages in flight of 16 KB (bf16, BLOCK_N 64); fp32 needs 122 KB of shared
        # memory, where BLOCK_K 256 needed 240 KB, past both sm_80 (163 KB) and sm_90 (227 KB)
        return MatmulConfig(16, block_n, 128, rank_block(rank, 64), 8, 4, 4)
    if m <= 64:
        return MatmulConfig(64, 64, 64, rank_block(rank, 64), 8, 4, 4)
    if m <= 256:
        # 8 warps: with 4, the dX epilogue's dropout (two live fp32 tiles) spilled ~1 KB per thread
        return MatmulConfig(64, 128, 64, rank_block(rank, 32), 8, 8, 4)
    return MatmulConfig(128, 128, 64, rank_block(rank, 32), 8, 8, 3)


@functools.lru_cache(maxsize=1024)
def shrink_config(m: int, k: int, rank: int) -> ShrinkConfig:
    if m <= 16:
        return ShrinkConfig(16, rank_block(rank, 64), 128, 4, 3)
    return ShrinkConfig(64, rank_block(rank, 64), 64, 4, 3)


@functools.lru_cache(maxsize=1024)
def rows_config(p: int, q: int) -> RowsConfig:
    """Weight-gradient tiles: one side is the rank (small), the other K or N (large)."""
    block_p = 16 if p <= 16 else (32 if p <= 32 else 64)
    block_q = 16 if q <= 16 else (32 if q <= 32 else 64)
    return RowsConfig(block_p, block_q, 64, 4, 3)


@functools.lru_cache(maxsize=1024)
def _splits(length: int, block: int, programs: int) -> tuple[int, int]:
    """(number of splits, elements per split) of a reduction of `length`, so that `programs`
    programs per split times the splits reach about TARGET_PROGRAMS. Every split is non-empty."""
    blocks = triton.cdiv(max(length, 1), block)
    splits = max(1, min(MAX_SPLITS, blocks, TARGET_PROGRAMS // max(programs, 1)))
    per_split = triton.cdiv(blocks, splits) * block
    return triton.cdiv(max(length, 1), per_split), per_split


def _sum_splits(partials: torch.Tensor) -> torch.Tensor:
    """(S, ...) fp32 partials -> (...): summed in a fixed order (deterministic), no copy when S = 1."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own switch (torch.backends.cuda.matmul.allow_tf32, off by
    default): exact fp32 unless the user allowed tf32. 16-bit inputs use their own tensor cores."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def lora_precision(dtype: torch.dtype) -> str:
    """The rank-r products take the fp32 intermediate and an upcast 16-bit operand: tf32 tensor
    cores (10-bit mantissa, finer than bf16's 7) for 16-bit inputs; fp32 inputs as dot_precision."""
    return dot_precision(dtype) if dtype == torch.float32 else "tf32"


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, float, float]:
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
    return seed, dropout_p, keep_scale


def shrink(x: torch.Tensor, a: torch.Tensor, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """fp32 partials (S, M, R) of dropout(x) · aᵀ; x (M, K), a (R, K) as any strided view."""
    m, k = x.shape
    rank = a.shape[0]
    cfg = shrink_config(m, k, rank)
    grid_mr = triton.cdiv(m, cfg.block_m) * triton.cdiv(rank, cfg.block_r)
    splits, k_per_split = _splits(k, cfg.block_k, grid_mr)
    partials = torch.empty((splits, m, rank), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(rank, cfg.block_r), splits)
    lora_shrink_kernel[grid](
        x, a, partials,
        m, k, rank, k_per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        partials.stride(0), partials.stride(1),
        *_dropout_args(dropout_p, seed),
        DROPOUT=dropout_p > 0.0,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return partials


def fused_matmul(
    x: torch.Tensor,            # (M, K)
    w: torch.Tensor,            # (K, N), any strides
    bias: torch.Tensor | None,  # (N,)
    t_partials: torch.Tensor,   # (S, M, R) fp32
    v: torch.Tensor,            # (R, N), any strides
    scale: float,
    store_t_sum: bool,
    epilogue_dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out (M, N) = x·w + bias + scale · (dropout_mask ⊙ ((Σ_s t_partials[s]) · v)), and, when
    store_t_sum, the reduced (M, R) fp32 intermediate Σ_s t_partials[s]."""
    m, k = x.shape
    n = w.shape[1]
    splits, _, rank = t_partials.shape
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    t_sum = torch.empty((m, rank), device=x.device, dtype=torch.float32) if store_t_sum else None
    cfg = fused_matmul_config(m, n, k, rank)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    lora_fused_matmul_kernel[grid](
        x, w, bias if bias is not None else out, t_partials, v, out, t_sum if store_t_sum else t_partials,
        m, n, k, rank, splits,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        t_partials.stride(0), t_partials.stride(1),
        v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        t_sum.stride(0) if store_t_sum else 0,
        bias.stride(0) if bias is not None else 0,
        scale, *_dropout_args(epilogue_dropout_p, seed),
        HAS_BIAS=bias is not None, STORE_T_SUM=store_t_sum, EPILOGUE_DROPOUT=epilogue_dropout_p > 0.0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
        GROUP_M=cfg.group_m, DOT_PRECISION=dot_precision(x.dtype), LORA_DOT_PRECISION=lora_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, t_sum


def rows_matmul(
    left: torch.Tensor,    # (M, P)
    right: torch.Tensor,   # (M, Q)
    out_dtype: torch.dtype,
    alpha: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """alpha · leftᵀ · dropout(right) -> (P, Q) in out_dtype, reduced over the M rows in fixed order."""
    m, p = left.shape
    q = right.shape[1]
    cfg = rows_config(p, q)
    grid_pq = triton.cdiv(p, cfg.block_p) * triton.cdiv(q, cfg.block_q)
    splits, rows_per_split = _splits(m, cfg.block_m, grid_pq)
    partials = torch.empty((splits, p, q), device=left.device, dtype=torch.float32)
    grid = (triton.cdiv(p, cfg.block_p), triton.cdiv(q, cfg.block_q), splits)
    compute_dtype = left.dtype if left.dtype != torch.float32 else right.dtype
    lora_rows_matmul_kernel[grid](
        left, right, partials,
        m, p, q, rows_per_split,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partials.stride(0), partials.stride(1),
        alpha, *_dropout_args(dropout_p, seed),
        DROPOUT_R=dropout_p > 0.0,
        BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m,
        DOT_PRECISION=lora_precision(compute_dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _sum_splits(partials).to(out_dtype)


def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and lora_hidden T = dropout(x) Aᵀ (M, r) fp32, saved for dB."""
    t_partials = shrink(x, lora_a, dropout_p, seed)                       # (S, M, r)
    y, lora_hidden = fused_matmul(x, weight.T, bias, t_partials, lora_b.T, scale, store_t_sum=True)
    return y, lora_hidden


def lora_linear_backward(
    grad_y: torch.Tensor,          # (M, N), last stride 1
    x: torch.Tensor | None,        # (M, K), needed for dA
    weight: torch.Tensor | None,   # (N, K), needed for dX
    lora_a: torch.Tensor | None,   # (r, K), needed for dX
    lora_b: torch.Tensor | None,   # (N, r), needed for dX and dA
    lora_hidden: torch.Tensor | None,   # (M, r) fp32 T = dropout(x) Aᵀ, needed for dB
    scale: float, dropout_p: float, seed: int,
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dA, dB) for the grads asked for.
    dU = dY·B (M, r);  dX = dY·W0 + mask ⊙ (s·dU·A);  dA = s·dUᵀ·dropout(x);  dB = s·dYᵀ·T."""
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        du_partials = shrink(grad_y, lora_b.T)                            # (S, M, r)
        if need_x:
            grad_x, grad_u = fused_matmul(grad_y, weight, None, du_partials, lora_a, scale,
                                          store_t_sum=need_a, epilogue_dropout_p=dropout_p, seed=seed)
        else:
            grad_u = _sum_splits(du_partials)
        if need_a:
            grad_a = rows_matmul(grad_u, x, grad_y.dtype, scale, dropout_p, seed)   # (r, K)
    if need_b:
        grad_b = rows_matmul(grad_y, lora_hidden, grad_y.dtype, scale)           # (N, r)
    return grad_x, grad_a, grad_b


def dropout_keep_mask(m: int, k: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The (M, K) bool keep-mask the kernels derive from `seed` (tests check forward/backward with it)."""
    out = torch.empty((m, k), device=device, dtype=torch.int8)
    if m and k:
        grid = (triton.cdiv(m, 32), triton.cdiv(k, 64))
        dropout_mask_kernel[grid](out, m, k, seed, dropout_p, BLOCK_M=32, BLOCK_K=64)
    return out.bool()
