"""Multi-adapter LoRA linear benchmark: y[i] = x[i] W0ᵀ + b + s_j · (x[i] A[j]ᵀ) B[j]ᵀ, j = adapter_ids[i].

    python bench/bench_multi_lora_linear.py                 # default config (CPU: about a minute)
    python bench/bench_multi_lora_linear.py --full          # Llama-3-8B / SmolLM2 sweep (for a GPU)
    python bench/bench_multi_lora_linear.py --device cpu --no-out --workloads decode --decode-requests 64 \\
        --adapters 1,64 --popularity distinct,zipf --modes fwd

A batch is made of requests (Workload: decode, one row each; prefill, ragged lengths), each on one adapter
of the stack (or none) picked by a popularity pattern (POPULARITY_HELP). The providers (providers.MULTI)
are checked against float64 before they are timed; README.md says what each runs and what the columns mean.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

import harness
import providers as lora
from providers import (LLAMA_KV, LLAMA_QO, MIXED, MIXED_RANK_CYCLE, MODES, POPULARITIES, POPULARITY_HELP, SMOL_QO,
                       WORKLOADS, Ranks, Shape, Stack, Workload, decode, make_adapter_ids, prefill)

import lora_kernels  # this checkout's: importing providers put it first on sys.path

PROVIDERS = ("base", "ours", "shared", "peft", "peft_layer", "lean_torch")
LEAN_VARIANTS = ("loop", "gather", "dense")
# The goals (stated for CUDA, bf16, K=N=4096, r=16, fwd): decode, 64 rows, LoRA overhead over
# the base GEMM <= 15 % at L = 1, 8, 64 and 64 distinct adapters within 1.25x of one shared adapter;
# prefill 8192 rows (here: a ragged prefill batch of at least 4096 rows): overhead <= 5 %.
GOAL_DECODE_M, GOAL_DECODE_ADAPTERS, GOAL_DECODE_OVERHEAD_PCT = 64, (1, 8, 64), 15.0
GOAL_DISTINCT_L, GOAL_DISTINCT_RATIO = 64, 1.25
GOAL_PREFILL_MIN_M, GOAL_PREFILL_OVERHEAD_PCT = 4096, 5.0

FLOPS_NOTE = ("Bytes (for GB/s): the least traffic, each tensor once, of the stacks only the used adapters' "
              "true-rank factors: fwd x, W0, b, A_j, B_j, y; fwd_bwd also dY, dX, dA_j, dB_j. "
              "FLOPs (counted for TFLOP/s): fwd = 2·M·K·N + 2·Σr·(K+N); fwd_bwd = 4·M·K·N + 6·Σr·(K+N), "
              "Σr = the sum over the rows with an adapter of that adapter's true rank (W0 frozen: no dW0 GEMM).")


# ----------------------------------------------------------------------------- configurations


SQUARE_1024 = Shape("1024→1024", 1024, 1024)
KNOWN_SHAPES = {(s.k, s.n): s for s in (SMOL_QO, SQUARE_1024, LLAMA_QO, LLAMA_KV)}


def layer_shape(k: int, n: int) -> Shape:
    return KNOWN_SHAPES.get((k, n), Shape(f"{k}→{n}", k, n))


@dataclass(frozen=True)
class Group:
    """Every combination of ranks, adapter counts L, workloads and popularities on one shape, in each mode.
    padding: the padding case, the group's ranks (padding_group) timed together in one unit."""
    shape: Shape
    ranks: tuple[Ranks, ...]
    adapters: tuple[int, ...]
    workloads: tuple[Workload, ...]
    popularities: tuple[str, ...] = ("distinct",)
    modes: tuple[str, ...] = MODES
    padding: bool = False


def padding_group(shape: Shape, rank: int, padded: int, adapters: tuple[int, ...], workloads: tuple[Workload, ...],
                  modes: tuple[str, ...] = MODES) -> Group:
    """The padding case: adapters of true rank `rank` in a stack padded to `padded` (AdapterBatch
    ranks=...), against an unpadded stack of `rank` and the same with every adapter at `padded`; the
    three timed together, for every combination of L, workload and popularity."""
    return Group(shape, (Ranks(rank), Ranks(padded, (rank,)), Ranks(padded)), adapters, workloads, modes=modes,
                 padding=True)


