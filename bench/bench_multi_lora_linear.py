"""Multi-adapter LoRA linear benchmark: y[i] = x[i] W0ᵀ + b + s_j · (x[i] A[j]ᵀ) B[j]ᵀ, j = adapter_ids[i].

    python bench/bench_multi_lora_linear.py                 # default config (CPU: about 2 minutes)
    python bench/bench_multi_lora_linear.py --full          # Llama-3-8B / SmolLM2 sweep (for a GPU)
    python bench/bench_multi_lora_linear.py --device cpu --no-out --tokens 64 --adapters 1,64 --modes fwd

Providers, each a function of the same x, W0, b, adapter stacks A (L, r, K), B (L, N, r), scales (L,)
and adapter ids (M,) (-1: no adapter):
    base        F.linear(x, W0, b)                                   the floor: no LoRA at all
    ours        lora_kernels.multi_lora_linear with a prebuilt AdapterBatch (built once per batch,
                reused by every layer: its build time is its own column, "batch ms")
    peft        a real PEFT model (get_peft_model + add_adapter, L adapters on one nn.Linear) called
                as model(x, adapter_names=[...]): PEFT's mixed adapter batch inference (fwd only)
    peft_layer  the same model's LoRA layer called with adapter_names directly: PEFT's per-layer share
                of that path (what its forward hook injects into every LoRA layer)
    lean_torch  the fastest of three plain-torch compositions (the column "lean" says which):
                loop    rows sorted by adapter once per batch; per adapter index_select, two matmuls,
                        index_add_ (a contiguous run of rows: slices, no gather)
                gather  per-row weights: bmm(x, A[ids]ᵀ) and bmm(·, B[ids]ᵀ)
                dense   every adapter on every row: x·[A_0..A_L]ᵀ, masked by a one-hot·scale, ·[B_0..B_L]ᵀ

Modes: fwd (torch.no_grad) and fwd_bwd (x, A, B require grad, W0 and b frozen; torch.autograd.grad of
y against a fixed random dY). PEFT rejects mixed adapter batches in training mode, so its fwd_bwd
cells stay empty. Every provider is checked against lora_kernels.multi_lora_linear_reference in
float64 before it is timed. See README.md for the columns and the derived ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))      # benchmark this checkout's lora_kernels
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
import lora_kernels  # noqa: E402
# From the single-adapter benchmark: the layer shapes and inputs, the providers' interface, the timed
# step and the check against float64 (its tolerances: a wrong adapter, scale or padded rank read is
# O(1) off as well, the LoRA term being drawn as large as the base term), and the PEFT set-up.
from bench_lora_linear import (  # noqa: E402
    LLAMA_QO, MODES, SMOL_QO, Provider, Shape, check, lora_kernels_backend, make_activations, peft_base_module,
    peft_lora_layer, step_fn,
)
from bench_lora_linear import Reference as SingleAdapterReference  # noqa: E402

PROVIDERS = ("base", "ours", "peft", "peft_layer", "lean_torch")
LEAN_VARIANTS = ("loop", "gather", "dense")
ID_PATTERNS = ("rr", "random", "none25")
ID_PATTERN_HELP = ("rr: row i -> adapter i mod L; random: uniform in [0, L); "
                   "none25: random, then a random 25 % of the rows -1 (no adapter)")
# Per-adapter LoRA scales s_j = lora_alpha_j / r_j, cycling: a provider that applies one adapter's
# scale to another's rows fails the check.
SCALE_CYCLE = (0.5, 1.0, 1.5, 2.0)
# Entries of a padded stack past an adapter's true rank: large, so that reading them fails the check.
PADDING_GARBAGE_STD = 10.0
# The gather variant materialises A[ids] and B[ids] (M·r·(K+N) elements): skipped above this.
GATHER_MAX_BYTES = 2 * 2**30
# The goals (stated for CUDA, bf16, K=N=4096, r=16, fwd): decode batch of 64 rows over
# 1, 8, 64 distinct adapters, LoRA overhead over the base GEMM <= 15 % and 64 distinct adapters within
# 1.25x of one shared adapter; prefill 8192 rows: overhead <= 5 %.
GOAL_DECODE_M, GOAL_DECODE_OVERHEAD_PCT, GOAL_DISTINCT_L, GOAL_DISTINCT_RATIO = 64, 15.0, 64, 1.25
GOAL_PREFILL_M, GOAL_PREFILL_OVERHEAD_PCT = 8192, 5.0

FLOPS_NOTE = ("FLOPs (counted for TFLOP/s): fwd = 2·M·K·N + 2·M'·r·(K+N); fwd_bwd = 4·M·K·N + 6·M'·r·(K+N), "
              "M' = rows with an adapter, r = true rank (W0 frozen: no dW0 GEMM).")


# ----------------------------------------------------------------------------- configurations


SQUARE_1024 = Shape("1024→1024", 1024, 1024)
KNOWN_SHAPES = {576: SMOL_QO, 1024: SQUARE_1024, 4096: LLAMA_QO}


def square_shape(size: int) -> Shape:
    return KNOWN_SHAPES.get(size, Shape(f"{size}→{size}", size, size))


@dataclass(frozen=True)
class Group:
    """Every combination of ranks, rows M, adapter counts L, id patterns and modes on one shape.
    All adapters of a stack have the stack's rank r (no ranks= in the AdapterBatch)."""
    shape: Shape
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    adapters: tuple[int, ...]
    ids: tuple[str, ...] = ("rr",)
    modes: tuple[str, ...] = MODES


