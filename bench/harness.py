"""The one benchmark harness: timing, peak memory, an environment stamp, tables and result files, and the
command-line options the scripts share. It knows nothing about LoRA.

Rows are flat dicts; a column is any key, in the order of first appearance. None prints as "-".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
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
# On CUDA, batches of at most this many tokens are timed as replays of a captured CUDA graph (decode
# sizes: there the CPU's launch overhead, not the GPU, sets the eager time; serving engines replay graphs).
GRAPH_MAX_TOKENS = 256
# CUDA timing (triton.testing.do_bench): warm-up and measurement windows in ms.
CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int        # CPU: blocks of blocked_autorange; CUDA: -1 (do_bench does not say)
    method: str = ""    # "cpu", "cuda" (eager launches), "cuda graph" (replays of one captured call)
    graph_error: str | None = None      # cuda_graph=True but fn could not be captured: why
    rounds_ms: tuple[float, ...] = ()   # time_interleaved: each round's median, in round order


def _timing(times_ms: Sequence[float], method: str) -> Timing:
    """Median, p20 and p80 of the times, linearly interpolated."""
    values = sorted(times_ms)

    def percentile(q: float) -> float:
        pos = q * (len(values) - 1)
        lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (pos - lo)
    return Timing(percentile(0.5), percentile(0.2), percentile(0.8), len(values), method)


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
    return _timing([t * 1e3 for t in times], "cpu")


def _time_cuda_events(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> Timing:
    """do_bench's method without triton (a CUDA torch without it): warm up, then time each call with CUDA
    events. (No L2 flush between calls, unlike do_bench.)"""
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
    return _timing([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda")


def _capture_cuda_graph(fn: Callable[[], Any]):
    """fn() captured in a CUDA graph, or the reason it cannot be.

    A call that synchronises with the host (a .item(), a .tolist(), a copy from pageable memory, as
    PEFT's per-call index lists make) cannot be captured. It is found first, outside any capture, by
    one call under torch's sync debug mode "error", because a capture that fails midway can leave the
    stream and the caching allocator in a state that breaks every later capture. Then torch's recipe:
    warm-up calls on a side stream (lazy initialisation, autotuning and cuBLAS workspaces happen
    outside the graph), one capture, one replay."""
    previous_mode = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)
    except Exception as e:  # noqa: BLE001 - a host synchronisation: time eagerly, nothing was captured
        torch.cuda.synchronize()
        return f"synchronises with the host, so it cannot be captured: {_first_line(e)}"
    stream = torch.cuda.current_stream()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        stream.wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph
    except Exception as e:  # noqa: BLE001 - any other failure: time the call eagerly instead
        torch.cuda.set_stream(stream)   # a failed capture_end skips torch.cuda.graph's own restore
        # the capture's end raises over fn's own error: report the one that caused it
        reason = _first_line(e.__context__ if e.__context__ is not None else e)
        try:
            torch.cuda.synchronize()
        except Exception as sync_error:  # noqa: BLE001
            raise RuntimeError(f"CUDA unusable after a failed graph capture ({reason})") from sync_error
        return f"capture failed: {reason}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, min_run_time: float = CPU_MIN_RUN_TIME_S,
            cuda_graph: bool = False) -> Timing:
    """Median, p20 and p80 wall time of fn() in ms. CUDA: triton.testing.do_bench (L2 flushed between
    calls), or CUDA events when triton is missing. CPU: torch.utils.benchmark's blocked_autorange with the
    process's thread count; percentiles over its per-block means.

    cuda_graph (CUDA only): time replays of fn captured once in a CUDA graph, as a serving engine runs
    its decode steps: the CPU's launch overhead is gone and only the GPU's time is left. When fn cannot
    be captured it is timed eagerly: Timing.method then says "cuda", and Timing.graph_error why."""
    device = torch.device(device)
    if device.type != "cuda":
        return _time_cpu(fn, min_run_time)
    method, graph_error = "cuda", None
    if cuda_graph:
        graph = _capture_cuda_graph(fn)
        if isinstance(graph, str):
            graph_error = graph
        else:
            fn, method = graph.replay, "cuda graph"
    try:
        import triton.testing   # lazily: importing the harness (and timing on CPU) must not need triton
    except ImportError:
        timing = _time_cuda_events(fn, CUDA_WARMUP_MS, CUDA_REP_MS)
        return Timing(timing.median_ms, timing.p20_ms, timing.p80_ms, timing.samples, method, graph_error)
    median, p20, p80 = triton.testing.do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80, -1, method, graph_error)


def time_interleaved(steps: dict[Any, Callable[[], Any]], device: torch.device | str, min_run_time: float,
                     repeats: int = 1, cuda_graph: bool = False) -> dict[Any, Timing]:
    """time_fn on every step, `repeats` rounds interleaved (provider order reversed every other round)
    with min_run_time / repeats each: slow drift of a shared machine (clock, neighbours) then hits every
    provider of a row alike instead of whichever was timed during it, at the same total time. Per step:
    the median of the rounds' medians, the lowest p20 and the highest p80 of any round, the last round's
    method and graph_error, and rounds_ms."""
    per_round = min_run_time / max(repeats, 1)
    rounds: dict[Any, list[Timing]] = {key: [] for key in steps}
    order = list(steps)
    for i in range(max(repeats, 1)):
        for key in (order if i % 2 == 0 else order[::-1]):
            rounds[key].append(time_fn(steps[key], device, min_run_time=per_round, cuda_graph=cuda_graph))
    out = {}
    for key, timings in rounds.items():
        medians = tuple(t.median_ms for t in timings)
        out[key] = Timing(statistics.median(medians), min(t.p20_ms for t in timings), max(t.p80_ms for t in timings),
                          sum(t.samples for t in timings), timings[-1].method, timings[-1].graph_error, medians)
    return out


def timer_name(device: torch.device | str) -> str:
    """What time_fn measures with on this device, for the notes under a table."""
    if torch.device(device).type == "cuda":
        return "triton.testing.do_bench"
    return "torch.utils.benchmark blocked_autorange"


def synchronized(fn: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """fn, then on CUDA a device synchronisation: for wall-clock timers such as pytest-benchmark's."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return call


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


# ----------------------------------------------------------------------------- peaks and the roofline


@dataclass(frozen=True)
class Peak:
    """What this device reaches, measured here: the fractions in a table are of these, not of a datasheet."""
    tflops: float           # one large square GEMM in the benchmark's dtype
    gbps: float             # one large device-to-device copy: (bytes read + bytes written) / time
    how: str                # what was run, for the notes


def measure_peak(device: torch.device | str, dtype: torch.dtype, *, min_run_time: float = CPU_MIN_RUN_TIME_S) -> Peak:
    """Attainable compute and memory bandwidth: an n×n×n GEMM (n = 8192 on CUDA, 2048 on CPU) and a
    copy of 1 GiB (CUDA; 256 MiB on CPU, far beyond its caches). A kernel's "% of peak" is then its
    distance from what this very machine can do, in the same dtype and library."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    gemm_ms = time_fn(lambda: a @ b, device, min_run_time=min_run_time).median_ms
    copy_bytes = (2**30 if cuda else 2**28)
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_ms = time_fn(lambda: dst.copy_(src), device, min_run_time=min_run_time).median_ms
    name = str(dtype).replace("torch.", "")
    return Peak(tflops=2 * n**3 / (gemm_ms * 1e-3) / 1e12, gbps=2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
                how=f"{n}×{n}×{n} {name} GEMM (torch.matmul) and a {copy_bytes // 2**20} MiB copy_, "
                    "timed as the rows are")


def measure_peak_and_warm_up(device: torch.device | str, dtype: torch.dtype, stamp: dict[str, Any],
                             min_run_time: float = CPU_MIN_RUN_TIME_S) -> Peak:
    """A run's start: measure_peak, recorded in the stamp (peak_tflops, peak_gbps), then a second of matmuls
    right before the first row: wakes the thread pool / the GPU clocks and pays one-time library
    initialisation outside any timing (the first rows have come out 2-3x slow in some CPU runs without it)."""
    device = torch.device(device)
    peak = measure_peak(device, dtype, min_run_time=min_run_time)
    stamp["peak_tflops"], stamp["peak_gbps"] = round(peak.tflops, 3), round(peak.gbps, 1)
    a = torch.randn(512, 512, device=device)
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        a = (a @ a).tanh_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return peak


def roofline(flops: float, bytes_moved: float, ms: float | None, peak: Peak | None) -> dict[str, float | None]:
    """Achieved TFLOP/s and GB/s of a call that does `flops` and must move at least `bytes_moved`,
    and how close it is to the measured roofline: 100 · max(TFLOP/s / peak TFLOP/s, GB/s / peak GB/s)
    (the bound that limits it; 100 % = as fast as this machine's GEMM or copy can be)."""
    if not ms:
        return {"tflops": None, "gbps": None, "peak_pct": None}
    tflops = flops / (ms * 1e-3) / 1e12
    gbps = bytes_moved / (ms * 1e-3) / 1e9
    pct = None if peak is None else 100 * max(tflops / peak.tflops, gbps / peak.gbps)
    return {"tflops": tflops, "gbps": gbps, "peak_pct": pct}


# ----------------------------------------------------------------------------- progress


class Progress:
    """A progress bar for sweeps: progress.step(message) after each unit of work prints one line on
    stderr (stdout keeps only the tables), e.g.
        [#######.............]  12/34  35%  0:41 elapsed, ~1:15 left | Llama-3-8B q/o M=64 fwd: ours=...
    """

    WIDTH = 20

    def __init__(self, total: int, file=None):
        self.total, self.done = max(total, 0), 0
        self.start = time.perf_counter()
        self.file = file

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(round(seconds))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
            else f"{seconds // 60}:{seconds % 60:02d}"

    def line(self, message: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        fraction = self.done / self.total if self.total else 1.0
        filled = int(self.WIDTH * min(fraction, 1.0))
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        width = len(str(self.total))
        text = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done:>{width}}/{self.total} "
                f"{100 * fraction:3.0f}%  {self._clock(elapsed)} elapsed"
                + (f", ~{self._clock(left)} left" if left is not None else ""))
        return text + (f" | {message}" if message else "")

    def step(self, message: str = "", count: int = 1) -> None:
        self.done += count
        print(self.line(message), file=self.file or sys.stderr, flush=True)


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
            # committed result files rewritten by an earlier run do not make the code dirty
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                    ":(exclude)bench/results"], cwd=REPO_ROOT, capture_output=True, text=True,
                                   timeout=10)
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


