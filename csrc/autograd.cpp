// Autograd of the two differentiable ops for CPU tensors (AutogradCPU), as lora_kernels/ops registers
// it in Python for the other devices: the backend that served the forward serves the backward (its
// dropout mask); only what the requested gradients read is saved; a backward recorded for a second
// derivative (create_graph=True) takes Python's differentiable compositions; the frozen layer's
// gradients, for the rare caller who trains it, are plain GEMMs.
#include "lora_kernels.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace lora_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool requires_grad(const OptTensor& t) {
    return is_given(t) && t->requires_grad();
}

OptTensor optional(const Tensor& t) {
    return t.defined() ? OptTensor(t) : std::nullopt;
}

// grad_y (M, N) with last stride 1, as the kernels read it.
Tensor rows(const Tensor& grad_y) {
    return grad_y.stride(-1) == 1 ? grad_y : grad_y.contiguous();
}

// Whether autograd records a graph through these: grad mode on and one requiring grad. For a forward's
// inputs: else the C++ Function's bookkeeping (its node, saved data) is skipped, ~1-2 µs of a decode-size
// call. For what a backward reads: then it must be differentiable itself (create_graph=True; fallback:
// ops/_autograd.py records_second_derivative).
bool records_a_graph(std::initializer_list<Tensor> inputs) {
    if (!at::GradMode::is_enabled()) {
        return false;
    }
    for (const Tensor& t : inputs) {
        if (t.defined() && t.requires_grad()) {
            return true;
        }
    }
    return false;
}

// (dW0 (N, K), db (N,)) of the frozen layer, undefined where not asked for.
std::pair<Tensor, Tensor> frozen_layer_grads(const Tensor& grad_y, const Tensor& x, bool need_w, bool need_bias) {
    return {need_w ? at::mm(grad_y.t(), x) : Tensor(), need_bias ? grad_y.sum(0) : Tensor()};
}

// What the forward saw asked for: x, weight, bias, lora_a, lora_b.
struct Needs {
    bool x, w, bias, a, b;
};

void save_needs(AutogradContext* ctx, const Needs& need) {
    ctx->saved_data["need"] = std::vector<bool>{need.x, need.w, need.bias, need.a, need.b};
}

Needs load_needs(AutogradContext* ctx) {
    auto list = ctx->saved_data["need"].toBoolList();
    return {list[0], list[1], list[2], list[3], list[4]};
}

