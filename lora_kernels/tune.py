"""The tuner: measure on this GPU which plan serves each single-adapter LoRA matmul of a model fastest,
and write the table lora_kernels.tuning reads (the user's cache for this device's model by default).

    python -m lora_kernels.tune --model meta-llama/Meta-Llama-3-8B --tokens 16,128,1024,4096 --ranks 16
    python -m lora_kernels.tune --shapes 4096x4096,4096x1024 --dtype bfloat16 --time-budget 600

For each op ("forward": y; "dx": the backward's dX), layer shape (K x N), token count M and rank, the
candidates are the split plan and a fused plan per config of triton.lora_linear.fused_candidates. Each
runs the real launcher under tuning.forced_plan; its output is checked against the split plan's (a
candidate that differs or raises, e.g. out of shared memory, is skipped with the reason recorded, never
chosen), then timed (triton.testing.do_bench, median ms); the fastest is written. Token counts and ranks
are measured once per bucket (tuning.m_bucket, rank_bucket: the plans serve buckets), at the largest
value asked for in it. Never inside CUDA-graph capture or a torch.compile trace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch

from . import _env, tuning

DEFAULT_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)   # one per M bucket up to 4096
DEFAULT_RANK = 16
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A candidate may differ from the split plan's output by this much of max |split's output|: 2-8 ulps of
# the output dtype (bf16 2^-8, fp16 2^-11; fp32 at tf32's 2^-11, the GEMMs may run on tensor cores).
# Both sum the same products in different orders; a wrong tile or a lost split-K partial is off by
# 1/split_k of the output or more.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 4e-3}
# Llama-style projections (PEFT's target module names) -> (in_features K, out_features N) of a config
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Timer = Callable[[Callable[[], object]], float]


class TuneResult(NamedTuple):
    path: Path | None        # the table written (None: nothing was measured in the time budget)
    entries: list[dict]      # the entries measured by this run (tuning.entry_of)
    complete: bool           # False: the time budget stopped the run before its last candidate


def tune(
    layer_shapes: Iterable[tuple[int, int]],
    *,
    tokens: Iterable[int],
    ranks: Iterable[int],
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    timer: Timer | None = None,
    output: str | Path | None = None,
    time_budget_s: float | None = None,
    ops: Sequence[str] = tuning.OPS,
    verbose: bool = True,
) -> TuneResult:
    """Measure the plans of every (op, layer (K, N), M, rank) and write the fastest of each to `output`
    (default: tuning.user_table_path(device)), merged into the table already there, each shape as soon
    as it is measured; then drop the in-process tables, so the next lookup uses them. layer_shapes: (in_features K, out_features N) pairs.
    timer(fn) -> milliseconds (default: do_bench's median on CUDA, the wall clock's under the
    interpreter). time_budget_s: stop between candidates once spent, keeping the shapes fully measured."""
    _refuse_inside_capture_or_compile()
    device = _resolve_device(device)
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype {dtype}: the tuner measures {list(DTYPES)}")
    bad_ops = [op for op in ops if op not in tuning.OPS]
    if bad_ops:
        raise ValueError(f"ops {bad_ops}: expected some of {tuning.OPS}")
    shapes = list(dict.fromkeys((int(k), int(n)) for k, n in layer_shapes))
    if not shapes or any(k <= 0 or n <= 0 for k, n in shapes):
        raise ValueError(f"layer_shapes {shapes}: expected (K, N) pairs of positive sizes")
    token_counts = _per_bucket(tokens, tuning.m_bucket, "tokens", verbose)
    rank_list = _per_bucket(ranks, tuning.rank_bucket, "ranks", verbose)
    from .triton import lora_linear as launchers   # imports triton: TRITON_INTERPRET is read now

    timer = timer or _default_timer(device)
    output = Path(output) if output is not None else tuning.user_table_path(device)
    # Fail before measuring, not after: an unwritable path or another device's table there
    tuning.write_table(output, device, [])
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    entries: list[dict] = []
    complete = True
    if verbose:
        print(f"tuning on {tuning.device_name(device)} ({tuning.device_kind(device)}), {dtype}: "
              f"{len(shapes)} shapes x {len(token_counts)} token counts x {len(rank_list)} ranks x {len(ops)} ops")
        print(_ROW.format("op", "M", "N", "K", "rank", "plan", "ms", "split ms", "speedup", "skipped"))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():   # do_bench's events
        for op, m, n, k, rank, run in _cases(launchers, shapes, rank_list, token_counts, ops, dtype, device):
            candidates = [tuning.SPLIT] + [tuning.Plan("fused", cfg)
                                           for cfg in launchers.fused_candidates(op, m, n, k, rank, dtype)]
            measured = _measure(run, candidates, dtype, timer, deadline)
            if measured is None:
                complete = False
                break
            best, times_ms, skipped = measured
            entries.append(tuning.entry_of(op, dtype, m, n, k, rank, best, times_ms, skipped))
            # written at once (merged into the table): a run stopped later (a step's time limit, a
            # sticky CUDA error of a candidate) keeps every shape it measured
            tuning.write_table(output, device, entries[-1:])
            if verbose:
                split_ms, best_ms = times_ms["split"], times_ms[tuning.plan_name(best)]
                print(_ROW.format(op, m, n, k, rank, tuning.plan_name(best), f"{best_ms:.4f}", f"{split_ms:.4f}",
                                  f"{split_ms / best_ms:.2f}x", len(skipped)), flush=True)
    path = output if entries else None
    tuning.clear_tables()
    if verbose:
        stopped = "" if complete else " (stopped by the time budget; the rest keeps its default plans)"
        print(f"wrote {len(entries)} plans to {path}{stopped}" if path else f"nothing measured{stopped}")
    return TuneResult(path, entries, complete)


def _cases(launchers, shapes: list[tuple[int, int]], ranks: list[int], token_counts: list[int], ops: Sequence[str],
           dtype: torch.dtype, device: torch.device
           ) -> Iterator[tuple[str, int, int, int, int, Callable[[], torch.Tensor]]]:
    """(op, M, N, K, rank, run) per matmul to measure, N and K as tuning.plan_for keys them; run() calls
    the launcher on random inputs made for it (one weight per layer shape, one adapter per rank)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    for k, n in shapes:
        weight = randn(n, k, std=k ** -0.5)                                    # (N, K): x·W0ᵀ ~ N(0, 1)
        for rank in ranks:
            # a unit-scale LoRA term (s·(x·Aᵀ)·Bᵀ ~ N(0, 1), as x·W0ᵀ): a wrong epilogue cannot hide in it
            a, b, scale = randn(rank, k, std=k ** -0.5), randn(n, rank, std=rank ** -0.5), 1.0
            for m in token_counts:
                for op in ops:
                    if op == "forward":
                        x = randn(m, k, std=1.0)                               # y (M, N) = x (M, K) · W0ᵀ
                        yield op, m, n, k, rank, lambda x=x, w=weight, a=a, b=b: launchers.lora_linear_forward(
                            x, w, None, a, b, scale, 0.0, None)[0]
                    else:
                        grad_y = randn(m, n, std=1.0)                          # dX (M, K) = dY (M, N) · W0
                        yield op, m, k, n, rank, lambda g=grad_y, w=weight, a=a, b=b: launchers.lora_linear_backward(
                            g, None, w, a, b, None, scale, 0.0, None, True, False, False)[0]


