"""What the LoRA benchmarks time: layer shapes, inputs, the providers, and their check against float64.

A provider is one implementation of a layer on fixed inputs (Provider), made by SINGLE[name](weights,
dropout_p) or MULTI[name](stack, ids, batch); bench/README.md says what each runs. A row's providers are
built, checked against the float64 reference, then timed together (time_rows). Importing this module puts
this checkout first on sys.path, so the benchmarks time this checkout's lora_kernels.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # benchmark this checkout's lora_kernels

import harness  # noqa: E402
import lora_kernels  # noqa: E402
from lora_kernels import _extension  # noqa: E402

MODES = ("fwd", "fwd_bwd")
# LoRA scale s = lora_alpha / r with lora_alpha = 2r, as PEFT computes it.
ALPHA_OVER_R = 2.0
# Loose tolerances on max|out - ref64| / max|ref64| (check): real bugs (a missing term, a wrong scale or
# adapter, a transposed operand, a padded rank read) are O(1) off, because the inputs are drawn so the
# LoRA term is as large as the base.
# fp32 leaves room for TF32 (2^-11 ≈ 4.9e-4 per operand); 16-bit for intermediates rounded to 16 bits.
REL_TOL = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# Per-adapter LoRA scales s_j = lora_alpha_j / r_j, cycling: a provider that applies one adapter's
# scale to another's rows fails the check.
SCALE_CYCLE = (0.5, 1.0, 1.5, 2.0)
# The mixed-rank stack: padded to 64, adapter j of true rank MIXED_RANK_CYCLE[j % 4].
MIXED_RANK_CYCLE = (8, 16, 32, 64)
# Entries of a padded stack past an adapter's true rank: large, so that reading them fails the check.
PADDING_GARBAGE_STD = 10.0
# The gather variant materialises A[ids] and B[ids] (M·r·(K+N) elements): skipped above this.
GATHER_MAX_BYTES = 2 * 2**30
PEAK_NOTE = ("ours % peak = 100 · max(TFLOP/s / peak TFLOP/s, GB/s / peak GB/s): how close ours is to this machine's "
             "roofline, the peaks measured in this run ({how}: {tflops:.3g} TFLOP/s, {gbps:.3g} GB/s).")


# ----------------------------------------------------------------------------- layers


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


def flops(mode: str, m: int, k: int, n: int, rank_rows: int) -> int:
    """FLOPs of one call. rank_rows: the sum over the rows with an adapter of that adapter's true rank
    (one adapter: M·r). fwd_bwd: W0 is frozen, so no dW0 GEMM."""
    if mode == "fwd":
        return 2 * m * k * n + 2 * rank_rows * (k + n)
    return 4 * m * k * n + 6 * rank_rows * (k + n)


def min_bytes(mode: str, m: int, k: int, n: int, r: int, element_size: int) -> int:
    """The least memory traffic of one call, each tensor read or written once: fwd reads x, W0, b, A, B
    and writes y; fwd_bwd also reads dY and writes dX, dA, dB (y is still written)."""
    weights = n * k + n + r * (k + n)                       # W0, b, A, B
    if mode == "fwd":
        return element_size * (m * k + weights + m * n)
    return element_size * (2 * m * k + weights + r * (k + n) + 2 * m * n)


# ----------------------------------------------------------------------------- inputs


@dataclass
class Weights:
    """W0 and b frozen; A and B leaves that require grad. scale = lora_alpha / r."""
    weight: Tensor          # (N, K)
    bias: Tensor            # (N,)
    lora_a: Tensor          # (r, K)
    lora_b: Tensor          # (N, r)
    scale: float


def _randn(gen: torch.Generator, device: torch.device):
    def randn(*size, std):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * std
    return randn


def make_weights(shape: Shape, r: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Weights:
    """nn.Linear-like magnitudes, and B non-zero (PEFT would start it at zero) and scaled so the
    LoRA term s·(x Aᵀ) Bᵀ is as large as x W0ᵀ: a wrong LoRA branch cannot hide under the base."""
    randn = _randn(torch.Generator(device=device).manual_seed(seed), device)
    k, n = shape.k, shape.n
    return Weights(
        weight=randn(n, k, std=k ** -0.5).to(dtype),
        bias=randn(n, std=0.1).to(dtype),
        lora_a=randn(r, k, std=k ** -0.5).to(dtype).requires_grad_(True),
        lora_b=randn(n, r, std=r ** -0.5 / ALPHA_OVER_R).to(dtype).requires_grad_(True),
        scale=ALPHA_OVER_R,
    )


def make_activations(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seed: int = 1):
    """x (M, K) and the fixed upstream gradient dY (M, N)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=device, dtype=torch.float32).to(dtype)
    grad_y = torch.randn(m, n, generator=gen, device=device, dtype=torch.float32).to(dtype)
    return x, grad_y