def default_groups(device: torch.device, shapes: Sequence[Shape] | None = None) -> list[Group]:
    """CPU (about a minute, fp32, 2 cores): a 1024→1024 layer over L = 64 adapters: decode 16 and 64
    requests under every popularity (r 16), decode 64 and one small ragged prefill batch under distinct
    and zipf (r 16 and mixed; fwd_bwd: prefill at r 16), the padding case at decode 64 (fwd).
    CUDA: the issue's shape, Llama-3-8B q/o, r 16 and mixed, decode 1..256 requests and a ragged prefill
    of about 8192 rows (both modes), L 1..128, every popularity. The padding case runs on the last shape."""
    r16 = Ranks(16)
    groups: list[Group] = []
    if device.type == "cuda":
        shapes = shapes or (LLAMA_QO,)
        long_prefill = prefill(16, 256, 768)                     # about 8192 rows
        not_distinct = tuple(p for p in POPULARITIES if p != "distinct")
        for shape in shapes:
            groups += [
                Group(shape, (r16, MIXED), (1, 8, 64, 128), tuple(decode(r) for r in (1, 16, 64, 256)),
                      ("distinct",), ("fwd",)),
                Group(shape, (r16, MIXED), (64, 128), (decode(64), decode(256)), not_distinct, ("fwd",)),
                Group(shape, (r16, MIXED), (1, 8, 64, 128), (long_prefill,)),
                Group(shape, (r16,), (64,), (long_prefill,), ("uniform", "zipf", "skewed")),
            ]
        groups.append(padding_group(shapes[-1], 8, 64, (8,), (decode(64), long_prefill)))
        return groups
    shapes = shapes or (SQUARE_1024,)
    short_prefill = prefill(8, 8, 64)                            # 221 rows
    for shape in shapes:
        groups += [
            Group(shape, (r16,), (64,), (decode(16), decode(64)), POPULARITIES, ("fwd",)),
            Group(shape, (MIXED,), (64,), (decode(64),), ("distinct", "zipf"), ("fwd",)),
            Group(shape, (r16,), (64,), (short_prefill,), ("distinct", "zipf")),
            Group(shape, (MIXED,), (64,), (short_prefill,), ("distinct", "zipf"), ("fwd",)),
        ]
    groups.append(padding_group(shapes[-1], 8, 64, (8,), (decode(64),), modes=("fwd",)))
    return groups


def full_groups(shapes: Sequence[Shape] | None = None) -> list[Group]:
    """Llama-3-8B q/o and k/v, SmolLM2 q/o; r 16, 64 and mixed; decode 1..256 requests over L 1..128 and
    every popularity; ragged prefills of about 8192 rows as 16 long or 64 short requests."""
    r16, r64 = Ranks(16), Ranks(64)
    shapes = shapes or (LLAMA_QO, LLAMA_KV, SMOL_QO)
    prefills = (prefill(16, 256, 768), prefill(64, 64, 192))
    not_distinct = tuple(p for p in POPULARITIES if p != "distinct")
    groups: list[Group] = []
    for shape in shapes:
        groups += [
            Group(shape, (r16, r64, MIXED), (1, 8, 64, 128), tuple(decode(r) for r in (1, 4, 16, 64, 128, 256)),
                  ("distinct",), ("fwd",)),
            Group(shape, (r16, MIXED), (64, 128), (decode(64), decode(256)), not_distinct, ("fwd",)),
            Group(shape, (r16, MIXED), (1, 8, 64, 128), prefills),
            Group(shape, (r16,), (64,), prefills, not_distinct),
        ]
    groups.append(padding_group(shapes[0], 8, 64, (8, 64), (decode(64), decode(256), prefills[0])))
    return groups


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Case:
    shape: Shape
    ranks: Ranks
    num_adapters: int
    workload: Workload
    popularity: str
    padding: bool = False       # part of a padding group

    @property
    def stack_key(self) -> tuple:
        return self.shape, self.num_adapters, self.ranks

    @property
    def label(self) -> str:
        return (f"{self.shape.name} {self.workload.label} L={self.num_adapters} r={self.ranks.label} "
                f"{self.popularity}")


def expand(groups: list[Group]) -> list[tuple[list[Case], tuple[str, ...]]]:
    """Units of work: the cases of one unit are timed together, their providers interleaved (one case,
    or the three stacks of a padding comparison), in each of the unit's modes. Units on the same
    stacks run back to back (a stack and its PEFT model are built once), in order of first appearance."""
    units = [(tuple(Case(g.shape, r, num_adapters, workload, popularity, g.padding) for r in ranks), g.modes)
             for g in groups for ranks in ([g.ranks] if g.padding else [(r,) for r in g.ranks])
             for num_adapters, workload, popularity in itertools.product(g.adapters, g.workloads, g.popularities)]
    modes_of: dict[tuple[Case, ...], set[str]] = {}
    for cases, modes in units:  # overrides (e.g. --popularity distinct) can make two groups ask for the same case
        modes_of.setdefault(cases, set()).update(modes)
    first_use: dict[tuple, int] = {}
    for cases in modes_of:
        first_use.setdefault(tuple(c.stack_key for c in cases), len(first_use))
    ordered = sorted(modes_of, key=lambda cases: first_use[tuple(c.stack_key for c in cases)])
    return [(list(cases), tuple(m for m in MODES if m in modes_of[cases])) for cases in ordered]


