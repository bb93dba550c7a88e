"""The one benchmark harness: timing, peak memory, an environment stamp, and result files.

Every bench script imports this module; it knows nothing about LoRA.

    time_fn(fn, device)              -> Timing(median_ms, p20_ms, p80_ms, samples)
    timer_name(device)               -> what time_fn measures with there, for a table's notes
    peak_memory_mib(fn, device)      -> extra CUDA memory one call allocates at its peak (None on CPU)
    environment_stamp(device, dtype) -> dict: device name, versions, git commit, date, threads
    stamp_run_end(stamp, wall_s)     -> adds the run's wall time and the load average at its end
    write_results(name, rows, stamp) -> bench/results/<name>-<device kind>.json and .md
    print_table(rows)                -> the same Markdown table, on stdout

and what the scripts' rows and command lines have in common: visible_columns, ratio, safe_check;
the options add_device_options, add_output_options, add_timing_options, checked by check_options
and read by device_and_dtype.

Rows are flat dicts; a column is any key, in the order of first appearance. None prints as "-".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Tuple, Union

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# CPU timing: blocked_autorange runs for at least this long per measurement (plus a short
# block-size estimate, which doubles as warm-up). 0.2 s keeps the default CPU run near a minute.
CPU_MIN_RUN_TIME_S = 0.2
# ...and keeps measuring until it has this many blocks (percentiles of 2 samples mean little),
# unless a single call is so slow that this would take longer than CPU_MAX_TIME_S.
CPU_MIN_SAMPLES = 5
CPU_MAX_TIME_S = 2.0
# CUDA timing (triton.testing.do_bench): warm-up and measurement windows in ms.
CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int        # CPU: blocks of blocked_autorange; CUDA: -1 (do_bench does not say)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated q-quantile (0 <= q <= 1) of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _time_cpu(fn: Callable[[], Any], min_run_time: float) -> Timing:
    from torch.utils import benchmark

    # Timer defaults to ONE thread; time with the threads the process would really use.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times: list[float] = []
    spent = 0.0
    while True:
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        times.extend(measurement.times)              # seconds per call, one value per block
        spent += sum(measurement.raw_times)
        if len(times) >= CPU_MIN_SAMPLES or spent + min_run_time > CPU_MAX_TIME_S:
            break
    times_ms = sorted(t * 1e3 for t in times)
    return Timing(_percentile(times_ms, 0.5), _percentile(times_ms, 0.2), _percentile(times_ms, 0.8), len(times_ms))


def _time_cuda_events(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> Timing:
    """do_bench's method without triton: warm up, then time each call with CUDA events.
    (No L2 flush between calls, unlike do_bench.)"""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        fn()
    n_rep = max(1, int(rep_ms / estimate_ms))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times_ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(_percentile(times_ms, 0.5), _percentile(times_ms, 0.2), _percentile(times_ms, 0.8), len(times_ms))


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, min_run_time: float = CPU_MIN_RUN_TIME_S) -> Timing:
    """Median, p20 and p80 wall time of fn() in ms. CUDA: triton.testing.do_bench (L2 flushed
    between calls), or CUDA events when triton is missing. CPU: torch.utils.benchmark's
    blocked_autorange with the process's thread count; percentiles over its per-block means."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton.testing   # lazily: importing the harness must not need triton
        except ImportError:
            return _time_cuda_events(fn, CUDA_WARMUP_MS, CUDA_REP_MS)
        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80, -1)
    return _time_cpu(fn, min_run_time)


def timer_name(device: torch.device | str) -> str:
    """What time_fn measures with on this device, for the notes under a table."""
    if torch.device(device).type == "cuda":
        return "triton.testing.do_bench"
    return "torch.utils.benchmark blocked_autorange"