_ROW = "{:<8} {:>6} {:>6} {:>6} {:>4}  {:<34} {:>9} {:>9} {:>7} {:>7}"


def _measure(run: Callable[[], torch.Tensor], candidates: list[tuning.Plan], dtype: torch.dtype,
             timer: Timer, deadline: float | None) -> tuple[tuning.Plan, dict[str, float], dict[str, str]] | None:
    """(fastest plan, times_ms, skipped reasons) of one shape; None when the deadline passed first."""
    times_ms: dict[str, float] = {}
    skipped: dict[str, str] = {}
    reference = None
    for plan in candidates:
        if deadline is not None and time.monotonic() > deadline:
            return None
        name = tuning.plan_name(plan)
        try:
            with tuning.forced_plan(plan):
                out = run()
                if reference is None:
                    reference = out.clone()    # the split plan runs first: the others are checked against it
                else:
                    mismatch = _mismatch(out, reference, dtype)
                    if mismatch is not None:
                        skipped[name] = mismatch
                        continue
                del out
                times_ms[name] = float(timer(run))
        except Exception as exc:   # noqa: BLE001 - a candidate that cannot run (shared memory, registers) is skipped
            if plan is tuning.SPLIT:
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            skipped[name] = f"{type(exc).__name__}: {first_line}"[:300]
    best = min((plan for plan in candidates if tuning.plan_name(plan) in times_ms),
               key=lambda plan: times_ms[tuning.plan_name(plan)])
    return best, times_ms, skipped


def _mismatch(out: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why `out` is not the split plan's result, or None."""
    if out.shape != reference.shape or out.dtype != reference.dtype:
        return f"output {tuple(out.shape)} {out.dtype}, the split plan's {tuple(reference.shape)} {reference.dtype}"
    err = (out.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    if not err <= TOLERANCE[dtype] * scale:   # NaN fails too
        return f"max |out - split's out| {err:.3g} > {TOLERANCE[dtype]} x max |split's out| {scale:.3g}"
    return None


def _refuse_inside_capture_or_compile() -> None:
    # is_compiling() is True only while Dynamo traces; at the graph break its raise causes, Dynamo runs the
    # call eagerly, where only the frame callback it keeps installed for the callees tells (None outside
    # torch.compile and under torch.compiler.disable)
    dynamo_callback = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", lambda: None)
    if torch.compiler.is_compiling() or dynamo_callback() is not None:
        raise RuntimeError("lora_kernels.tune called inside a torch.compile trace: tune eagerly, once, before "
                           "compiling (the compiled model's lookups read the table it writes)")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lora_kernels.tune called during CUDA-graph capture: timing needs real launches and "
                           "host syncs; tune before capturing (the captured launches read the table it writes)")


def _resolve_device(device: torch.device | str | None) -> torch.device:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.type == "cpu":
        if not _env.triton_interpreter_enabled():
            raise RuntimeError("tuning on CPU runs the Triton kernels interpreted: set TRITON_INTERPRET=1 "
                               "(tests and dry runs only; a table is worth measuring on a GPU)")
        return device
    raise ValueError(f"device {device}: the tuner times the Triton launchers on cuda (or cpu, interpreted)")


def _per_bucket(values: Iterable[int], bucket: Callable[[int], int], what: str, verbose: bool) -> list[int]:
    """The largest value asked for in each bucket, in increasing order."""
    values = sorted({int(v) for v in values})
    if not values or values[0] <= 0:
        raise ValueError(f"{what} {values}: expected positive integers")
    largest = {bucket(v): v for v in values}                        # sorted: the largest of a bucket wins
    kept = sorted(largest.values())
    if verbose and len(kept) < len(values):
        print(f"{what}: measuring {kept} (one per bucket; {sorted(set(values) - set(kept))} share their plans)")
    return kept


def _default_timer(device: torch.device) -> Timer:
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, return_mode="median")
    return _wall_clock_ms


