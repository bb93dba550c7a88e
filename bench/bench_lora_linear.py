"""Single-adapter LoRA linear benchmark: y = x W0ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ.

    python bench/bench_lora_linear.py                  # default config (CPU: about a minute)
    python bench/bench_lora_linear.py --full           # Llama-3-8B + SmolLM2 sweep (for a GPU)
    python bench/bench_lora_linear.py --overhead       # per-call overhead at 1-64 tokens, fp32 (issue 14)
    python bench/bench_lora_linear.py --device cpu --no-out --tokens 1,64 --ranks 16

Providers base, ours, ours_python, peft, lean_torch (providers.SINGLE), each a function of the same x,
W0, b, A, B, s and checked against the float64 reference (lora_kernels.reference.lora_linear_reference) before
it is timed, in the modes fwd and fwd_bwd; see README.md for the columns.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import torch

import harness
import providers as lora
from providers import LLAMA_DOWN, LLAMA_KV, LLAMA_QO, LLAMA_UP, MODES, SMOL_QO, SMOL_UP, Shape

import lora_kernels  # this checkout's: importing providers put it first on sys.path
from lora_kernels import tuning

PROVIDERS = tuple(lora.SINGLE)      # base, ours, ours_python, peft, lean_torch
FLOPS_NOTE = ("FLOPs (counted for TFLOP/s): fwd = 2·M·K·N + 2·M·r·(K+N); "
              "fwd_bwd = 4·M·K·N + 6·M·r·(K+N) (W0 frozen: no dW0 GEMM; dX = dY·W0 + (s·dY·B)·A, "
              "dA = (s·dY·B)ᵀ·x, dB = dYᵀ·(s·x·Aᵀ)); dropout's elementwise work is not counted. "
              "Bytes (for GB/s): the least traffic, each tensor once: fwd x, W0, b, A, B, y; "
              "fwd_bwd also dY, dX, dA, dB.")


# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Group:
    """Every combination of these ranks, token counts, dropout rates and modes on one shape.
    fwd rows are run with dropout 0 only: nobody runs dropout at inference."""
    shape: Shape
    ranks: tuple[int, ...]
    tokens: tuple[int, ...]
    dropouts: tuple[float, ...] = (0.0,)
    modes: tuple[str, ...] = MODES

    @property
    def runs(self) -> list[tuple[float, str]]:
        """(dropout, mode) of each row at one rank and token count."""
        return [(p, mode) for p in self.dropouts for mode in self.modes if not (mode == "fwd" and p > 0)]


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


def overhead_groups() -> list[Group]:
    """Issue 14's per-call overhead table: few tokens, where the Python around a call (about 10 µs per
    forward, 50 µs per backward before csrc/) is a visible part of the time; run in fp32 (main())."""
    return [Group(shape, (16,), (1, 4, 16, 64)) for shape in (SMOL_QO, LLAMA_QO)]


def full_groups() -> list[Group]:
    tokens = (1, 4, 16, 64, 256, 1024, 4096, 8192)
    ranks = (8, 16, 64, 128)
    return [Group(shape, ranks, tokens, (0.0, 0.1))
            for shape in (LLAMA_QO, LLAMA_KV, LLAMA_UP, LLAMA_DOWN, SMOL_QO, SMOL_UP)]


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


# ----------------------------------------------------------------------------- the run


# (key, header, the provider it needs): a key alone is its own header; a pair needs ours (harness.visible_columns)
TABLE_COLUMNS = [
    "shape", ("m", "M"), ("k", "K"), ("n", "N"), "r", ("dropout_p", "p"), "mode", ("base_ms", "base ms", "base"),
    ("ours_ms", "ours ms"), ("ours_python_ms", "ours_python ms", "ours_python"), ("peft_ms", "peft ms", "peft"),
    ("lean_torch_ms", "lean ms", "lean_torch"), ("ours_minus_lean_us", "ours−lean µs", "lean_torch"),
    ("ours_python_minus_lean_us", "ours_py−lean µs", "ours_python"), ("overhead_pct", "ours/base-1 %", "base"),
    ("speedup_vs_peft", "× vs peft", "peft"), ("speedup_vs_lean_torch", "× vs lean", "lean_torch"),
    ("ours_tflops", "ours TFLOP/s"), ("ours_gbps", "ours GB/s"), ("ours_peak_pct", "ours % peak"),
    ("plan", "ours plan"),
]
CUDA_COLUMNS = [("timed", "timed", None), ("ours_peak_mib", "ours MiB", "ours"), ("peft_peak_mib", "peft MiB", "peft")]


def excess_us(ms: float | None, lean_ms: float | None) -> float | None:
    """Per-call time over lean_torch in µs, (ms − lean ms) · 1000, or None when either is missing."""
    return (ms - lean_ms) * 1000 if ms is not None and lean_ms is not None else None


def run(groups: list[Group], providers: tuple[str, ...], device: torch.device, dtype: torch.dtype,
        min_run_time: float, peak: harness.Peak | None = None, graph_max_tokens: int = 0) -> list[dict]:
    """graph_max_tokens: on CUDA, rows of at most this many tokens are timed as CUDA-graph replays."""
    backend = lora.lora_kernels_backend(device, dtype)
    rows: list[dict] = []
    bar = harness.Progress(sum(len(g.ranks) * len(g.tokens) * len(g.runs) for g in groups))
    for group in groups:
        shape = group.shape
        for r in group.ranks:
            w = lora.make_weights(shape, r, dtype, device)
            built: dict[tuple[str, float], lora.Provider | str] = {}     # (provider, p) -> Provider or the error

            def build(name: str, p: float) -> lora.Provider | str:
                if (name, p) not in built:
                    built[(name, p)] = lora.build(name, lambda: lora.SINGLE[name](w, p))
                return built[(name, p)]

            for m in group.tokens:
                x, grad_y = lora.make_activations(m, shape.k, shape.n, dtype, device)
                ref = lora.Reference(w, x, grad_y)
                verdicts: dict[tuple[str, str], str | None] = {}     # (provider, mode) -> error at p = 0
                for p, mode in group.runs:
                    label = f"{shape.name} M={m} r={r} p={p} {mode}"
                    checks = {}
                    for name in providers:       # build and check every provider first, then time them
                        provider = build(name, p)
                        error = provider if isinstance(provider, str) else None
                        if error is None and (name, mode) not in verdicts:
                            # checked without dropout: then it is deterministic
                            verdicts[(name, mode)] = lora.verdict(name, build(name, 0.0), mode, ref)
                        error = error or verdicts[(name, mode)]
                        if error is None and p > 0:
                            error = harness.safe_check(lambda: lora.check_finite(provider, mode, x, grad_y))
                        checks[name] = (provider, error)
                    ready, errors = lora.checked(checks, label)
                    row = {"shape": shape.name, "m": m, "k": shape.k, "n": shape.n, "r": r, "dropout_p": p,
                           "mode": mode}
                    steps = {(0, name): lora.step_fn(provider, mode, x, grad_y) for name, provider in ready.items()}
                    lora.time_rows({0: row}, steps, providers, device, min_run_time, cuda_graph=m <= graph_max_tokens)
                    rows.append(finish_row(row, providers, errors, backend, device, dtype, shape, x, peak))
                    speedup = row["speedup_vs_lean_torch"]
                    lora.row_done(row, providers, providers, label, bar,
                                  f" (×{speedup:.2f} vs lean)" if speedup else "")
            built.clear()       # free this rank's providers (PEFT's model) before the next weights
    return rows


def finish_row(row: dict, providers: tuple[str, ...], errors: list[str], backend: str, device: torch.device,
               dtype: torch.dtype, shape: Shape, x: torch.Tensor, peak: harness.Peak | None) -> dict:
    """The row's derived numbers (ratios, roofline, timing method, ours' plan) and its errors."""
    m, r, mode = row["m"], row["r"], row["mode"]
    ours, lean = row.get("ours_ms"), row.get("lean_torch_ms")
    row["overhead_pct"] = lora.overhead_pct(row)
    row["speedup_vs_peft"] = harness.ratio(row.get("peft_ms"), ours)
    row["speedup_vs_lean_torch"] = harness.ratio(lean, ours)
    row["ours_minus_lean_us"] = excess_us(ours, lean)
    row["ours_python_minus_lean_us"] = excess_us(row.get("ours_python_ms"), lean)
    lora.add_ours_roofline(row, lora.flops(mode, m, shape.k, shape.n, m * r),
                           lora.min_bytes(mode, m, shape.k, shape.n, r, x.element_size()), peak)
    row["timed"] = harness.timed_with(row, providers)
    if "ours" in providers:
        row.update(ours_plan(backend, device, dtype, mode, m, shape, r, row["dropout_p"]))
    row["errors"] = "; ".join(errors) or None
    return row


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
    parser.add_argument("--providers", type=harness.str_list, default=PROVIDERS,
                        help=f"subset of {','.join(PROVIDERS)}")
    parser.add_argument("--modes", type=harness.str_list, default=MODES, help="fwd, fwd_bwd or both")
    parser.add_argument("--tokens", type=harness.int_list, help="override the token counts M, e.g. 1,64,1024")
    parser.add_argument("--ranks", type=harness.int_list, help="override the ranks, e.g. 16,64")
    parser.add_argument("--dropouts", type=harness.float_list, help="override the dropout rates, e.g. 0,0.1")
    harness.add_timing_options(parser, graphs=True)
    args = parser.parse_args(argv)
    if args.full and args.overhead:
        parser.error("--full and --overhead are two configurations: pick one")
    if args.overhead and not args.dtype:
        args.dtype = "fp32"         # the goals are stated in fp32, on a GPU too
    harness.check_options(parser, args, [("--providers", args.providers, PROVIDERS), ("--modes", args.modes, MODES)])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = harness.setup(args)
    providers = tuple(p for p in PROVIDERS if p in args.providers)
    groups = full_groups() if args.full else overhead_groups() if args.overhead else default_groups(device)
    groups = [Group(g.shape, args.ranks or g.ranks, args.tokens or g.tokens, args.dropouts or g.dropouts,
                    tuple(m for m in g.modes if m in args.modes)) for g in groups]
    groups = [g for g in groups if g.modes]

    stamp = harness.environment_stamp(device, dtype)
    stamp["lora_kernels_backend"] = lora.lora_kernels_backend(device, dtype)
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

    columns = harness.visible_columns(rows, providers, TABLE_COLUMNS, CUDA_COLUMNS, device)
    notes = [
        f"Times are medians in ms ({harness.timer_name(device)}; "
        "p20/p80 in the JSON). ours/base-1 % = LoRA overhead of ours over the base layer alone; "
        "× vs peft / × vs lean = their time / ours (> 1: ours is faster). ours−lean µs, ours_py−lean µs = "
        "(ours or ours_python − lean_torch) · 1000: the per-call overhead over the plain torch composition. "
        "ours_python = ours through the Python route (autograd.Function, Python kernels); "
        f"ours: {stamp['lora_kernels_extension']}.",
        FLOPS_NOTE,
        lora.PEAK_NOTE.format(how=peak.how, tflops=peak.tflops, gbps=peak.gbps),
        "fwd: torch.no_grad, PEFT in eval mode. fwd_bwd: dX, dA, dB (base: dX) against a fixed dY; W0, b frozen. "
        "Rows with dropout are checked at p = 0 (the masks differ between providers) and for finiteness at p.",
    ]
    if graph_max_tokens:
        notes.append(f"Rows of at most {graph_max_tokens} tokens are timed as replays of one call captured in a CUDA "
                     "graph (column timed: cuda graph), as a serving engine runs decode steps; a provider that cannot "
                     "be captured is timed eagerly (timed names it; <provider>_graph_error in the JSON says why).")
    name = args.name or ("lora_linear_full" if args.full else "lora_linear_overhead" if args.overhead
                         else "lora_linear")
    plot = harness.PlotSpec(providers, panel=("shape", "r", "dropout_p", "mode"),
                            title=f"lora_linear on {stamp['device_name']}, {stamp['dtype']}")
    harness.report(rows, columns, notes, stamp, wall, args, name, plot)
    return lora.exit_status(rows, providers)


if __name__ == "__main__":
    sys.exit(main())
