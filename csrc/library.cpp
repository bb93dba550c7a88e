// The ops' schemas (TORCH_LIBRARY), their CPU kernels, the hooks into Python and the module
// lora_kernels._C. Python (lora_kernels/ops/) adds to the same ops the fake kernels, the kernels of
// every other device (the Triton launchers on CUDA) and their autograd; autograd.cpp adds CPU's.
//
// A CPU call runs here unless a backend other than torch may be requested for CPU tensors (the Triton
// interpreter, or a forced backend that must raise): then the Python kernel serves it, reading the
// choice as it always has. That is known without Python: a flag Python keeps (use_backend /
// set_backend naming another backend somewhere) and the environment variable LORA_KERNELS_BACKEND.
#include "lora_kernels.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <unordered_map>

namespace py = pybind11;

namespace lora_kernels {
namespace {

std::atomic<bool> python_backend_requested{false};

// LORA_KERNELS_BACKEND names a backend other than torch / auto (read at call time, as Python does;
// a value Python rejects counts too, so that Python raises its error).
bool env_requests_another_backend() {
    const char* raw = std::getenv("LORA_KERNELS_BACKEND");
    if (raw == nullptr) {
        return false;
    }
    std::string value(raw);   // as Python reads it: ends stripped, lower case
    auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
    while (!value.empty() && space(value.back())) {
        value.pop_back();
    }
    value.erase(value.begin(), std::find_if_not(value.begin(), value.end(), space));
    for (char& c : value) {
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    return !(value.empty() || value == "auto" || value == "torch");
}

bool python_may_serve_cpu() {
    return python_backend_requested.load(std::memory_order_relaxed) || env_requests_another_backend();
}

// Python kernels by name, set once by lora_kernels/ops at import (never freed: they outlive the interpreter).
std::unordered_map<std::string, py::object>& python_kernels() {
    static auto* kernels = new std::unordered_map<std::string, py::object>();
    return *kernels;
}

template <typename Result, typename... Args>
Result call_python(const std::string& name, const Args&... args) {
    py::gil_scoped_acquire gil;
    auto found = python_kernels().find(name);
    TORCH_CHECK(found != python_kernels().end(), "lora_kernels._C: no Python kernel registered as '", name,
                "' (lora_kernels.ops registers them at import)");
    return found->second(args...).template cast<Result>();
}

// Only a direct call of a registered op can get here with these wrong (lora_linear checks dropout_p and
// draws the seed): an error naming them, never a wrong answer or a read through a missing tensor.
void check_dropout(double dropout_p, const OptTensor& seed, bool seed_read) {
    TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
    if (dropout_p > 0.0 && seed_read) {
        TORCH_CHECK_VALUE(is_given(seed) && seed->dim() == 0 && seed->scalar_type() == at::kLong, "dropout_p=",
                          dropout_p, " needs seed, a 0-d int64 tensor; got ",
                          is_given(seed) ? c10::str("shape ", seed->sizes(), ", dtype ", seed->scalar_type()) : "None");
    }
}

void check_given(const OptTensor& t, const char* name, const char* needed_for) {
    TORCH_CHECK_VALUE(is_given(t), name, " is None but ", needed_for, " needs it");
}

// The AdapterBatch's by-adapter view against the stacks: L + 1 starts, L scales and ranks, M sorted rows.
void check_batch(const Tensor& lora_a, const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts,
                 const OptTensor& ranks, int64_t m) {
    int64_t num_adapters = lora_a.size(0);
    TORCH_CHECK_VALUE(adapter_starts.dim() == 1 && adapter_starts.numel() == num_adapters + 1, "adapter_starts (shape ",
                      adapter_starts.sizes(), ") must hold L + 1 = ", num_adapters + 1, " entries");
    TORCH_CHECK_VALUE(scales.dim() == 1 && scales.numel() == num_adapters, "scales (shape ", scales.sizes(),
                      ") must hold L = ", num_adapters, " entries");
    TORCH_CHECK_VALUE(!is_given(ranks) || (ranks->dim() == 1 && ranks->numel() == num_adapters), "ranks (shape ",
                      is_given(ranks) ? ranks->sizes() : at::IntArrayRef{}, ") must hold L = ", num_adapters,
                      " entries");
    TORCH_CHECK_VALUE(sorted_rows.dim() == 1 && sorted_rows.numel() == m, "sorted_rows (shape ", sorted_rows.sizes(),
                      ") must hold one entry per row, M = ", m);
}

// A gradient not asked for comes back as an empty (0,) tensor; one asked for but not computed (no rows) as zeros.
Grads fill_grads(const Grads& grads, const Tensor& grad_y, at::IntArrayRef shape_x, at::IntArrayRef shape_a,
                 at::IntArrayRef shape_b, bool need_x, bool need_a, bool need_b) {
    auto fill = [&](const Tensor& g, bool need, at::IntArrayRef shape) {
        if (g.defined()) {
            return g;
        }
        return need ? grad_y.new_zeros(shape) : grad_y.new_zeros({0});
    };
    return {fill(std::get<0>(grads), need_x, shape_x), fill(std::get<1>(grads), need_a, shape_a),
            fill(std::get<2>(grads), need_b, shape_b)};
}

// ---- CPU kernels of the registered ops ---------------------------------------------------------------

std::tuple<Tensor, Tensor> lora_linear_cpu(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    double scale, double dropout_p, const OptTensor& seed) {
    if (python_may_serve_cpu()) {
        return call_python<std::tuple<Tensor, Tensor>>("lora_linear", x, weight, bias, lora_a, lora_b, scale,
                                                       dropout_p, seed);
    }
    check_dropout(dropout_p, seed, true);
    int64_t m = x.size(0), n = weight.size(0);
    if (m == 0 || n == 0) {
        return {x.new_empty({m, n}),
                x.new_zeros({m, lora_a.size(0)}, x.options().dtype(hidden_dtype(x.scalar_type())))};
    }
    return lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
}

Grads lora_linear_backward_cpu(
    const Tensor& grad_y, const OptTensor& x, const OptTensor& weight, const OptTensor& lora_a,
    const OptTensor& lora_b, const OptTensor& lora_hidden, double scale, double dropout_p, const OptTensor& seed,
    bool need_x, bool need_a, bool need_b, c10::string_view backend) {
    if (backend != "torch") {   // the backend that served the forward serves the backward (its mask)
        return call_python<Grads>("lora_linear_backward", grad_y, x, weight, lora_a, lora_b, lora_hidden, scale,
                                  dropout_p, seed, need_x, need_a, need_b, std::string(backend));
    }
    check_dropout(dropout_p, seed, need_x || need_a);
    if (need_x) {
        for (auto [t, name] : {std::pair{&weight, "weight"}, {&lora_a, "lora_a"}, {&lora_b, "lora_b"}}) {
            check_given(*t, name, "dX = dY·W0 + s·(dY·B)·A");
        }
    }
    if (need_a) {
        check_given(x, "x", "dA = s·(dY·B)ᵀ·dropout(x)");
        check_given(lora_b, "lora_b", "dA = s·(dY·B)ᵀ·dropout(x)");
    }
    if (need_b) {
        check_given(lora_hidden, "lora_hidden", "dB = s·dYᵀ·T");
    }
    Grads grads;
    if (grad_y.size(0) > 0) {
        grads = lora_linear_backward(grad_y, x, weight, lora_a, lora_b, lora_hidden, scale, dropout_p, seed, need_x,
                                     need_a, need_b);
    }
    int64_t m = grad_y.size(0), n = grad_y.size(1);
    std::vector<int64_t> shape_x{m, need_x ? weight->size(1) : 0};
    std::vector<int64_t> shape_a{need_a ? lora_b->size(1) : 0, need_a ? x->size(1) : 0};
    std::vector<int64_t> shape_b{n, need_b ? lora_hidden->size(1) : 0};
    return fill_grads(grads, grad_y, shape_x, shape_a, shape_b, need_x, need_a, need_b);
}

std::tuple<Tensor, Tensor> multi_lora_linear_cpu(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts, const Tensor& segment_rows,
    const Tensor& segment_starts, const OptTensor& segment_adapters, const OptTensor& ranks,
    const Tensor& segment_tiles, const Tensor& adapter_tiles, const Tensor& active_adapters, int64_t row_tile,
    bool need_hidden) {
    if (python_may_serve_cpu()) {
        return call_python<std::tuple<Tensor, Tensor>>(
            "multi_lora_linear", x, weight, bias, lora_a, lora_b, scales, sorted_rows, adapter_starts, segment_rows,
            segment_starts, segment_adapters, ranks, segment_tiles, adapter_tiles, active_adapters, row_tile,
            need_hidden);
    }
    int64_t m = x.size(0), n = weight.size(0);
    check_batch(lora_a, scales, sorted_rows, adapter_starts, ranks, m);
    if (m == 0 || n == 0) {
        return {x.new_empty({m, n}), x.new_zeros({m, need_hidden ? lora_a.size(1) : 0},
                                                 x.options().dtype(hidden_dtype(x.scalar_type())))};
    }
    return multi_lora_linear_forward(x, weight, bias, lora_a, lora_b, scales, sorted_rows, adapter_starts, ranks,
                                     need_hidden);
}

Grads multi_lora_linear_backward_cpu(
    const Tensor& grad_y, const OptTensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const OptTensor& lora_hidden, const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts,
    const Tensor& segment_rows, const Tensor& segment_starts, const OptTensor& segment_adapters,
    const OptTensor& ranks, const Tensor& segment_tiles, const Tensor& adapter_tiles, const Tensor& active_adapters,
    int64_t row_tile, bool need_x, bool need_a, bool need_b, c10::string_view backend) {
    if (backend != "torch") {
        return call_python<Grads>("multi_lora_linear_backward", grad_y, x, weight, lora_a, lora_b, lora_hidden,
                                  scales, sorted_rows, adapter_starts, segment_rows, segment_starts, segment_adapters,
                                  ranks, segment_tiles, adapter_tiles, active_adapters, row_tile, need_x, need_a,
                                  need_b, std::string(backend));
    }
    check_batch(lora_a, scales, sorted_rows, adapter_starts, ranks, grad_y.size(0));
    if (need_a) {
        check_given(x, "x", "dA[j] = s_j·(dY_j·B_j)ᵀ·X_j");
    }
    if (need_b) {
        check_given(lora_hidden, "lora_hidden", "dB[j] = s_j·dY_jᵀ·T_j");
    }
    Grads grads;
    if (grad_y.size(0) > 0) {
        grads = multi_lora_linear_backward(grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, sorted_rows,
                                           adapter_starts, ranks, need_x, need_a, need_b);
    }
    return fill_grads(grads, grad_y, {grad_y.size(0), weight.size(1)}, lora_a.sizes(), lora_b.sizes(), need_x,
                      need_a, need_b);
}

void add_multi_lora_cpu(
    const Tensor& out, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, const Tensor& scales,
    const Tensor& sorted_rows, const Tensor& adapter_starts, const Tensor& segment_rows, const Tensor& segment_starts,
    const OptTensor& segment_adapters, const OptTensor& ranks, const Tensor& segment_tiles,
    const Tensor& adapter_tiles, const Tensor& active_adapters, int64_t row_tile) {
    if (python_may_serve_cpu()) {
        call_python<py::object>("add_multi_lora_", out, x, lora_a, lora_b, scales, sorted_rows, adapter_starts,
                                segment_rows, segment_starts, segment_adapters, ranks, segment_tiles, adapter_tiles,
                                active_adapters, row_tile);
        return;
    }
    check_batch(lora_a, scales, sorted_rows, adapter_starts, ranks, x.size(0));
    if (x.size(0) == 0 || out.size(1) == 0) {
        return;
    }
    multi_lora_add_(out, x, lora_a, lora_b, scales, sorted_rows, adapter_starts, ranks);
}

// The compositions return None for a gradient not asked for.
using OptGrads = std::tuple<OptTensor, OptTensor, OptTensor>;

Grads undefined_for_none(const OptGrads& grads) {
    return {or_undefined(std::get<0>(grads)), or_undefined(std::get<1>(grads)), or_undefined(std::get<2>(grads))};
}

}  // namespace

// The typed dispatcher handle of lora_kernels::<name>; each op's function below keeps one.
template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

const c10::TypedOperatorHandle<LoRALinearFn>& lora_linear_op() {
    static const auto handle = find_op<LoRALinearFn>("lora_kernels::lora_linear");
    return handle;
}

const c10::TypedOperatorHandle<LoRALinearBackwardFn>& lora_linear_backward_op() {
    static const auto handle = find_op<LoRALinearBackwardFn>("lora_kernels::lora_linear_backward");
    return handle;
}

const c10::TypedOperatorHandle<MultiLoRALinearFn>& multi_lora_linear_op() {
    static const auto handle = find_op<MultiLoRALinearFn>("lora_kernels::multi_lora_linear");
    return handle;
}

const c10::TypedOperatorHandle<MultiLoRALinearBackwardFn>& multi_lora_linear_backward_op() {
    static const auto handle = find_op<MultiLoRALinearBackwardFn>("lora_kernels::multi_lora_linear_backward");
    return handle;
}

std::string cpu_backend(const Tensor& x) {
    return python_may_serve_cpu() ? call_python<std::string>("resolve_backend", x) : "torch";
}

Grads lora_linear_grads_in_python(
    const Tensor& grad_y, const OptTensor& x, const OptTensor& weight, const OptTensor& lora_a,
    const OptTensor& lora_b, const OptTensor& lora_hidden, const OptTensor& seed, double scale, double dropout_p,
    const std::string& backend, bool need_x, bool need_a, bool need_b) {
    return undefined_for_none(call_python<OptGrads>("lora_linear_grads", grad_y, x, weight, lora_a, lora_b, lora_hidden,
                                                    seed, scale, dropout_p, backend, need_x, need_a, need_b));
}

Grads multi_lora_linear_grads_in_python(
    const Tensor& grad_y, const OptTensor& x, const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
    const OptTensor& lora_hidden, const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts,
    const OptTensor& ranks, bool need_x, bool need_a, bool need_b) {
    return undefined_for_none(call_python<OptGrads>("multi_lora_linear_grads", grad_y, x, weight, lora_a, lora_b,
                                                    lora_hidden, scales, sorted_rows, adapter_starts, ranks, need_x,
                                                    need_a, need_b));
}

}  // namespace lora_kernels

// The schemas the Python-only definitions (torch.library.custom_op) infer: one op, either way.
TORCH_LIBRARY(lora_kernels, m) {
    const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
    m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, "
          "float dropout_p, Tensor? seed) -> (Tensor, Tensor)", tags);
    m.def("lora_linear_backward(Tensor grad_y, Tensor? x, Tensor? weight, Tensor? lora_a, Tensor? lora_b, "
          "Tensor? lora_hidden, float scale, float dropout_p, Tensor? seed, bool need_x, bool need_a, bool need_b, "
          "str backend) -> (Tensor, Tensor, Tensor)", tags);
    m.def("multi_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scales, "
          "Tensor sorted_rows, Tensor adapter_starts, Tensor segment_rows, Tensor segment_starts, "
          "Tensor? segment_adapters, Tensor? ranks, Tensor segment_tiles, Tensor adapter_tiles, "
          "Tensor active_adapters, SymInt row_tile, bool need_hidden) -> (Tensor, Tensor)", tags);
    m.def("multi_lora_linear_backward(Tensor grad_y, Tensor? x, Tensor weight, Tensor lora_a, Tensor lora_b, "
          "Tensor? lora_hidden, Tensor scales, Tensor sorted_rows, Tensor adapter_starts, Tensor segment_rows, "
          "Tensor segment_starts, Tensor? segment_adapters, Tensor? ranks, Tensor segment_tiles, "
          "Tensor adapter_tiles, Tensor active_adapters, SymInt row_tile, bool need_x, bool need_a, bool need_b, "
          "str backend) -> (Tensor, Tensor, Tensor)", tags);
    m.def("add_multi_lora_(Tensor(a0!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor scales, "
          "Tensor sorted_rows, Tensor adapter_starts, Tensor segment_rows, Tensor segment_starts, "
          "Tensor? segment_adapters, Tensor? ranks, Tensor segment_tiles, Tensor adapter_tiles, "
          "Tensor active_adapters, SymInt row_tile) -> ()", tags);
}

TORCH_LIBRARY_IMPL(lora_kernels, CPU, m) {
    m.impl("lora_linear", &lora_kernels::lora_linear_cpu);
    m.impl("lora_linear_backward", &lora_kernels::lora_linear_backward_cpu);
    m.impl("multi_lora_linear", &lora_kernels::multi_lora_linear_cpu);
    m.impl("multi_lora_linear_backward", &lora_kernels::multi_lora_linear_backward_cpu);
    m.impl("add_multi_lora_", &lora_kernels::add_multi_lora_cpu);
}

// ---- the Python module: hooks, and the ops called with one binding hop (no torch.ops overhead) ----------

namespace {

using lora_kernels::OptTensor;
using lora_kernels::Tensor;

Tensor call_lora_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a,
                        const Tensor& lora_b, double scale, double dropout_p, const OptTensor& seed) {
    static const auto& op = lora_kernels::lora_linear_op();
    return std::get<0>(op.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed));
}

Tensor call_multi_lora_linear(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& lora_a, const Tensor& lora_b,
    const Tensor& scales, const Tensor& sorted_rows, const Tensor& adapter_starts, const Tensor& segment_rows,
    const Tensor& segment_starts, const OptTensor& segment_adapters, const OptTensor& ranks,
    const Tensor& segment_tiles, const Tensor& adapter_tiles, const Tensor& active_adapters, int64_t row_tile,
    bool need_hidden) {
    static const auto& op = lora_kernels::multi_lora_linear_op();
    return std::get<0>(op.call(x, weight, bias, lora_a, lora_b, scales, sorted_rows, adapter_starts, segment_rows,
                               segment_starts, segment_adapters, ranks, segment_tiles, adapter_tiles,
                               active_adapters, c10::SymInt(row_tile), need_hidden));
}

