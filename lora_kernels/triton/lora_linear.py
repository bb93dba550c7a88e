"""Launchers of the single-adapter LoRA kernels: allocate, pick a plan and config by shape, launch (the
public launchers under their inputs' device: _device.on_device_of).

Inputs arrive validated by the op layer (lora_kernels.ops.lora_linear): x2d (M, K) with last
stride 1, weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r), all on one device, one dtype.
The forward's y and the backward's dX each run the plan lora_kernels.tuning.plan_for gives them:
"split" (torch's GEMM, then shrink and an in-place expand) or "fused" (our GEMM with the LoRA term
in its accumulator; split_k > 1: fp32 partials over K ranges, summed by the expand kernel).
Each kernel is launched by keyword from its argument builder (shrink_arguments, ...), which
tests/test_aot_compile.py calls too. What this module shares with the multi-adapter launcher (precision,
split reductions, the weight-gradient tiles) is in _common.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch
import triton
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from ..tuning import MatmulConfig, current_forced_plan, demote_to_split, plan_for
from ._common import (
    RowsConfig, base_gemm, dot_precision, fp32_dot, lora_precision, or_stand_in, rank_block, rows_compute_dtype,
    rows_config, split_reduction, stride_or_zero, sum_splits,
)
from .kernels.lora_linear import (
    dropout_mask_kernel,
    lora_expand_kernel,
    lora_fused_matmul_kernel,
    lora_rows_matmul_kernel,
    lora_shrink_kernel,
)
from ._device import on_device_of

# Column blocks wanted at decode sizes: about one per SM of an H100 (132).
DECODE_PROGRAMS = 128


@dataclass(frozen=True, kw_only=True)
class ShrinkConfig:
    block_m: int
    block_r: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True, kw_only=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int
    num_stages: int


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
        return MatmulConfig(block_m=16, block_n=block_n, block_k=32 if fp32_dot == "ieee" else 128,
                            block_r=rank_block(rank, 16), group_m=8, num_warps=4, num_stages=4)
    if m <= 64:
        # 8 warps and a rank tile of at most 32: with 4 warps the unspecialized signature spilled
        # 16-552 B (rank tile 32-64, 255 registers), with 8 and a 64-wide rank tile fp32 tf32 still
        # spilled 16 B (sm_80, forward); 8 and at most 32: 73-190 registers, none
        # fp32 on tf32 in 3 stages: with 4, the dX call with dropout spilled 8 B on sm_80 (80 registers;
        # 32 deep: 8 B in the forward, 64), with 3 80-108 registers (190-230 unspecialized), none
        cfg = MatmulConfig(block_m=64, block_n=64, block_k=64, block_r=rank_block(rank, 32), group_m=8, num_warps=8,
                           num_stages=3 if fp32_dot == "tf32" else 4)
    elif m <= 256 or epilogue_dropout or fp32_dot == "ieee":
        # 8 warps: with 4, the dX epilogue's dropout spilled ~1 KB per thread (beside the second fp32
        # tile of before issue 12). The dX-with-dropout call keeps this 64x128 tile past 256 rows: on
        # 128x128 the two fp32 tiles of before issue 12 and the Philox mask spilled 160-280 B (16-bit),
        # 256-504 B (tf32); since the LoRA term is the accumulator's initial value (one live fp32 tile)
        # 128x128 needs 172-184 registers aligned and no spill, and the tuner's candidates hold it.
        # 3 stages under dropout: fp32 tf32 unspecialized spilled 8 B on sm_90 with 4 (255 registers).
        # Exact fp32 too (below): its 128x128 FMA tile needed 238-255 registers at 16 deep and spilled
        # 8-72 B (forward, either signature), 64x128 128-188, none
        cfg = MatmulConfig(block_m=64, block_n=128, block_k=64, block_r=rank_block(rank, 32), group_m=8, num_warps=8,
                           num_stages=3 if epilogue_dropout else 4)
    else:
        # Rank tile 16: at 32 the dX call without dropout spilled 8 B on sm_90 (255 registers);
        # 218-222 registers with 16. The rank loop is a sliver of the K loop's work. fp32 on tf32: 32
        # deep (the bytes of 64 16-bit elements): 64 deep spilled 8 B unspecialized (forward, 254-255
        # registers, both targets), 32 deep 236-253 and none, and half the shared memory (97 KB on sm_90)
        cfg = MatmulConfig(block_m=128, block_n=128, block_k=32 if fp32_dot == "tf32" else 64,
                           block_r=rank_block(rank, 16), group_m=8, num_warps=8, num_stages=3)
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
    configs = [MatmulConfig(block_m=bm, block_n=bn, block_k=bk,
                            block_r=16 if fp32_dot == "ieee" or bm * bn >= 128 * 128 else rank_block(rank, 32),
                            group_m=8, num_warps=warps, num_stages=stages) for bm, bn, bk, warps, stages in tiles]
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
        return ShrinkConfig(block_m=16, block_r=block_r, block_k=128, num_warps=8 if block_r == 64 else 4, num_stages=3)
    # 64-deep at 64 rows spilled: exact fp32 (FMA) 144 B on sm_80 (5 KB unspecialized), 16-deep
    # 72-164 registers and none; dropout (32 Philox draws per thread and step) 120-584 B
    # unspecialized, 32-deep 184-245 registers and none
    return ShrinkConfig(block_m=64, block_r=rank_block(rank, 64),
                        block_k=16 if fp32_dot == "ieee" else (32 if dropout else 64), num_warps=4, num_stages=3)


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
        return ExpandConfig(block_m=16, block_n=block_n, block_r=16, num_warps=2, num_stages=2)
    return ExpandConfig(block_m=32, block_n=128, block_r=16, num_warps=8, num_stages=2)


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor) -> dict:
    """seed_ptr, dropout_p and dropout_scale (the keep scale) of a launch on like's device. seed: 0-d int64
    tensor, copied there when it is elsewhere (a CPU seed: a registered-op call, a graph traced on another
    backend); without dropout `like` stands in for seed_ptr, never read."""
    if dropout_p == 0.0:
        return dict(seed_ptr=like, dropout_p=0.0, dropout_scale=1.0)
    if seed.device != like.device:
        seed = seed.to(like.device)
    return dict(seed_ptr=seed, dropout_p=dropout_p, dropout_scale=1.0 / (1.0 - dropout_p))


# The kernels' keyword arguments, one function per kernel, from the tensors of its launch: the launchers
# below launch with them, and tests/test_aot_compile.py builds its compile signatures from them (with
# meta tensors of its representative sizes), so both see an argument added or renamed.

def shrink_arguments(
    x: torch.Tensor,          # (M, K)
    a: torch.Tensor,          # (R, K), any strides
    partials: torch.Tensor,   # (S, M, R) fp32, written
    k_per_split: int, dropout_p: float, seed: torch.Tensor | None, cfg: ShrinkConfig,
) -> dict:
    """lora_shrink_kernel's arguments: partials[s] = dropout(x)[:, k in split s] · aᵀ."""
    return dict(
        x_ptr=x, a_ptr=a, out_ptr=partials,
        M=x.shape[0], K=x.shape[1], R=a.shape[0], k_per_split=k_per_split,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_os=partials.stride(0), stride_om=partials.stride(1),
        **_dropout_args(dropout_p, seed, x),
        DROPOUT=dropout_p > 0.0,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(x.dtype),
    )


