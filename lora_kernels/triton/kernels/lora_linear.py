"""Triton kernels of the single-adapter fused LoRA linear (forward and backward).

Four kernels serve every matmul of ``y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` and of its backward:

* ``lora_shrink_kernel``        partial[s] = dropout(X)[:, k in split s] · Aᵀ      (M, K) x (K, R) -> (M, R)
* ``lora_fused_matmul_kernel``  out = X · W + b + scale · ((Σ_s partial[s]) · V)   (M, K) x (K, N) + (M, R) x (R, N)
                                (or, split-K, the fp32 partials of X · W over split_k ranges of K)
* ``lora_expand_kernel``        out = base + b + scale · ((Σ_s partial[s]) · V), base = out (in place, after
                                torch's GEMM: the split strategy) or the split-K partials' fixed-order sum
* ``lora_rows_matmul_kernel``   partial[s] = alpha · Lᵀ · dropout(Rm) over the rows m of split s   (P, M) x (M, Q)

Every operand is addressed through its strides, so transposed views (W0ᵀ, Bᵀ) are read in place.
Accumulation is fp32; the rank-R intermediate stays fp32; each output is cast once, at the store.
Split reductions write fp32 partials that a later step sums in a fixed order: no atomics, so
results are bit-identical from run to run.
The dropout seed is no int argument (nothing to ``do_not_specialize``): each kernel loads it once per
program from a 0-d int64 tensor (``seed_ptr``), so a captured CUDA graph reads the seed that each
replay draws on the device, and nothing syncs to hand it to the launch.
"""

import triton
import triton.language as tl

from ._common import dropout_keep, shrink_k_loop


@triton.jit
def add_partials(acc, ptrs, mask, stride, num_partials):
    """acc + Σ_s load(ptrs + s · stride) for s < num_partials, in a fixed order (deterministic): the split sums
    of lora_term (the rank partials) and lora_expand_kernel (the split-K GEMM's partials). Pointer increments:
    64-bit, whatever s · stride."""
    for _ in range(0, num_partials):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride
    return acc