// lora_kernels.lora_linear's whole eager call on CPU, for the common case: y (..., N), or None when anything
// is not (another backend may be requested; a shape, dtype, device, scale or dropout_p Python would reject
// or name; a tensor subclass or DTensor): Python then takes the call, with its checks and messages. Same
// steps as Python's: checks, x flattened to rows (copied when its last stride is not 1), the dropout seed
// drawn from torch's CPU generator, the registered op, y back to x's leading dims.
py::object lora_linear_eager(py::handle x_obj, py::handle weight_obj, py::handle bias_obj, py::handle lora_a_obj,
                             py::handle lora_b_obj, double scale, double dropout_p) {
    // anything but tensors: Python names it; __torch_function__ overrides (subclasses, modes), dispatch modes
    // and the JIT tracer: Python's calls show them the ops one by one
    auto plain = [](py::handle t) { return THPVariable_CheckExact(t.ptr()); };   // torch.Tensor or Parameter
    if (!plain(x_obj) || !plain(weight_obj) || !plain(lora_a_obj) || !plain(lora_b_obj) ||
        !(bias_obj.is_none() || plain(bias_obj)) || at::impl::torch_function_mode_enabled() ||
        c10::impl::TorchDispatchModeTLS::stack_len() > 0 || torch::jit::tracer::isTracing()) {
        return py::none();
    }
    const Tensor &x = THPVariable_Unpack(x_obj.ptr()), &weight = THPVariable_Unpack(weight_obj.ptr()),
                 &lora_a = THPVariable_Unpack(lora_a_obj.ptr()), &lora_b = THPVariable_Unpack(lora_b_obj.ptr());
    const OptTensor bias = bias_obj.is_none() ? OptTensor() : OptTensor(THPVariable_Unpack(bias_obj.ptr()));
    constexpr double max_scale = std::numeric_limits<float>::max();   // ops/_checks.py: MAX_SCALE
    constexpr double max_dropout_p = 1.0 - 0x1p-24;                    // MAX_DROPOUT_P
    const bool has_bias = lora_kernels::is_given(bias);
    const at::ScalarType dtype = x.scalar_type();
    auto plain_cpu = [dtype](const Tensor& t, int64_t dim) {
        return t.dim() == dim && t.is_cpu() && t.layout() == at::kStrided && !t.is_nested() &&
               t.scalar_type() == dtype && !t.unsafeGetTensorImpl()->is_python_dispatch();
    };
    if (lora_kernels::python_may_serve_cpu() || x.dim() == 0 || !plain_cpu(x, x.dim()) ||
        !(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16) ||
        !plain_cpu(weight, 2) || !plain_cpu(lora_a, 2) || !plain_cpu(lora_b, 2) ||
        (has_bias && !plain_cpu(*bias, 1)) || !(std::abs(scale) <= max_scale) ||
        !(dropout_p >= 0.0 && dropout_p <= max_dropout_p)) {
        return py::none();
    }
    const int64_t n = weight.size(0), k = weight.size(1), rank = lora_a.size(0);
    if (k == 0 || x.size(-1) != k || lora_a.size(1) != k || rank < 1 || lora_b.size(0) != n || lora_b.size(1) != rank ||
        (has_bias && bias->size(0) != n)) {
        return py::none();
    }
    Tensor y;
    {
        py::gil_scoped_release no_gil;
        Tensor rows = x.dim() == 2 ? x : x.reshape({-1, k});                                       // (M, K)
        if (rows.stride(-1) != 1) {
            rows = rows.contiguous();
        }
        OptTensor seed;
        if (dropout_p > 0.0) {   // ops/lora_linear.py: _dropout_seed
            seed = at::randint(2147483647, {}, at::TensorOptions().dtype(at::kLong));
        }
        y = call_lora_linear(rows, weight, bias, lora_a, lora_b, scale, dropout_p, seed);          // (M, N)
        if (x.dim() != 2) {
            std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
            shape.push_back(n);
            y = y.reshape(shape);
        }
    }
    return py::cast(y);
}