# (key, header, the provider it needs): a key alone is its own header; a pair needs ours (harness.visible_columns)
TABLE_COLUMNS = [
    "shape", "workload", ("requests", "R"), ("m", "M"), ("k", "K"), ("n", "N"), "r", ("num_adapters", "L"),
    "popularity", "used", "mode", ("base_ms", "base ms", "base"), ("ours_ms", "ours ms"),
    ("shared_ms", "shared ms", "shared"), ("batch_ms", "batch ms"), ("peft_ms", "peft ms", "peft"),
    ("peft_layer_ms", "peft layer ms", "peft_layer"), ("lean_torch_ms", "lean ms", "lean_torch"),
    ("lean_variant", "lean", "lean_torch"), ("overhead_pct", "ours/base-1 %", "base"),
    ("ours_over_shared", "ours/shared ×", "shared"), ("speedup_vs_peft_layer", "× vs peft layer", "peft_layer"),
    ("speedup_vs_lean_torch", "× vs lean", "lean_torch"), ("ours_tflops", "ours TFLOP/s"), ("ours_gbps", "ours GB/s"),
    ("ours_peak_pct", "ours % peak"), ("plan", "ours plan"), ("others_cpu", "other CPUs"),
]
CUDA_COLUMNS = [("timed", "timed", None), ("ours_peak_mib", "ours MiB", "ours"),
                ("shared_peak_mib", "shared MiB", "shared"), ("peft_layer_peak_mib", "peft layer MiB", "peft_layer"),
                ("lean_torch_peak_mib", "lean MiB", "lean_torch")]


@dataclass
class Prepared:
    """One case's inputs, references, AdapterBatch and providers (built on first use)."""
    case: Case
    stack: Stack
    ids: Tensor                     # (M,)
    x: Tensor                       # (M, K)
    grad_y: Tensor                  # (M, N)
    ref: lora.MultiReference
    shared_ref: lora.Reference
    used: int                       # adapters with at least one row
    rank_rows: int                  # sum over the rows with an adapter of its true rank
    used_ranks: int                 # sum over the adapters with rows of their true ranks
    batch: object = None            # AdapterBatch, or the exception building it raised
    batch_timing: object = None
    built: dict = field(default_factory=dict)

    @property
    def m(self) -> int:
        return self.ids.shape[0]


def prepare(case: Case, stacks: dict, providers: tuple[str, ...], device: torch.device, dtype: torch.dtype,
            min_run_time: float) -> Prepared:
    if case.stack_key not in stacks:
        stacks[case.stack_key] = lora.make_stack(case.shape, case.num_adapters, case.ranks, dtype, device)
    stack = stacks[case.stack_key]
    ids = make_adapter_ids(case.workload, case.popularity, case.num_adapters, device)
    x, grad_y = lora.make_activations(ids.shape[0], case.shape.k, case.shape.n, dtype, device)
    true_ranks = torch.tensor([stack.rank(j) for j in range(case.num_adapters)])
    adapter_rows = ids[ids >= 0].cpu()
    used = torch.unique(adapter_rows)
    prep = Prepared(case, stack, ids, x, grad_y, lora.MultiReference(stack, ids, x, grad_y),
                    lora.shared_reference(stack, x, grad_y), int(used.numel()), int(true_ranks[adapter_rows].sum()),
                    int(true_ranks[used].sum()))
    if "ours" in providers:
        try:
            ranks = stack.ranks_tensor()        # made once: "batch ms" times the AdapterBatch build alone

            def build():
                return lora_kernels.AdapterBatch(ids, case.num_adapters, ranks=ranks)
            prep.batch = build()
            prep.batch_timing = harness.time_fn(build, device, min_run_time=min_run_time)
        except Exception as e:  # noqa: BLE001 - ours then fails with this message
            prep.batch = e
    return prep


def make_provider(prep: Prepared, name: str) -> lora.Provider:
    """providers.MULTI[name] on the case; ours fails with the AdapterBatch's error when it could not be built."""
    if name == "ours" and isinstance(prep.batch, Exception):
        raise prep.batch
    return lora.MULTI[name](prep.stack, prep.ids, prep.batch)


def ready_providers(prep: Prepared, names: list[str], mode: str) -> tuple[dict[str, lora.Provider], list[str]]:
    """Build (once per case) and check (per mode) every provider; returns the ones that passed and the
    errors of the others. A provider without this case or mode (Unsupported, PEFT's fwd_bwd) is neither."""
    checks = {}
    for name in names:
        if name not in prep.built:
            prep.built[name] = lora.build(name, lambda: make_provider(prep, name))
        provider = prep.built[name]
        if isinstance(provider, lora.Unsupported) or (isinstance(provider, lora.Provider)
                                                      and mode not in provider.modes):
            continue
        checks[name] = (provider, lora.verdict(name, provider, mode, prep.shared_ref if name == "shared" else prep.ref))
    return lora.checked(checks, f"{prep.case.label} {mode}")


def case_row(prep: Prepared, mode: str) -> dict:
    """A row's first columns: the case (shape, batch, ranks, adapters) and the mode."""
    case = prep.case
    row = {"shape": case.shape.name, "workload": case.workload.kind, "requests": case.workload.requests, "m": prep.m,
           "k": case.shape.k, "n": case.shape.n, "r": prep.stack.label, "num_adapters": case.num_adapters,
           "popularity": case.popularity, "used": prep.used, "mode": mode}
    if case.workload.kind == "prefill":
        row["min_length"], row["max_length"] = case.workload.min_length, case.workload.max_length
    return row