def fused_matmul_arguments(
    x: torch.Tensor,                # (M, K)
    w: torch.Tensor,                # (K, N), any strides
    bias: torch.Tensor | None,      # (N,)
    t_partials: torch.Tensor,       # (S, M, R) fp32
    v: torch.Tensor,                # (R, N), any strides
    out: torch.Tensor,              # (M, N) in x's dtype, or (SPLIT_K, M, N) fp32 partials of x·w
    t_sum: torch.Tensor | None,     # (M, R) fp32, written
    scale: float, dropout_p: float, seed: torch.Tensor | None, k_per_split: int, cfg: MatmulConfig,
) -> dict:
    """lora_fused_matmul_kernel's arguments: out = x·w + bias + scale · (mask ⊙ ((Σ_s t_partials[s]) · v)),
    or, out being 3-d (SPLIT_K_PARTIALS), the fp32 partials of x·w over K ranges of k_per_split."""
    split_k_partials = out.dim() == 3
    return dict(
        x_ptr=x, w_ptr=w, bias_ptr=or_stand_in(bias, x), t_ptr=t_partials, v_ptr=v, out_ptr=out,
        t_sum_ptr=or_stand_in(t_sum, t_partials),
        M=x.shape[0], N=w.shape[1], K=x.shape[1], R=t_partials.shape[2], num_t_splits=t_partials.shape[0],
        k_per_split=k_per_split,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wk=w.stride(0), stride_wn=w.stride(1),
        stride_ts=t_partials.stride(0), stride_tm=t_partials.stride(1),
        stride_vr=v.stride(0), stride_vn=v.stride(1),
        stride_os=out.stride(0) if split_k_partials else 0, stride_om=out.stride(-2), stride_on=out.stride(-1),
        stride_sm=stride_or_zero(t_sum, 0),
        stride_bias=stride_or_zero(bias, 0),
        scale=scale, **_dropout_args(dropout_p, seed, x),
        HAS_BIAS=bias is not None, STORE_T_SUM=t_sum is not None, EPILOGUE_DROPOUT=dropout_p > 0.0,
        SPLIT_K_PARTIALS=split_k_partials,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r, GROUP_M=cfg.group_m,
        DOT_PRECISION=dot_precision(x.dtype), LORA_DOT_PRECISION=lora_precision(x.dtype),
    )


