// lora_kernels C++ extension: what its translation units share.
//
// The CPU kernels (lora_linear.cpp, multi_lora_linear.cpp) are the torch backend's maths
// (lora_kernels/fallback.py) in ATen calls: the same BLAS calls on the same layouts, so their
// results are the Python backend's bit for bit. library.cpp defines the ops' schemas, registers
// these kernels for CPU and the autograd of autograd.cpp for AutogradCPU, and holds the hooks
// into Python (another backend requested for CPU tensors, second derivatives).
// Everything is 2-D: x (M, K), weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r);
// multi-adapter lora_a (L, R, K), lora_b (L, N, R), scales (L,).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ScalarOps.h>

#include <optional>
#include <string>
#include <tuple>

namespace lora_kernels {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;   // (dX, dA, dB): empty (0,) where not asked for

// ---- single adapter (lora_linear.cpp) ------------------------------------------------------------

// (M, K) bool keep-mask derived from seed (0-d int64) alone: fallback.dropout_keep_mask.
Tensor dropout_keep_mask(int64_t m, int64_t k, double dropout_p, const Tensor& seed);

// (y (M, N), T = dropout(x) Aᵀ (M, r) in fp32 for 16-bit and fp32 x, fp64 for fp64).
std::tuple<Tensor, Tensor> lora_linear_forward(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    double scale, double dropout_p, const OptTensor& seed);

Grads lora_linear_backward(
    const Tensor& grad_y, const OptTensor& x, const OptTensor& weight, const OptTensor& lora_a,
    const OptTensor& lora_b, const OptTensor& lora_hidden, double scale, double dropout_p, const OptTensor& seed,
    bool need_x, bool need_a, bool need_b);

// ---- many adapters (multi_lora_linear.cpp) -------------------------------------------------------
// Of the AdapterBatch only the by-adapter view: sorted_rows (M,), adapter_starts (L + 1,), ranks (L,) | None.

std::tuple<Tensor, Tensor> multi_lora_linear_forward(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts, const OptTensor& ranks,
    bool need_hidden);

Grads multi_lora_linear_backward(
    const Tensor& grad_y, const OptTensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const OptTensor& lora_hidden, const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts,
    const OptTensor& ranks, bool need_x, bool need_a, bool need_b);

void multi_lora_add_(
    const Tensor& out, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, const Tensor& scales,
    const Tensor& sorted_rows, const Tensor& adapter_starts, const OptTensor& ranks);

// A Python float operand as Python passes it: a wrapped 0-d double tensor (t.mul_(s) is aten::mul_.Tensor).
// aten::mul_.Scalar rounds differently for fp16 (27 % of a (64, 16) tensor's elements differed, torch 2.13).
inline Tensor python_float(double value) {
    return at::native::wrapped_scalar_tensor(value);
}

// Whether an optional tensor argument holds a tensor (None and an undefined tensor do not).
inline bool is_given(const OptTensor& t) {
    return t.has_value() && t->defined();
}

// The tensor of an optional argument, undefined for None (what autograd and the tuples of Grads hold).
inline Tensor or_undefined(const OptTensor& t) {
    return t.has_value() ? *t : Tensor();
}

// fallback.hidden_dtype: the saved rank intermediate's dtype.
inline at::ScalarType hidden_dtype(at::ScalarType dtype) {
    return (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
}

// out = beta · out + scale · (left @ right) in place: fallback.add_scaled_product_.
void add_scaled_product_(const Tensor& out, const Tensor& left, const Tensor& right, double scale, int64_t beta = 1);

}  // namespace lora_kernels

// ---- the registered ops' dispatcher handles (library.cpp: one lookup each) ------------------------------
namespace lora_kernels {

using ForwardOutputs = std::tuple<Tensor, Tensor>;   // (y, the rank intermediate T)
using LoRALinearFn = ForwardOutputs(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                                    double, double, const OptTensor&);
using LoRALinearBackwardFn = Grads(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const OptTensor&, double, double, const OptTensor&, bool, bool,
                                   bool, c10::string_view);
using MultiLoRALinearFn = ForwardOutputs(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                         const Tensor&, c10::SymInt, bool);
using MultiLoRALinearBackwardFn = Grads(const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                                        const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                        const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                        const Tensor&, const Tensor&, c10::SymInt, bool, bool, bool,
                                        c10::string_view);
const c10::TypedOperatorHandle<LoRALinearFn>& lora_linear_op();
const c10::TypedOperatorHandle<LoRALinearBackwardFn>& lora_linear_backward_op();
const c10::TypedOperatorHandle<MultiLoRALinearFn>& multi_lora_linear_op();
const c10::TypedOperatorHandle<MultiLoRALinearBackwardFn>& multi_lora_linear_backward_op();

}  // namespace lora_kernels

// ---- hooks into Python (library.cpp) ---------------------------------------------------------------
namespace lora_kernels {

// "torch" when the C++ kernels serve CPU tensors; when another backend may be requested (use_backend,
// set_backend or LORA_KERNELS_BACKEND naming one), Python's resolve_backend for x's device and dtype.
std::string cpu_backend(const Tensor& x);

// A backward recorded for a second derivative (create_graph=True): the gradients as differentiable
// torch ops, by Python's compositions (lora_kernels/ops/_composite.py), the serving backend's mask.
Grads lora_linear_grads_in_python(
    const Tensor& grad_y, const OptTensor& x, const OptTensor& weight, const OptTensor& lora_a,
    const OptTensor& lora_b, const OptTensor& lora_hidden, const OptTensor& seed, double scale, double dropout_p,
    const std::string& backend, bool need_x, bool need_a, bool need_b);

Grads multi_lora_linear_grads_in_python(
    const Tensor& grad_y, const OptTensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const OptTensor& lora_hidden, const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts,
    const OptTensor& ranks, bool need_x, bool need_a, bool need_b);

}  // namespace lora_kernels