@dataclass(frozen=True)
class PaddingGroup:
    """The padding case: adapters of true rank `rank` in a stack padded to `padded` (AdapterBatch
    ranks=...), against the same with every adapter at `padded`, and an unpadded stack of `rank`."""
    shape: Shape
    rank: int
    padded: int
    tokens: tuple[int, ...]
    adapters: tuple[int, ...]
    ids: tuple[str, ...] = ("rr",)
    modes: tuple[str, ...] = MODES


def default_groups(device: torch.device, shapes: Sequence[Shape] | None = None) -> list:
    """CPU: SmolLM2 576 and 1024 square layers, small enough for a 2-core CPU in fp32 in about two
    minutes. CUDA: the issue's goal shapes (K=N=4096, r=16, decode 64 rows and prefill 8192 rows over
    1, 8, 64 adapters). The padding case runs on the last shape."""
    if device.type == "cuda":
        tokens, shapes = (16, 64, 256, 1024, 8192), shapes or (LLAMA_QO,)
        pad_tokens = (64, 8192)
    else:
        tokens, shapes = (16, 64, 256), shapes or (SMOL_QO, SQUARE_1024)
        pad_tokens = (64,)
    groups: list = []
    for shape in shapes:
        groups += [Group(shape, (16,), tokens, (1, 8, 64), ("rr",)),
                   Group(shape, (16,), tokens, (8,), ("none25",))]
    groups.append(PaddingGroup(shapes[-1], 8, 64, pad_tokens, (8,)))
    return groups


def full_groups(device: torch.device, shapes: Sequence[Shape] | None = None) -> list:
    tokens = (1, 16, 64, 256, 1024, 4096, 8192)
    groups: list = []
    for shape in shapes or (LLAMA_QO, SMOL_QO):
        groups += [Group(shape, (16, 64), tokens, (1, 8, 64), ("rr",)),
                   Group(shape, (16, 64), tokens, (8, 64), ("random", "none25"))]
    groups.append(PaddingGroup((shapes or (LLAMA_QO,))[0], 8, 64, (64, 1024, 8192), (8, 64)))
    return groups


def flops(mode: str, m: int, m_lora: int, k: int, n: int, r: int) -> int:
    if mode == "fwd":
        return 2 * m * k * n + 2 * m_lora * r * (k + n)
    return 4 * m * k * n + 6 * m_lora * r * (k + n)


# ----------------------------------------------------------------------------- inputs


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
    label: str              # the r column: "16", or "8 of 64" for true rank 8 in a stack of 64
    peft_model: object = None                  # built lazily, once per stack
    lean_weights: tuple | None = None          # (A zero-padded (L, R, K), Bᵀ zero-padded (L, R, N)) leaves

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