def finish_row(row: dict, prep: Prepared, names: list[str], lean_variants: tuple[str, ...], errors: list[str],
               device: torch.device, peak: harness.Peak | None = None) -> dict:
    """The row's AdapterBatch build time, the winning lean variant, its derived numbers (ratios, roofline,
    timing method, ours' plan) and its errors."""
    case, mode = prep.case, row["mode"]
    if prep.batch_timing is not None:
        row["batch_ms"] = prep.batch_timing.median_ms
        row["batch_p20_ms"], row["batch_p80_ms"] = prep.batch_timing.p20_ms, prep.batch_timing.p80_ms
    lean = {v: row.get(f"lean_{v}_ms") for v in lean_variants if row.get(f"lean_{v}_ms") is not None}
    best = min(lean, key=lean.get) if lean else None
    row["lean_torch_ms"] = lean[best] if best else None
    row["lean_variant"] = best
    if device.type == "cuda" and best:
        row["lean_torch_peak_mib"] = row.get(f"lean_{best}_peak_mib")
    ours = row.get("ours_ms")
    row["overhead_pct"] = lora.overhead_pct(row)
    row["ours_over_shared"] = harness.ratio(ours, row.get("shared_ms"))
    for p in ("peft", "peft_layer", "lean_torch"):
        row[f"speedup_vs_{p}"] = harness.ratio(row.get(f"{p}_ms"), ours)
    # each used adapter's factors are read once: their summed true ranks play the single adapter's r
    lora.add_ours_roofline(row, lora.flops(mode, prep.m, case.shape.k, case.shape.n, prep.rank_rows),
                           lora.min_bytes(mode, prep.m, case.shape.k, case.shape.n, prep.used_ranks,
                                          prep.x.element_size()), peak)
    row["timed"] = harness.timed_with(row, names)
    if "ours" in names:
        row.update(ours_plan(lora.lora_kernels_backend(device, prep.x.dtype), prep.batch))
    row["padding_case"] = case.padding
    row["errors"] = "; ".join(errors) or None
    return row


def ours_plan(backend: str, batch) -> dict:
    """What serves ours in one row: "torch" (the torch backend: per adapter, torch's matmuls on its rows),
    or on the Triton backend "segmented", the segmented kernels over the batch's row tiles of row_tile rows."""
    if backend != "triton":
        plan = "torch" if backend == "torch" else None
        return {"strategy": plan, "row_tile": None, "plan": plan}
    row_tile = getattr(batch, "row_tile", None)     # None: the AdapterBatch could not be built
    return {"strategy": "segmented", "row_tile": row_tile,
            "plan": "segmented" + (f", row tile {row_tile}" if row_tile else "")}


def run(units: list[tuple[list[Case], tuple[str, ...]]], providers: tuple[str, ...], lean_variants: tuple[str, ...],
        device: torch.device, dtype: torch.dtype, min_run_time: float, repeats: int = 1,
        peak: harness.Peak | None = None, graph_max_tokens: int = 0) -> list[dict]:
    """graph_max_tokens: on CUDA, units whose batches have at most this many rows are timed as CUDA-graph
    replays (decode steps, as a serving engine runs them)."""
    names = [p for p in providers if p != "lean_torch"] + [f"lean_{v}" for v in lean_variants
                                                           if "lean_torch" in providers]
    rows: list[dict] = []
    bar = harness.Progress(sum(len(cases) * len(modes) for cases, modes in units))
    stacks: dict[tuple, Stack] = {}
    for cases, modes in units:
        if not {c.stack_key for c in cases} & stacks.keys():
            stacks.clear()      # units come grouped by stack: keep only the current ones (and their PEFT models)
        preps = [prepare(c, stacks, providers, device, dtype, min_run_time) for c in cases]
        for mode in modes:
            t_unit, cpu_start = time.perf_counter(), harness.cpu_seconds()
            steps, errors = {}, []
            for i, prep in enumerate(preps):             # build and check everything first, then time it
                ready, errs = ready_providers(prep, names, mode)
                errors.append(errs)
                steps.update({(i, name): lora.step_fn(p, mode, prep.x, prep.grad_y) for name, p in ready.items()})
            unit_rows = {i: case_row(prep, mode) for i, prep in enumerate(preps)}
            graph = device.type == "cuda" and max(prep.m for prep in preps) <= graph_max_tokens
            lora.time_rows(unit_rows, steps, names, device, min_run_time, repeats, cuda_graph=graph, rounds=True)
            cpu_end = harness.cpu_seconds()
            others = (None if cpu_start is None or cpu_end is None else round(max(
                0.0, (cpu_end[0] - cpu_start[0]) - (cpu_end[1] - cpu_start[1])) / (time.perf_counter() - t_unit), 2))
            for i, prep in enumerate(preps):
                row = finish_row(unit_rows[i], prep, names, lean_variants, errors[i], device, peak)
                row["others_cpu"] = others
                rows.append(row)
                lora.row_done(row, names, providers, f"{prep.case.label} M={prep.m} {mode}", bar,
                              (f" batch={row['batch_ms']:.3g}ms" if row.get("batch_ms") is not None else "")
                              + (f" (other processes used {others:.2f} CPUs meanwhile)" if (others or 0) > 0.2 else ""),
                              case=f"{prep.case.label} {mode}")
    return rows


