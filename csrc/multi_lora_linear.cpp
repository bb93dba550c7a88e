// Many adapters on CPU: the torch backend's multi-adapter maths (lora_kernels/fallback.py,
// host_groups .. multi_lora_linear_backward) in ATen calls, op for op on the same layouts, so the
// results equal the Python backend's bit for bit.
// x (M, K), weight (N, K), bias (N,) | None, lora_a (L, R, K), lora_b (L, N, R), scales (L,);
// of the AdapterBatch only the by-adapter view: sorted_rows (M,), adapter_starts (L + 1,), ranks (L,) | None.
// Never a per-row weight gather: the rows of all adapters are index_select-ed once into adapter order
// (M' rows: those with an adapter), each adapter's contiguous block goes through two matmuls with its
// rank-trimmed weights, one index_add_ puts the blocks back. Rows of no adapter are never touched.
// When one adapter has every row, the stable sort left them in order: no gather and no scatter.
// (Python's bulk split/unbind views are a Python-speed trick: here every view is a narrow/select.)
#include "lora_kernels.h"


#include <algorithm>
#include <cstdint>
#include <vector>

namespace lora_kernels {
namespace {

// A 1-D tensor's values on the host, as int64 (index tensors) or double (scales): tolist().
template <typename T>
std::vector<T> host_values(const Tensor& t) {
    const Tensor host = t.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
    const T* p = host.const_data_ptr<T>();
    return std::vector<T>(p, p + host.numel());
}

// fallback.host_groups, read on the host once per call.
struct HostGroups {
    std::vector<int64_t> counts;    // (L,) rows per adapter
    std::vector<int64_t> offsets;   // (L + 1,) first row of adapter j's block in adapter order (from 0)
    std::vector<int64_t> ranks;     // (L,) clamped to [0, R], as the Triton kernels read them
    std::vector<double> scales;     // (L,)
    std::vector<int64_t> active;    // adapters with rows and rank > 0
    bool rank0_rows = false;        // some adapter with rows has rank 0: its rows must stay zero

    // Rows of adapter j in a tensor holding each adapter's rows in turn ((sum(counts), ...)).
    Tensor block(const Tensor& t, int64_t j) const { return t.narrow(0, offsets[j], counts[j]); }
};

HostGroups host_groups(const Tensor& adapter_starts, const OptTensor& ranks, const Tensor& scales,
                       int64_t max_rank) {
    HostGroups g;
    const std::vector<int64_t> starts = host_values<int64_t>(adapter_starts);
    const size_t num_adapters = starts.empty() ? 0 : starts.size() - 1;
    std::vector<int64_t> given_ranks = is_given(ranks) ? host_values<int64_t>(*ranks)
                                                    : std::vector<int64_t>(num_adapters, max_rank);
    g.scales = host_values<double>(scales);
    g.offsets.push_back(0);
    for (size_t j = 0; j < num_adapters; ++j) {
        const int64_t count = starts[j + 1] - starts[j];
        const int64_t rank = std::min(std::max<int64_t>(given_ranks[j], 0), max_rank);
        g.counts.push_back(count);
        g.offsets.push_back(g.offsets.back() + count);
        g.ranks.push_back(rank);
        if (count && rank) g.active.push_back(static_cast<int64_t>(j));
        if (count && !rank) g.rank0_rows = true;
    }
    return g;
}

// fallback._rows_in_adapter_order: rows (M',) in adapter order, or none when one adapter has all
// M rows, already in order (then the blocks are the tensors themselves).
OptTensor rows_in_adapter_order(const Tensor& sorted_rows, const HostGroups& g, int64_t m) {
    if (g.active.size() == 1 && g.counts[g.active[0]] == m) return std::nullopt;
    return sorted_rows.slice(0, 0, g.offsets.back());   // sorted_rows[:sum(counts)]
}

Tensor gather(const Tensor& t, const OptTensor& rows) { return rows ? t.index_select(0, *rows) : t; }

// fallback._add_lora_rows: out[rows of j] += scales[j] · (x A[j]ᵀ) B[j]ᵀ; when hidden (M, R),
// zero-filled, is given, its rows of adapter j also get the unscaled T = x A[j]ᵀ.
void add_lora_rows(const Tensor& out, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                   const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts,
                   const OptTensor& ranks, const Tensor* hidden) {
    const int64_t m = x.size(0), max_rank = lora_a.size(1);
    const HostGroups g = host_groups(adapter_starts, ranks, scales, max_rank);
    if (g.active.empty()) return;
    const OptTensor rows = rows_in_adapter_order(sorted_rows, g, m);
    Tensor x_rows, lora_out;   // (M', K), (M', N)
    int64_t beta = 1;
    if (!rows) {   // the blocks are x and out themselves
        x_rows = x;
        lora_out = out;
    } else {       // a buffer the blocks overwrite (beta 0); rows of a rank-0 adapter must stay zero in it
        x_rows = x.index_select(0, *rows);
        beta = 0;
        const std::vector<int64_t> shape{rows->size(0), out.size(1)};
        lora_out = g.rank0_rows ? out.new_zeros(shape) : out.new_empty(shape);
    }
    // (M', R) in x's dtype, like Python's x.new_zeros: cast into hidden's dtype at the end
    const Tensor t_rows = hidden ? x.new_zeros({x_rows.size(0), max_rank}) : Tensor();
    const Tensor a_t = lora_a.transpose(1, 2), b_t = lora_b.transpose(1, 2);   // A[j]ᵀ (K, R), B[j]ᵀ (R, N)
    for (const int64_t j : g.active) {
        const int64_t rank = g.ranks[j];
        Tensor a_j = a_t.select(0, j), b_j = b_t.select(0, j);
        if (rank != max_rank) {
            a_j = a_j.slice(1, 0, rank);   // (K, r_j)
            b_j = b_j.slice(0, 0, rank);   // (r_j, N)
        }
        const Tensor t = at::mm(g.block(x_rows, j), a_j);                          // (m_j, r_j)
        add_scaled_product_(g.block(lora_out, j), t, b_j, g.scales[j], beta);
        if (t_rows.defined()) g.block(t_rows, j).slice(1, 0, rank).copy_(t);
    }
    if (rows) out.index_add_(0, *rows, lora_out);
    if (hidden) {
        if (!rows) {
            hidden->copy_(t_rows);
        } else {
            hidden->index_copy_(0, rows->to(at::kLong), t_rows.to(hidden->scalar_type()));
        }
    }
}

}  // namespace

void multi_lora_add_(
    const Tensor& out, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, const Tensor& scales,
    const Tensor& sorted_rows, const Tensor& adapter_starts, const OptTensor& ranks) {
    add_lora_rows(out, x, lora_a, lora_b, scales, sorted_rows, adapter_starts, ranks, nullptr);
}

// y (M, N), and when need_hidden the rank intermediate T (M, R) in hidden_dtype, unscaled, zero on
// rows of no adapter and past each adapter's rank (else an empty (M, 0)).
std::tuple<Tensor, Tensor> multi_lora_linear_forward(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts, const OptTensor& ranks,
    bool need_hidden) {
    const int64_t m = x.size(0), max_rank = lora_a.size(1);
    // Python's x @ weight.T is aten::mm for 2-D operands
    const Tensor y = is_given(bias) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());   // (M, N)
    const Tensor hidden = x.new_zeros({m, need_hidden ? max_rank : 0},
                                      at::TensorOptions().dtype(hidden_dtype(x.scalar_type())));
    add_lora_rows(y, x, lora_a, lora_b, scales, sorted_rows, adapter_starts, ranks,
                  need_hidden ? &hidden : nullptr);
    return {y, hidden};
}