struct LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
    static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                 const Tensor& lora_a, const Tensor& lora_b, double scale, double dropout_p,
                                 const OptTensor& seed) {
        static const auto& op = lora_linear_op();
        Needs need{x.requires_grad(), weight.requires_grad(), requires_grad(bias), lora_a.requires_grad(),
                   lora_b.requires_grad()};
        std::string backend = cpu_backend(x);   // read before the forward: the one that serves it
        Tensor y, hidden;
        {
            at::AutoDispatchBelowADInplaceOrView guard;
            std::tie(y, hidden) = op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
        }
        ctx->mark_non_differentiable({hidden});
        ctx->saved_data["scale"] = scale;
        ctx->saved_data["dropout_p"] = dropout_p;
        ctx->saved_data["backend"] = backend;
        save_needs(ctx, need);
        // lora_a (a parameter: no memory) also for dB, whose second derivative differentiates T = dropout(x) Aᵀ in A
        ctx->save_for_backward({need.a || need.w ? x : Tensor(), need.x ? weight : Tensor(),
                                need.x || need.b ? lora_a : Tensor(), need.x || need.a ? lora_b : Tensor(),
                                need.b ? hidden : Tensor(), or_undefined(seed)});
        return {y, hidden};
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        static const auto& op = lora_linear_backward_op();
        variable_list saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3],
                     &hidden = saved[4], &seed = saved[5];
        Needs need = load_needs(ctx);
        double scale = ctx->saved_data["scale"].toDouble(), dropout_p = ctx->saved_data["dropout_p"].toDouble();
        std::string backend = ctx->saved_data["backend"].toStringRef();
        Tensor grad_y = rows(grad_outputs[0]);
        Tensor grad_x, grad_a, grad_b;
        if (records_a_graph({grad_y, x, weight, lora_a, lora_b})) {
            std::tie(grad_x, grad_a, grad_b) = lora_linear_grads_in_python(
                grad_y, optional(x), optional(weight), optional(lora_a), optional(lora_b), optional(hidden),
                optional(seed), scale, dropout_p, backend, need.x, need.a, need.b);
        } else if (need.x || need.a || need.b) {
            std::tie(grad_x, grad_a, grad_b) =
                op.call(grad_y, optional(x), optional(weight), optional(lora_a), optional(lora_b), optional(hidden),
                        scale, dropout_p, optional(seed), need.x, need.a, need.b, backend);
        }
        auto [grad_w, grad_bias] = frozen_layer_grads(grad_y, x, need.w, need.bias);
        return {need.x ? grad_x : Tensor(), grad_w, grad_bias, need.a ? grad_a : Tensor(),
                need.b ? grad_b : Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

std::tuple<Tensor, Tensor> lora_linear_autograd(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    double scale, double dropout_p, const OptTensor& seed) {
    if (!records_a_graph({x, weight, or_undefined(bias), lora_a, lora_b})) {   // inference: the kernel alone
        static const auto& op = lora_linear_op();
        at::AutoDispatchBelowADInplaceOrView guard;
        return op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
    }
    variable_list out = LoRALinearFunction::apply(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
    return {out[0], out[1]};
}

struct MultiLoRALinearFunction : public torch::autograd::Function<MultiLoRALinearFunction> {
    static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                 const Tensor& lora_a, const Tensor& lora_b, const Tensor& scales,
                                 const Tensor& sorted_rows, const Tensor& adapter_starts, const Tensor& segment_rows,
                                 const Tensor& segment_starts, const OptTensor& segment_adapters,
                                 const OptTensor& ranks, const Tensor& segment_tiles, const Tensor& adapter_tiles,
                                 const Tensor& active_adapters, c10::SymInt row_tile, bool need_hidden) {
        static const auto& op = multi_lora_linear_op();
        Needs need{x.requires_grad(), weight.requires_grad(), requires_grad(bias), lora_a.requires_grad(),
                   lora_b.requires_grad()};
        std::string backend = cpu_backend(x);
        Tensor y, hidden;
        {
            at::AutoDispatchBelowADInplaceOrView guard;
            std::tie(y, hidden) = op.call(x, weight, bias, lora_a, lora_b, scales, sorted_rows, adapter_starts,
                                          segment_rows, segment_starts, segment_adapters, ranks, segment_tiles,
                                          adapter_tiles, active_adapters, row_tile, need_hidden);
        }
        ctx->mark_non_differentiable({hidden});
        ctx->saved_data["backend"] = backend;
        ctx->saved_data["row_tile"] = row_tile;
        save_needs(ctx, need);
        // weight and the stacks are parameters (no memory); of the activations only what is read
        ctx->save_for_backward({need.a || need.w ? x : Tensor(), weight, lora_a, lora_b, need.b ? hidden : Tensor(),
                                scales, sorted_rows, adapter_starts, segment_rows, segment_starts,
                                or_undefined(segment_adapters), or_undefined(ranks), segment_tiles, adapter_tiles,
                                active_adapters});
        return {y, hidden};
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        static const auto& op = multi_lora_linear_backward_op();
        variable_list s = ctx->get_saved_variables();
        const Tensor &x = s[0], &weight = s[1], &lora_a = s[2], &lora_b = s[3], &hidden = s[4], &scales = s[5];
        Needs need = load_needs(ctx);
        std::string backend = ctx->saved_data["backend"].toStringRef();
        Tensor grad_y = rows(grad_outputs[0]);
        Tensor grad_x, grad_a, grad_b;
        if (records_a_graph({grad_y, x, weight, lora_a, lora_b})) {
            std::tie(grad_x, grad_a, grad_b) = multi_lora_linear_grads_in_python(
                grad_y, optional(x), weight, lora_a, lora_b, optional(hidden), scales, s[6], s[7], optional(s[11]),
                need.x, need.a, need.b);
        } else if (need.x || need.a || need.b) {
            std::tie(grad_x, grad_a, grad_b) =
                op.call(grad_y, optional(x), weight, lora_a, lora_b, optional(hidden), scales, s[6], s[7], s[8], s[9],
                        optional(s[10]), optional(s[11]), s[12], s[13], s[14], ctx->saved_data["row_tile"].toSymInt(),
                        need.x, need.a, need.b, backend);
        }
        auto [grad_w, grad_bias] = frozen_layer_grads(grad_y, x, need.w, need.bias);
        variable_list grads{need.x ? grad_x : Tensor(), grad_w, grad_bias, need.a ? grad_a : Tensor(),
                            need.b ? grad_b : Tensor()};
        grads.resize(17);   // scales, the batch, row_tile, need_hidden: no gradient
        return grads;
    }
};

std::tuple<Tensor, Tensor> multi_lora_linear_autograd(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts, const Tensor& segment_rows,
    const Tensor& segment_starts, const OptTensor& segment_adapters, const OptTensor& ranks,
    const Tensor& segment_tiles, const Tensor& adapter_tiles, const Tensor& active_adapters, c10::SymInt row_tile,
    bool need_hidden) {
    variable_list out = MultiLoRALinearFunction::apply(
        x, weight, bias, lora_a, lora_b, scales, sorted_rows, adapter_starts, segment_rows, segment_starts,
        segment_adapters, ranks, segment_tiles, adapter_tiles, active_adapters, std::move(row_tile), need_hidden);
    return {out[0], out[1]};
}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_IMPL(lora_kernels, AutogradCPU, m) {
    m.impl("lora_linear", &lora_kernels::lora_linear_autograd);
    m.impl("multi_lora_linear", &lora_kernels::multi_lora_linear_autograd);
}