def warm_up(device: torch.device | str, seconds: float = 0.3) -> None:
    """Matmuls for a moment before the first measurement: wakes the thread pool / the GPU clocks
    and pays one-time library initialisation outside any timing."""
    device = torch.device(device)
    a = torch.randn(512, 512, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = (a @ a).tanh_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """CUDA memory one call of fn() allocates at its peak, above what was allocated before it
    (inputs and weights excluded), in MiB. None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / 2**20


# ----------------------------------------------------------------------------- environment


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    """The module's version without importing it when it is absent (triton is optional)."""
    try:
        from importlib import metadata

        return metadata.version(module)
    except Exception:   # noqa: BLE001 - any failure means "not installed / unknown"
        return None


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def device_kind(device: torch.device | str) -> str:
    return torch.device(device).type


def environment_stamp(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What a result needs to be reproduced and compared: where, with what, when."""
    device = torch.device(device)
    stamp: dict[str, Any] = {
        "device_kind": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()),
        "cpu": _cpu_name(),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": _load_average(),     # > ~0.5 before a CPU run: something else is competing
    }
    if device.type == "cuda":
        stamp["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return stamp


def stamp_run_end(stamp: dict[str, Any], wall_s: float) -> None:
    """Add the end-of-run fields to an environment_stamp: the run's wall time and the load average at its end."""
    stamp["wall_s"] = round(wall_s, 1)
    stamp["load_average_1m_end"] = _load_average()


# ----------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value != value:                  # NaN
            return "-"
        if value == 0:
            return "0"
        a = abs(value)
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        if a >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


Columns = Sequence[Union[str, Tuple[str, str]]]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Columns | None = None) -> str:
    """columns: row keys, or (key, header) pairs; default: every key, as its own header.
    Numeric columns are right-aligned."""
    if not rows:
        return "(no rows)\n"
    pairs = [c if isinstance(c, tuple) else (c, c) for c in (columns if columns is not None else _columns(rows))]
    keys, headers = [k for k, _ in pairs], [h for _, h in pairs]
    cells = [[_fmt(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    right = [all(isinstance(row.get(k), (int, float)) or row.get(k) is None for row in rows) for k in keys]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)]) + "\n"


def print_table(rows: Sequence[dict[str, Any]], columns: Columns | None = None, file=None) -> None:
    print(markdown_table(rows, columns), end="", file=file or sys.stdout, flush=True)


def progress(message: str) -> None:
    """One line per unit of work, on stderr so stdout keeps only the table."""
    print(message, file=sys.stderr, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(
    name: str, rows: Sequence[dict[str, Any]], stamp: dict[str, Any], *,
    notes: Sequence[str] = (), columns: Columns | None = None, results_dir: Path | str = RESULTS_DIR,
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write <results_dir>/<name>-<device kind>.json (stamp, notes, rows) and .md (stamp, notes,
    table). extra: more top-level JSON fields (e.g. derived summaries), not written to the .md.
    Returns both paths."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{stamp.get('device_kind', 'unknown')}"
    json_path, md_path = results_dir / f"{stem}.json", results_dir / f"{stem}.md"
    _write_atomic(json_path, json.dumps({"benchmark": name, "environment": stamp, "notes": list(notes),
                                         "rows": list(rows), **(extra or {})}, indent=1, ensure_ascii=False) + "\n")
    md = [f"# {name} ({stamp.get('device_kind')})", ""]
    md += [f"- **{k}**: {v}" for k, v in stamp.items()]
    for note in notes:
        md += ["", note]
    md += ["", markdown_table(rows, columns)]
    _write_atomic(md_path, "\n".join(md))
    return json_path, md_path


# ----------------------------------------------------------------------------- rows and checks


def visible_columns(rows: Sequence[dict[str, Any]], providers: Sequence[str], table_columns: Columns,
                    cuda_columns: Columns, needs: dict[str, str], device: torch.device | str) -> list:
    """The table's columns for this run: those whose provider ran (needs: column key -> provider,
    "ours" when not listed), on CUDA the <provider>_peak_mib ones too, and "errors" when a row has one."""
    columns = [c for c in table_columns if needs.get(c[0], "ours") in providers]
    if torch.device(device).type == "cuda":
        columns += [c for c in cuda_columns if c[0].rsplit("_peak", 1)[0] in providers]
    if any(row.get("errors") for row in rows):
        columns.append(("errors", "errors"))
    return columns


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    return a / b if a is not None and b is not None and b > 0 else None


def safe_check(fn: Callable[[], str | None]) -> str | None:
    """fn() (a check: None, or what is wrong); an exception it raises is a failed check too."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with its type
        return f"raised {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- command line


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def float_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device (default: cuda when available) and --dtype (default: see device_and_dtype)."""
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--out / --no-out and --results-dir: whether and where write_results writes."""
    parser.add_argument("--out", action=argparse.BooleanOptionalAction, default=True,
                        help="write bench/results/<name>-<device>.json and .md (default: yes)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def add_timing_options(parser: argparse.ArgumentParser,
                       min_run_time_help: str = "CPU only: seconds blocked_autorange measures each provider for",
                       ) -> None:
    """--threads and --min-run-time (time_fn's CPU measuring time)."""
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing (default: torch's choice)")
    parser.add_argument("--min-run-time", type=float, default=CPU_MIN_RUN_TIME_S, help=min_run_time_help)


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  comma_lists: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> None:
    """parser.error unless every (option, values, allowed) has only allowed values and a --device
    cuda run has a GPU."""
    for option, values, allowed in comma_lists:
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"{option}: unknown {bad}; expected a comma list of {allowed}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device, and --dtype or the device's default: bf16 on cuda, fp32 on cpu."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype
