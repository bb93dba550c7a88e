"""``@triton.jit`` helpers of both kernel files (lora_linear.py, multi_lora_linear.py): the shrink's K loop
and the dropout keep-mask it draws. Pure device code, inlined into each kernel that calls it."""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, offs_m, k_start, dropout_p, BLOCK_K: tl.constexpr):
    """Keep-mask of LoRA dropout for rows offs_m (BM,) x columns k_start + arange(BLOCK_K) of an (M, K)
    matrix, seed being the int64 value a kernel loaded from its seed_ptr: element (m, k) is kept iff
    uniform(output k % 4 of philox(seed; counter = (k // 4, m, 0, 0))) >= dropout_p. One Philox call
    gives four columns' bits (the 10 rounds are the cost: a quarter of one call per element).
    k_start must be a multiple of 4 (every caller's is a multiple of its column block, >= 16).
    The same (seed, m, k) gives the same bit in every kernel and tile, which is how backward
    regenerates the forward mask without storing it. 32-bit counters rather than one 64-bit offset
    m*K + k: unique up to 2**32 rows and 2**34 columns, and 32-bit Philox keeps the dX epilogue from
    spilling registers (~1 KB per thread at 128x128 with 64-bit Philox, sm_90)."""
    groups = (k_start // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
    rows, cols = tl.broadcast(offs_m.to(tl.uint32)[:, None], groups[None, :])   # (BM, BK / 4)
    zero = rows * 0
    r0, r1, r2, r3 = tl.philox(seed, cols, rows, zero, zero)
    # (BM, BK/4, 2, 2)[m, j, c, d] = r_{2c + d}: row-major reshape puts output i at column 4j + i
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (offs_m.shape[0], BLOCK_K))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def shrink_k_loop(
    acc,                        # (BM, BR) fp32
    x_row_ptrs, row_mask,       # (BM, 1): x's rows of the tile, x_ptr + row · stride_xm, and their mask
    a_col_ptrs, col_mask,       # (1, BR): a's rows (aᵀ's columns), a_ptr + r · stride_ar, and their mask
    k_start, k_end, stride_xk, stride_ak,
    seed, offs_m, dropout_p, dropout_scale,   # with DROPOUT: the int64 seed, the rows offs_m (BM,) of x
    DROPOUT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc + dropout(x)[rows, k_start:k_end] · a[:, k_start:k_end]ᵀ in BLOCK_K steps: the K loop of
    lora_shrink_kernel and segmented_shrink_kernel. With DROPOUT, x's keep-mask (dropout_keep of seed for
    rows offs_m) scales x, kept entries by dropout_scale."""
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_row_ptrs + offs_k[None, :] * stride_xk, mask=row_mask & k_mask[None, :], other=0.0)  # (BM, BK)
        if DROPOUT:
            keep = dropout_keep(seed, offs_m, k0, dropout_p, BLOCK_K)   # k0: a multiple of BLOCK_K
            # times 0, not a select: a dropped inf or NaN is NaN, as in x · mask / (1 - p)
            x = (x.to(tl.float32) * tl.where(keep, dropout_scale, 0.0)).to(x.dtype)
        a = tl.load(a_col_ptrs + offs_k[:, None] * stride_ak, mask=col_mask & k_mask[:, None], other=0.0)  # (BK, BR)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    return acc
