"""Launchers of the single-adapter LoRA kernels: allocate, pick a plan and config by shape, launch (the
public launchers under their inputs' device: _device.on_device_of).

Inputs arrive validated by the op layer (lora_kernels.ops.lora_linear): x2d (M, K) with last
stride 1, weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r), all on one device, one dtype.
The forward's y and the backward's dX each run the plan lora_kernels.tuning.plan_for gives them:
"split" (torch's GEMM, then shrink and an in-place expand) or "fused" (our GEMM with the LoRA term
in its accumulator; split_k > 1: fp32 partials over K ranges, summed by the expand kernel).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from ..tuning import MatmulConfig, current_forced_plan, demote_to_split, fp32_matmul_uses_tf32, plan_for
from .kernels.lora_linear import (
    dropout_mask_kernel,
    lora_expand_kernel,
    lora_fused_matmul_kernel,
    lora_rows_matmul_kernel,
    lora_shrink_kernel,
)
from ._device import on_device_of

# Enough programs to fill an H100 (132 SMs) about twice; the split heuristics aim at it.
TARGET_PROGRAMS = 256
# Split reductions write fp32 partials that every consumer re-reads: keep them few (8 x 16 rows
# x r of rank partials per column block at decode, against 4096 x 32 of W0 it streams).
MAX_SPLITS = 8
# Column blocks wanted at decode sizes: about one per SM of an H100 (132).
DECODE_PROGRAMS = 128


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_r: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_r: int
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
def fused_matmul_config(m: int, n: int, k: int, rank: int, fp32_dot: str | None = None,
                        epilogue_dropout: bool = False) -> MatmulConfig:
    """Heuristic by M: decode sizes are bound by reading W0, so small M tiles and
    column blocks narrow enough for about one program per SM (N = 4096 -> 32 wide, 128 programs);
    prefill/training sizes are compute bound, so large square tiles.
    fp32_dot: fp32_dot(dtype) of the inputs; epilogue_dropout: the dX call whose
    epilogue draws the Philox keep-mask (EPILOGUE_DROPOUT). Register figures: AOT cubins (ptxas of
    Triton 3.9, sm_80 / sm_90; tests/test_aot_compile.py, bench/results/kernel-resources.md)."""
    if m <= 16:
        block_n = 64
        while block_n > 16 and triton.cdiv(n, block_n) < DECODE_PROGRAMS:
            block_n //= 2
        # BLOCK_K 128: 3 stages in flight of 16 KB (bf16, BLOCK_N 64); fp32 needs 122 KB of shared
        # memory, where BLOCK_K 256 needed 240 KB, past both sm_80 (163 KB) and sm_90 (227 KB).
        # Rank tile 16: at 32, 16-bit on sm_90 spilled 8-24 B (56-64 registers: forward, dX with and
        # without dropout), none with 16 (53-62 registers); the rank loop is a sliver of the K loop.
        # Exact fp32 (FMA dots) 32 deep: 128 deep spilled up to 2.3 KB unspecialized (sm_80, 64 wide)
        return MatmulConfig(16, block_n, 32 if fp32_dot == "ieee" else 128, rank_block(rank, 16), 8, 4, 4)
    if m <= 64:
        # 8 warps and a rank tile of at most 32: with 4 warps the unspecialized signature spilled
        # 16-552 B (rank tile 32-64, 255 registers), with 8 and a 64-wide rank tile fp32 tf32 still
        # spilled 16 B (sm_80, forward); 8 and at most 32: 73-190 registers, none
        # fp32 on tf32 in 3 stages: with 4, the dX call with dropout spilled 8 B on sm_80 (80 registers;
        # 32 deep: 8 B in the forward, 64), with 3 80-108 registers (190-230 unspecialized), none
        cfg = MatmulConfig(64, 64, 64, rank_block(rank, 32), 8, 8, 3 if fp32_dot == "tf32" else 4)
    elif m <= 256 or epilogue_dropout or fp32_dot == "ieee":
        # 8 warps: with 4, the dX epilogue's dropout spilled ~1 KB per thread (beside the second fp32
        # tile of before issue 12). The dX-with-dropout call keeps this 64x128 tile past 256 rows: on
        # 128x128 the two fp32 tiles of before issue 12 and the Philox mask spilled 160-280 B (16-bit),
        # 256-504 B (tf32); since the LoRA term is the accumulator's initial value (one live fp32 tile)
        # 128x128 needs 172-184 registers aligned and no spill, and the tuner's candidates hold it.
        # 3 stages under dropout: fp32 tf32 unspecialized spilled 8 B on sm_90 with 4 (255 registers).
        # Exact fp32 too (below): its 128x128 FMA tile needed 238-255 registers at 16 deep and spilled
        # 8-72 B (forward, either signature), 64x128 128-188, none
        cfg = MatmulConfig(64, 128, 64, rank_block(rank, 32), 8, 8, 3 if epilogue_dropout else 4)
    else:
        # Rank tile 16: at 32 the dX call without dropout spilled 8 B on sm_90 (255 registers);
        # 218-222 registers with 16. The rank loop is a sliver of the K loop's work. fp32 on tf32: 32
        # deep (the bytes of 64 16-bit elements): 64 deep spilled 8 B unspecialized (forward, 254-255
        # registers, both targets), 32 deep 236-253 and none, and half the shared memory (97 KB on sm_90)
        cfg = MatmulConfig(128, 128, 32 if fp32_dot == "tf32" else 64, rank_block(rank, 16), 8, 8, 3)
    if fp32_dot == "ieee":
        # FMA dots hold the whole (BM, depth) and (depth, BN) operand slices in registers: 64-deep
        # reduction tiles (BLOCK_K, and BLOCK_R for the LoRA term) spilled 128 B-2 KB per thread (6 KB
        # unspecialized); 16-deep: 128-255 registers and none, and a quarter of the shared memory
        cfg = replace(cfg, block_k=16, block_r=16)
    return cfg


# GEMM tiles of the tuner's fused search space, (block_m, block_n, block_k, num_warps, num_stages) by the
# kind of input (fp32_dot: None for 16-bit inputs) and by M: decode tiles for M <= 16, 64-row tiles for
# small M, 128x128 for prefill (3-5 stages: 96-160 KB of shared memory at 64 deep, bf16, within sm_80's
# 163 KB per block). fp32 reads twice the bytes per element: half as deep (tf32), FMA dots (ieee) 16
# deep (deeper spilled, see fused_matmul_config). Pruned by their AOT compiles (Triton 3.9, sm_80 /
# sm_90, tests/test_aot_compile.py): 128x256x64 (8 warps, 3 stages) needed 244-255 registers aligned and
# spilled 136-184 B per thread unspecialized (forward and the split-K GEMM), 72 B aligned under the dX
# dropout epilogue; with 16 warps ptxas caps a thread at 128 registers and it spilled 96-224 B; 256x128x64
# (8 warps) spilled 8-24 B aligned; 128x128x64 with 4 warps 24-48 B; 64x64x64 with 4 warps 8 B on
# sm_80 (bf16, capped at 128 registers), 8 warps none; exact fp32 (FMA) 64x128x16 in 3 stages 16 B as
# the split-K GEMM on sm_90, 2 stages none; 64x64x16 with 4 warps 8 B there.
_CANDIDATE_TILES = {
    None: {16: [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 128, 4, 5), (16, 128, 64, 4, 4),
                (64, 64, 64, 8, 3)],
           64: [(64, 64, 64, 8, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4), (64, 128, 64, 8, 5)],
           256: [(64, 64, 64, 8, 3), (64, 128, 64, 4, 4), (64, 128, 64, 8, 5), (128, 128, 64, 8, 3),
                 (128, 128, 64, 8, 4)],
           None: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 5), (64, 128, 64, 4, 4),
                  (64, 128, 64, 8, 5), (64, 128, 64, 8, 3)]},
    "tf32": {16: [(16, 32, 64, 4, 4), (64, 64, 32, 4, 4)],
             64: [(64, 64, 32, 4, 4), (64, 128, 32, 8, 3)],
             256: [(64, 64, 32, 4, 4), (64, 128, 32, 8, 3), (64, 128, 32, 8, 4)],
             None: [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3), (64, 128, 32, 8, 4), (128, 64, 32, 8, 3)]},
    "ieee": {16: [(16, 32, 32, 4, 4), (32, 64, 16, 4, 3)],
             64: [(32, 64, 16, 4, 3), (64, 64, 16, 8, 3), (64, 128, 16, 8, 2)],
             256: [(64, 64, 16, 8, 3), (64, 128, 16, 8, 2)],
             None: [(64, 128, 16, 8, 2), (64, 64, 16, 8, 3), (128, 64, 16, 8, 3)]},
}
# SMs of an H100 SXM: a tile grid with fewer programs gets split-K candidates
SMS = 132
SPLIT_K_CANDIDATES = (2, 4, 8)
# split-K on the tiles with the fewest programs, each split at least this many K steps deep
SPLIT_K_TILES = 2
MIN_STEPS_PER_SPLIT = 4


def fused_candidates(op: str, m: int, n: int, k: int, rank: int, dtype: torch.dtype) -> list[MatmulConfig]:
    """The tuner's fused configs for one matmul (op "forward": N = out_features, K = in_features; "dx":
    N = in_features, K = out_features; the rank r): the heuristic's own config first, then the tiles of
    _CANDIDATE_TILES for M's range and the inputs' precision, and split-K 2, 4 and 8 of the tiles with
    the fewest programs where the (M, N) grid leaves SMs idle. 6-15 configs; each compiles without
    spills for sm_80 and sm_90 at every call site that can run it (tests/test_aot_compile.py)."""
    return list(candidate_configs(op, m, n, k, rank, fp32_dot(dtype)))


@functools.lru_cache(maxsize=1024)
def candidate_configs(op: str, m: int, n: int, k: int, rank: int,
                      fp32_dot: str | None = None) -> tuple[MatmulConfig, ...]:
    """fused_candidates by fp32_dot(dtype) (what the AOT test sweeps for each precision). A "dx" plan
    serves the call with and without the epilogue's dropout: both heuristic configs."""
    heuristics = [fused_matmul_config(m, n, k, rank, fp32_dot, epilogue_dropout=False)]
    if op == "dx":
        heuristics.append(fused_matmul_config(m, n, k, rank, fp32_dot, epilogue_dropout=True))
    by_m = _CANDIDATE_TILES[fp32_dot]
    tiles = by_m[next((bound for bound in (16, 64, 256) if m <= bound), None)]
    configs = [MatmulConfig(bm, bn, bk, 16 if fp32_dot == "ieee" or bm * bn >= 128 * 128 else rank_block(rank, 32),
                            8, warps, stages) for bm, bn, bk, warps, stages in tiles]
    programs = {c: triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n) for c in configs}
    splits = []
    for c in sorted((c for c in configs if programs[c] < SMS), key=programs.get)[:SPLIT_K_TILES]:
        splits += [replace(c, split_k=s) for s in SPLIT_K_CANDIDATES
                   if programs[c] * s <= 2 * SMS and k >= s * MIN_STEPS_PER_SPLIT * c.block_k]
    return tuple(dict.fromkeys(heuristics + configs + splits))