def make_stack(shape: Shape, num_adapters: int, max_rank: int, true_rank: int | None, dtype: torch.dtype,
               device: torch.device, seed: int = 0) -> Stack:
    """nn.Linear-like W0 and A; B drawn so s_j·(x A_jᵀ) B_jᵀ is as large as x W0ᵀ (PEFT would start B
    at zero): a wrong adapter, scale or rank cannot hide under the base output."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, std):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * std

    k, n, L = shape.k, shape.n, num_adapters
    weight = randn(n, k, std=k ** -0.5).to(dtype)
    bias = randn(n, std=0.1).to(dtype)
    scales = torch.tensor([SCALE_CYCLE[j % len(SCALE_CYCLE)] for j in range(L)], dtype=torch.float32, device=device)
    rank = true_rank or max_rank
    lora_a = randn(L, max_rank, k, std=k ** -0.5)
    lora_b = randn(L, n, max_rank, std=rank ** -0.5) / scales[:, None, None]
    if true_rank is not None and true_rank < max_rank:
        lora_a[:, true_rank:] = randn(L, max_rank - true_rank, k, std=PADDING_GARBAGE_STD)
        lora_b[:, :, true_rank:] = randn(L, n, max_rank - true_rank, std=PADDING_GARBAGE_STD)
    ranks = [true_rank] * L if true_rank is not None else None
    label = f"{true_rank} of {max_rank}" if true_rank is not None else str(max_rank)
    return Stack(shape, weight, bias, lora_a.to(dtype).requires_grad_(True), lora_b.to(dtype).requires_grad_(True),
                 scales, ranks, label)


def make_adapter_ids(pattern: str, m: int, num_adapters: int, device: torch.device, seed: int = 2) -> Tensor:
    """(M,) int64 adapter ids on `device`; see ID_PATTERN_HELP."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "rr":
        ids = torch.arange(m) % num_adapters
    elif pattern in ("random", "none25"):
        ids = torch.randint(0, num_adapters, (m,), generator=gen)
        if pattern == "none25":
            ids[torch.randperm(m, generator=gen)[: m // 4]] = -1
    else:
        raise ValueError(f"unknown id pattern {pattern!r}: expected one of {ID_PATTERNS}")
    return ids.to(device)


# ----------------------------------------------------------------------------- providers
# Provider (bench_lora_linear.py): to_ref maps grads to the reference's dA (L, R, K), dB (L, N, R).


class Unsupported(Exception):
    """The provider does not exist for this case (not a failure: its cell stays empty)."""


def provider_base(stack: Stack, ids: Tensor, batch) -> Provider:
    return Provider(lambda x: F.linear(x, stack.weight, stack.bias), [])


def provider_ours(stack: Stack, ids: Tensor, batch) -> Provider:
    s = stack
    return Provider(lambda x: lora_kernels.multi_lora_linear(x, s.weight, s.bias, s.lora_a, s.lora_b, s.scales, batch),
                    [s.lora_a, s.lora_b])


PEFT_TRAIN_MESSAGE: list[str] = []      # what PEFT says when asked for a mixed batch in training mode


def peft_model(stack: Stack):
    """get_peft_model on a module holding one nn.Linear(W0, b) with adapter "a0", add_adapter for
    a1..a{L-1}; adapter j gets r_j = its true rank, lora_alpha = s_j·r_j, and copies of A[j, :r_j] and
    B[j, :, :r_j] (same dtype: autocast_adapter_dtype=False keeps PEFT from upcasting them). Eval mode."""
    if stack.peft_model is not None:
        return stack.peft_model
    from peft import LoraConfig, get_peft_model

    model = None
    for j in range(stack.num_adapters):
        rank, scale = stack.rank(j), float(stack.scales[j])
        config = LoraConfig(r=rank, lora_alpha=scale * rank, target_modules=["proj"], lora_dropout=0.0)
        if model is None:
            model = get_peft_model(peft_base_module(stack.weight, stack.bias), config, adapter_name="a0",
                                   autocast_adapter_dtype=False)
        else:
            model.add_adapter(f"a{j}", config, autocast_adapter_dtype=False)
    layer = peft_lora_layer(model)
    with torch.no_grad():
        for j in range(stack.num_adapters):
            rank, name = stack.rank(j), f"a{j}"
            if not math.isclose(layer.scaling[name], float(stack.scales[j]), rel_tol=1e-6):
                raise ValueError(f"PEFT scaling {layer.scaling[name]} != s_{j} = {float(stack.scales[j])}")
            layer.lora_A[name].weight = nn.Parameter(stack.lora_a[j, :rank].detach().clone())
            layer.lora_B[name].weight = nn.Parameter(stack.lora_b[j, :, :rank].detach().clone())
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


def provider_peft(stack: Stack, ids: Tensor, batch) -> Provider:
    model, names = peft_model(stack), _adapter_names(ids)
    return Provider(lambda x: model(x, adapter_names=names), [], modes=("fwd",))


def provider_peft_layer(stack: Stack, ids: Tensor, batch) -> Provider:
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


def provider_lean_loop(stack: Stack, ids: Tensor, batch) -> Provider:
    """Rows grouped by adapter once per batch (one host read, not timed); per call, for each adapter
    with rows: x rows -> (· A_jᵀ)·s_j -> (· B_jᵀ) -> index_add_ into y. A contiguous run of rows
    (one shared adapter, caller-sorted batches) takes slices instead of index_select / index_add_."""
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


def provider_lean_gather(stack: Stack, ids: Tensor, batch) -> Provider:
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


def provider_lean_dense(stack: Stack, ids: Tensor, batch) -> Provider:
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


MAKERS = {"base": provider_base, "ours": provider_ours, "peft": provider_peft, "peft_layer": provider_peft_layer,
          "lean_loop": provider_lean_loop, "lean_gather": provider_lean_gather, "lean_dense": provider_lean_dense}


# ----------------------------------------------------------------------------- correctness


class Reference(SingleAdapterReference):
    """float64 outputs and gradients of lora_kernels.multi_lora_linear_reference for one
    (stack, ids, x, dY), computed once per case (check compares with them)."""

    def __init__(self, stack: Stack, ids: Tensor, x: Tensor, grad_y: Tensor):
        super().__init__(stack, x, grad_y)
        self.stack, self.ids = stack, ids

    def lora_y64(self, x64: Tensor, a64: Tensor, b64: Tensor) -> Tensor:
        s = self.stack
        return lora_kernels.multi_lora_linear_reference(x64, s.weight.double(), s.bias.double(), a64, b64,
                                                        s.scales.double(), self.ids, s.ranks_tensor())


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Case:
    shape: Shape
    max_rank: int
    true_rank: int | None       # None: every adapter at max_rank
    num_adapters: int
    m: int
    ids: str
    padding: bool = False       # part of a PaddingGroup


def expand(groups: list) -> list[tuple[list[Case], tuple[str, ...]]]:
    """Units of work: the cases of one unit are timed together, their providers interleaved (one case,
    or the three stacks of a padding comparison), in each of the unit's modes."""
    units = []
    for g in groups:
        if isinstance(g, PaddingGroup):
            for num_adapters in g.adapters:
                for m in g.tokens:
                    for pattern in g.ids:
                        units.append(([Case(g.shape, max_rank, true_rank, num_adapters, m, pattern, True)
                                       for max_rank, true_rank in ((g.rank, None), (g.padded, g.rank), (g.padded, None))],
                                      g.modes))
        else:
            for r in g.ranks:
                for num_adapters in g.adapters:
                    for m in g.tokens:
                        for pattern in g.ids:
                            units.append(([Case(g.shape, r, None, num_adapters, m, pattern)], g.modes))
    unique = []
    for unit in units:          # overrides (e.g. --ids rr) can make two groups ask for the same case
        if unit not in unique:
            unique.append(unit)
    return unique


TABLE_COLUMNS = [
    ("shape", "shape"), ("m", "M"), ("k", "K"), ("n", "N"), ("r", "r"), ("num_adapters", "L"), ("ids", "ids"),
    ("used", "used"), ("mode", "mode"),
    ("base_ms", "base ms"), ("ours_ms", "ours ms"), ("batch_ms", "batch ms"), ("peft_ms", "peft ms"),
    ("peft_layer_ms", "peft layer ms"), ("lean_torch_ms", "lean ms"), ("lean_variant", "lean"),
    ("overhead_pct", "ours/base-1 %"), ("speedup_vs_peft_layer", "× vs peft layer"),
    ("speedup_vs_lean_torch", "× vs lean"), ("ours_tflops", "ours TFLOP/s"), ("others_cpu", "other CPUs"),
]
CUDA_COLUMNS = [("ours_peak_mib", "ours MiB"), ("peft_layer_peak_mib", "peft layer MiB"),
                ("lean_torch_peak_mib", "lean MiB")]


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process has used, CPU seconds this process has used) so far; None off Linux.
    Their difference over a row is what other processes took while it was timed: on a CPU run,
    anything well above 0 means the row's times are suspect."""
    try:
        hz = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)     # minus idle and iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy / hz, (int(own[11]) + int(own[12])) / hz                           # utime + stime
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass(frozen=True)
class Timing:
    median_ms: float        # median of the rounds' medians
    p20_ms: float           # lowest p20 of any round
    p80_ms: float           # highest p80 of any round
    rounds_ms: list[float]  # each round's median, in round order