def expand_arguments(
    out: torch.Tensor,              # (M, N), written (updated in place when base is None)
    t_partials: torch.Tensor,       # (S, M, R) fp32
    v: torch.Tensor,                # (R, N), any strides
    t_sum: torch.Tensor | None,     # (M, R) fp32, written
    bias: torch.Tensor | None,      # (N,)
    base: torch.Tensor | None,      # (SPLIT_K, M, N) fp32 partials of the GEMM; None: out's values
    scale: float, dropout_p: float, seed: torch.Tensor | None, cfg: ExpandConfig,
) -> dict:
    """lora_expand_kernel's arguments: out = base + bias + scale · (mask ⊙ ((Σ_s t_partials[s]) · v))."""
    return dict(
        base_ptr=or_stand_in(base, out), bias_ptr=or_stand_in(bias, out), t_ptr=t_partials,
        v_ptr=v, out_ptr=out, t_sum_ptr=or_stand_in(t_sum, t_partials),
        M=out.shape[0], N=out.shape[1], R=t_partials.shape[2], num_t_splits=t_partials.shape[0],
        stride_bs=stride_or_zero(base, 0), stride_bm=stride_or_zero(base, 1), stride_bn=stride_or_zero(base, 2),
        stride_ts=t_partials.stride(0), stride_tm=t_partials.stride(1),
        stride_vr=v.stride(0), stride_vn=v.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_sm=stride_or_zero(t_sum, 0),
        stride_bias=stride_or_zero(bias, 0),
        scale=scale, **_dropout_args(dropout_p, seed, out),
        HAS_BIAS=bias is not None, STORE_T_SUM=t_sum is not None, EPILOGUE_DROPOUT=dropout_p > 0.0,
        BASE_PARTIALS=base is not None, SPLIT_K=base.shape[0] if base is not None else 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, LORA_DOT_PRECISION=lora_precision(out.dtype),
    )