# ----------------------------------------------------------------------------- derived tables


def _goal(mode: str, workload: str, m: int, by_adapters: dict[int, dict]) -> tuple[str | None, str | None]:
    """The issue's goal for one (shape, r, mode, workload, M) of distinct rows, and whether it is met
    ("yes", "no", or None when a number is missing)."""
    if mode != "fwd":
        return None, None
    limits = []                                   # (value, bound)
    if workload == "decode" and m == GOAL_DECODE_M:
        adapters = [n for n in GOAL_DECODE_ADAPTERS if n in by_adapters]
        limits += [(by_adapters[n].get("overhead_pct"), GOAL_DECODE_OVERHEAD_PCT) for n in adapters]
        goal = f"+% ≤ {GOAL_DECODE_OVERHEAD_PCT:g} at L {', '.join(map(str, adapters))}" if adapters else ""
        if GOAL_DISTINCT_L in by_adapters:
            limits.append((by_adapters[GOAL_DISTINCT_L].get("ours_over_shared"), GOAL_DISTINCT_RATIO))
            goal += f"{'; ' if goal else ''}L={GOAL_DISTINCT_L} ours/shared ≤ {GOAL_DISTINCT_RATIO}×"
    elif workload == "prefill" and m >= GOAL_PREFILL_MIN_M:
        limits += [(row.get("overhead_pct"), GOAL_PREFILL_OVERHEAD_PCT) for row in by_adapters.values()]
        goal = f"+% ≤ {GOAL_PREFILL_OVERHEAD_PCT:g}"
    if not limits:
        return None, None
    if any(value is None for value, _ in limits):
        return goal, None
    return goal, "yes" if all(value <= bound for value, bound in limits) else "no"


CASE_KEYS = ("shape", "r", "mode", "workload", "requests", "m")
CASE_COLUMNS = ["shape", "r", "mode", "workload", ("requests", "R"), ("m", "M")]


