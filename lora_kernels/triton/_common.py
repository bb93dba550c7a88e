"""What both launchers (lora_linear.py, multi_lora_linear.py) share: the precision of their dots, the
split reductions' arithmetic, and the weight-gradient tiles (rows_config) both weight-gradient kernels
run. Neither launcher imports the other; both import this.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from ..tuning import fp32_matmul_uses_tf32

# Enough programs to fill an H100 (132 SMs) about twice; the split heuristics aim at it.
TARGET_PROGRAMS = 256
# Split reductions write fp32 partials that every consumer re-reads: keep them few (8 x 16 rows
# x r of rank partials per column block at decode, against 4096 x 32 of W0 it streams).
MAX_SPLITS = 8


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own setting for fp32 matmuls (fp32_matmul_uses_tf32, off by
    default): exact fp32 unless the user allowed tf32. 16-bit inputs use their own tensor cores."""
    if dtype == torch.float32 and not fp32_matmul_uses_tf32():
        return "ieee"
    return "tf32"


def fp32_dot(dtype: torch.dtype) -> str | None:
    """What the config heuristics take of the precision: dot_precision of fp32 inputs ("ieee": exact
    fp32, tl.dot as FMA; "tf32"), None for 16-bit inputs (their own tensor cores)."""
    return dot_precision(dtype) if dtype == torch.float32 else None


def lora_precision(dtype: torch.dtype) -> str:
    """The rank-r products take the fp32 intermediate and an upcast 16-bit operand: tf32 tensor
    cores (10-bit mantissa, finer than bf16's 7) for 16-bit inputs; fp32 inputs as dot_precision."""
    return dot_precision(dtype) if dtype == torch.float32 else "tf32"


def rows_compute_dtype(left: torch.Tensor, right: torch.Tensor) -> torch.dtype:
    """The dtype whose precision a weight-gradient product takes: one operand is the fp32 rank
    intermediate, the other the input dtype (fp32 when both are)."""
    return left.dtype if left.dtype != torch.float32 else right.dtype


def rank_block(rank: int, cap: int) -> int:
    """Rank tile: a power of two >= 16 (tl.dot's minimum), at most cap; larger ranks loop."""
    return min(cap, max(16, triton.next_power_of_2(rank)))


@functools.lru_cache(maxsize=1024)
def split_reduction(length: int, block: int, programs: int) -> tuple[int, int]:
    """(number of splits, elements per split) of a reduction of `length`, so that `programs`
    programs per split times the splits reach about TARGET_PROGRAMS. Every split is non-empty."""
    blocks = triton.cdiv(max(length, 1), block)
    splits = max(1, min(MAX_SPLITS, blocks, TARGET_PROGRAMS // max(programs, 1)))
    per_split = triton.cdiv(blocks, splits) * block
    return triton.cdiv(max(length, 1), per_split), per_split


def sum_splits(partials: torch.Tensor) -> torch.Tensor:
    """(S, ...) fp32 partials -> (...): summed in a fixed order (deterministic), no copy when S = 1."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)


@dataclass(frozen=True, kw_only=True)
class RowsConfig:
    block_p: int
    block_q: int
    block_m: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=1024)
def rows_config(p: int, q: int, fp32_dot: str | None = None, dropout: bool = False) -> RowsConfig:
    """Weight-gradient tiles (lora_rows_matmul_kernel, segmented_rows_matmul_kernel): one side is the
    rank (small), the other K or N (large).
    fp32_dot: fp32_dot(dtype) of the 16-bit or fp32 operand ("ieee": FMA dots); dropout: the right
    operand's keep-mask is drawn in the row loop (dA)."""
    block_p = 16 if p <= 16 else (32 if p <= 32 else 64)
    block_q = 16 if q <= 16 else (32 if q <= 32 else 64)
    # 8 warps from 32x64 up: with 4 it spilled 8-24 B at 64x64 (fp32 tf32 dB on sm_80 at 96 registers;
    # 16-bit and exact fp32 unspecialized) and 8-160 B at 32x64 (fp32 tf32 unspecialized, sm_90), with
    # 8 37-196 registers and none
    num_warps = 8 if block_p * block_q >= 32 * 64 else 4
    # 16 rows deep for FMA dots (exact fp32): 64 deep spilled 224 B-7 KB per thread (at 64x64 ptxas kept
    # 32 registers and spilled everything), 16 deep 96-217 registers and none. 32 deep under dropout
    # (half the Philox draws per step): 64 deep spilled 8 B at 128-168 registers (dA, q 64, sm_80) and
    # up to 96 B unspecialized; 32 deep 126-182 registers, none
    block_m = 16 if fp32_dot == "ieee" else (32 if dropout else 64)
    return RowsConfig(block_p=block_p, block_q=block_q, block_m=block_m, num_warps=num_warps, num_stages=3)


def base_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) · weight (N, K)ᵀ + bias: F.linear's own GEMM (cuBLAS on CUDA), the split strategy's base."""
    return torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T


# Absent tensors (no bias, no t_sum, ...): the kernel's flag says so and never reads the pointer or stride.
def or_stand_in(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """t, or a stand-in pointer the kernel never reads (its flag says t is absent)."""
    return t if t is not None else stand_in


def stride_or_zero(t: torch.Tensor | None, dim: int) -> int:
    """t.stride(dim), or 0 for an absent t."""
    return t.stride(dim) if t is not None else 0