@dataclass(frozen=True)
class Ranks:
    """An adapter stack's ranks: the stack is `padded` wide; adapter j has true rank cycle[j % len(cycle)]
    (AdapterBatch ranks=...), or `padded` when the cycle is empty."""
    padded: int
    cycle: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """The r column: "16"; "8 of 64" (every adapter of rank 8 in a stack of 64); "mixed"."""
        if not self.cycle:
            return str(self.padded)
        if len(self.cycle) == 1:
            return f"{self.cycle[0]} of {self.padded}"
        return "mixed" if self.cycle == MIXED_RANK_CYCLE else f"{'/'.join(map(str, self.cycle))} of {self.padded}"

    def true_ranks(self, num_adapters: int) -> list[int] | None:
        return [self.cycle[j % len(self.cycle)] for j in range(num_adapters)] if self.cycle else None


MIXED = Ranks(max(MIXED_RANK_CYCLE), MIXED_RANK_CYCLE)


@dataclass
class Stack:
    """One layer's weights: W0, b frozen; the adapter stacks A (L, R, K) and B (L, N, R) are leaves
    that require grad. ranks: true ranks (L,) or None (all R); past a true rank the stacks hold
    large garbage (only a provider that honours ranks passes the check)."""
    shape: Shape
    weight: Tensor          # (N, K)
    bias: Tensor            # (N,)
    lora_a: Tensor          # (L, R, K)
    lora_b: Tensor          # (L, N, R)
    scales: Tensor          # (L,) fp32
    ranks: list[int] | None
    label: str              # the r column (Ranks.label)
    peft_model: object = None                  # built lazily, once per stack
    lean_weights: tuple | None = None          # (A zero-padded (L, R, K), Bᵀ zero-padded (L, R, N)) leaves
    shared_weights: Weights | None = None      # adapter 0 alone, for the shared provider

    @property
    def num_adapters(self) -> int:
        return self.lora_a.shape[0]

    @property
    def max_rank(self) -> int:
        return self.lora_a.shape[1]

    def rank(self, j: int) -> int:
        return self.max_rank if self.ranks is None else self.ranks[j]

    def ranks_tensor(self) -> Tensor | None:
        return None if self.ranks is None else torch.tensor(self.ranks, dtype=torch.int32, device=self.lora_a.device)


def make_stack(shape: Shape, num_adapters: int, ranks: Ranks, dtype: torch.dtype, device: torch.device,
               seed: int = 0) -> Stack:
    """nn.Linear-like W0 and A; B_j drawn so s_j·(x A_jᵀ) B_jᵀ is as large as x W0ᵀ at adapter j's true
    rank (PEFT would start B at zero): a wrong adapter, scale or rank cannot hide under the base output."""
    randn = _randn(torch.Generator(device=device).manual_seed(seed), device)
    k, n, num, padded = shape.k, shape.n, num_adapters, ranks.padded
    true_ranks = ranks.true_ranks(num)
    rank = torch.tensor(true_ranks or [padded] * num, dtype=torch.float32, device=device)      # (L,)
    weight = randn(n, k, std=k ** -0.5).to(dtype)
    bias = randn(n, std=0.1).to(dtype)
    scales = torch.tensor([SCALE_CYCLE[j % len(SCALE_CYCLE)] for j in range(num)], dtype=torch.float32, device=device)
    lora_a = randn(num, padded, k, std=k ** -0.5)
    lora_b = randn(num, n, padded, std=1.0) * (rank.rsqrt() / scales)[:, None, None]
    if true_ranks is not None:
        past = torch.arange(padded, device=device)[None, :] >= rank[:, None]                   # (L, R)
        lora_a = torch.where(past[:, :, None], randn(num, padded, k, std=PADDING_GARBAGE_STD), lora_a)
        lora_b = torch.where(past[:, None, :], randn(num, n, padded, std=PADDING_GARBAGE_STD), lora_b)
    return Stack(shape, weight, bias, lora_a.to(dtype).requires_grad_(True), lora_b.to(dtype).requires_grad_(True),
                 scales, true_ranks, ranks.label)


# ----------------------------------------------------------------------------- batches of many adapters


WORKLOADS = ("decode", "prefill")
POPULARITIES = ("identical", "distinct", "uniform", "zipf", "skewed", "none25")
ZIPF_EXPONENT = 1.5
SKEWED_HOT_SHARE = 0.9
NO_ADAPTER_SHARE = 0.25
POPULARITY_HELP = {
    "identical": "every request on adapter 0",
    "distinct": "request i on adapter i mod L",
    "uniform": "each request on an adapter drawn uniformly from [0, L)",
    "zipf": f"each request on adapter j with probability ∝ (j+1)^-{ZIPF_EXPONENT}",
    "skewed": (f"round({SKEWED_HOT_SHARE:.0%} of R) requests on adapter 0 (the hot one), the others uniform over "
               "[1, L), in a random order"),
    "none25": f"uniform, then a random {NO_ADAPTER_SHARE:.0%} of the requests on no adapter (-1)",
}
# Seeds of the draws (torch CPU generators): the requests' adapters, the prefill lengths (the stack's and the
# activations': make_stack's and make_activations' defaults). Every run draws the same batches.
ADAPTER_SEED, LENGTH_SEED = 2, 3


@dataclass(frozen=True)
class Workload:
    """A batch of `requests` requests. decode: one row each. prefill: each request's length drawn
    uniformly in [min_length, max_length] (seeded); its rows contiguous, requests in order."""
    kind: str
    requests: int
    min_length: int = 1
    max_length: int = 1

    def __post_init__(self):
        if self.kind not in WORKLOADS or self.requests < 1 or not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"bad workload {self}")

    @property
    def label(self) -> str:
        if self.kind == "decode":
            return f"decode R={self.requests}"
        return f"prefill R={self.requests} ({self.min_length}..{self.max_length} rows each)"


def decode(requests: int) -> Workload:
    return Workload("decode", requests)


def prefill(requests: int, min_length: int, max_length: int) -> Workload:
    return Workload("prefill", requests, min_length, max_length)