def _grouped(rows: list[dict], keys: tuple[str, ...], by: str) -> dict[tuple, dict]:
    """Rows grouped by their values of keys, each group a dict: the row's value of `by` -> the row."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), {})[row[by]] = row
    return groups


def goals_table(rows: list[dict]) -> list[dict]:
    """Per (shape, r, mode, workload, R, M) of the `distinct` rows (no padding case): ours' overhead over
    the base GEMM at each L, and at L = GOAL_DISTINCT_L (the goal's; else the largest L run) the distinct
    adapters' time over one shared adapter (ours, PEFT's layer, lean / shared), with the issue's goal
    where one applies (judged on the same L as the ratio shown)."""
    distinct = [r for r in rows if r["popularity"] == "distinct" and not r["padding_case"]]
    out = []
    for key, by_adapters in _grouped(distinct, CASE_KEYS, "num_adapters").items():
        compared = GOAL_DISTINCT_L if GOAL_DISTINCT_L in by_adapters else max(by_adapters)
        most = by_adapters[compared]
        entry = {**dict(zip(CASE_KEYS, key)), "base_ms": most.get("base_ms")}
        for num_adapters in sorted(by_adapters):
            entry[f"ours_L{num_adapters}_overhead_pct"] = by_adapters[num_adapters].get("overhead_pct")
        entry["distinct_L"] = compared
        for p in ("ours", "peft_layer", "lean_torch"):
            entry[f"{p}_over_shared"] = harness.ratio(most.get(f"{p}_ms"), most.get("shared_ms"))
        entry["goal"], entry["goal_met"] = _goal(entry["mode"], entry["workload"], entry["m"], by_adapters)
        out.append(entry)
    return out


def goals_columns(entries: list[dict]) -> list:
    adapter_counts = sorted({int(k[len("ours_L"):-len("_overhead_pct")]) for e in entries for k in e
                             if k.startswith("ours_L")})
    return (CASE_COLUMNS + [("base_ms", "base ms")]
            + [(f"ours_L{n}_overhead_pct", f"ours +% L={n}") for n in adapter_counts]
            + [("distinct_L", "L"), ("ours_over_shared", "ours/shared ×"),
               ("peft_layer_over_shared", "peft layer/shared ×"), ("lean_torch_over_shared", "lean/shared ×"),
               ("goal", "goal (CUDA bf16 K=N=4096 r 16)"), ("goal_met", "met")])


def popularity_table(rows: list[dict]) -> list[dict]:
    """Per (shape, r, mode, workload, R, M, L) run under several popularities (no padding case): ours /
    shared under each popularity, and how many adapters each one used."""
    keys = (*CASE_KEYS, "num_adapters")
    compared = {key: by_popularity for key, by_popularity in
                _grouped([r for r in rows if not r["padding_case"]], keys, "popularity").items()
                if len(by_popularity) > 1}
    present = [p for p in POPULARITIES if any(p in by_popularity for by_popularity in compared.values())]
    out = []
    for key, by_popularity in compared.items():
        entry = dict(zip(keys, key))
        for p in present:
            entry[f"{p}_ours_over_shared"] = by_popularity[p].get("ours_over_shared") if p in by_popularity else None
        entry["used"] = " / ".join(str(by_popularity[p]["used"]) if p in by_popularity else "-" for p in present)
        out.append(entry)
    return out


def popularity_columns(entries: list[dict]) -> list:
    present = [p for p in POPULARITIES if any(f"{p}_ours_over_shared" in e for e in entries)]
    return (CASE_COLUMNS + [("num_adapters", "L")] + [(f"{p}_ours_over_shared", f"{p} ×") for p in present]
            + [("used", "used (" + " / ".join(present) + ")")])


def padding_table(rows: list[dict]) -> list[dict]:
    """Per padding case: ours with true rank r in a stack padded to R (ranks=) against an unpadded
    stack of r (the ideal: ratio 1) and against every adapter at R."""
    keys = ("shape", "workload", "requests", "m", "num_adapters", "popularity", "mode")
    out = []
    for key, by_rank in _grouped([r for r in rows if r["padding_case"]], keys, "r").items():
        for label, r in by_rank.items():
            if " of " not in label:
                continue
            rank, padded = (int(v) for v in label.split(" of "))
            unpadded, full = by_rank.get(str(rank), {}), by_rank.get(str(padded), {})
            out.append({**dict(zip(keys, key)), "rank": rank, "padded": padded, "r": label,
                        "ours_padded_ms": r.get("ours_ms"), "ours_unpadded_ms": unpadded.get("ours_ms"),
                        "ours_full_rank_ms": full.get("ours_ms"),
                        "padded_vs_unpadded": harness.ratio(r.get("ours_ms"), unpadded.get("ours_ms")),
                        "padded_vs_full_rank": harness.ratio(r.get("ours_ms"), full.get("ours_ms")),
                        "lean_padded_ms": r.get("lean_torch_ms"), "lean_padded_variant": r.get("lean_variant"),
                        "peft_layer_padded_ms": r.get("peft_layer_ms")})
    return out


PADDING_COLUMNS = [
    "shape", "workload", ("m", "M"), ("num_adapters", "L"), "popularity", "mode", "r",
    ("ours_padded_ms", "ours padded ms"), ("ours_unpadded_ms", "ours r ms (unpadded)"),
    ("ours_full_rank_ms", "ours R ms"), ("padded_vs_unpadded", "padded / unpadded ×"),
    ("padded_vs_full_rank", "padded / R ×"), ("lean_padded_ms", "lean padded ms"), ("lean_padded_variant", "lean"),
    ("peft_layer_padded_ms", "peft layer padded ms"),
]


# ----------------------------------------------------------------------------- CLI


def shape_list(text: str) -> tuple[Shape, ...]:
    """"576,4096x1024" -> square 576→576 and 4096→1024 layers (K, or KxN)."""
    shapes = []
    for item in harness.str_list(text):
        k, _, n = item.partition("x")
        shapes.append(layer_shape(int(k), int(n or k)))
    return tuple(shapes)


def rank_list(text: str) -> tuple[Ranks, ...]:
    """"16,mixed" -> every adapter at rank 16; the mixed-rank stack."""
    return tuple(MIXED if v == "mixed" else Ranks(int(v)) for v in harness.str_list(text))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="Llama-3-8B q/o, k/v and SmolLM2 q/o; r 16/64/mixed; decode 1..256 requests, ragged "
                             "prefills of about 8192 rows; L 1..128; every popularity")
    harness.add_device_options(parser)
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="lora_kernels.set_backend for ours (auto: triton on cuda, torch on cpu)")
    harness.add_output_options(parser)
    parser.add_argument("--name", help="result file stem (default: multi_lora_linear, or multi_lora_linear_full)")
    parser.add_argument("--providers", type=harness.str_list, default=PROVIDERS,
                        help=f"subset of {','.join(PROVIDERS)}")
    parser.add_argument("--lean-variants", type=harness.str_list, default=LEAN_VARIANTS,
                        help=f"which plain-torch compositions lean_torch picks from: {','.join(LEAN_VARIANTS)}")
    parser.add_argument("--modes", type=harness.str_list, default=MODES,
                        help="fwd, fwd_bwd or both: a subset of each group's modes (the decode groups are fwd only)")
    parser.add_argument("--shapes", type=shape_list,
                        help="layers K (square) or KxN, e.g. 576,4096x1024 (default: 1024 on cpu, 4096 on cuda; "
                             "--full: 4096,4096x1024,576)")
    parser.add_argument("--ranks", type=rank_list,
                        help=f"override the ranks: integers, or mixed (a stack of {MIXED.padded}, adapter j of true "
                             f"rank {'/'.join(map(str, MIXED_RANK_CYCLE))}[j mod {len(MIXED_RANK_CYCLE)}]), "
                             "e.g. 16,mixed")
    parser.add_argument("--adapters", type=harness.int_list, help="override the adapter counts L, e.g. 1,8,64")
    parser.add_argument("--popularity", type=harness.str_list,
                        help="override how requests pick adapters: " + "; ".join(
                            f"{k}: {v}" for k, v in POPULARITY_HELP.items()).replace("%", "%%"))
    parser.add_argument("--workloads", type=harness.str_list, default=WORKLOADS, help="decode, prefill or both")
    parser.add_argument("--decode-requests", type=harness.int_list,
                        help="override decode's request counts R (one row each), e.g. 1,64,256")
    parser.add_argument("--prefill-requests", type=harness.int_list,
                        help="override prefill's request counts R, e.g. 16")
    parser.add_argument("--prefill-lengths", type=harness.int_list,
                        help="override prefill's request lengths LO,HI (each drawn uniformly in [LO, HI]), "
                             "e.g. 256,768")
    parser.add_argument("--padding", action=argparse.BooleanOptionalAction, default=True,
                        help="the padded-rank case (rank 8 in a stack of 64 vs 64 vs 8; default: yes)")
    harness.add_timing_options(
        parser, "CPU only: seconds blocked_autorange measures each provider for (over all rounds)", graphs=True)
    parser.add_argument("--repeats", type=int,
                        help="timing rounds per row, providers interleaved, order reversed every other round "
                             "(default: 2 on cpu, i.e. A B C .. C B A, which cancels a linear drift; 1 on cuda)")
    args = parser.parse_args(argv)
    harness.check_options(parser, args, [("--providers", args.providers, PROVIDERS),
                                         ("--modes", args.modes, MODES),
                                         ("--lean-variants", args.lean_variants, LEAN_VARIANTS),
                                         ("--popularity", args.popularity or (), POPULARITIES),
                                         ("--workloads", args.workloads, WORKLOADS)])
    if args.prefill_lengths and not (len(args.prefill_lengths) == 2 and 1 <= args.prefill_lengths[0]
                                     <= args.prefill_lengths[1]):
        parser.error("--prefill-lengths: expected LO,HI with 1 <= LO <= HI")
    if any(v < 1 for v in (*(args.adapters or ()), *(args.decode_requests or ()), *(args.prefill_requests or ()))):
        parser.error("--adapters, --decode-requests, --prefill-requests: expected positive integers")
    return args


def configured_workloads(workloads: tuple[Workload, ...], args: argparse.Namespace) -> tuple[Workload, ...]:
    """A group's workloads with the command line's overrides (request counts, prefill lengths) and
    filter (--workloads) applied."""
    out: list[Workload] = []
    for w in workloads:
        if w.kind not in args.workloads:
            continue
        if w.kind == "decode":
            new = [decode(r) for r in (args.decode_requests or (w.requests,))]
        else:
            low, high = args.prefill_lengths or (w.min_length, w.max_length)
            new = [prefill(r, low, high) for r in (args.prefill_requests or (w.requests,))]
        out += [n for n in new if n not in out]
    return tuple(out)


def configured_groups(args: argparse.Namespace, device: torch.device) -> list[Group]:
    groups = full_groups(args.shapes) if args.full else default_groups(device, args.shapes)
    out = []
    for g in groups:
        if g.padding and not args.padding:
            continue
        g = replace(g, adapters=args.adapters or g.adapters, workloads=configured_workloads(g.workloads, args),
                    popularities=args.popularity or g.popularities,
                    modes=tuple(m for m in g.modes if m in args.modes),
                    ranks=g.ranks if g.padding else args.ranks or g.ranks)     # the padding case keeps its stacks
        if g.modes and g.workloads:
            out.append(g)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = harness.setup(args)
    lora_kernels.set_backend(args.backend)
    providers = tuple(p for p in PROVIDERS if p in args.providers)
    lean_variants = tuple(v for v in LEAN_VARIANTS if v in args.lean_variants)
    units = expand(configured_groups(args, device))

    stamp = harness.environment_stamp(device, dtype)
    stamp["lora_kernels_backend"] = lora.lora_kernels_backend(device, dtype)
    try:
        from lora_kernels.metadata import check_adapter_ids_enabled  # internal: is the id check in "batch ms"
        stamp["adapter_id_check"] = check_adapter_ids_enabled(device)
    except Exception:  # noqa: BLE001
        stamp["adapter_id_check"] = None
    harness.progress(f"multi_lora_linear benchmark on {stamp['device_name']} ({dtype}, {stamp['torch_threads']} "
                     f"threads, ours via {stamp['lora_kernels_backend']}); providers {', '.join(providers)}"
                     + (f" (lean: {', '.join(lean_variants)})" if "lean_torch" in providers else ""))

    t0 = time.perf_counter()
    repeats = args.repeats or (2 if device.type == "cpu" else 1)
    stamp["timing_rounds"] = repeats
    peak = harness.measure_peak_and_warm_up(device, dtype, stamp, args.min_run_time)
    graph_max_tokens = args.graph_max_tokens if device.type == "cuda" else 0
    rows = run(units, providers, lean_variants, device, dtype, args.min_run_time, repeats, peak, graph_max_tokens)
    wall = time.perf_counter() - t0

    columns = harness.visible_columns(rows, providers, TABLE_COLUMNS, CUDA_COLUMNS, device)
    goals, popularity, padding = goals_table(rows), popularity_table(rows), padding_table(rows)
    peft_train = lora.PEFT_TRAIN_MESSAGE[0] if lora.PEFT_TRAIN_MESSAGE else "(not asked: PEFT was not run)"
    notes = [
        (f"Times are medians in ms ({harness.timer_name(device)}; p20/p80 in the JSON)"
         + (f", median of {repeats} interleaved rounds per provider (each round's median in the JSON as "
            "<provider>_rounds_ms)" if repeats > 1 else "") + ". ours/base-1 % = LoRA overhead of ours over the "
         "base layer alone; ours/shared × = ours over the same rows all on adapter 0 through the single-adapter "
         "lora_linear (what mixing adapters costs; with mixed ranks, adapter 0 has rank 8); × vs peft layer / "
         "× vs lean = their time / ours (> 1: ours is faster). r: LoRA rank (\"8 of 64\": true rank 8 in a stack "
         f"padded to 64; \"mixed\": a stack of {MIXED.padded}, adapter j of true rank "
         f"{'/'.join(map(str, MIXED_RANK_CYCLE))}[j mod {len(MIXED_RANK_CYCLE)}], AdapterBatch(ranks=...)); "
         "L: adapters in the stack; used: adapters with at least one row."),
        ("Workloads: decode = R requests of one row each (M = R); prefill = R requests of lengths drawn uniformly "
         "in [min_length, max_length] (in the JSON), each request's rows contiguous (M = their sum). Popularity, "
         "how requests pick adapters (seeded): " + "; ".join(f"{k}: {v}" for k, v in POPULARITY_HELP.items()) + "."),
        ("ours runs with an AdapterBatch built once per batch (as every layer of a model reuses it); "
         "batch ms = one AdapterBatch(ids, L, ranks) build, paid once per batch, not per layer. "
         "peft ms = model(x, adapter_names=[...]) on a real PEFT model (one LoRA layer; includes PEFT's per-forward "
         "hook set-up, paid once per model call); peft layer ms = that LoRA layer called with adapter_names directly "
         "(PEFT's per-layer cost; × vs peft layer compares with this, the smaller of the two). "
         "lean = the fastest plain-torch composition of loop (grouped rows, per-adapter matmuls, index_add_), "
         "gather (bmm over per-row gathered weights) and dense (all adapters on all rows, masked); each variant's "
         "time is in the JSON as lean_<variant>_ms. Per-batch set-up of lean (grouping, masks) is not timed, "
         "like ours' AdapterBatch."),
        (f"PEFT has no fwd_bwd here: mixed adapter batches are inference-only. Asked in training mode, "
         f"model(x, adapter_names=...) says: {peft_train}"),
        FLOPS_NOTE,
        lora.PEAK_NOTE.format(how=peak.how, tflops=peak.tflops, gbps=peak.gbps),
        ("other CPUs: CPU time other processes used while the row ran, in CPUs (from /proc/stat); on a CPU run, "
         f"rows well above 0 were timed on a shared machine and may be inflated. This run: "
         f"{sum(1 for r in rows if (r.get('others_cpu') or 0) > 0.2)} of {len(rows)} rows above 0.2."),
    ]
    if graph_max_tokens:
        notes.append(f"Batches of at most {graph_max_tokens} rows are timed as replays of one call captured in a CUDA "
                     "graph (column timed: cuda graph), as a serving engine runs decode steps; a provider that cannot "
                     "be captured (PEFT's per-call index lists, the torch backend's host reads) is timed eagerly "
                     "(timed names it; <provider>_graph_error in the JSON says why).")
    if goals:
        notes.append(("Distinct adapters (popularity distinct): overhead of ours over the base GEMM per adapter count "
                      "L, and at L = 64 (else the largest L run) the time over one shared adapter (same rows through "
                      "lora_linear). "
                      "The goals are the issue's, stated for CUDA bf16 K=N=4096 r=16 fwd (prefill: a ragged batch "
                      f"of at least {GOAL_PREFILL_MIN_M} rows); elsewhere they are shown for reference only.\n\n")
                     + harness.markdown_table(goals, goals_columns(goals)))
    if popularity:
        notes.append("Popularity: ours / shared under each popularity (same shape, r, mode, workload and L); used = "
                     "adapters with rows under each.\n\n" + harness.markdown_table(popularity,
                                                                                  popularity_columns(popularity)))
    if padding:
        notes.append("Padding: adapters of true rank r in a stack padded to R (AdapterBatch ranks=...) against an "
                     "unpadded stack of r (1.00 = padding costs nothing) and against all adapters at R.\n\n"
                     + harness.markdown_table(padding, PADDING_COLUMNS))
    name = args.name or ("multi_lora_linear_full" if args.full else "multi_lora_linear")
    plot = harness.PlotSpec(tuple(n for n in ("base", "ours", "shared", "peft_layer", "lean_torch") if n in providers),
                            panel=("shape", "r", "num_adapters", "popularity", "mode"),
                            title=f"multi_lora_linear on {stamp['device_name']}, {stamp['dtype']} "
                                  "(decode and prefill batches; padding case left out)",
                            keep=lambda row: not row["padding_case"])
    harness.report(rows, columns, notes, stamp, wall, args, name, plot,
                   extra={"goals": goals, "popularity": popularity, "padding": padding})
    return lora.exit_status(rows, providers)


if __name__ == "__main__":
    sys.exit(main())