def _wall_clock_ms(fn: Callable[[], object], repeat: int = 5) -> float:
    """Median wall time of `fn` after one warm-up call (the interpreter: tests and dry runs)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------- model shapes


def layer_shapes_of_config(config, modules: Iterable[str] | None = None) -> list[tuple[int, int]]:
    """(K, N) of a Llama-style transformers config's projections (q, k, v, o, gate, up, down; `modules`:
    the PEFT target names among LLAMA_MODULES, None: all), deduplicated in that order."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    except AttributeError as exc:
        raise ValueError(f"{type(config).__name__} is not a Llama-style config ({exc}): pass --shapes") from None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    shapes = {
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }
    names = LLAMA_MODULES if modules is None else [name for name in LLAMA_MODULES if name in set(modules)]
    if not names:
        raise ValueError(f"target modules {sorted(modules)} name none of {LLAMA_MODULES}: pass --shapes")
    return list(dict.fromkeys(shapes[name] for name in names))


def model_shapes(name_or_path: str) -> tuple[list[tuple[int, int]], list[int]]:
    """(layer shapes, adapter ranks) of a transformers model (name or directory: AutoConfig) or of a PEFT
    adapter directory (its adapter_config.json names the base model, the rank r and the target modules)."""
    from transformers import AutoConfig

    adapter_config = Path(name_or_path) / "adapter_config.json"
    if not adapter_config.is_file():
        return layer_shapes_of_config(AutoConfig.from_pretrained(name_or_path)), []
    adapter = json.loads(adapter_config.read_text(encoding="utf-8"))
    base, rank = adapter.get("base_model_name_or_path"), adapter.get("r")
    if not base or not isinstance(rank, int):
        raise ValueError(f"{adapter_config}: expected base_model_name_or_path and an integer r, got {base!r}, {rank!r}")
    targets = adapter.get("target_modules")
    modules = None if targets is None or isinstance(targets, str) else targets   # a str: a regex or "all-linear"
    return layer_shapes_of_config(AutoConfig.from_pretrained(base), modules), [rank]


# ----------------------------------------------------------------------------- command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def _shape_list(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, n = part.lower().partition("x")
        if not (sep and k.isdigit() and n.isdigit() and int(k) > 0 and int(n) > 0):
            raise argparse.ArgumentTypeError(f"{part!r}: expected KxN (in_features x out_features), e.g. 4096x1024")
        shapes.append((int(k), int(n)))
    if not shapes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KxN,KxN,...")
    return shapes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_kernels.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=_shape_list, default=[],
                        help="layer shapes KxN (in_features x out_features), comma-separated: 4096x4096,4096x1024")
    parser.add_argument("--model", help="a transformers model (name or directory) or a PEFT adapter directory: "
                                        "its Llama-style projections (and the adapter's rank and target modules)")
    parser.add_argument("--tokens", type=_int_list, default=list(DEFAULT_TOKENS),
                        help=f"token counts M, comma-separated (default {','.join(map(str, DEFAULT_TOKENS))})")
    parser.add_argument("--ranks", type=_int_list, default=None,
                        help=f"LoRA ranks, comma-separated (default: the adapter's r, else {DEFAULT_RANK})")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop between candidates once spent, keeping the shapes fully measured")
    parser.add_argument("--output", type=Path, default=None,
                        help="the table to write (default: the user cache file of this device's model)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, ... (default: the current CUDA device)")
    args = parser.parse_args(argv)
    if not args.shapes and not args.model:
        parser.error("give --shapes or --model")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shapes, ranks = list(args.shapes), []
    if args.model:
        model_layer_shapes, ranks = model_shapes(args.model)
        shapes += model_layer_shapes
    result = tune(shapes, tokens=args.tokens, ranks=args.ranks or ranks or [DEFAULT_RANK],
                  dtype=DTYPES[args.dtype], device=args.device, output=args.output, time_budget_s=args.time_budget)
    return 0 if result.entries else 1   # nothing measured in the time budget: a failed run


if __name__ == "__main__":
    sys.exit(main())