// Per adapter j over its rows:  dU_j = s_j·dY_j·B_j;  dX_j += dU_j·A_j;  dA_j = dU_jᵀ·X_j;
// dB_j = s_j·dY_jᵀ·T_j.  dX = dY·W0 first; unused adapters (and padded ranks) get zero gradients.
// A gradient not asked for is an undefined Tensor.
Grads multi_lora_linear_backward(
    const Tensor& grad_y, const OptTensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const OptTensor& lora_hidden, const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts,
    const OptTensor& ranks, bool need_x, bool need_a, bool need_b) {
    const int64_t m = grad_y.size(0), max_rank = lora_a.size(1);
    Tensor grad_x = need_x ? at::mm(grad_y, weight) : Tensor();                     // (M, K)
    Tensor grad_a = need_a ? lora_a.new_zeros(lora_a.sizes()) : Tensor();           // (L, R, K)
    Tensor grad_b = need_b ? lora_b.new_zeros(lora_b.sizes()) : Tensor();           // (L, N, R)
    const HostGroups g = host_groups(adapter_starts, ranks, scales, max_rank);
    if (g.active.empty()) return {grad_x, grad_a, grad_b};
    const OptTensor rows = rows_in_adapter_order(sorted_rows, g, m);
    const Tensor grad_y_rows = gather(grad_y, rows);                                // (M', N)
    const Tensor x_rows = need_a ? gather(*x, rows) : Tensor();                     // (M', K)
    const Tensor hidden_rows = need_b ? gather(*lora_hidden, rows).to(grad_y.scalar_type()) : Tensor();  // (M', R)
    // dX's LoRA term: into dX itself when in order, else a buffer (zero: rank-0 rows)
    Tensor grad_x_lora;                                                             // (M', K)
    if (need_x) grad_x_lora = rows ? grad_y.new_zeros({rows->size(0), grad_x.size(1)}) : grad_x;
    for (const int64_t j : g.active) {
        const int64_t rank = g.ranks[j];
        const double scale = g.scales[j];
        Tensor a_j = lora_a.select(0, j), b_j = lora_b.select(0, j);               // A[j] (R, K), B[j] (N, R)
        if (rank != max_rank) {
            a_j = a_j.slice(0, 0, rank);   // (r_j, K)
            b_j = b_j.slice(1, 0, rank);   // (N, r_j)
        }
        if (need_x || need_a) {
            const Tensor grad_u = at::mm(g.block(grad_y_rows, j), b_j).mul_(python_float(scale));   // (m_j, r_j)
            if (need_x) g.block(grad_x_lora, j).addmm_(grad_u, a_j);
            if (need_a) {
                Tensor grad_a_j = grad_a.select(0, j).slice(0, 0, rank);           // (r_j, K)
                at::mm_out(grad_a_j, grad_u.t(), g.block(x_rows, j));
            }
        }
        if (need_b) {
            const Tensor grad_b_j = grad_b.select(0, j).slice(1, 0, rank);         // (N, r_j), strided
            add_scaled_product_(grad_b_j, g.block(grad_y_rows, j).t(), g.block(hidden_rows, j).slice(1, 0, rank),
                                scale, /*beta=*/0);
        }
    }
    if (need_x && rows) grad_x.index_add_(0, *rows, grad_x_lora);
    return {grad_x, grad_a, grad_b};
}

}  // namespace lora_kernels