def cpu_seconds() -> tuple[float, float] | None:
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


def device_kind(device: torch.device | str) -> str:
    """The device in result file names (<name>-<device kind>.json): the GPU's model on CUDA (h200, a100),
    so runs on two GPU models do not overwrite each other; else the device type ("cpu"). The slug of
    lora_kernels' plan tables (lora_kernels.tuning.device_kind): a GPU's results and plans share one name."""
    from lora_kernels.tuning import device_kind as plan_table_kind     # lazily: importing the harness stays torch-only

    return plan_table_kind(device)


def environment_stamp(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """What a result needs to be reproduced and compared: where, with what, when."""
    device = torch.device(device)
    stamp: dict[str, Any] = {
        "device_kind": device_kind(device),
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
    if device.type == "cuda":   # cuBLAS's fp32 mode: allow_tf32's getter raises once fp32_precision alone was set
        matmul = torch.backends.cuda.matmul
        stamp["allow_tf32"] = (matmul.fp32_precision == "tf32" if hasattr(torch.backends, "fp32_precision")
                               else matmul.allow_tf32)
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


Columns = Sequence[Union[str, Tuple[str, str]]]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Columns | None = None) -> str:
    """columns: row keys, or (key, header) pairs; default: every key, as its own header.
    Numeric columns are right-aligned."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    pairs = [c if isinstance(c, tuple) else (c, c) for c in columns]
    keys, headers = [k for k, _ in pairs], [h for _, h in pairs]
    cells = [[_fmt(row.get(k)) for k in keys] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    right = [all(isinstance(row.get(k), (int, float)) or row.get(k) is None for row in rows) for k in keys]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)]) + "\n"


def print_table(rows: Sequence[dict[str, Any]], columns: Columns | None = None) -> None:
    print(markdown_table(rows, columns), end="", flush=True)


def progress(message: str) -> None:
    """One line per unit of work, on stderr so stdout keeps only the table."""
    print(message, file=sys.stderr, flush=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class PlotSpec:
    """A plot of time against x for each provider: one panel per distinct value of the `panel` keys,
    one line per provider (its "<provider>_ms" key), log-log. Within a panel, the rows must differ in x."""
    providers: Sequence[str]
    panel: Sequence[str]
    x: str = "m"
    x_label: str = "tokens M (rows of x)"
    title: str = ""
    keep: Callable[[dict[str, Any]], bool] = lambda row: True     # which rows are plotted


PLOT_COLUMNS = 3


def write_plot(path: Path | str, rows: Sequence[dict[str, Any]], spec: PlotSpec) -> Path | None:
    """A matplotlib PNG of spec (see PlotSpec); None, with a line on stderr, when matplotlib is missing
    or no row has a time (a missing time is a gap in its line, never a zero)."""
    try:
        import matplotlib
        matplotlib.use("Agg")           # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        progress("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    panels: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if spec.keep(row) and any(row.get(f"{p}_ms") is not None for p in spec.providers):
            panels.setdefault(tuple(row.get(k) for k in spec.panel), []).append(row)
    if not panels:
        progress("plot skipped: no timed rows")
        return None
    n_cols = min(PLOT_COLUMNS, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5.2 * n_cols, 3.8 * n_rows), squeeze=False)
    for ax, (key, panel_rows) in zip(axes.flat, panels.items()):
        for provider in spec.providers:
            points = sorted((r[spec.x], r[f"{provider}_ms"]) for r in panel_rows if r.get(f"{provider}_ms") is not None)
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", markersize=3, label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")                          # 1, 16, 0.5: not 2^k, 5×10^-1
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(" · ".join(f"{v}" if k in ("shape", "mode") else f"{k}={v}" for k, v in zip(spec.panel, key)),
                     fontsize=9)
        ax.set_xlabel(spec.x_label, fontsize=8)
        ax.set_ylabel("ms (median)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if spec.title:
        fig.suptitle(spec.title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_results(
    name: str, rows: Sequence[dict[str, Any]], stamp: dict[str, Any], *,
    notes: Sequence[str] = (), columns: Columns | None = None, results_dir: Path | str = RESULTS_DIR,
    extra: dict[str, Any] | None = None, plot: PlotSpec | None = None,
) -> tuple[Path, ...]:
    """Write <results_dir>/<name>-<device kind>.json (stamp, notes, rows) and .md (stamp, notes,
    table), and with plot= a .png of it (write_plot; linked from the .md). extra: more top-level JSON
    fields (e.g. derived summaries), not written to the .md. Returns the paths written."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{stamp.get('device_kind', 'unknown')}"
    json_path, md_path = results_dir / f"{stem}.json", results_dir / f"{stem}.md"
    _write_atomic(json_path, json.dumps({"benchmark": name, "environment": stamp, "notes": list(notes),
                                         "rows": list(rows), **(extra or {})}, indent=1, ensure_ascii=False) + "\n")
    png_path = write_plot(results_dir / f"{stem}.png", rows, plot) if plot is not None else None
    md = [f"# {name} ({stamp.get('device_kind')})", ""]
    md += [f"- **{k}**: {v}" for k, v in stamp.items()]
    if png_path is not None:
        md += ["", f"![time vs {plot.x} per provider]({png_path.name})"]
    for note in notes:
        md += ["", note]
    md += ["", markdown_table(rows, columns)]
    _write_atomic(md_path, "\n".join(md))
    return (json_path, md_path) + ((png_path,) if png_path is not None else ())


def report(rows: Sequence[dict[str, Any]], columns: Columns, notes: Sequence[str], stamp: dict[str, Any],
           wall_s: float, args: argparse.Namespace, name: str, plot: PlotSpec | None = None,
           extra: dict[str, Any] | None = None) -> None:
    """A sweep's end: the table and the notes on stdout, "<n> rows in <s> s", and with --out the result
    files (write_results, the stamp completed by stamp_run_end) and the line "wrote <paths>"."""
    print()
    print_table(rows, columns)
    for note in notes:
        print()
        print(note)
    print(f"\n{len(rows)} rows in {wall_s:.0f} s")
    if args.out:
        stamp_run_end(stamp, wall_s)
        paths = write_results(name, rows, stamp, notes=notes, columns=columns, results_dir=args.results_dir,
                              extra=extra, plot=plot)
        print("wrote " + ", ".join(str(p) for p in paths))


# ----------------------------------------------------------------------------- rows and checks


def visible_columns(rows: Sequence[dict[str, Any]], providers: Sequence[str], table_columns: Sequence,
                    cuda_columns: Sequence, device: torch.device | str) -> list[tuple[str, str]]:
    """The table's (key, header) columns for this run. A column is a key (its own header), (key, header), or
    (key, header, the provider it needs: None = none); the first two need ours. The table_columns whose
    provider ran, on CUDA the cuda_columns too, and "errors" when a row has one."""
    columns = [*table_columns, *(cuda_columns if torch.device(device).type == "cuda" else ())]
    columns = [(c, c, "ours") if isinstance(c, str) else (*c, "ours") if len(c) == 2 else c for c in columns]
    visible = [(key, header) for key, header, needs in columns if needs is None or needs in providers]
    if any(row.get("errors") for row in rows):
        visible.append(("errors", "errors"))
    return visible


def timed_with(row: dict[str, Any], providers: Sequence[str]) -> str | None:
    """The row's timing method in one word ("cuda graph", "cuda"), naming the providers that differ."""
    methods = {p: row[f"{p}_method"] for p in providers if row.get(f"{p}_method")}
    if not methods:
        return None
    common = max(set(methods.values()), key=list(methods.values()).count)
    odd = [f"{p}: {m}" for p, m in methods.items() if m != common]
    return common + (f" ({', '.join(odd)})" if odd else "")


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
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", action=argparse.BooleanOptionalAction, default=True,
                        help="write bench/results/<name>-<device>.json and .md (default: yes)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def add_timing_options(parser: argparse.ArgumentParser,
                       min_run_time_help: str = "CPU only: seconds blocked_autorange measures each provider for",
                       graphs: bool = False) -> None:
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before timing (default: torch's choice)")
    parser.add_argument("--min-run-time", type=float, default=CPU_MIN_RUN_TIME_S, help=min_run_time_help)
    if graphs:
        parser.add_argument("--graph-max-tokens", type=int, default=GRAPH_MAX_TOKENS,
                            help="CUDA: batches of at most this many tokens are timed as CUDA-graph replays "
                                 f"(default {GRAPH_MAX_TOKENS}; 0: every row eager)")


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


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """torch.set_num_threads(--threads) when given; then --device, and --dtype or the device's default:
    bf16 on cuda, fp32 on cpu."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype
