// Single-adapter CPU kernels: the torch backend's maths (lora_kernels/fallback.py) in ATen calls,
// the same ops on the same layouts, so the results are the Python backend's bit for bit.
#include "lora_kernels.h"

#include <ATen/CPUGeneratorImpl.h>

namespace lora_kernels {

void add_scaled_product_(const Tensor& out, const Tensor& left, const Tensor& right, double scale, int64_t beta) {
    // out = beta · out + scale · (left @ right); beta 0 ignores out's old values (NaN too). At scale 0
    // BLAS would skip the product (alpha = 0), dropping the NaN that 0 · inf gives there: form it.
    if (scale != 0.0) {
        out.addmm_(left, right, beta, scale);
    } else if (beta == 0) {
        at::mm_out(const_cast<Tensor&>(out), left, right).mul_(python_float(0.0));
    } else {
        out.add_(at::mm(left, right).mul_(python_float(0.0)));
    }
}

Tensor dropout_keep_mask(int64_t m, int64_t k, double dropout_p, const Tensor& seed) {
    // A private generator seeded with the seed's value (the global one untouched), uniforms in the
    // default dtype as torch.rand draws them, kept where >= p: fallback.dropout_keep_mask's mask.
    auto generator = at::detail::createCPUGenerator(static_cast<uint64_t>(seed.item<int64_t>()));
    return at::rand({m, k}, generator, at::TensorOptions()).ge(dropout_p);
}

static Tensor apply_keep_mask(const Tensor& x, const Tensor& keep, double dropout_p) {
    // x (M, K) dropped, the kept entries scaled by 1 / (1 - p)
    return x.mul(keep).mul(python_float(1.0 / (1.0 - dropout_p)));
}

static Tensor dropped(const Tensor& x, double dropout_p, const OptTensor& seed) {
    if (dropout_p == 0.0) {
        return x;
    }
    return apply_keep_mask(x, dropout_keep_mask(x.size(0), x.size(1), dropout_p, *seed), dropout_p);
}

std::tuple<Tensor, Tensor> lora_linear_forward(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    double scale, double dropout_p, const OptTensor& seed) {
    Tensor y = is_given(bias) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());                    // (M, N)
    Tensor hidden = at::mm(dropped(x, dropout_p, seed), lora_a.t());                                         // (M, r)
    add_scaled_product_(y, hidden, lora_b.t(), scale);
    at::ScalarType saved = hidden_dtype(hidden.scalar_type());
    return {y, hidden.scalar_type() == saved ? hidden : hidden.to(saved)};   // fp32 / fp64: no copy
}

Grads lora_linear_backward(
    const Tensor& grad_y, const OptTensor& x, const OptTensor& weight, const OptTensor& lora_a,
    const OptTensor& lora_b, const OptTensor& lora_hidden, double scale, double dropout_p, const OptTensor& seed,
    bool need_x, bool need_a, bool need_b) {
    // dT = s·dY·B;  dX = dY·W0 + mask ⊙ (dT·A);  dA = dTᵀ·dropout(x);  dB = dYᵀ·(s·T).
    Tensor grad_x, grad_a, grad_b;
    if (need_x || need_a) {
        Tensor grad_t = at::mm(grad_y, *lora_b).mul_(python_float(scale));                                  // (M, r)
        Tensor keep;   // one mask for dX and dA
        if (dropout_p != 0.0) {
            int64_t k = is_given(x) ? x->size(1) : lora_a->size(1);
            keep = dropout_keep_mask(grad_y.size(0), k, dropout_p, *seed);                       // (M, K)
        }
        if (need_x) {
            grad_x = at::mm(grad_y, *weight);                                                  // (M, K)
            if (!keep.defined()) {
                grad_x.addmm_(grad_t, *lora_a);
            } else {
                grad_x.add_(apply_keep_mask(at::mm(grad_t, *lora_a), keep, dropout_p));
            }
        }
        if (need_a) {
            grad_a = at::mm(grad_t.t(), keep.defined() ? apply_keep_mask(*x, keep, dropout_p) : *x);   // (r, K)
        }
    }
    if (need_b) {
        grad_b = at::mm(grad_y.t(), lora_hidden->mul(python_float(scale)).to(grad_y.scalar_type()));      // (N, r)
    }
    return {grad_x, grad_a, grad_b};
}

}  // namespace lora_kernels
