"""Launchers of the single-adapter LoRA kernels: allocate, pick a config by shape, launch (the public
launchers under their inputs' device: _device.on_device_of).

Inputs arrive validated by the op layer (lora_kernels.ops.lora_linear): x2d (M, K) with last
stride 1, weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r), all on one device, one dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton

from .kernels.lora_linear import (
    dropout_mask_kernel,
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
        cfg = MatmulConfig(64, 64, 64, rank_block(rank, 32), 8, 8, 4)
    elif m <= 256 or epilogue_dropout or fp32_dot == "ieee":
        # 8 warps: with 4, the dX epilogue's dropout (two live fp32 tiles) spilled ~1 KB per thread.
        # The dX-with-dropout call keeps this 64x128 tile past 256 rows too: on the 128x128 one the two
        # fp32 accumulators (128 of 255 registers) and the Philox mask spilled 160-280 B (16-bit),
        # 256-504 B (tf32), up to 1.6 KB unspecialized; 64x128 has the same arithmetic intensity and
        # needs 214-241 registers, no spill. 3 stages under dropout: fp32 tf32 unspecialized spilled
        # 8 B on sm_90 with 4 (255 registers). Exact fp32 too (below): its 128x128 FMA tile needed 238-255
        # registers at 16 deep and spilled 8-72 B (forward, either signature), 64x128 128-188, none
        cfg = MatmulConfig(64, 128, 64, rank_block(rank, 32), 8, 8, 3 if epilogue_dropout else 4)
    else:
        # rank tile 16: at 32 the dX call without dropout spilled 8 B on sm_90 (255 registers);
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


def _cublas_fp32_uses_tf32() -> bool:
    """Whether cuBLAS would run an fp32 matmul on tf32 tensor cores now. Where torch has the
    fp32_precision API, cuBLAS reads torch.backends.cuda.matmul.fp32_precision (its getter resolves
    "none" to the generic torch.backends.fp32_precision), which allow_tf32 and
    set_float32_matmul_precision ("high" and "medium": tf32) set too; allow_tf32's getter raises once
    fp32_precision alone made the two disagree ("mix of the legacy and new APIs"). Older torch
    (2.4 ...): allow_tf32 is the one switch."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:   # no fp32_precision: cuBLASModule raises AttributeError for unknown names
        return bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own setting for fp32 matmuls (_cublas_fp32_uses_tf32, off by
    default): exact fp32 unless the user allowed tf32. 16-bit inputs use their own tensor cores."""
    if dtype == torch.float32 and not _cublas_fp32_uses_tf32():
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out (M, N) = x·w + bias + scale · (dropout_mask ⊙ ((Σ_s t_partials[s]) · v)), and, when
    store_t_sum, the reduced (M, R) fp32 intermediate Σ_s t_partials[s]."""
    m, k = x.shape
    n = w.shape[1]
    splits, _, rank = t_partials.shape
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    t_sum = torch.empty((m, rank), device=x.device, dtype=torch.float32) if store_t_sum else None
    cfg = fused_matmul_config(m, n, k, rank, fp32_dot(x.dtype), epilogue_dropout=epilogue_dropout_p > 0.0)
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
        scale, *_dropout_args(epilogue_dropout_p, seed, out),
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


@on_device_of("x")
def lora_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y (M, N) and lora_hidden T = dropout(x) Aᵀ (M, r) fp32, saved for dB. seed: 0-d int64 tensor
    (None without dropout), loaded by the kernels on x's device: never read on the host."""
    t_partials = shrink(x, lora_a, dropout_p, seed)                       # (S, M, r)
    y, lora_hidden = fused_matmul(x, weight.T, bias, t_partials, lora_b.T, scale, store_t_sum=True)
    return y, lora_hidden


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