def time_interleaved(steps: dict, device: torch.device, min_run_time: float, repeats: int) -> dict:
    """harness.time_fn on every step, `repeats` rounds interleaved (provider order reversed every other
    round) with min_run_time / repeats each: slow drift of a shared machine (clock, neighbours) then
    hits every provider of a row alike instead of whichever was timed during it, at the same total time."""
    per_round = min_run_time / max(repeats, 1)
    rounds: dict = {name: [] for name in steps}
    order = list(steps)
    for i in range(max(repeats, 1)):
        for name in (order if i % 2 == 0 else order[::-1]):
            rounds[name].append(harness.time_fn(steps[name], device, min_run_time=per_round))
    out = {}
    for name, timings in rounds.items():
        medians = [t.median_ms for t in timings]
        out[name] = Timing(statistics.median(medians), min(t.p20_ms for t in timings),
                           max(t.p80_ms for t in timings), medians)
    return out


@dataclass
class Prepared:
    """One case's inputs, reference, AdapterBatch and providers (built on first use)."""
    case: Case
    stack: Stack
    ids: Tensor
    x: Tensor
    grad_y: Tensor
    ref: Reference
    used: int                       # adapters with at least one row
    m_lora: int                     # rows with an adapter
    batch: object = None            # AdapterBatch, or the exception building it raised
    batch_timing: object = None
    built: dict = field(default_factory=dict)


def prepare(case: Case, stacks: dict, providers: tuple[str, ...], device: torch.device, dtype: torch.dtype,
            min_run_time: float) -> Prepared:
    key = (case.shape, case.num_adapters, case.max_rank, case.true_rank)
    if key not in stacks:
        stacks[key] = make_stack(case.shape, case.num_adapters, case.max_rank, case.true_rank, dtype, device)
    stack = stacks[key]
    ids = make_adapter_ids(case.ids, case.m, case.num_adapters, device)
    x, grad_y = make_activations(case.m, case.shape.k, case.shape.n, dtype, device)
    prep = Prepared(case, stack, ids, x, grad_y, Reference(stack, ids, x, grad_y),
                    int(torch.unique(ids[ids >= 0]).numel()), int((ids >= 0).sum()))
    if "ours" in providers:
        try:
            def build():
                return lora_kernels.AdapterBatch(ids, case.num_adapters, ranks=stack.ranks_tensor())
            prep.batch = build()
            prep.batch_timing = harness.time_fn(build, device, min_run_time=min_run_time)
        except Exception as e:  # noqa: BLE001 - ours then fails with this message
            prep.batch = e
    return prep


def ready_providers(prep: Prepared, names: list[str], mode: str) -> tuple[dict[str, Provider], list[str]]:
    """Build (once per case) and check (per mode) every provider; returns the ones that passed and the
    errors of the others. A provider without this case or mode (Unsupported, PEFT's fwd_bwd) is neither."""
    ready, errors = {}, []
    case = prep.case
    for name in names:
        if name not in prep.built:
            try:
                if name == "ours" and isinstance(prep.batch, Exception):
                    raise prep.batch
                prep.built[name] = MAKERS[name](prep.stack, prep.ids, prep.batch)
            except Unsupported as e:
                prep.built[name] = e
            except Exception as e:  # noqa: BLE001 - report and go on with the other providers
                prep.built[name] = f"{name} could not be built: {type(e).__name__}: {e}"
        provider = prep.built[name]
        if isinstance(provider, Unsupported) or (isinstance(provider, Provider) and mode not in provider.modes):
            continue
        error = (provider if isinstance(provider, str)
                 else harness.safe_check(lambda: check(name, provider, mode, prep.ref)))
        if error is None:
            ready[name] = provider
        else:
            harness.progress(f"  !! {name} {case.shape.name} M={case.m} L={case.num_adapters} "
                             f"r={prep.stack.label} {case.ids} {mode}: {error}")
            errors.append(f"{name}: {error}")
    return ready, errors