def rows_matmul_arguments(
    left: torch.Tensor,        # (M, P)
    right: torch.Tensor,       # (M, Q)
    partials: torch.Tensor,    # (S, P, Q) fp32, written
    rows_per_split: int, alpha: float, dropout_p: float, seed: torch.Tensor | None, cfg: RowsConfig,
) -> dict:
    """lora_rows_matmul_kernel's arguments: partials[s] = alpha · leftᵀ · dropout(right) over the rows of split s."""
    return dict(
        l_ptr=left, r_ptr=right, out_ptr=partials,
        M=left.shape[0], P=left.shape[1], Q=right.shape[1], rows_per_split=rows_per_split,
        stride_lm=left.stride(0), stride_lp=left.stride(1), stride_rm=right.stride(0), stride_rq=right.stride(1),
        stride_os=partials.stride(0), stride_op=partials.stride(1),
        alpha=alpha, **_dropout_args(dropout_p, seed, partials),
        DROPOUT_R=dropout_p > 0.0,
        BLOCK_P=cfg.block_p, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m,
        DOT_PRECISION=lora_precision(rows_compute_dtype(left, right)),
    )


# dropout_mask_kernel's tile
MASK_BLOCK_M, MASK_BLOCK_K = 32, 64


def dropout_mask_arguments(out: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> dict:
    """dropout_mask_kernel's arguments: out (M, K) int8, written; seed 0-d int64 on out's device."""
    return dict(out_ptr=out, M=out.shape[0], K=out.shape[1], seed_ptr=seed, dropout_p=dropout_p,
                BLOCK_M=MASK_BLOCK_M, BLOCK_K=MASK_BLOCK_K)


def shrink(x: torch.Tensor, a: torch.Tensor, dropout_p: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 partials (S, M, R) of dropout(x) · aᵀ; x (M, K), a (R, K) as any strided view."""
    m, k = x.shape
    rank = a.shape[0]
    cfg = shrink_config(m, k, rank, fp32_dot(x.dtype), dropout=dropout_p > 0.0)
    grid_mr = triton.cdiv(m, cfg.block_m) * triton.cdiv(rank, cfg.block_r)
    splits, k_per_split = split_reduction(k, cfg.block_k, grid_mr)
    partials = torch.empty((splits, m, rank), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(rank, cfg.block_r), splits)
    lora_shrink_kernel[grid](**shrink_arguments(x, a, partials, k_per_split, dropout_p, seed, cfg),
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
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
    rank = t_partials.shape[2]
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
        **fused_matmul_arguments(x, w, bias, t_partials, v, gemm_out, t_sum, scale, epilogue_dropout_p, seed,
                                 k_per_split, cfg),
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
    rank = t_partials.shape[2]
    t_sum = torch.empty((m, rank), device=out.device, dtype=torch.float32) if store_t_sum else None
    cfg = expand_config(m, n)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
    lora_expand_kernel[grid](
        **expand_arguments(out, t_partials, v, t_sum, bias, base, scale, epilogue_dropout_p, seed, cfg),
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
    cfg = rows_config(p, q, fp32_dot(rows_compute_dtype(left, right)), dropout=dropout_p > 0.0)
    grid_pq = triton.cdiv(p, cfg.block_p) * triton.cdiv(q, cfg.block_q)
    splits, rows_per_split = split_reduction(m, cfg.block_m, grid_pq)
    partials = torch.empty((splits, p, q), device=left.device, dtype=torch.float32)
    grid = (triton.cdiv(p, cfg.block_p), triton.cdiv(q, cfg.block_q), splits)
    lora_rows_matmul_kernel[grid](**rows_matmul_arguments(left, right, partials, rows_per_split, alpha, dropout_p,
                                                          seed, cfg),
                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return sum_splits(partials).to(out_dtype)


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
        y = base_gemm(x, weight, bias)   # (M, N)
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
            grad_u = sum_splits(du_partials)
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
        grid = (triton.cdiv(m, MASK_BLOCK_M), triton.cdiv(k, MASK_BLOCK_K))
        # seed.to(...), not seed: under torch.func the seed is a functorch wrapper, and this copy (made in
        # _keep_mask's _DisableFuncTorch block) is a plain tensor the kernel can read; the wrapper itself
        # raised "Cannot access storage of TensorWrapper" (interpreter, test_higher_order_autograd)
        dropout_mask_kernel[grid](**dropout_mask_arguments(out, seed.to(out.device), dropout_p))
    return out.bool()