@triton.jit
def lora_term(
    t_ptr, v_ptr, t_sum_ptr, seed_ptr,
    offs_m, offs_n, pid_n, M, N, R, num_t_splits,
    stride_ts, stride_tm, stride_vr, stride_vn, stride_sm,
    scale, dropout_p, dropout_scale,
    STORE_T_SUM: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, LORA_DOT_PRECISION: tl.constexpr,
):
    """The LoRA term of one (BLOCK_M, BLOCK_N) output tile, fp32: scale · (mask ⊙ ((Σ_s t[s]) · v)), v (R, N),
    t (num_t_splits, M, R) fp32 partials summed in a fixed order (deterministic); the mask (DROPOUT: the
    dX term, columns = x's) as dropout_keep gives it, kept entries times dropout_scale. With STORE_T_SUM
    the column block pid_n == 0 stores t_sum = Σ_s t[s] (M, R) fp32 for the backward. The one place
    the fused GEMM (its accumulator's initial value) and the expand kernel compute it."""
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # (BM, R) x (R, BN) in chunks of BLOCK_R, rank intermediate kept in fp32
    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        tile_mask = m_mask[:, None] & r_mask[None, :]
        t = add_partials(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                         t_ptr + rows[:, None] * stride_tm + offs_r[None, :], tile_mask, stride_ts, num_t_splits)
        if STORE_T_SUM:   # one column block stores the reduced intermediate for the backward pass
            if pid_n == 0:
                tl.store(t_sum_ptr + rows[:, None] * stride_sm + offs_r[None, :], t, mask=tile_mask)
        v = tl.load(v_ptr + offs_r[:, None] * stride_vr + cols[None, :] * stride_vn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        lora = tl.dot(t, v, lora, input_precision=LORA_DOT_PRECISION)
    if DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), offs_m, pid_n * BLOCK_N, dropout_p, BLOCK_N)
        lora = tl.where(keep, lora * dropout_scale, lora * 0.0)   # a dropped inf or NaN is NaN, as in the reference
    # the scale multiplies the finished rank product, as in the reference: scaling T first turns a
    # large finite scale into ±inf terms whose sum is NaN where the reference has a finite value
    return scale * lora


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk,      # x: (M, K)
    stride_ar, stride_ak,      # a: (R, K)   (Bᵀ in backward: a (R, N) view of lora_b (N, R))
    stride_os, stride_om,      # out: (SPLIT_K, M, R) fp32, last stride 1
    seed_ptr, dropout_p, dropout_scale,   # seed_ptr: 0-d int64, read only with DROPOUT
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R), SPLIT_K); program (i, j, s) sums k in [s*k_per_split, ...)
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = offs_m.to(tl.int64)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = shrink_k_loop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                        x_ptr + rows[:, None] * stride_xm, offs_m[:, None] < M,
                        a_ptr + offs_r[None, :] * stride_ar, offs_r[None, :] < R,
                        k_start, k_end, stride_xk, stride_ak, seed, offs_m, dropout_p, dropout_scale,
                        DROPOUT, BLOCK_K, DOT_PRECISION)

    out = out_ptr + pid_s.to(tl.int64) * stride_os + rows[:, None] * stride_om + offs_r[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def lora_fused_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, t_ptr, v_ptr, out_ptr, t_sum_ptr,
    M, N, K, R, num_t_splits, k_per_split,
    stride_xm, stride_xk,      # x: (M, K)
    stride_wk, stride_wn,      # w: (K, N)   (W0ᵀ in forward, W0 in backward)
    stride_ts, stride_tm,      # t: (num_t_splits, M, R) fp32 partials of the rank-R intermediate, last stride 1
    stride_vr, stride_vn,      # v: (R, N)   (Bᵀ in forward, A in backward)
    stride_os, stride_om, stride_on,   # out: (M, N); SPLIT_K_PARTIALS: (SPLIT_K, M, N) fp32 partials
    stride_sm,                 # t_sum: (M, R) fp32, last stride 1
    stride_bias,               # bias: (N,), any stride (0 for an expanded one)
    scale, seed_ptr, dropout_p, dropout_scale,   # seed_ptr: 0-d int64, read only with EPILOGUE_DROPOUT
    HAS_BIAS: tl.constexpr, STORE_T_SUM: tl.constexpr, EPILOGUE_DROPOUT: tl.constexpr,
    SPLIT_K_PARTIALS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, LORA_DOT_PRECISION: tl.constexpr,
):
    """out = x·w + bias + scale · (mask ⊙ ((Σ_s t[s]) · v)) in one fp32 accumulator: the LoRA term
    (lora_term) is its initial value, the K loop adds x·w into it, bias last, one cast at the store: no
    (M, N) intermediate besides out, and one live (BM, BN) fp32 tile (the dX epilogue's dropout mask is
    drawn before the K loop, not beside a second accumulator); t_sum = Σ_s t[s].
    Forward: x, W0ᵀ, bias, xAᵀ partials, Bᵀ -> y, T.   Backward: dY, W0, none, dY·B partials, A -> dX, dU
    (the dropout mask then applies to the LoRA term of dX, EPILOGUE_DROPOUT).
    SPLIT_K_PARTIALS: program (tile, s) of the grid (tiles, SPLIT_K) stores the fp32 partial x·w over
    k in [s·k_per_split, (s+1)·k_per_split) to out[s], nothing else (lora_expand_kernel sums them in a
    fixed order and adds bias and the LoRA term): enough programs when the (M, N) tiles are few."""
    # grouped ordering: GROUP_M row-blocks share each column-block of w while it is in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N

    if SPLIT_K_PARTIALS:
        pid_s = tl.program_id(1)
        k_start = pid_s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)   # an empty range stores zeros
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        k_start = 0
        k_end = K
        acc = lora_term(t_ptr, v_ptr, t_sum_ptr, seed_ptr, offs_m, offs_n, pid_n, M, N, R, num_t_splits,
                        stride_ts, stride_tm, stride_vr, stride_vn, stride_sm, scale, dropout_p, dropout_scale,
                        STORE_T_SUM, EPILOGUE_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, LORA_DOT_PRECISION)

    # main GEMM: (BM, BK) x (BK, BN) into the fp32 accumulator
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K_PARTIALS:
        tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def lora_expand_kernel(
    base_ptr, bias_ptr, t_ptr, v_ptr, out_ptr, t_sum_ptr,
    M, N, R, num_t_splits,
    stride_bs, stride_bm, stride_bn,   # base: (SPLIT_K, M, N) fp32 partials of x·w (BASE_PARTIALS)
    stride_ts, stride_tm,      # t: (num_t_splits, M, R) fp32 partials of the rank-R intermediate, last stride 1
    stride_vr, stride_vn,      # v: (R, N)   (Bᵀ in forward, A in backward)
    stride_om, stride_on,      # out: (M, N)
    stride_sm,                 # t_sum: (M, R) fp32, last stride 1
    stride_bias,               # bias: (N,), any stride
    scale, seed_ptr, dropout_p, dropout_scale,   # seed_ptr: 0-d int64, read only with EPILOGUE_DROPOUT
    HAS_BIAS: tl.constexpr, STORE_T_SUM: tl.constexpr, EPILOGUE_DROPOUT: tl.constexpr,
    BASE_PARTIALS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, LORA_DOT_PRECISION: tl.constexpr,
):
    """out = base + bias + scale · (mask ⊙ ((Σ_s t[s]) · v)) in fp32, one cast at the store; t_sum = Σ_s t[s]
    (STORE_T_SUM). base: out's own values (in place, after torch's GEMM wrote x·w + bias there: the
    split strategy), or with BASE_PARTIALS the sum of the SPLIT_K fp32 partials of the split-K fused
    GEMM, in a fixed order: deterministic.
    Memory bound: reads out (or the partials) and writes out once; the rank loop is a sliver."""
    # grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]

    acc = lora_term(t_ptr, v_ptr, t_sum_ptr, seed_ptr, offs_m, offs_n, pid_n, M, N, R, num_t_splits,
                    stride_ts, stride_tm, stride_vr, stride_vn, stride_sm, scale, dropout_p, dropout_scale,
                    STORE_T_SUM, EPILOGUE_DROPOUT, BLOCK_M, BLOCK_N, BLOCK_R, LORA_DOT_PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    if BASE_PARTIALS:
        # a loop, not unrolled: 8 unrolled (BM, BN) fp32 loads in flight spilled 232-608 B per thread
        # (64x128, 8 warps, sm_80 / sm_90; 255 registers)
        acc = add_partials(acc, base_ptr + rows[:, None] * stride_bm + cols[None, :] * stride_bn, out_mask,
                           stride_bs, SPLIT_K)
    else:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def lora_rows_matmul_kernel(
    l_ptr, r_ptr, out_ptr,
    M, P, Q, rows_per_split,
    stride_lm, stride_lp,      # l: (M, P)
    stride_rm, stride_rq,      # r: (M, Q)
    stride_os, stride_op,      # out: (SPLIT_M, P, Q) fp32, last stride 1
    alpha, seed_ptr, dropout_p, dropout_scale,   # seed_ptr: 0-d int64, read only with DROPOUT_R
    DROPOUT_R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """partial[s] = alpha · Σ_{m in split s} l[m, :]ᵀ r[m, :]  -> (P, Q), the weight gradients
    dA = s · dUᵀ · dropout(x) (P = R, Q = K) and dB = s · dYᵀ · T (P = N, Q = R). One operand is the fp32
    rank intermediate, so both are taken in fp32 (tf32 tensor cores unless fp32 exactness is asked)."""
    # grid: (cdiv(P, BLOCK_P), cdiv(Q, BLOCK_Q), SPLIT_M)
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < P
    q_mask = offs_q < Q
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if DROPOUT_R:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        m_mask = offs_m < m_end
        lt = tl.load(l_ptr + rows[None, :] * stride_lm + offs_p[:, None] * stride_lp,
                     mask=p_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)   # (BP, BM)
        r = tl.load(r_ptr + rows[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                    mask=m_mask[:, None] & q_mask[None, :], other=0.0).to(tl.float32)    # (BM, BQ)
        if DROPOUT_R:
            keep = dropout_keep(seed, offs_m, pid_q * BLOCK_Q, dropout_p, BLOCK_Q)
            r = r * tl.where(keep, dropout_scale, 0.0)   # a dropped inf or NaN is NaN, as in the reference
        acc = tl.dot(lt, r, acc, input_precision=DOT_PRECISION)

    out = out_ptr + pid_s.to(tl.int64) * stride_os + offs_p[:, None].to(tl.int64) * stride_op + offs_q[None, :]
    tl.store(out, acc * alpha, mask=p_mask[:, None] & q_mask[None, :])


@triton.jit
def dropout_mask_kernel(out_ptr, M, K, seed_ptr, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes the keep-mask (M, K) int8 that the kernels above regenerate from the seed at seed_ptr
    (0-d int64): for tests and debugging."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), offs_m, tl.program_id(1) * BLOCK_K, dropout_p, BLOCK_K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