def make_row(prep: Prepared, mode: str, names: list[str], lean_variants: tuple[str, ...], timings: dict,
             peaks: dict, errors: list[str], device: torch.device) -> dict:
    case, stack = prep.case, prep.stack
    row = {"shape": case.shape.name, "m": case.m, "k": case.shape.k, "n": case.shape.n, "r": stack.label,
           "num_adapters": case.num_adapters, "ids": case.ids, "used": prep.used, "mode": mode}
    for name in names:
        timing = timings.get(name)
        row[f"{name}_ms"] = timing.median_ms if timing else None
        if timing:
            row[f"{name}_p20_ms"], row[f"{name}_p80_ms"] = timing.p20_ms, timing.p80_ms
            row[f"{name}_rounds_ms"] = timing.rounds_ms
        if name in peaks:
            row[f"{name}_peak_mib"] = peaks[name]
    if prep.batch_timing is not None:
        row["batch_ms"] = prep.batch_timing.median_ms
        row["batch_p20_ms"], row["batch_p80_ms"] = prep.batch_timing.p20_ms, prep.batch_timing.p80_ms
    lean = {v: row.get(f"lean_{v}_ms") for v in lean_variants if row.get(f"lean_{v}_ms") is not None}
    best = min(lean, key=lean.get) if lean else None
    row["lean_torch_ms"] = lean[best] if best else None
    row["lean_variant"] = best
    if device.type == "cuda" and best:
        row["lean_torch_peak_mib"] = row.get(f"lean_{best}_peak_mib")
    ours, base = row.get("ours_ms"), row.get("base_ms")
    row["overhead_pct"] = (ours / base - 1) * 100 if ours is not None and base else None
    row["speedup_vs_peft"] = harness.ratio(row.get("peft_ms"), ours)
    row["speedup_vs_peft_layer"] = harness.ratio(row.get("peft_layer_ms"), ours)
    row["speedup_vs_lean_torch"] = harness.ratio(row.get("lean_torch_ms"), ours)
    row["flops"] = flops(mode, case.m, prep.m_lora, case.shape.k, case.shape.n, case.true_rank or case.max_rank)
    row["ours_tflops"] = row["flops"] / (ours * 1e-3) / 1e12 if ours else None
    row["padding_case"] = case.padding
    row["errors"] = "; ".join(errors) or None
    return row


def run(units: list[tuple[list[Case], tuple[str, ...]]], providers: tuple[str, ...], lean_variants: tuple[str, ...],
        modes: tuple[str, ...], device: torch.device, dtype: torch.dtype, min_run_time: float,
        repeats: int = 1) -> list[dict]:
    names = [p for p in providers if p != "lean_torch"] + [f"lean_{v}" for v in lean_variants
                                                           if "lean_torch" in providers]
    rows: list[dict] = []
    total = sum(len(cases) * len([m for m in ms if m in modes]) for cases, ms in units)
    done, t_start = 0, time.perf_counter()
    stacks: dict[tuple, Stack] = {}
    for cases, unit_modes in units:
        unit_modes = tuple(m for m in unit_modes if m in modes)
        if not unit_modes:
            continue
        keys = {(c.shape, c.num_adapters, c.max_rank, c.true_rank) for c in cases}
        if not keys & stacks.keys():
            stacks.clear()      # units come grouped by stack: keep only the current ones (and their PEFT models)
        preps = [prepare(c, stacks, providers, device, dtype, min_run_time) for c in cases]
        for mode in unit_modes:
            t_unit, cpu_start = time.perf_counter(), _cpu_seconds()
            steps, errors, peaks = {}, [], []
            for i, prep in enumerate(preps):             # build and check everything first, then time it
                ready, errs = ready_providers(prep, names, mode)
                errors.append(errs)
                steps.update({(i, name): step_fn(p, mode, prep.x, prep.grad_y) for name, p in ready.items()})
            timings = time_interleaved(steps, device, min_run_time, repeats)
            cpu_end = _cpu_seconds()
            others = (None if cpu_start is None or cpu_end is None else round(max(
                0.0, (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1])) / (time.perf_counter() - t_unit), 2))
            for i, prep in enumerate(preps):
                done += 1
                case = prep.case
                mine = {name: t for (j, name), t in timings.items() if j == i}
                peaks = ({name: harness.peak_memory_mib(steps[(i, name)], device) for name in mine}
                         if device.type == "cuda" else {})
                row = make_row(prep, mode, names, lean_variants, mine, peaks, errors[i], device)
                row["others_cpu"] = others
                if row.get("ours_ms") is None and "ours" in providers:
                    harness.progress(f"  !! row aborted: ours failed ({case.shape.name} M={case.m} "
                                     f"L={case.num_adapters} r={prep.stack.label} {case.ids} {mode})")
                rows.append(row)
                harness.progress(
                    f"[{done}/{total}] {case.shape.name} M={case.m} L={case.num_adapters} r={prep.stack.label} "
                    f"{case.ids} {mode}: "
                    + " ".join(f"{n}={row[f'{n}_ms']:.3g}ms" if row.get(f"{n}_ms") is not None else f"{n}=-"
                               for n in names)
                    + (f" batch={row['batch_ms']:.3g}ms" if row.get("batch_ms") is not None else "")
                    + (f" (other processes used {others:.2f} CPUs meanwhile)" if (others or 0) > 0.2 else "")
                    + f" [total {time.perf_counter() - t_start:.0f}s]")
    return rows


