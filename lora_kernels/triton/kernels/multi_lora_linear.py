"""Triton kernels of the multi-adapter LoRA linear: a different adapter per row.

Rows come grouped in segments (see lora_kernels.metadata.AdapterBatch): segment s is positions
seg_starts[s]:seg_starts[s + 1] of `rows` (position -> row of x) and uses adapter seg_adapters[s]
(or adapter s when SEGMENT_IS_ADAPTER; -1 = none). Each segment is cut into BLOCK_M-row tiles, and
the batch's tile map (metadata.tile_map, built once per batch on the device) gives program `tile`
its (segment, first position): a few scalar loads, not a scan of the S segments. The grid is the
map's T = min(cdiv(M, BLOCK_M) + S, M) tiles, sized from shapes alone (CUDA-graph capturable);
programs past the last real tile return at once.

* ``segmented_shrink_kernel``       partial[s][rows] = X[rows] · A[j]ᵀ over the k of split s   (fp32)
* ``segmented_expand_kernel``       out[rows] += scale[j] · (Σ_s partial[s][rows]) · V[j]     (in place)
* ``segmented_rows_matmul_kernel``  partial[s, a] = scale[j] · Σ_{rows of j = active[a] in split s} L[row]ᵀ R[row]

True ranks: adapter j's rank r_j bounds every rank loop and mask, so an adapter of rank 8 in a
stack padded to 64 reads and multiplies 8 (rounded up to the 16-wide dot tile), not 64.
Every output element is written by one program and split partials are summed in a fixed order:
no atomics, bit-identical results, whatever the order of the rows.
"""

import triton
import triton.language as tl

from ._common import shrink_k_loop


@triton.jit
def tile_work(tile, tiles_ptr, seg_starts_ptr, seg_adapters_ptr, ranks_ptr, R,
              SEGMENT_IS_ADAPTER: tl.constexpr, HAS_RANKS: tl.constexpr):
    """(first position of row tile `tile`, end of its segment, adapter j, rank r_j) from the tile map
    (T, 2) int32: (segment, first position), or (-1, 0) past the last real tile. Adapter -1 when the
    tile has nothing to do (past the last real tile, or a segment of no adapter). Loads: the map entry
    (8 bytes), then the segment's end and adapter, then the rank: three dependent steps, whatever S."""
    entry = tiles_ptr + tile.to(tl.int64) * 2
    segment = tl.load(entry)
    start = tl.load(entry + 1)
    real = segment >= 0
    end = tl.load(seg_starts_ptr + segment + 1, mask=real, other=0)
    adapter = segment
    if not SEGMENT_IS_ADAPTER:
        adapter = tl.load(seg_adapters_ptr + segment, mask=real, other=-1)
    rank = R
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + adapter, mask=adapter >= 0, other=0), R)
    return start, end, adapter, rank


@triton.jit
def tile_rows(start, end, rows_ptr, BLOCK_M: tl.constexpr):
    """(rows (BLOCK_M,) int64 of x, row mask) of the tile at positions start:min(start + BLOCK_M, end)."""
    offs_pos = start + tl.arange(0, BLOCK_M)
    m_mask = offs_pos < end
    rows = tl.load(rows_ptr + offs_pos, mask=m_mask, other=0).to(tl.int64)
    return rows, m_mask


