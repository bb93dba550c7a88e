"""Single-adapter LoRA linear benchmark: y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ.

    python bench/bench_lora_linear.py                  # default config (CPU: about a minute)
    python bench/bench_lora_linear.py --full           # Llama-3-8B + SmolLM2 sweep (for a GPU)
    python bench/bench_lora_linear.py --overhead       # per-call overhead at 1-64 tokens, fp32 (issue 14)
    python bench/bench_lora_linear.py --device cpu --no-out --tokens 1,64 --ranks 16

Providers, each a function of the same x, W0, b, A, B, s:
    base        F.linear(x, W0, b)                                   the floor: no LoRA at all
    ours        lora_kernels.lora_linear (CPU: the C++ extension's op and autograd, when it is loaded)
    ours_python the same call inside lora_kernels._extension.python_eager_calls(): the Python route
                (autograd.Function, Python torch backend); the same path as ours without the extension
    peft        a real peft.tuners.lora.Linear (get_peft_model), eager forward
    lean_torch  y = F.linear(x, W0, b); y.addmm_(x @ Aᵀ, Bᵀ, alpha=s)  the strongest plain composition

Modes: fwd (torch.no_grad, PEFT in eval mode) and fwd_bwd (x, A, B require grad, W0 and b frozen;
torch.autograd.grad of y against a fixed random dY). Every provider is checked against the float64
reference (lora_kernels.lora_linear_reference) before it is timed; see README.md for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))      # benchmark this checkout's lora_kernels
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
import lora_kernels  # noqa: E402
from lora_kernels import _extension, tuning  # noqa: E402

PROVIDERS = ("base", "ours", "ours_python", "peft", "lean_torch")
MODES = ("fwd", "fwd_bwd")
# LoRA scale s = lora_alpha / r with lora_alpha = 2r, as PEFT computes it.
ALPHA_OVER_R = 2.0
# Loose tolerances on max|out - ref64| / max|ref64| (check; bench_multi_lora_linear.py uses them too):
# real bugs (a missing term, a wrong scale, a transposed operand) are O(1) off, because A and B are
# drawn so the LoRA term is as large as the base.
# fp32 leaves room for TF32 (2^-11 ≈ 4.9e-4 per operand); 16-bit for intermediates rounded to 16 bits.
REL_TOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}

FLOPS_NOTE = ("FLOPs (counted for TFLOP/s): fwd = 2·M·K·N + 2·M·r·(K+N); "
              "fwd_bwd = 4·M·K·N + 6·M·r·(K+N) (W0 frozen: no dW0 GEMM; dX = dY·W0 + (s·dY·B)·A, "
              "dA = (s·dY·B)ᵀ·x, dB = dYᵀ·(s·x·Aᵀ)); dropout's elementwise work is not counted. "
              "Bytes (for GB/s): the least traffic, each tensor once: fwd x, W0, b, A, B, y; fwd_bwd also dY, dX, dA, dB.")
PEAK_NOTE = ("ours % peak = 100 · max(TFLOP/s / peak TFLOP/s, GB/s / peak GB/s): how close ours is to this machine's "
             "roofline, the peaks measured in this run ({how}: {tflops:.3g} TFLOP/s, {gbps:.3g} GB/s).")


# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Shape:
    name: str
    k: int          # in_features
    n: int          # out_features


SMOL_QO = Shape("SmolLM2-135M q/o", 576, 576)
SMOL_UP = Shape("SmolLM2-135M gate/up", 576, 1536)
LLAMA_QO = Shape("Llama-3-8B q/o", 4096, 4096)
LLAMA_KV = Shape("Llama-3-8B k/v", 4096, 1024)
LLAMA_UP = Shape("Llama-3-8B gate/up", 4096, 14336)
LLAMA_DOWN = Shape("Llama-3-8B down", 14336, 4096)


@dataclass(frozen=True)
class Group:
    """Every combination of these ranks, token counts, dropout rates and modes on one shape.
    fwd rows are run with dropout 0 only: nobody runs dropout at inference."""
    shape: Shape
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    dropouts: tuple[float, ...] = (0.0,)
    modes: tuple[str, ...] = MODES


def default_groups(device: torch.device) -> list[Group]:
    """Small enough for a 2-core CPU in fp32 in about a minute; on a GPU the same shapes with more tokens.
    One training row with dropout 0.1 shows what the regenerated mask costs."""
    if device.type == "cuda":
        many = (1, 16, 256, 1024, 4096)
        # k/v at mid-size M too: at 32 and 128 rows the fused GEMM's heuristic tiles (64×64, 64×128) make
        # 16 programs for 132 SMs (H100/H200), the case split-K or the split strategy must fix
        return [Group(SMOL_QO, (16,), many), Group(SMOL_UP, (16, 64), many),
                Group(LLAMA_KV, (16,), (1, 16, 32, 128, 256, 1024, 4096)), Group(LLAMA_QO, (16, 128), many),
                Group(LLAMA_QO, (16,), (1024,), (0.1,), ("fwd_bwd",))]
    return [
        Group(SMOL_QO, (16,), (1, 16, 256, 1024)),
        Group(SMOL_UP, (16,), (1, 16, 256, 1024)),
        Group(SMOL_UP, (64,), (16, 1024)),
        Group(SMOL_UP, (16,), (256,), (0.1,), ("fwd_bwd",)),
        Group(LLAMA_KV, (16,), (1, 16, 32, 128, 256)),
        Group(LLAMA_QO, (16,), (1, 16, 64)),
    ]


def overhead_groups(device: torch.device) -> list[Group]:
    """Issue 14's per-call overhead table: few tokens, where the Python around a call (about 10 µs per
    forward, 50 µs per backward before csrc/) is a visible part of the time; run in fp32 (main())."""
    return [Group(shape, (16,), (1, 4, 16, 64)) for shape in (SMOL_QO, LLAMA_QO)]


def full_groups(device: torch.device) -> list[Group]:
    tokens = (1, 4, 16, 64, 256, 1024, 4096, 8192)
    ranks = (8, 16, 64, 128)
    return [Group(shape, ranks, tokens, (0.0, 0.1))
            for shape in (LLAMA_QO, LLAMA_KV, LLAMA_UP, LLAMA_DOWN, SMOL_QO, SMOL_UP)]


def flops(mode: str, m: int, k: int, n: int, r: int) -> int:
    if mode == "fwd":
        return 2 * m * k * n + 2 * m * r * (k + n)
    return 4 * m * k * n + 6 * m * r * (k + n)


def min_bytes(mode: str, m: int, k: int, n: int, r: int, element_size: int) -> int:
    """The least memory traffic of one call, each tensor read or written once: fwd reads x, W0, b, A, B
    and writes y; fwd_bwd also reads dY and writes dX, dA, dB (y is still written)."""
    weights = n * k + n + r * (k + n)                       # W0, b, A, B
    if mode == "fwd":
        return element_size * (m * k + weights + m * n)
    return element_size * (2 * m * k + weights + r * (k + n) + 2 * m * n)


# ----------------------------------------------------------------------------- inputs and providers


@dataclass
class Weights:
    """W0 and b frozen; A and B leaves that require grad. scale = lora_alpha / r."""
    weight: Tensor          # (N, K)
    bias: Tensor            # (N,)
    lora_a: Tensor          # (r, K)
    lora_b: Tensor          # (N, r)
    scale: float


def make_weights(shape: Shape, r: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Weights:
    """nn.Linear-like magnitudes, and B non-zero (PEFT would start it at zero) and scaled so the
    LoRA term s·(x Aᵀ) Bᵀ is as large as x W0ᵀ: a wrong LoRA branch cannot hide under the base."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, std):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    k, n = shape.k, shape.n
    return Weights(
        weight=randn(n, k, std=k ** -0.5),
        bias=randn(n, std=0.1),
        lora_a=randn(r, k, std=k ** -0.5).requires_grad_(True),
        lora_b=randn(n, r, std=r ** -0.5 / ALPHA_OVER_R).requires_grad_(True),
        scale=ALPHA_OVER_R,
    )