# ----------------------------------------------------------------------------- derived ratios


def _fmt(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def goals_table(rows: list[dict]) -> list[dict]:
    """Per (shape, r, mode, M), from the rr rows of plain (unpadded) stacks: ours' overhead over the
    base GEMM at each L, and 64 (or the largest L) distinct adapters over one shared adapter (L=1)."""
    plain = [r for r in rows if r["ids"] == "rr" and not r["padding_case"]]
    keys = []
    for r in plain:
        key = (r["shape"], r["r"], r["mode"], r["m"])
        if key not in keys:
            keys.append(key)
    out = []
    for shape, rank, mode, m in keys:
        by_l = {r["num_adapters"]: r for r in plain if (r["shape"], r["r"], r["mode"], r["m"]) == (shape, rank, mode, m)}
        most = max(by_l)
        entry = {"shape": shape, "r": rank, "mode": mode, "m": m, "base_ms": by_l[most].get("base_ms")}
        for L in sorted(by_l):
            entry[f"ours_L{L}_overhead_pct"] = by_l[L].get("overhead_pct")
        distinct = {}
        for p in ("ours", "peft_layer", "lean_torch"):
            shared = by_l.get(1, {}).get(f"{p}_ms")
            distinct[p] = harness.ratio(by_l[most].get(f"{p}_ms"), shared) if most > 1 else None
            entry[f"{p}_distinct_vs_shared"] = distinct[p]
        entry["distinct_L"] = most
        overheads = [by_l[L].get("overhead_pct") for L in sorted(by_l)]
        goal, met = None, None
        if mode == "fwd" and m == GOAL_DECODE_M:
            goal = f"+% ≤ {GOAL_DECODE_OVERHEAD_PCT:.0f}"
            if all(o is not None for o in overheads):
                met = all(o <= GOAL_DECODE_OVERHEAD_PCT for o in overheads)
            if most == GOAL_DISTINCT_L and 1 in by_l:        # the distinct-vs-shared goal is 64 vs 1
                goal += f", {most} vs 1 ≤ {GOAL_DISTINCT_RATIO}×"
                met = None if met is None or distinct["ours"] is None else met and distinct["ours"] <= GOAL_DISTINCT_RATIO
        elif mode == "fwd" and m == GOAL_PREFILL_M:
            goal = f"+% ≤ {GOAL_PREFILL_OVERHEAD_PCT:.0f}"
            if all(o is not None for o in overheads):
                met = all(o <= GOAL_PREFILL_OVERHEAD_PCT for o in overheads)
        entry["goal"], entry["goal_met"] = goal, (None if met is None else ("yes" if met else "no"))
        out.append(entry)
    return out


def goals_markdown(entries: list[dict]) -> str:
    if not entries:
        return ""
    ls = sorted({int(k[len("ours_L"):-len("_overhead_pct")]) for e in entries for k in e if k.startswith("ours_L")})
    header = (["shape", "r", "mode", "M", "base ms"] + [f"ours +% L={L}" for L in ls]
              + ["ours L/1 ×", "peft layer L/1 ×", "lean L/1 ×", "goal (CUDA bf16, fwd)", "met"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for e in entries:
        cells = [e["shape"], str(e["r"]), e["mode"], str(e["m"]), _fmt(e["base_ms"], "{:.3g}")]
        cells += [_fmt(e.get(f"ours_L{L}_overhead_pct")) for L in ls]
        cells += [_fmt(e[f"{p}_distinct_vs_shared"], "{:.2f}") for p in ("ours", "peft_layer", "lean_torch")]
        cells += [e["goal"] or "", e["goal_met"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def padding_table(rows: list[dict]) -> list[dict]:
    """Per padding case: ours with true rank r in a stack padded to R (ranks=) against an unpadded
    stack of r (the ideal: ratio 1) and against every adapter at R."""
    pad = [r for r in rows if r["padding_case"]]
    out = []
    for r in pad:
        if " of " not in str(r["r"]):
            continue
        rank, padded = (int(v) for v in str(r["r"]).split(" of "))
        key = (r["shape"], r["m"], r["num_adapters"], r["ids"], r["mode"])

        def find(label):
            for o in pad:
                if (o["shape"], o["m"], o["num_adapters"], o["ids"], o["mode"]) == key and str(o["r"]) == label:
                    return o
            return {}

        unpadded, full = find(str(rank)), find(str(padded))
        out.append({"shape": r["shape"], "m": r["m"], "num_adapters": r["num_adapters"], "ids": r["ids"],
                    "mode": r["mode"], "rank": rank, "padded": padded,
                    "ours_padded_ms": r.get("ours_ms"), "ours_unpadded_ms": unpadded.get("ours_ms"),
                    "ours_full_rank_ms": full.get("ours_ms"),
                    "padded_vs_unpadded": harness.ratio(r.get("ours_ms"), unpadded.get("ours_ms")),
                    "padded_vs_full_rank": harness.ratio(r.get("ours_ms"), full.get("ours_ms")),
                    "lean_padded_ms": r.get("lean_torch_ms"), "lean_padded_variant": r.get("lean_variant"),
                    "peft_layer_padded_ms": r.get("peft_layer_ms")})
    return out


def padding_markdown(entries: list[dict]) -> str:
    if not entries:
        return ""
    header = ["shape", "M", "L", "ids", "mode", "ours r of R ms", "ours r ms (unpadded)", "ours R ms",
              "padded / unpadded ×", "padded / R ×", "lean r of R ms", "peft layer r ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for e in entries:
        lines.append("| " + " | ".join([
            e["shape"], str(e["m"]), str(e["num_adapters"]), e["ids"], e["mode"],
            _fmt(e["ours_padded_ms"], "{:.3g}") + f" ({e['rank']} of {e['padded']})",
            _fmt(e["ours_unpadded_ms"], "{:.3g}"), _fmt(e["ours_full_rank_ms"], "{:.3g}"),
            _fmt(e["padded_vs_unpadded"], "{:.2f}"), _fmt(e["padded_vs_full_rank"], "{:.2f}"),
            _fmt(e["lean_padded_ms"], "{:.3g}") + (f" ({e['lean_padded_variant']})" if e["lean_padded_variant"] else ""),
            _fmt(e["peft_layer_padded_ms"], "{:.3g}")]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="Llama-3-8B q/o and SmolLM2 q/o, ranks 16/64, rows 1..8192, L 1/8/64, all id patterns")
    harness.add_device_options(parser)
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="lora_kernels.set_backend for ours (auto: triton on cuda, torch on cpu)")
    harness.add_output_options(parser)
    parser.add_argument("--name", help="result file stem (default: multi_lora_linear, or multi_lora_linear_full)")
    parser.add_argument("--providers", type=harness.str_list, default=PROVIDERS,
                        help=f"subset of {','.join(PROVIDERS)}")
    parser.add_argument("--lean-variants", type=harness.str_list, default=LEAN_VARIANTS,
                        help=f"which plain-torch compositions lean_torch picks from: {','.join(LEAN_VARIANTS)}")
    parser.add_argument("--modes", type=harness.str_list, default=MODES, help="fwd, fwd_bwd or both")
    parser.add_argument("--shapes", type=harness.int_list,
                        help="square layers K=N, e.g. 576,1024 (default: 576,1024 on cpu, 4096 on cuda; "
                             "--full: 4096,576)")
    parser.add_argument("--tokens", type=harness.int_list, help="override the row counts M, e.g. 64,8192")
    parser.add_argument("--ranks", type=harness.int_list, help="override the ranks of the main groups, e.g. 16,64")
    parser.add_argument("--adapters", type=harness.int_list, help="override the adapter counts L, e.g. 1,8,64")
    parser.add_argument("--ids", type=harness.str_list,
                        help=f"override the id patterns ({ID_PATTERN_HELP.replace('%', '%%')})")
    parser.add_argument("--padding", action=argparse.BooleanOptionalAction, default=True,
                        help="the padded-rank case (rank 8 in a stack of 64 vs 64 vs 8; default: yes)")
    harness.add_timing_options(
        parser, "CPU only: seconds blocked_autorange measures each provider for (over all rounds)")
    parser.add_argument("--repeats", type=int,
                        help="timing rounds per row, providers interleaved, order reversed every other round "
                             "(default: 2 on cpu, i.e. A B C .. C B A, which cancels a linear drift; 1 on cuda)")
    args = parser.parse_args(argv)
    harness.check_options(parser, args, [("--providers", args.providers, PROVIDERS), ("--modes", args.modes, MODES),
                                         ("--lean-variants", args.lean_variants, LEAN_VARIANTS),
                                         ("--ids", args.ids or (), ID_PATTERNS)])
    return args


def configured_groups(args: argparse.Namespace, device: torch.device) -> list:
    shapes = [square_shape(s) for s in args.shapes] if args.shapes else None
    groups = full_groups(device, shapes) if args.full else default_groups(device, shapes)
    out = []
    for g in groups:
        if isinstance(g, PaddingGroup):
            if args.padding:
                out.append(PaddingGroup(g.shape, g.rank, g.padded, args.tokens or g.tokens, args.adapters or g.adapters,
                                        args.ids or g.ids, g.modes))
        else:
            out.append(Group(g.shape, args.ranks or g.ranks, args.tokens or g.tokens, args.adapters or g.adapters,
                             args.ids or g.ids, g.modes))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = harness.device_and_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    lora_kernels.set_backend(args.backend)
    providers = tuple(p for p in PROVIDERS if p in args.providers)
    lean_variants = tuple(v for v in LEAN_VARIANTS if v in args.lean_variants)
    modes = tuple(m for m in MODES if m in args.modes)
    units = expand(configured_groups(args, device))

    stamp = harness.environment_stamp(device, dtype)
    stamp["lora_kernels_backend"] = lora_kernels_backend(device, dtype)
    try:
        from lora_kernels.metadata import check_adapter_ids_enabled   # internal: is the id check in "batch ms"
        stamp["adapter_id_check"] = check_adapter_ids_enabled(device)
    except Exception:  # noqa: BLE001
        stamp["adapter_id_check"] = None
    harness.progress(f"multi_lora_linear benchmark on {stamp['device_name']} ({dtype}, {stamp['torch_threads']} "
                     f"threads, ours via {stamp['lora_kernels_backend']}); providers {', '.join(providers)}"
                     + (f" (lean: {', '.join(lean_variants)})" if "lean_torch" in providers else ""))

    t0 = time.perf_counter()
    harness.warm_up(device)
    repeats = args.repeats or (2 if device.type == "cpu" else 1)
    stamp["timing_rounds"] = repeats
    rows = run(units, providers, lean_variants, modes, device, dtype, args.min_run_time, repeats)
    wall = time.perf_counter() - t0

    needs = {"base_ms": "base", "ours_ms": "ours", "batch_ms": "ours", "peft_ms": "peft",
             "peft_layer_ms": "peft_layer", "lean_torch_ms": "lean_torch", "lean_variant": "lean_torch",
             "overhead_pct": "base", "speedup_vs_peft_layer": "peft_layer", "speedup_vs_lean_torch": "lean_torch"}
    columns = harness.visible_columns(rows, providers, TABLE_COLUMNS, CUDA_COLUMNS, needs, device)
    goals, padding = goals_table(rows), padding_table(rows)
    peft_train = PEFT_TRAIN_MESSAGE[0] if PEFT_TRAIN_MESSAGE else "(not asked: PEFT was not run)"
    notes = [
        f"Times are medians in ms ({harness.timer_name(device)}; p20/p80 in the JSON)"
        + (f", median of {repeats} interleaved rounds per provider (each round's median in the JSON as "
           "<provider>_rounds_ms)" if repeats > 1 else "") + ". ours/base-1 % = LoRA overhead of ours over the "
        "base layer alone; × vs peft layer / × vs lean = their time / ours (> 1: ours is faster). "
        "r: LoRA rank (\"8 of 64\": true rank 8 in a stack padded to 64, AdapterBatch(ranks=...)); L: adapters in "
        f"the stack; ids: {ID_PATTERN_HELP}; used: adapters with at least one row.",
        "ours runs with an AdapterBatch built once per batch (as every layer of a model reuses it); "
        "batch ms = one AdapterBatch(ids, L, ranks) build, paid once per batch, not per layer. "
        "peft ms = model(x, adapter_names=[...]) on a real PEFT model (one LoRA layer; includes PEFT's per-forward "
        "hook set-up, paid once per model call); peft layer ms = that LoRA layer called with adapter_names directly "
        "(PEFT's per-layer cost; × vs peft layer compares with this, the smaller of the two). "
        "lean = the fastest plain-torch composition of loop (grouped rows, per-adapter matmuls, index_add_), "
        "gather (bmm over per-row gathered weights) and dense (all adapters on all rows, masked); each variant's "
        "time is in the JSON as lean_<variant>_ms. Per-batch set-up of lean (grouping, masks) is not timed, "
        "like ours' AdapterBatch.",
        f"PEFT has no fwd_bwd here: mixed adapter batches are inference-only. Asked in training mode, "
        f"model(x, adapter_names=...) says: {peft_train}",
        FLOPS_NOTE,
        "other CPUs: CPU time other processes used while the row ran, in CPUs (from /proc/stat); on a CPU run, "
        f"rows well above 0 were timed on a shared machine and may be inflated. This run: "
        f"{sum(1 for r in rows if (r.get('others_cpu') or 0) > 0.2)} of {len(rows)} rows above 0.2.",
    ]
    if goals:
        notes.append("Overhead of ours over the base GEMM per adapter count L (ids rr), and L distinct adapters over "
                     "one shared adapter (time at the largest L / time at L=1, same M). The goals are the issue's, "
                     "stated for CUDA bf16 K=N=4096 r=16 fwd; on other devices and shapes they are shown for "
                     "reference only.\n\n" + goals_markdown(goals))
    if padding:
        notes.append("Padding: adapters of true rank r in a stack padded to R (AdapterBatch ranks=...) against an "
                     "unpadded stack of r (1.00 = padding costs nothing) and against all adapters at R.\n\n"
                     + padding_markdown(padding))
    print()
    harness.print_table(rows, columns)
    for note in notes:
        print()
        print(note)
    print(f"\n{len(rows)} rows in {wall:.0f} s")
    if args.out:
        name = args.name or ("multi_lora_linear_full" if args.full else "multi_lora_linear")
        harness.stamp_run_end(stamp, wall)
        paths = harness.write_results(name, rows, stamp, notes=notes, columns=columns, results_dir=args.results_dir,
                                      extra={"goals": goals, "padding": padding})
        print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(row.get("ours_ms") is None for row in rows if "ours" in providers) else 0


if __name__ == "__main__":
    sys.exit(main())