def request_lengths(workload: Workload, seed: int = LENGTH_SEED) -> Tensor:
    """(R,) int64 rows of each request: 1 (decode), or uniform in [min_length, max_length] (prefill)."""
    if workload.kind == "decode":
        return torch.ones(workload.requests, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(workload.min_length, workload.max_length + 1, (workload.requests,), generator=gen)


def request_adapters(popularity: str, requests: int, num_adapters: int, seed: int = ADAPTER_SEED) -> Tensor:
    """(R,) int64 adapter of each request (-1: none), by POPULARITY_HELP[popularity]; seeded."""
    gen = torch.Generator().manual_seed(seed)
    if popularity == "identical":
        return torch.zeros(requests, dtype=torch.int64)
    if popularity == "distinct":
        return torch.arange(requests) % num_adapters
    if popularity in ("uniform", "none25"):
        ids = torch.randint(0, num_adapters, (requests,), generator=gen)
        if popularity == "none25":
            ids[torch.randperm(requests, generator=gen)[: round(NO_ADAPTER_SHARE * requests)]] = -1
        return ids
    if popularity == "zipf":
        weights = (torch.arange(num_adapters, dtype=torch.float64) + 1) ** -ZIPF_EXPONENT     # (L,)
        return torch.multinomial(weights, requests, replacement=True, generator=gen)
    if popularity == "skewed":
        if num_adapters == 1:
            return torch.zeros(requests, dtype=torch.int64)
        hot = round(SKEWED_HOT_SHARE * requests)
        cold = torch.randint(1, num_adapters, (requests - hot,), generator=gen)
        ids = torch.cat([torch.zeros(hot, dtype=torch.int64), cold])
        return ids[torch.randperm(requests, generator=gen)]
    raise ValueError(f"unknown popularity {popularity!r}: expected one of {POPULARITIES}")


def make_adapter_ids(workload: Workload, popularity: str, num_adapters: int, device: torch.device) -> Tensor:
    """(M,) int64 adapter id of every row on `device`: each request's adapter over its rows, in request order."""
    adapters = request_adapters(popularity, workload.requests, num_adapters)
    return adapters.repeat_interleave(request_lengths(workload)).to(device)


# ----------------------------------------------------------------------------- providers, the timed step


class Unsupported(Exception):
    """The provider does not exist for this case (not a failure: its cell stays empty)."""


@dataclass
class Provider:
    """One benchmarked implementation of the layer."""
    forward: Callable[[Tensor], Tensor]     # x (M, K) -> y (M, N)
    params: list[Tensor]                    # what fwd_bwd differentiates besides x: [A, B], or [] for base
    train: Callable[[bool], None] = lambda mode: None   # PEFT: module.train(mode)
    # grads (dX, *d params) -> [dX, dA, dB] in the reference's layout (e.g. from a transposed B)
    to_ref: Callable[[Sequence[Tensor]], list[Tensor]] = lambda grads: list(grads)
    modes: tuple[str, ...] = MODES          # the modes it exists for (the others are skipped)
    # entered around every step (forward and backward) and check's forward: ours_python's route switch
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


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


def base(weight: Tensor, bias: Tensor) -> Provider:
    """F.linear(x, W0, b): the floor, no LoRA at all."""
    return Provider(lambda x: F.linear(x, weight, bias), [])


class _OneLinear(nn.Module):
    """What get_peft_model is given (target_modules=["proj"]): one nn.Linear whose weight and bias are W0
    and b themselves, frozen."""

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        n, k = weight.shape
        self.proj = torch.nn.utils.skip_init(nn.Linear, k, n, device=weight.device, dtype=weight.dtype)
        self.proj.weight = nn.Parameter(weight, requires_grad=False)
        self.proj.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return self.proj(x)


def peft_lora(weight: Tensor, bias: Tensor, adapters: Sequence[tuple[str, Tensor, Tensor, float, str]],
              dropout_p: float = 0.0):
    """get_peft_model on _OneLinear(W0, b) with the first of adapters, add_adapter for the others; each
    (name, A (r, K), B (N, r), s, s as an error names it) gets r, lora_alpha = s·r and copies of A and B
    (same dtype: autocast_adapter_dtype=False keeps PEFT from upcasting them), after checking that PEFT's
    scaling is s. Returns (model, its peft.tuners.lora.Linear, the [A, B] parameters of the first adapter)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as PeftLoraLinear

    model = None
    for name, lora_a, _, scale, _ in adapters:
        r = lora_a.shape[0]
        config = LoraConfig(r=r, lora_alpha=scale * r, target_modules=["proj"], lora_dropout=dropout_p)
        if model is None:
            model = get_peft_model(_OneLinear(weight, bias), config, adapter_name=name, autocast_adapter_dtype=False)
        else:
            model.add_adapter(name, config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    if not isinstance(layer, PeftLoraLinear):
        raise TypeError(f"get_peft_model gave {type(layer).__name__}, not peft.tuners.lora.Linear")
    params = []
    for name, lora_a, lora_b, scale, what in adapters:
        if not math.isclose(layer.scaling[name], scale, rel_tol=1e-6):
            raise ValueError(f"PEFT scaling {layer.scaling[name]} != {what}")
        params.append([nn.Parameter(lora_a.detach().clone()), nn.Parameter(lora_b.detach().clone())])
        layer.lora_A[name].weight, layer.lora_B[name].weight = params[-1]
    return model, layer, params[0]


# Single adapter: maker(w, dropout_p) -> Provider.


def ours(w: Weights, dropout_p: float) -> Provider:
    """lora_kernels.lora_linear (CPU: the C++ extension's op and autograd, when it is loaded)."""
    return Provider(lambda x: lora_kernels.lora_linear(x, w.weight, w.bias, w.lora_a, w.lora_b, w.scale,
                                                       dropout_p=dropout_p), [w.lora_a, w.lora_b])


def ours_python(w: Weights, dropout_p: float) -> Provider:
    """ours through the Python route even with the C++ extension loaded: what a call cost before csrc/."""
    provider = ours(w, dropout_p)
    provider.context = _extension.python_eager_calls
    return provider


def lean_torch(w: Weights, dropout_p: float) -> Provider:
    """The strongest plain composition: y = F.linear(x, W0, b); y.addmm_(x @ Aᵀ, Bᵀ, alpha=s)."""
    def forward(x: Tensor) -> Tensor:
        y = F.linear(x, w.weight, w.bias)                                       # (M, N)
        x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
        return y.addmm_(x_lora @ w.lora_a.T, w.lora_b.T, alpha=w.scale)         # += s·(x Aᵀ) Bᵀ

    return Provider(forward, [w.lora_a, w.lora_b])


def peft(w: Weights, dropout_p: float) -> Provider:
    """A real PEFT LoRA layer (peft_lora) on W0, b with adapter "default" = A, B, s."""
    _, layer, params = peft_lora(w.weight, w.bias, [("default", w.lora_a, w.lora_b, w.scale, f"{w.scale}")],
                                 dropout_p)
    return Provider(layer, params, train=layer.train)


SINGLE = {"base": lambda w, dropout_p: base(w.weight, w.bias), "ours": ours, "ours_python": ours_python,
          "peft": peft, "lean_torch": lean_torch}


# Many adapters: maker(stack, ids (M,), batch: AdapterBatch) -> Provider; to_ref maps grads to the
# reference's dA (L, R, K), dB (L, N, R).


def multi_ours(stack: Stack, ids: Tensor, batch) -> Provider:
    """lora_kernels.multi_lora_linear with the AdapterBatch built beforehand, once per batch."""
    s = stack
    return Provider(lambda x: lora_kernels.multi_lora_linear(x, s.weight, s.bias, s.lora_a, s.lora_b, s.scales, batch),
                    [s.lora_a, s.lora_b])


def shared_weights(stack: Stack) -> Weights:
    """Adapter 0 as a single adapter, in leaves of its own: A[0, :r0] (r0, K), B[0, :, :r0] (N, r0), s0."""
    if stack.shared_weights is None:
        r0 = stack.rank(0)
        with torch.no_grad():
            lora_a = stack.lora_a[0, :r0].clone(memory_format=torch.contiguous_format)
            lora_b = stack.lora_b[0, :, :r0].clone(memory_format=torch.contiguous_format)
        stack.shared_weights = Weights(weight=stack.weight, bias=stack.bias, lora_a=lora_a.requires_grad_(True),
                                       lora_b=lora_b.requires_grad_(True), scale=float(stack.scales[0]))
    return stack.shared_weights


def shared(stack: Stack, ids: Tensor, batch) -> Provider:
    """Every row on adapter 0 through lora_kernels.lora_linear: the same rows and layer without mixing
    adapters (the ids are ignored). Checked against shared_reference, not the batch's reference."""
    w = shared_weights(stack)
    return Provider(lambda x: lora_kernels.lora_linear(x, w.weight, w.bias, w.lora_a, w.lora_b, w.scale),
                    [w.lora_a, w.lora_b])


PEFT_TRAIN_MESSAGE: list[str] = []      # what PEFT says when asked for a mixed batch in training mode


def peft_model(stack: Stack):
    """peft_lora with adapters a0..a{L-1}, adapter j at its true rank r_j with A[j, :r_j], B[j, :, :r_j],
    s_j; built once per stack, in eval mode."""
    if stack.peft_model is not None:
        return stack.peft_model
    adapters = []
    for j in range(stack.num_adapters):
        rank, scale = stack.rank(j), float(stack.scales[j])
        adapters.append((f"a{j}", stack.lora_a[j, :rank], stack.lora_b[j, :, :rank], scale, f"s_{j} = {scale}"))
    model, _, _ = peft_lora(stack.weight, stack.bias, adapters)
    if not PEFT_TRAIN_MESSAGE:          # ask PEFT once whether it trains on mixed batches
        model.train()
        try:
            model(stack.weight.new_zeros((1, stack.shape.k)), adapter_names=["a0"])
            PEFT_TRAIN_MESSAGE.append("(accepted: PEFT did not refuse a mixed batch in training mode)")
        except ValueError as e:
            PEFT_TRAIN_MESSAGE.append(f"ValueError: {e}")
    model.eval()
    stack.peft_model = model
    return model


def _adapter_names(ids: Tensor) -> list[str]:
    """One name per row of x: "a{j}", or "__base__" (PEFT's name for the base layer alone)."""
    return ["__base__" if j < 0 else f"a{j}" for j in ids.tolist()]


def multi_peft(stack: Stack, ids: Tensor, batch) -> Provider:
    """PEFT's mixed adapter batch inference: model(x, adapter_names=[...]), one name per row (fwd only)."""
    model, names = peft_model(stack), _adapter_names(ids)
    return Provider(lambda x: model(x, adapter_names=names), [], modes=("fwd",))


def multi_peft_layer(stack: Stack, ids: Tensor, batch) -> Provider:
    """The model's LoRA layer called with adapter_names directly: PEFT's per-layer share of multi_peft."""
    layer, names = peft_model(stack).base_model.model.proj, _adapter_names(ids)
    return Provider(lambda x: layer(x, adapter_names=names), [], modes=("fwd",))


def lean_weights(stack: Stack) -> tuple[Tensor, Tensor]:
    """The plain-torch providers' own copy of the stacks, in the layout they like, prepared once per
    layer (load time, not timed): A (L, R, K) and Bᵀ (L, R, N), zero past each true rank."""
    if stack.lean_weights is None:
        with torch.no_grad():
            a = stack.lora_a.detach().clone()
            bt = stack.lora_b.detach().transpose(1, 2).contiguous()
            if stack.ranks is not None:
                for j, rank in enumerate(stack.ranks):
                    a[j, rank:] = 0
                    bt[j, rank:] = 0
        stack.lean_weights = (a.requires_grad_(True), bt.requires_grad_(True))
    return stack.lean_weights


def _lean_to_ref(grads: Sequence[Tensor]) -> list[Tensor]:
    grad_x, grad_a, grad_bt = grads
    return [grad_x, grad_a, grad_bt.transpose(1, 2)]


def lean_loop(stack: Stack, ids: Tensor, batch) -> Provider:
    """Rows grouped by adapter once per batch (one host read, not timed); per call, for each adapter
    with rows: x rows -> (· A_jᵀ)·s_j -> (· B_jᵀ) -> index_add_ into y. A contiguous run of rows
    (one shared adapter, a prefill request, caller-sorted batches) takes slices instead of
    index_select / index_add_."""
    a, bt = lean_weights(stack)
    order = torch.argsort(torch.where(ids >= 0, ids, stack.num_adapters), stable=True)
    counts = torch.bincount(ids[ids >= 0], minlength=stack.num_adapters).tolist()
    groups, start, host_order = [], 0, order.tolist()
    for j, count in enumerate(counts):
        rows = host_order[start:start + count]
        if count:
            contiguous = rows == list(range(rows[0], rows[0] + count))
            groups.append((j, stack.rank(j), float(stack.scales[j]),
                           slice(rows[0], rows[0] + count) if contiguous else order[start:start + count]))
        start += count

    def forward(x: Tensor) -> Tensor:
        y = torch.addmm(stack.bias, x, stack.weight.T)                        # (M, N)
        for j, rank, scale, rows in groups:
            if isinstance(rows, slice):
                y[rows].addmm_(x[rows] @ a[j, :rank].T, bt[j, :rank], alpha=scale)
            else:
                t = x.index_select(0, rows) @ a[j, :rank].T                   # (m_j, r_j)
                y.index_add_(0, rows, t @ bt[j, :rank], alpha=scale)          # (m_j, N)
        return y

    return Provider(forward, [a, bt], to_ref=_lean_to_ref)


def lean_gather(stack: Stack, ids: Tensor, batch) -> Provider:
    """Per-row weights, no grouping: y += s_i·bmm(bmm(x_i, A[ids_i]ᵀ), B[ids_i]ᵀ); rows of no adapter
    use adapter 0 with scale 0. Per batch (not timed): the clamped ids and per-row scales."""
    a, bt = lean_weights(stack)
    m, (n, k), r = ids.shape[0], stack.weight.shape, stack.max_rank
    if m * r * (k + n) * a.element_size() > GATHER_MAX_BYTES:
        raise Unsupported(f"A[ids], B[ids] would take > {GATHER_MAX_BYTES / 2**30:.0f} GiB")
    safe_ids = ids.clamp(min=0)
    row_scale = torch.where(ids >= 0, stack.scales[safe_ids], 0.0).to(a.dtype)[:, None, None]   # (M, 1, 1)

    def forward(x: Tensor) -> Tensor:
        y = torch.addmm(stack.bias, x, stack.weight.T)                        # (M, N)
        t = torch.bmm(x.unsqueeze(1), a[safe_ids].transpose(1, 2))            # (M, 1, R)
        return y.add_(torch.bmm(t * row_scale, bt[safe_ids]).squeeze(1))       # (M, N)

    return Provider(forward, [a, bt], to_ref=_lean_to_ref)


def lean_dense(stack: Stack, ids: Tensor, batch) -> Provider:
    """Every adapter on every row, then masked: T = x·[A_0; ..; A_L-1]ᵀ (M, L·R), T ⊙ (one-hot(ids)·s),
    y += T·[B_0 .. B_L-1]ᵀ: two plain GEMMs, L times the LoRA FLOPs. Per batch (not timed): the mask."""
    a, bt = lean_weights(stack)
    num_adapters, r = stack.num_adapters, stack.max_rank
    adapters = torch.arange(num_adapters, device=ids.device)
    coef = ((ids[:, None] == adapters[None, :]) * stack.scales[None, :]).to(a.dtype)[:, :, None]   # (M, L, 1)

    def forward(x: Tensor) -> Tensor:
        m, k = x.shape
        y = torch.addmm(stack.bias, x, stack.weight.T)                        # (M, N)
        t = (x @ a.reshape(num_adapters * r, k).T).view(m, num_adapters, r) * coef
        return y.addmm_(t.view(m, num_adapters * r), bt.reshape(num_adapters * r, -1))

    return Provider(forward, [a, bt], to_ref=_lean_to_ref)


MULTI = {"base": lambda stack, ids, batch: base(stack.weight, stack.bias), "ours": multi_ours, "shared": shared,
         "peft": multi_peft, "peft_layer": multi_peft_layer, "lean_loop": lean_loop, "lean_gather": lean_gather,
         "lean_dense": lean_dense}


# ----------------------------------------------------------------------------- correctness


class Reference:
    """float64 outputs and gradients of lora_kernels.reference.lora_linear_reference for one (weights, x, dY),
    computed once. w: anything with weight, bias, lora_a and lora_b (MultiReference's: a Stack)."""

    def __init__(self, w: Weights, x: Tensor, grad_y: Tensor):
        self.w, self.x, self.grad_y = w, x, grad_y
        self._cache: dict[tuple[bool, str], list[Tensor]] = {}

    def lora_y64(self, x64: Tensor, a64: Tensor, b64: Tensor) -> Tensor:
        """The LoRA layer's reference output, from float64 x, A and B."""
        w = self.w
        return lora_kernels.reference.lora_linear_reference(x64, w.weight.double(), w.bias.double(), a64, b64, w.scale)

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


class MultiReference(Reference):
    """float64 outputs and gradients of lora_kernels.reference.multi_lora_linear_reference for one
    (stack, ids, x, dY), computed once per case (check compares with them)."""

    def __init__(self, stack: Stack, ids: Tensor, x: Tensor, grad_y: Tensor):
        super().__init__(stack, x, grad_y)
        self.stack, self.ids = stack, ids

    def lora_y64(self, x64: Tensor, a64: Tensor, b64: Tensor) -> Tensor:
        s = self.stack
        return lora_kernels.reference.multi_lora_linear_reference(x64, s.weight.double(), s.bias.double(), a64, b64,
                                                                  s.scales.double(), self.ids, s.ranks_tensor())


def shared_reference(stack: Stack, x: Tensor, grad_y: Tensor) -> Reference:
    """The shared provider's float64 reference: lora_kernels.reference.lora_linear_reference, every row on adapter 0."""
    return Reference(shared_weights(stack), x, grad_y)


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


def build(name: str, make: Callable[[], Provider]) -> Provider | Unsupported | str:
    """make(): the provider, Unsupported when it does not exist for the case, or why it could not be built."""
    try:
        return make()
    except Unsupported as e:
        return e
    except Exception as e:  # noqa: BLE001 - report and go on with the other providers
        return f"{name} could not be built: {type(e).__name__}: {e}"


def verdict(name: str, built: Provider | str, mode: str, ref: Reference) -> str | None:
    """None when a built provider passes check in this mode, else why not (a build error included)."""
    return built if isinstance(built, str) else harness.safe_check(partial(check, name, built, mode, ref))


def checked(verdicts: dict[str, tuple[Provider, str | None]], label: str) -> tuple[dict[str, Provider], list[str]]:
    """The providers of one row that passed (name -> Provider) and the errors of the others ("name: why",
    each also printed with the row's label): what the row times and what its errors column says."""
    ready, errors = {}, []
    for name, (provider, error) in verdicts.items():
        if error is None:
            ready[name] = provider
        else:
            harness.progress(f"  !! {name} {label}: {error}")
            errors.append(f"{name}: {error}")
    return ready, errors


# ----------------------------------------------------------------------------- rows


def time_rows(rows: dict, steps: dict, names: Sequence[str], device: torch.device, min_run_time: float,
              repeats: int = 1, cuda_graph: bool = False, rounds: bool = False) -> None:
    """Time every step (key: (row key, provider)) with harness.time_interleaved and write each row's
    <provider>_ms (None when not timed), _p20_ms, _p80_ms, (rounds: _rounds_ms,) _method, _graph_error
    when it could not be captured, and on CUDA _peak_mib."""
    timings = harness.time_interleaved(steps, device, min_run_time, repeats, cuda_graph)
    for key, row in rows.items():
        for name in names:
            timing = timings.get((key, name))
            row[f"{name}_ms"] = timing.median_ms if timing else None
            if timing is None:
                continue
            row[f"{name}_p20_ms"], row[f"{name}_p80_ms"] = timing.p20_ms, timing.p80_ms
            if rounds:
                row[f"{name}_rounds_ms"] = list(timing.rounds_ms)
            row[f"{name}_method"] = timing.method
            if timing.graph_error:
                row[f"{name}_graph_error"] = timing.graph_error
            if device.type == "cuda":
                row[f"{name}_peak_mib"] = harness.peak_memory_mib(steps[(key, name)], device)


def add_ours_roofline(row: dict, flops: int, bytes_moved: int, peak: harness.Peak | None) -> None:
    """flops, bytes and what ours achieved with them: ours_tflops, ours_gbps, ours_peak_pct."""
    row["flops"], row["bytes"] = flops, bytes_moved
    achieved = harness.roofline(flops, bytes_moved, row.get("ours_ms"), peak)
    row.update(ours_tflops=achieved["tflops"], ours_gbps=achieved["gbps"], ours_peak_pct=achieved["peak_pct"])


def overhead_pct(row: dict) -> float | None:
    """LoRA overhead of ours over the base layer alone: (ours / base - 1) · 100."""
    ours_ms, base_ms = row.get("ours_ms"), row.get("base_ms")
    return (ours_ms / base_ms - 1) * 100 if ours_ms is not None and base_ms else None


def row_done(row: dict, names: Sequence[str], providers: Sequence[str], label: str, bar: harness.Progress,
             extra: str = "", case: str | None = None) -> None:
    """The row's progress line (label, every provider's time, then extra), after a line naming the case
    (default: label) when ours failed."""
    if row.get("ours_ms") is None and "ours" in providers:
        harness.progress(f"  !! row aborted: ours failed ({case or label})")
    bar.step(f"{label}: " + " ".join(f"{n}={row[f'{n}_ms']:.3g}ms" if row.get(f"{n}_ms") is not None else f"{n}=-"
                                     for n in names) + extra)


def exit_status(rows: Sequence[dict], providers: Sequence[str]) -> int:
    """1 when ours ran and failed in a row (its time is missing), else 0."""
    return 1 if any(row.get("ours_ms") is None for row in rows if "ours" in providers) else 0


def lora_kernels_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which lora_kernels backend serves "ours" on this device and dtype (for the stamp)."""
    try:
        from lora_kernels._backend import resolve_backend     # internal
        return resolve_backend(device, dtype)
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {e})"