def make_activations(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seed: int = 1):
    """x (M, K) and the fixed upstream gradient dY (M, N)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32).to(dtype)
    grad_y = torch.randn(m, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return x, grad_y


@dataclass
class Provider:
    """One benchmarked implementation of the layer (bench_multi_lora_linear.py's providers too)."""
    forward: Callable[[Tensor], Tensor]     # x (M, K) -> y (M, N)
    params: list[Tensor]                    # what fwd_bwd differentiates besides x: [A, B], or [] for base
    train: Callable[[bool], None] = lambda mode: None   # PEFT: module.train(mode)
    # grads (dX, *d params) -> [dX, dA, dB] in the reference's layout (e.g. from a transposed B)
    to_ref: Callable[[Sequence[Tensor]], list[Tensor]] = lambda grads: list(grads)
    modes: tuple[str, ...] = MODES          # the modes it exists for (bench_multi_lora_linear.py skips others)
    # entered around every step (forward and backward) and check's forward: ours_python's route switch
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def provider_base(w: Weights, dropout_p: float) -> Provider:
    return Provider(lambda x: F.linear(x, w.weight, w.bias), [])


def provider_ours(w: Weights, dropout_p: float) -> Provider:
    return Provider(lambda x: lora_kernels.lora_linear(x, w.weight, w.bias, w.lora_a, w.lora_b, w.scale,
                                                       dropout_p=dropout_p), [w.lora_a, w.lora_b])


def provider_ours_python(w: Weights, dropout_p: float) -> Provider:
    """ours through the Python route even with the C++ extension loaded: what a call cost before csrc/."""
    ours = provider_ours(w, dropout_p)
    ours.context = _extension.python_eager_calls
    return ours


def provider_lean_torch(w: Weights, dropout_p: float) -> Provider:
    def forward(x: Tensor) -> Tensor:
        y = F.linear(x, w.weight, w.bias)                                       # (M, N)
        x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
        return y.addmm_(x_lora @ w.lora_a.T, w.lora_b.T, alpha=w.scale)         # += s·(x Aᵀ) Bᵀ

    return Provider(forward, [w.lora_a, w.lora_b])


class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def peft_base_module(weight: Tensor, bias: Tensor) -> nn.Module:
    """What get_peft_model is given (target_modules=["proj"]): a module holding one nn.Linear whose
    weight and bias are W0 and b themselves, frozen."""
    n, k = weight.shape
    linear = torch.nn.utils.skip_init(nn.Linear, k, n, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = nn.Parameter(bias, requires_grad=False)
    return _OneLinear(linear)


def peft_lora_layer(model) -> nn.Module:
    """The LoRA layer get_peft_model made of peft_base_module's nn.Linear."""
    from peft.tuners.lora import Linear as PeftLoraLinear

    layer = model.base_model.model.proj
    if not isinstance(layer, PeftLoraLinear):
        raise TypeError(f"get_peft_model gave {type(layer).__name__}, not peft.tuners.lora.Linear")
    return layer


def provider_peft(w: Weights, dropout_p: float) -> Provider:
    """get_peft_model on a module holding one nn.Linear(W0, b); its lora_A / lora_B weights replaced
    by copies of A and B (same dtype: autocast_adapter_dtype=False keeps PEFT from upcasting them)."""
    from peft import LoraConfig, get_peft_model

    r = w.lora_a.shape[0]
    config = LoraConfig(r=r, lora_alpha=int(ALPHA_OVER_R * r), target_modules=["proj"], lora_dropout=dropout_p)
    model = get_peft_model(peft_base_module(w.weight, w.bias), config, autocast_adapter_dtype=False)
    layer = peft_lora_layer(model)
    if not math.isclose(layer.scaling["default"], w.scale):
        raise ValueError(f"PEFT scaling {layer.scaling['default']} != {w.scale}")
    lora_a = nn.Parameter(w.lora_a.detach().clone())
    lora_b = nn.Parameter(w.lora_b.detach().clone())
    layer.lora_A["default"].weight = lora_a
    layer.lora_B["default"].weight = lora_b
    return Provider(layer, [lora_a, lora_b], train=layer.train)


MAKERS = {"base": provider_base, "ours": provider_ours, "ours_python": provider_ours_python, "peft": provider_peft,
          "lean_torch": provider_lean_torch}


def step_fn(provider: Provider, mode: str, x: Tensor, grad_y: Tensor) -> Callable[[], object]:
    """What is timed: one forward, or one forward + backward to the requested gradients."""
    provider.train(mode == "fwd_bwd")
    if mode == "fwd":
        x = x.detach()

        def step():
            with torch.no_grad():
                return provider.forward(x)
    else:
        x = x.detach().requires_grad_(True)
        targets = [x, *provider.params]

        def step():
            return torch.autograd.grad(provider.forward(x), targets, grad_y)
    if provider.context is contextlib.nullcontext:  # entering one costs ~0.5 µs: not in the other providers' times
        return step
    inner, context = step, provider.context

    def step_in_context():
        with context():     # around the backward too: ours_python's autograd nodes run inside
            return inner()
    return step_in_context


# ----------------------------------------------------------------------------- what ran


def plan_text(strategy: str, config: dict | None) -> str:
    """One table cell: "torch", "split", or "fused" with its tiles, e.g. "fused 128×128×64 r16 g8 w8 s3"
    (M×N×K block, rank block, group size, warps, stages; "k4": split-K into 4)."""
    if config is None:
        return strategy
    return (f"{strategy} {config['block_m']}×{config['block_n']}×{config['block_k']} r{config['block_r']} "
            f"g{config['group_m']} w{config['num_warps']} s{config['num_stages']}"
            + (f" k{config['split_k']}" if config.get("split_k", 1) > 1 else ""))


def triton_plan(op: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, r: int,
                epilogue_dropout: bool) -> tuple[str, dict | None]:
    """(strategy, MatmulConfig fields or None) the Triton backend runs for one matmul: lora_kernels.tuning's
    plan for this device; a fused plan without a config runs the launcher's heuristic tiles."""
    plan = tuning.plan_for(op, device, dtype, m, n, k, r)
    if plan.strategy != "fused":
        return plan.strategy, None
    from lora_kernels.triton.lora_linear import fused_plan_config

    return plan.strategy, asdict(fused_plan_config(plan.config, m, n, k, r, dtype, epilogue_dropout))


def ours_plan(backend: str, device: torch.device, dtype: torch.dtype, mode: str, m: int, shape: Shape, r: int,
              dropout_p: float) -> dict:
    """What serves ours in one row: strategy and config (MatmulConfig fields, fused only) of the forward,
    in fwd_bwd rows also of dX (dx_strategy, dx_config), and "plan", both in one cell. The torch backend
    is "torch": torch's GEMM, then the LoRA add-on (a split strategy by construction). The Triton backend
    runs tuning.plan_for("forward", M, N = out, K = in) and ("dx", M, N = in, K = out)."""
    if backend != "triton":
        strategy = "torch" if backend == "torch" else None
        row = {"strategy": strategy, "config": None}
        if mode == "fwd_bwd":
            row.update(dx_strategy=strategy, dx_config=None)
        row["plan"] = strategy
        return row
    strategy, config = triton_plan("forward", device, dtype, m, shape.n, shape.k, r, False)
    row = {"strategy": strategy, "config": config, "plan": plan_text(strategy, config)}
    if mode == "fwd_bwd":
        dx_strategy, dx_config = triton_plan("dx", device, dtype, m, shape.k, shape.n, r, dropout_p > 0)
        row.update(dx_strategy=dx_strategy, dx_config=dx_config,
                   plan=f"{row['plan']}; dX {plan_text(dx_strategy, dx_config)}")
    return row


# ----------------------------------------------------------------------------- correctness


class Reference:
    """float64 outputs and gradients of the reference for one (weights, x, dY), computed once.
    w: anything with weight, bias, lora_a and lora_b (bench_multi_lora_linear.py's subclass: a Stack)."""

    def __init__(self, w: Weights, x: Tensor, grad_y: Tensor):
        self.w, self.x, self.grad_y = w, x, grad_y
        self._cache: dict[tuple[bool, str], list[Tensor]] = {}

    def lora_y64(self, x64: Tensor, a64: Tensor, b64: Tensor) -> Tensor:
        """The LoRA layer's reference output, from float64 x, A and B."""
        w = self.w
        return lora_kernels.lora_linear_reference(x64, w.weight.double(), w.bias.double(), a64, b64, w.scale)

    def get(self, lora: bool, mode: str) -> list[Tensor]:
        """lora=False: the base layer only. fwd: [y]; fwd_bwd: [y, dX, dA, dB] (or [y, dX]);
        a gradient y does not depend on is zeros."""
        key = (lora, mode)
        if key not in self._cache:
            w, grad = self.w, mode == "fwd_bwd"
            x64 = self.x.detach().double().requires_grad_(grad)
            a64 = w.lora_a.detach().double().requires_grad_(grad)
            b64 = w.lora_b.detach().double().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                y64 = self.lora_y64(x64, a64, b64) if lora else F.linear(x64, w.weight.double(), w.bias.double())
            out = [y64.detach()]
            if grad:
                targets = [x64, a64, b64] if lora else [x64]
                grads = torch.autograd.grad(y64, targets, self.grad_y.double(), allow_unused=True)
                out += [torch.zeros_like(t) if g is None else g for g, t in zip(grads, targets)]
            self._cache[key] = out
        return self._cache[key]


def check(name: str, provider: Provider, mode: str, ref: Reference) -> str | None:
    """None when every output of one step is within the dtype's loose tolerance of float64, else why not."""
    out = step_fn(provider, mode, ref.x, ref.grad_y)()
    if mode == "fwd":
        outs = [out]
    else:                                   # fwd_bwd returns grads only: y from a separate forward
        with torch.no_grad(), provider.context():
            provider.train(False)
            outs = [provider.forward(ref.x), *provider.to_ref(out)]
            provider.train(True)
    expected = ref.get(name != "base", mode)
    if len(outs) != len(expected):
        return f"{len(outs)} outputs (y and gradients), expected {len(expected)}"
    tol = REL_TOL[ref.x.dtype]
    for label, got, want in zip(["y", "dX", "dA", "dB"], outs, expected):
        if got.shape != want.shape:
            return f"{label}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if not torch.isfinite(got).all():
            return f"{label}: non-finite values"
        err = (got.double() - want).abs().max().item()
        magnitude = max(want.abs().max().item(), 1e-30)
        if err > tol * magnitude:
            return f"{label}: max abs error {err:.3e} = {err / magnitude:.2e} of max|ref| {magnitude:.3e} > {tol:.0e}"
    return None


def check_finite(provider: Provider, mode: str, x: Tensor, grad_y: Tensor) -> str | None:
    """With dropout on, outputs are random: only ask that they exist and are finite."""
    out = step_fn(provider, mode, x, grad_y)()
    for t in ([out] if mode == "fwd" else out):
        if not torch.isfinite(t).all():
            return "non-finite output with dropout on"
    return None


# ----------------------------------------------------------------------------- the run


TABLE_COLUMNS = [
    ("shape", "shape"), ("m", "M"), ("k", "K"), ("n", "N"), ("r", "r"), ("dropout_p", "p"), ("mode", "mode"),
    ("base_ms", "base ms"), ("ours_ms", "ours ms"), ("ours_python_ms", "ours_python ms"), ("peft_ms", "peft ms"),
    ("lean_torch_ms", "lean ms"), ("ours_minus_lean_us", "ours−lean µs"),
    ("ours_python_minus_lean_us", "ours_py−lean µs"),
    ("overhead_pct", "ours/base-1 %"), ("speedup_vs_peft", "× vs peft"), ("speedup_vs_lean_torch", "× vs lean"),
    ("ours_tflops", "ours TFLOP/s"), ("ours_gbps", "ours GB/s"), ("ours_peak_pct", "ours % peak"),
    ("plan", "ours plan"),
]
CUDA_COLUMNS = [("timed", "timed"), ("ours_peak_mib", "ours MiB"), ("peft_peak_mib", "peft MiB")]


def excess_us(ms: float | None, lean_ms: float | None) -> float | None:
    """Per-call time over lean_torch in µs, (ms − lean ms) · 1000, or None when either is missing."""
    return (ms - lean_ms) * 1000 if ms is not None and lean_ms is not None else None


def timed_with(row: dict, providers: Sequence[str]) -> str | None:
    """The row's timing method in one word ("cuda graph", "cuda"), naming the providers that differ."""
    methods = {p: row[f"{p}_method"] for p in providers if row.get(f"{p}_method")}
    if not methods:
        return None
    common = max(set(methods.values()), key=list(methods.values()).count)
    odd = [f"{p}: {m}" for p, m in methods.items() if m != common]
    return common + (f" ({', '.join(odd)})" if odd else "")


def run(groups: list[Group], providers: tuple[str, ...], device: torch.device, dtype: torch.dtype,
        min_run_time: float, peak: harness.Peak | None = None, graph_max_tokens: int = 0) -> list[dict]:
    """graph_max_tokens: on CUDA, rows of at most this many tokens are timed as CUDA-graph replays."""
    backend = lora_kernels_backend(device, dtype)
    rows: list[dict] = []
    cases = [(g, r, m, p, mode) for g in groups for r in g.ranks for m in g.tokens
             for p in g.dropouts for mode in g.modes if not (mode == "fwd" and p > 0)]
    bar = harness.Progress(len(cases))
    for group in groups:
        shape = group.shape
        for r in group.ranks:
            w = make_weights(shape, r, dtype, device)
            built: dict[tuple[str, float], Provider | str] = {}     # (provider, p) -> Provider or the error

            def build(name: str, p: float) -> Provider | str:
                if (name, p) not in built:
                    try:
                        built[(name, p)] = MAKERS[name](w, p)
                    except Exception as e:  # noqa: BLE001 - report and go on with the other providers
                        built[(name, p)] = f"{name} could not be built: {type(e).__name__}: {e}"
                return built[(name, p)]

            for m in group.tokens:
                x, grad_y = make_activations(m, shape.k, shape.n, dtype, device)
                ref = Reference(w, x, grad_y)
                verdicts: dict[tuple[str, str], str | None] = {}     # (provider, mode) -> error at p = 0
                for p in group.dropouts:
                    for mode in group.modes:
                        if mode == "fwd" and p > 0:
                            continue
                        row = {"shape": shape.name, "m": m, "k": shape.k, "n": shape.n, "r": r,
                               "dropout_p": p, "mode": mode}
                        errors, ready = [], {}
                        for name in providers:       # build and check every provider first, then time them
                            provider = build(name, p)
                            error = provider if isinstance(provider, str) else None
                            if error is None and (name, mode) not in verdicts:
                                clean = build(name, 0.0)      # checked without dropout: then it is deterministic
                                verdicts[(name, mode)] = clean if isinstance(clean, str) else harness.safe_check(
                                    lambda: check(name, clean, mode, ref))
                            if error is None:
                                error = verdicts[(name, mode)]
                            if error is None and p > 0:
                                error = harness.safe_check(lambda: check_finite(provider, mode, x, grad_y))
                            if error is None:
                                ready[name] = provider
                            else:
                                harness.progress(f"  !! {name} {shape.name} M={m} r={r} p={p} {mode}: {error}")
                                errors.append(f"{name}: {error}")
                        for name in providers:
                            row[f"{name}_ms"] = None
                            if name not in ready:
                                continue
                            step = step_fn(ready[name], mode, x, grad_y)
                            timing = harness.time_fn(step, device, min_run_time=min_run_time,
                                                     cuda_graph=m <= graph_max_tokens)
                            row[f"{name}_ms"] = timing.median_ms
                            row[f"{name}_p20_ms"] = timing.p20_ms
                            row[f"{name}_p80_ms"] = timing.p80_ms
                            row[f"{name}_method"] = timing.method
                            if timing.graph_error:
                                row[f"{name}_graph_error"] = timing.graph_error
                            if device.type == "cuda":
                                row[f"{name}_peak_mib"] = harness.peak_memory_mib(step, device)
                        if row.get("ours_ms") is None and "ours" in providers:
                            harness.progress(f"  !! row aborted: ours failed ({shape.name} M={m} r={r} p={p} {mode})")
                        ours, base = row.get("ours_ms"), row.get("base_ms")
                        row["overhead_pct"] = (ours / base - 1) * 100 if ours is not None and base else None
                        row["speedup_vs_peft"] = harness.ratio(row.get("peft_ms"), ours)
                        row["speedup_vs_lean_torch"] = row_lean = harness.ratio(row.get("lean_torch_ms"), ours)
                        lean = row.get("lean_torch_ms")
                        row["ours_minus_lean_us"] = excess_us(ours, lean)
                        row["ours_python_minus_lean_us"] = excess_us(row.get("ours_python_ms"), lean)
                        row["flops"] = flops(mode, m, shape.k, shape.n, r)
                        row["bytes"] = min_bytes(mode, m, shape.k, shape.n, r, x.element_size())
                        achieved = harness.roofline(row["flops"], row["bytes"], ours, peak)
                        row["ours_tflops"], row["ours_gbps"] = achieved["tflops"], achieved["gbps"]
                        row["ours_peak_pct"] = achieved["peak_pct"]
                        row["timed"] = timed_with(row, providers)
                        if "ours" in providers:
                            row.update(ours_plan(backend, device, dtype, mode, m, shape, r, p))
                        row["errors"] = "; ".join(errors) or None
                        rows.append(row)
                        bar.step(f"{shape.name} M={m} r={r} p={p} {mode}: "
                                 + " ".join(f"{n}={row.get(f'{n}_ms'):.3g}ms" if row.get(f"{n}_ms") is not None
                                            else f"{n}=-" for n in providers)
                                 + (f" (×{row_lean:.2f} vs lean)" if row_lean else ""))
            del built
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="Llama-3-8B and SmolLM2 shapes, ranks 8/16/64/128, tokens 1..8192, dropout 0 and 0.1")
    harness.add_device_options(parser)
    harness.add_output_options(parser)
    parser.add_argument("--overhead", action="store_true",
                        help="per-call overhead table: SmolLM2-135M and Llama-3-8B q/o, r 16, tokens 1/4/16/64, "
                             "fp32 unless --dtype")
    parser.add_argument("--name", help="result file stem (default: lora_linear, lora_linear_full with --full, "
                                       "lora_linear_overhead with --overhead)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    parser.add_argument("--modes", default=",".join(MODES), help="fwd, fwd_bwd or both")
    parser.add_argument("--tokens", type=harness.int_list, help="override the token counts M, e.g. 1,64,1024")
    parser.add_argument("--ranks", type=harness.int_list, help="override the ranks, e.g. 16,64")
    parser.add_argument("--dropouts", type=harness.float_list, help="override the dropout rates, e.g. 0,0.1")
    harness.add_timing_options(parser, graphs=True)
    args = parser.parse_args(argv)
    if args.full and args.overhead:
        parser.error("--full and --overhead are two configurations: pick one")
    if args.overhead and not args.dtype:
        args.dtype = "fp32"         # the goals are stated in fp32, on a GPU too
    harness.check_options(parser, args, [("--providers", args.providers.split(","), PROVIDERS),
                                         ("--modes", args.modes.split(","), MODES)])
    return args


def lora_kernels_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which lora_kernels backend serves "ours" on this device and dtype (for the stamp)."""
    try:
        from lora_kernels._backend import resolve_backend     # internal
        return resolve_backend(device, dtype)
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = harness.device_and_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = tuple(p for p in PROVIDERS if p in args.providers.split(","))
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    groups = (full_groups(device) if args.full else overhead_groups(device) if args.overhead
              else default_groups(device))
    groups = [Group(g.shape, args.ranks or g.ranks, args.tokens or g.tokens, args.dropouts or g.dropouts,
                    tuple(m for m in g.modes if m in modes)) for g in groups]
    groups = [g for g in groups if g.modes]

    stamp = harness.environment_stamp(device, dtype)
    stamp["lora_kernels_backend"] = lora_kernels_backend(device, dtype)
    # which route ours takes on CPU: without the extension, ours_python is the same path as ours
    stamp["lora_kernels_extension"] = lora_kernels.extension_status()
    harness.progress(f"lora_linear benchmark on {stamp['device_name']} ({dtype}, {stamp['torch_threads']} threads, "
                     f"ours via {stamp['lora_kernels_backend']}; {stamp['lora_kernels_extension']}); "
                     f"providers {', '.join(providers)}")

    t0 = time.perf_counter()
    peak = harness.measure_peak_and_warm_up(device, dtype, stamp, args.min_run_time)
    graph_max_tokens = args.graph_max_tokens if device.type == "cuda" else 0
    rows = run(groups, providers, device, dtype, args.min_run_time, peak, graph_max_tokens)
    wall = time.perf_counter() - t0

    needs = {"base_ms": "base", "ours_ms": "ours", "ours_python_ms": "ours_python", "peft_ms": "peft",
             "lean_torch_ms": "lean_torch", "ours_minus_lean_us": "lean_torch",
             "ours_python_minus_lean_us": "ours_python",
             "overhead_pct": "base", "speedup_vs_peft": "peft", "speedup_vs_lean_torch": "lean_torch"}
    columns = harness.visible_columns(rows, providers, TABLE_COLUMNS, CUDA_COLUMNS, needs, device)
    notes = [
        f"Times are medians in ms ({harness.timer_name(device)}; "
        "p20/p80 in the JSON). ours/base-1 % = LoRA overhead of ours over the base layer alone; "
        "× vs peft / × vs lean = their time / ours (> 1: ours is faster). ours−lean µs, ours_py−lean µs = "
        "(ours or ours_python − lean_torch) · 1000: the per-call overhead over the plain torch composition. "
        "ours_python = ours through the Python route (autograd.Function, Python kernels); "
        f"ours: {stamp['lora_kernels_extension']}.",
        FLOPS_NOTE,
        PEAK_NOTE.format(how=peak.how, tflops=peak.tflops, gbps=peak.gbps),
        "fwd: torch.no_grad, PEFT in eval mode. fwd_bwd: dX, dA, dB (base: dX) against a fixed dY; W0, b frozen. "
        "Rows with dropout are checked at p = 0 (the masks differ between providers) and for finiteness at p.",
    ]
    if graph_max_tokens:
        notes.append(f"Rows of at most {graph_max_tokens} tokens are timed as replays of one call captured in a CUDA "
                     "graph (column timed: cuda graph), as a serving engine runs decode steps; a provider that cannot "
                     "be captured is timed eagerly (timed names it; <provider>_graph_error in the JSON says why).")
    print()
    harness.print_table(rows, columns)
    print()
    for note in notes:
        print(note)
    print(f"\n{len(rows)} rows in {wall:.0f} s")
    if args.out:
        name = args.name or ("lora_linear_full" if args.full else "lora_linear_overhead" if args.overhead
                             else "lora_linear")
        harness.stamp_run_end(stamp, wall)
        plot = harness.PlotSpec(providers, panel=("shape", "r", "dropout_p", "mode"),
                                title=f"lora_linear on {stamp['device_name']}, {stamp['dtype']}")
        paths = harness.write_results(name, rows, stamp, notes=notes, columns=columns, results_dir=args.results_dir,
                                      plot=plot)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(row.get("ours_ms") is None for row in rows if "ours" in providers) else 0


if __name__ == "__main__":
    sys.exit(main())