void call_add_multi_lora_(
    const Tensor& out, const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, const Tensor& scales,
    const Tensor& sorted_rows, const Tensor& adapter_starts, const Tensor& segment_rows, const Tensor& segment_starts,
    const OptTensor& segment_adapters, const OptTensor& ranks, const Tensor& segment_tiles,
    const Tensor& adapter_tiles, const Tensor& active_adapters, int64_t row_tile) {
    static const auto op = lora_kernels::find_op<void(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
        c10::SymInt)>("lora_kernels::add_multi_lora_");
    op.call(out, x, lora_a, lora_b, scales, sorted_rows, adapter_starts, segment_rows, segment_starts,
            segment_adapters, ranks, segment_tiles, adapter_tiles, active_adapters, c10::SymInt(row_tile));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.doc() = "lora_kernels' ops in C++: schemas, CPU kernels and CPU autograd (see csrc/)";
    module.attr("torch_version") = TORCH_VERSION;
    module.def("set_python_kernel", [](const std::string& name, py::object fn) {
        lora_kernels::python_kernels()[name] = std::move(fn);
    }, "Register the Python function the C++ ops call as `name` (lora_kernels.ops does, at import)");
    module.def("set_python_backend_requested", [](bool requested) {
        lora_kernels::python_backend_requested.store(requested, std::memory_order_relaxed);
    }, "Whether use_backend / set_backend may request a backend other than torch for CPU tensors");
    module.def("lora_linear", &call_lora_linear, py::call_guard<py::gil_scoped_release>(),
               "y of lora_kernels::lora_linear (its first output), through the dispatcher");
    module.def("lora_linear_eager", &lora_linear_eager,
               "lora_kernels.lora_linear's eager CPU call in the common case, or None: Python takes the call");
    module.def("multi_lora_linear", &call_multi_lora_linear, py::call_guard<py::gil_scoped_release>(),
               "y of lora_kernels::multi_lora_linear (its first output), through the dispatcher");
    module.def("add_multi_lora_", &call_add_multi_lora_, py::call_guard<py::gil_scoped_release>(),
               "lora_kernels::add_multi_lora_, through the dispatcher");
}