@functools.lru_cache(maxsize=1024)
def shrink_config(m: int, k: int, rank: int, fp32_dot: str | None = None, dropout: bool = False) -> ShrinkConfig:
    """fp32_dot: fp32_dot(dtype) of the inputs ("ieee": FMA dots); dropout: x's keep-mask is drawn in
    the K loop."""
    if m <= 16:
        # 8 warps at the 64-wide rank tile: with 4, fp32 tf32 on sm_90 spilled 8 B (64-128 registers,
        # 128 or 64 deep), with 8 39-178 registers and none
        block_r = rank_block(rank, 64)
        return ShrinkConfig(16, block_r, 128, 8 if block_r == 64 else 4, 3)
    # 64-deep at 64 rows spilled: exact fp32 (FMA) 144 B on sm_80 (5 KB unspecialized), 16-deep
    # 72-164 registers and none; dropout (32 Philox draws per thread and step) 120-584 B
    # unspecialized, 32-deep 184-245 registers and none
    return ShrinkConfig(64, rank_block(rank, 64), 16 if fp32_dot == "ieee" else (32 if dropout else 64), 4, 3)


@functools.lru_cache(maxsize=1024)
def expand_config(m: int, n: int) -> ExpandConfig:
    """Tiles of lora_expand_kernel. It is memory bound: it reads out (or the split-K partials) and writes
    out once, the rank product is a sliver, so the tiles need enough programs and little else. Decode
    sizes narrow the column block to about one program per SM (N = 4096 -> 32 wide, 128 programs).
    Rank steps of 16 (tl.dot's minimum: a rank-8 adapter does one). Registers (AOT, Triton 3.9, summing
    8 split-K partials under the dX dropout or with bias): 16x64 with 4 warps spilled 8 B on sm_80
    (capped at 64 registers), 2 warps 74-80 and none; 64x128 with 8 warps needed 250-255 unspecialized,
    32x128 with 4 warps spilled 8 B on sm_80 (96), with 8 78-141 registers, none."""
    if m <= 16:
        block_n = 128
        while block_n > 32 and triton.cdiv(n, block_n) < DECODE_PROGRAMS:
            block_n //= 2
        return ExpandConfig(16, block_n, 16, 2, 2)
    return ExpandConfig(32, 128, 16, 8, 2)