@triton.jit
def segmented_shrink_kernel(
    x_ptr, a_ptr, out_ptr, tiles_ptr, rows_ptr, seg_starts_ptr, seg_adapters_ptr, ranks_ptr,
    K, R, k_per_split,
    stride_xm, stride_xk,                  # x: (M, K)
    stride_al, stride_ar, stride_ak,       # a: (L, R, K)   (B[j]ᵀ in backward: (L, R, N) view of lora_b)
    stride_os, stride_om,                  # out: (SPLIT_K, M, R) fp32, last stride 1
    SEGMENT_IS_ADAPTER: tl.constexpr, HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """partial[s][rows, :r_j] = X[rows, k in split s] · A[j, :r_j, k in split s]ᵀ for one row tile of
    one segment (adapter j). Entries of rows of no adapter, and rank tiles past r_j, are not written."""
    # grid: (T tiles of the map, cdiv(R, BLOCK_R), SPLIT_K)
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    start, end, adapter, rank = tile_work(pid_t, tiles_ptr, seg_starts_ptr, seg_adapters_ptr, ranks_ptr, R,
                                          SEGMENT_IS_ADAPTER, HAS_RANKS)
    if adapter < 0:
        return
    if pid_r * BLOCK_R >= rank:
        return
    rows, m_mask = tile_rows(start, end, rows_ptr, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_adapter_ptr = a_ptr + adapter.to(tl.int64) * stride_al
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    acc = shrink_k_loop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
                        x_ptr + rows[:, None] * stride_xm, m_mask[:, None],
                        a_adapter_ptr + offs_r[None, :].to(tl.int64) * stride_ar, r_mask[None, :],
                        k_start, k_end, stride_xk, stride_ak, 0, rows, 0.0, 1.0,   # no dropout
                        False, BLOCK_K, DOT_PRECISION)

    out = out_ptr + pid_s.to(tl.int64) * stride_os + rows[:, None] * stride_om + offs_r[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def segmented_expand_kernel(
    t_ptr, v_ptr, out_ptr, t_sum_ptr, tiles_ptr, rows_ptr, seg_starts_ptr, seg_adapters_ptr, ranks_ptr,
    scales_ptr, N, R,
    stride_ts, stride_tm,                  # t: (NUM_T_SPLITS, M, R) fp32 partials, last stride 1
    stride_vl, stride_vr, stride_vn,       # v: (L, R, N)   (B[j]ᵀ in forward, A[j] in backward)
    stride_om, stride_on,                  # out: (M, N), updated in place
    stride_sm,                             # t_sum: (M, R) fp32, last stride 1
    SEGMENT_IS_ADAPTER: tl.constexpr, HAS_RANKS: tl.constexpr, STORE_T_SUM: tl.constexpr,
    NUM_T_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    LORA_DOT_PRECISION: tl.constexpr,
):
    """out[rows] += scale[j] · (Σ_s t[s][rows, :r_j]) · V[j, :r_j], added to out's values in fp32 with one
    cast at the store; t_sum[rows, :r_j] = Σ_s t[s][rows, :r_j] when STORE_T_SUM (for the backward).
    Forward: out = base output y, V = Bᵀ.  Backward: out = dY·W0 (dX so far), t = dY·B, V = A."""
    # grid: (T tiles of the map, cdiv(N, BLOCK_N))
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    start, end, adapter, rank = tile_work(pid_t, tiles_ptr, seg_starts_ptr, seg_adapters_ptr, ranks_ptr, R,
                                          SEGMENT_IS_ADAPTER, HAS_RANKS)
    if (adapter < 0) | (rank <= 0):   # a rank-0 adapter adds nothing: its rows keep their bits
        return
    rows, m_mask = tile_rows(start, end, rows_ptr, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n.to(tl.int64)
    n_mask = offs_n < N
    v_adapter_ptr = v_ptr + adapter.to(tl.int64) * stride_vl

    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        tile_mask = m_mask[:, None] & r_mask[None, :]
        t_split_ptr = t_ptr + rows[:, None] * stride_tm + offs_r[None, :]
        t = tl.load(t_split_ptr, mask=tile_mask, other=0.0)                           # (BM, BR)
        # unrolled: the splits' loads are independent and in flight together; fixed order: deterministic
        for _ in tl.static_range(1, NUM_T_SPLITS):
            t_split_ptr += stride_ts   # a 64-bit pointer step: no int32 product split · stride
            t += tl.load(t_split_ptr, mask=tile_mask, other=0.0)
        if STORE_T_SUM:   # one column block stores the reduced intermediate
            if pid_n == 0:
                tl.store(t_sum_ptr + rows[:, None] * stride_sm + offs_r[None, :], t, mask=tile_mask)
        v = tl.load(v_adapter_ptr + offs_r[:, None].to(tl.int64) * stride_vr + cols[None, :] * stride_vn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)   # (BR, BN)
        lora = tl.dot(t, v, lora, input_precision=LORA_DOT_PRECISION)

    scale = tl.load(scales_ptr + adapter)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    out = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32) + scale * lora
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def segmented_rows_matmul_kernel(
    l_ptr, r_ptr, out_ptr, active_ptr, rows_ptr, adapter_starts_ptr, ranks_ptr, scales_ptr,
    P, Q, R, num_splits,
    stride_lm, stride_lp,                  # l: (M, P)
    stride_rm, stride_rq,                  # r: (M, Q)
    stride_os, stride_oa, stride_op,       # out: (SPLITS, A, P, Q) fp32, last stride 1
    HAS_RANKS: tl.constexpr, RANK_ON_P: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """partial[s, a] = scale[j] · Σ_{rows of adapter j = active[a] in split s} l[row, :]ᵀ r[row, :] -> (P, Q): the
    weight gradients dA[j] = s_j · dU_jᵀ · X_j (P = R, Q = K, the rank on P) and
    dB[j] = s_j · dY_jᵀ · T_j (P = N, Q = R, the rank on Q). Adapter j's rows are
    rows[adapter_starts[j]:adapter_starts[j + 1]], split into num_splits equal runs. Only the A active
    adapters (AdapterBatch.active_adapters) have programs and partials. Every program stores its tile
    (zeros for an adapter with no rows, and past the adapter's rank)."""
    # grid: (A, cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q), SPLITS)
    pid_a = tl.program_id(0)
    adapter = tl.load(active_ptr + pid_a)
    pid_pq = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_pid_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid_pq // num_pid_q
    pid_q = pid_pq % num_pid_q
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rank = R
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + adapter), R)
    if RANK_ON_P:
        p_mask = offs_p < rank
        q_mask = offs_q < Q
    else:
        p_mask = offs_p < P
        q_mask = offs_q < rank
    start = tl.load(adapter_starts_ptr + adapter)
    end = tl.load(adapter_starts_ptr + adapter + 1)
    per_split = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_M) * BLOCK_M
    m_start = start + pid_s * per_split
    m_end = tl.minimum(m_start + per_split, end)
    if RANK_ON_P:
        if pid_p * BLOCK_P >= rank:   # a rank tile past this adapter's rank: nothing to read
            m_end = m_start
    else:
        if pid_q * BLOCK_Q >= rank:
            m_end = m_start

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_pos = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_pos < m_end
        rows = tl.load(rows_ptr + offs_pos, mask=m_mask, other=0).to(tl.int64)
        lt = tl.load(l_ptr + rows[None, :] * stride_lm + offs_p[:, None] * stride_lp,
                     mask=p_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)   # (BP, BM)
        r = tl.load(r_ptr + rows[:, None] * stride_rm + offs_q[None, :] * stride_rq,
                    mask=m_mask[:, None] & q_mask[None, :], other=0.0).to(tl.float32)    # (BM, BQ)
        acc = tl.dot(lt, r, acc, input_precision=DOT_PRECISION)

    scale = tl.load(scales_ptr + adapter)
    out = (out_ptr + pid_s.to(tl.int64) * stride_os + pid_a.to(tl.int64) * stride_oa
           + offs_p[:, None].to(tl.int64) * stride_op + offs_q[None, :])
    # past the rank the masked-out operand is 0, but 0 · inf or NaN in the other is NaN: store the zeros
    # the reference has there; so does a split without rows (past an adapter's last row, or an adapter
    # with none in an unchecked batch's active_adapters tail): 0, not 0 · scale
    in_rank = p_mask[:, None] & q_mask[None, :] & (m_end > m_start)
    tl.store(out, tl.where(in_rank, acc * scale, 0.0), mask=(offs_p[:, None] < P) & (offs_q[None, :] < Q))