@functools.lru_cache(maxsize=1024)
def rows_config(p: int, q: int, fp32_dot: str | None = None, dropout: bool = False) -> RowsConfig:
    """Weight-gradient tiles: one side is the rank (small), the other K or N (large).
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
    return RowsConfig(block_p, block_q, block_m, num_warps, 3)


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
    """fp32 inputs follow torch's own setting for fp32 matmuls (fp32_matmul_uses_tf32, off by
    default): exact fp32 unless the user allowed tf32. 16-bit inputs use their own tensor cores."""
    if dtype == torch.float32 and not fp32_matmul_uses_tf32():
        return "ieee"
    return "tf32"


def fp32_dot(dtype: torch.dtype) -> str | None:
    """What the config heuristics take of the precision: dot_precision of fp32 inputs ("ieee": exact
    fp32, tl.dot as FMA; "tf32"), None for 16-bit inputs (their own tensor cores)."""
    return dot_precision(dtype) if dtype == torch.float32 else None


def rows_compute_dtype(left: torch.Tensor, right: torch.Tensor) -> torch.dtype:
    """The dtype whose precision a weight-gradient product takes: one operand is the fp32 rank
    intermediate, the other the input dtype (fp32 when both are)."""
    return left.dtype if left.dtype != torch.float32 else right.dtype


def lora_precision(dtype: torch.dtype) -> str:
    """The rank-r products take the fp32 intermediate and an upcast 16-bit operand: tf32 tensor
    cores (10-bit mantissa, finer than bf16's 7) for 16-bit inputs; fp32 inputs as dot_precision."""
    return dot_precision(dtype) if dtype == torch.float32 else "tf32"


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(seed_ptr, dropout_p, keep scale) of a launch on like's device. seed: 0-d int64 tensor, copied
    there when it is elsewhere (a CPU seed: a registered-op call, a graph traced on another backend);
    without dropout `like` stands in for seed_ptr, never read."""
    if dropout_p == 0.0:
        return like, 0.0, 1.0
    if seed.device != like.device:
        seed = seed.to(like.device)
    return seed, dropout_p, 1.0 / (1.0 - dropout_p)


def shrink(x: torch.Tensor, a: torch.Tensor, dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 partials (S, M, R) of dropout(x) · aᵀ; x (M, K), a (R, K) as any strided view."""
    m, k = x.shape
    rank = a.shape[0]
    cfg = shrink_config(m, k, rank, fp32_dot(x.dtype), dropout=dropout_p > 0.0)
    grid_mr = triton.cdiv(m, cfg.block_m) * triton.cdiv(rank, cfg.block_r)
    splits, k_per_split = _splits(k, cfg.block_k, grid_mr)
    partials = torch.empty((splits, m, rank), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(rank, cfg.block_r), splits)
    lora_shrink_kernel[grid](
        x, a, partials,
        m, k, rank, k_per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        partials.stride(0), partials.stride(1),
        *_dropout_args(dropout_p, seed, x),
        DROPOUT=dropout_p > 0.0,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return partials


def fused_plan_config(config: MatmulConfig | None, m: int, n: int, k: int, rank: int, dtype: torch.dtype,
                      epilogue_dropout: bool) -> MatmulConfig:
    """The tiles a fused plan runs for one matmul: its config, or (None) fused_matmul_config's heuristic."""
    return config or fused_matmul_config(m, n, k, rank, fp32_dot(dtype), epilogue_dropout=epilogue_dropout)


def fused_matmul(
    x: torch.Tensor,            # (M, K)
    w: torch.Tensor,            # (K, N), any strides
    bias: torch.Tensor | None,  # (N,)
    t_partials: torch.Tensor,   # (S, M, R) fp32
    v: torch.Tensor,            # (R, N), any strides
    scale: float,
    store_t_sum: bool,
    epilogue_dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,   # 0-d int64, read with epilogue dropout
    config: MatmulConfig | None = None,  # None: fused_matmul_config's heuristic
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out (M, N) = x·w + bias + scale · (dropout_mask ⊙ ((Σ_s t_partials[s]) · v)), and, when
    store_t_sum, the reduced (M, R) fp32 intermediate Σ_s t_partials[s]. config.split_k > 1: the GEMM
    writes split_k fp32 partials (split_k, M, N) of its K ranges, and the expand kernel sums them in a
    fixed order with bias and the LoRA term."""
    m, k = x.shape
    n = w.shape[1]
    splits, _, rank = t_partials.shape
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    cfg = fused_plan_config(config, m, n, k, rank, x.dtype, epilogue_dropout=epilogue_dropout_p > 0.0)
    split_k = cfg.split_k
    # split_k fp32 partials (split_k, M, N): memory split_k x 4 / 2 times out's for 16-bit inputs
    gemm_out = out if split_k == 1 else torch.empty((split_k, m, n), device=x.device, dtype=torch.float32)
    # K ranges of whole BLOCK_K steps; a range past K (K smaller than split_k steps) stores zeros
    k_per_split = k if split_k == 1 else triton.cdiv(triton.cdiv(k, cfg.block_k), split_k) * cfg.block_k
    t_sum = None
    if split_k == 1:
        t_sum = torch.empty((m, rank), device=x.device, dtype=torch.float32) if store_t_sum else None
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    lora_fused_matmul_kernel[grid](
        x, w, bias if bias is not None else out, t_partials, v, gemm_out, t_sum if t_sum is not None else t_partials,
        m, n, k, rank, splits, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        t_partials.stride(0), t_partials.stride(1),
        v.stride(0), v.stride(1),
        gemm_out.stride(0) if split_k > 1 else 0, gemm_out.stride(-2), gemm_out.stride(-1),
        t_sum.stride(0) if t_sum is not None else 0,
        bias.stride(0) if bias is not None else 0,
        scale, *_dropout_args(epilogue_dropout_p, seed, out),
        HAS_BIAS=bias is not None, STORE_T_SUM=t_sum is not None, EPILOGUE_DROPOUT=epilogue_dropout_p > 0.0,
        SPLIT_K_PARTIALS=split_k > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
        GROUP_M=cfg.group_m, DOT_PRECISION=dot_precision(x.dtype), LORA_DOT_PRECISION=lora_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split_k > 1:
        t_sum = expand(out, t_partials, v, scale, store_t_sum, epilogue_dropout_p, seed, bias=bias, base=gemm_out)
    return out, t_sum


def expand(
    out: torch.Tensor,          # (M, N), updated in place (written, when base is given)
    t_partials: torch.Tensor,   # (S, M, R) fp32
    v: torch.Tensor,            # (R, N), any strides
    scale: float,
    store_t_sum: bool,
    epilogue_dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,   # 0-d int64, read with epilogue dropout
    bias: torch.Tensor | None = None,   # (N,), added (with base only: torch's addmm already added it)
    base: torch.Tensor | None = None,   # (SPLIT_K, M, N) fp32 partials of the GEMM; None: out's values
) -> torch.Tensor | None:
    """out = base + bias + scale · (dropout_mask ⊙ ((Σ_s t_partials[s]) · v)), base being out itself (in
    place) or Σ base[s] in a fixed order; returns Σ_s t_partials[s] (M, R) fp32 when store_t_sum."""
    m, n = out.shape
    splits, _, rank = t_partials.shape
    t_sum = torch.empty((m, rank), device=out.device, dtype=torch.float32) if store_t_sum else None
    cfg = expand_config(m, n)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    lora_expand_kernel[grid](
        base if base is not None else out, bias if bias is not None else out, t_partials, v, out,
        t_sum if store_t_sum else t_partials,
        m, n, rank, splits,
        *(base.stride() if base is not None else (0, 0, 0)),
        t_partials.stride(0), t_partials.stride(1),
        v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        t_sum.stride(0) if store_t_sum else 0,
        bias.stride(0) if bias is not None else 0,
        scale, *_dropout_args(epilogue_dropout_p, seed, out),
        HAS_BIAS=bias is not None, STORE_T_SUM=store_t_sum, EPILOGUE_DROPOUT=epilogue_dropout_p > 0.0,
        BASE_PARTIALS=base is not None, SPLIT_K=base.shape[0] if base is not None else 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, LORA_DOT_PRECISION=lora_precision(out.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return t_sum


def rows_matmul(
    left: torch.Tensor,    # (M, P)
    right: torch.Tensor,   # (M, Q)
    out_dtype: torch.dtype,
    alpha: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,   # 0-d int64, read with dropout
) -> torch.Tensor:
    """alpha · leftᵀ · dropout(right) -> (P, Q) in out_dtype, reduced over the M rows in fixed order."""
    m, p = left.shape
    q = right.shape[1]
    compute_dtype = rows_compute_dtype(left, right)
    cfg = rows_config(p, q, fp32_dot(compute_dtype), dropout=dropout_p > 0.0)
    grid_pq = triton.cdiv(p, cfg.block_p) * triton.cdiv(q, cfg.block_q)
    splits, rows_per_split = _splits(m, cfg.block_m, grid_pq)
    partials = torch.empty((splits, p, q), device=left.device, dtype=torch.float32)
    grid = (triton.cdiv(p, cfg.block_p), triton.cdiv(q, cfg.block_q), splits)
    lora_rows_matmul_kernel[grid](
        left, right, partials,
        m, p, q, rows_per_split,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partials.stride(0), partials.stride(1),
        alpha, *_dropout_args(dropout_p, seed, partials),
        DROPOUT_R=dropout_p > 0.0,
        BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m,
        DOT_PRECISION=lora_precision(compute_dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _sum_splits(partials).to(out_dtype)


# What a fused plan from a table raises when its kernel cannot run on this GPU (shared memory,
# registers: a table measured with another Triton, or edited by hand)
LAUNCH_ERRORS = (OutOfResources, CompilationError)


def _run_plan(op: str, like: torch.Tensor, m: int, n: int, k: int, rank: int,
              fused: Callable[[MatmulConfig | None], tuple], split: Callable[[], tuple]) -> tuple:
    """fused(plan.config) or split(), as tuning.plan_for(op, ...) says for like's device and dtype. A
    fused plan from a table that cannot launch here falls back to split, for this call and every
    later one of its key (tuning.demote_to_split warns once); a forced plan (the tuner's candidate,
    a test's) raises instead."""
    plan = plan_for(op, like.device, like.dtype, m, n, k, rank)
    if plan.strategy == "fused":
        try:
            return fused(plan.config)
        except LAUNCH_ERRORS as exc:
            if current_forced_plan() is not None:
                raise
            demote_to_split(op, like.device, like.dtype, m, n, k, rank, f"{type(exc).__name__}: {exc}")
    return split()


@on_device_of("x")
def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and lora_hidden T = dropout(x) Aᵀ (M, r) fp32, saved for dB. seed: 0-d int64 tensor
    (None without dropout), loaded by the kernels on x's device: never read on the host.
    The plan (tuning.plan_for "forward", N = out_features, K = in_features) picks split or fused."""
    (m, k), n, rank = x.shape, weight.shape[0], lora_a.shape[0]
    t_partials = shrink(x, lora_a, dropout_p, seed)                       # (S, M, r)

    def split():
        y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T   # torch's GEMM (cuBLAS)
        return y, expand(y, t_partials, lora_b.T, scale, store_t_sum=True)

    def fused(config):
        return fused_matmul(x, weight.T, bias, t_partials, lora_b.T, scale, store_t_sum=True, config=config)

    return _run_plan("forward", x, m, n, k, rank, fused, split)


@on_device_of("grad_y")
def lora_linear_backward(
    grad_y: torch.Tensor,          # (M, N), last stride 1
    x: torch.Tensor | None,        # (M, K), needed for dA
    weight: torch.Tensor | None,   # (N, K), needed for dX
    lora_a: torch.Tensor | None,   # (r, K), needed for dX
    lora_b: torch.Tensor | None,   # (N, r), needed for dX and dA
    lora_hidden: torch.Tensor | None,   # (M, r) fp32 T = dropout(x) Aᵀ, needed for dB
    scale: float, dropout_p: float, seed: torch.Tensor | None,
    need_x: bool, need_a: bool, need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX, dA, dB) for the grads asked for.
    dU = dY·B (M, r);  dX = dY·W0 + mask ⊙ (s·dU·A);  dA = s·dUᵀ·dropout(x);  dB = s·dYᵀ·T.
    dX runs the plan of tuning.plan_for "dx" (N = in_features, K = out_features): split or fused."""
    grad_x = grad_a = grad_b = None
    if need_x or need_a:
        du_partials = shrink(grad_y, lora_b.T)                            # (S, M, r)
        if need_x:
            (m, k), n, rank = grad_y.shape, weight.shape[1], lora_b.shape[1]

            def split():
                grad_x = grad_y @ weight                                  # torch's GEMM (cuBLAS)
                return grad_x, expand(grad_x, du_partials, lora_a, scale, store_t_sum=need_a,
                                      epilogue_dropout_p=dropout_p, seed=seed)

            def fused(config):
                return fused_matmul(grad_y, weight, None, du_partials, lora_a, scale, store_t_sum=need_a,
                                    epilogue_dropout_p=dropout_p, seed=seed, config=config)

            grad_x, grad_u = _run_plan("dx", grad_y, m, n, k, rank, fused, split)
        else:
            grad_u = _sum_splits(du_partials)
        if need_a:
            grad_a = rows_matmul(grad_u, x, grad_y.dtype, scale, dropout_p, seed)   # (r, K)
    if need_b:
        grad_b = rows_matmul(grad_y, lora_hidden, grad_y.dtype, scale)           # (N, r)
    return grad_x, grad_a, grad_b


@on_device_of("device")
def dropout_keep_mask(m: int, k: int, dropout_p: float, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The (M, K) bool keep-mask the kernels derive from `seed` (0-d int64 tensor, read on `device`):
    the composition's mask (second derivatives, torch.func), and the tests' check of forward/backward."""
    out = torch.empty((m, k), device=device, dtype=torch.int8)
    if m and k:
        grid = (triton.cdiv(m, 32), triton.cdiv(k, 64))
        # seed.to(...), not seed: under torch.func the seed is a functorch wrapper, and this copy (made in
        # _keep_mask's _DisableFuncTorch block) is a plain tensor the kernel can read; the wrapper itself
        # raised "Cannot access storage of TensorWrapper" (interpreter, test_higher_order_autograd)
        dropout_mask_kernel[grid](out, m, k, seed.to(out.device), dropout_p, BLOCK_M=32, BLOCK_K=64)
    return out.bool()
