"""Which strategy and kernel config serve a single-adapter LoRA matmul, per device: the plan table.

Two strategies compute every matmul whose output gets the LoRA term (the forward's y, the backward's dX):
* ``fused``: our GEMM, the LoRA term added to its fp32 accumulator in the epilogue (one pass over out);
* ``split``: torch's GEMM (cuBLAS on a GPU) into out, then the LoRA add-on (shrink + an in-place expand):
  never slower than lean torch by more than the add-on.
A plan is chosen per (device name, op, dtype, M bucket, N, K, rank bucket) by a dict lookup: a forced
plan (tests, the tuner), else the tables measured for this device (the shipped ones in
lora_kernels/configs/, then the user's cache written by ``python -m lora_kernels.tune``), else the
default, ``split``: the fused GEMM is only taken where a measurement on this device showed it faster.
Nothing here tunes: lookups never time anything (not in CUDA-graph capture, not in a compile trace).
Importing this module imports neither triton nor a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import importlib.metadata
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import _env

OPS = ("forward", "dx")          # y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ;  dX = dY·W0 + s·mask ⊙ ((dY·B)·A)
STRATEGIES = ("fused", "split")


@dataclass(frozen=True, kw_only=True)
class MatmulConfig:
    """Tiles of the fused GEMM (out (M, N) = x (M, K) · w (K, N) + the LoRA term). split_k > 1 cuts the
    K loop into split_k fixed ranges whose fp32 partials a second kernel sums in a fixed order (no
    atomics: deterministic), adding bias and the LoRA term: enough programs at mid-size M."""
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1


@dataclass(frozen=True)
class Plan:
    """strategy "fused" with config (None: the shape heuristic's tiles), or "split" (config None)."""
    strategy: str
    config: MatmulConfig | None = None


SPLIT = Plan("split")
DEFAULT_PLAN = SPLIT

_forced: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("lora_kernels_plan", default=None)


@contextlib.contextmanager
def forced_plan(plan: Plan | str) -> Iterator[None]:
    """Every single-adapter matmul inside the block (this thread or asyncio task) runs `plan`
    ("fused", "split" or a Plan): how the tuner times candidates and the tests cover both strategies."""
    if isinstance(plan, str):
        plan = Plan(plan)
    if plan.strategy not in STRATEGIES:
        raise ValueError(f"strategy {plan.strategy!r}: expected one of {STRATEGIES}")
    if plan.strategy == "split" and plan.config is not None:
        raise ValueError(f"{plan}: the split strategy takes no GEMM config (torch runs the GEMM)")
    token = _forced.set(plan)
    try:
        yield
    finally:
        _forced.reset(token)


def current_forced_plan() -> Plan | None:
    """The plan forced in this thread or asyncio task (forced_plan), else None. The ops carry it from a
    forward to its backward, which autograd may run on another thread: on a GPU its CUDA device thread,
    which sees none of the caller's contextvars (torch 2.13)."""
    return _forced.get()


def m_bucket(m: int) -> int:
    """Rows are tuned per power of two from 16 up (decode sizes 1-16 share one bucket)."""
    return 16 if m <= 16 else 1 << (m - 1).bit_length()


def rank_bucket(rank: int) -> int:
    """Ranks per power of two from 16 up (the fused kernels' rank tile is at least 16 wide)."""
    return 16 if rank <= 16 else 1 << (rank - 1).bit_length()


def fp32_matmul_uses_tf32() -> bool:
    """Whether cuBLAS would run an fp32 matmul on tf32 tensor cores now (the Triton kernels follow the
    same setting for fp32 inputs). Where torch has the fp32_precision API, cuBLAS reads
    torch.backends.cuda.matmul.fp32_precision (its getter resolves "none" to the generic
    torch.backends.fp32_precision), which allow_tf32 and set_float32_matmul_precision ("high" and
    "medium": tf32) set too; allow_tf32's getter raises once fp32_precision alone made the two disagree
    ("mix of the legacy and new APIs"). Older torch (2.4 ...): allow_tf32 is the one switch."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:   # no fp32_precision: cuBLASModule raises AttributeError for unknown names
        return bool(matmul.allow_tf32)


def fp32_precision_now() -> str:
    """"tf32" or "ieee": the precision fp32 matmuls run at now (fp32_matmul_uses_tf32)."""
    return "tf32" if fp32_matmul_uses_tf32() else "ieee"


# dtype -> its name: str(dtype) costs ~100 ns a call, a dict hit ~50 (plan_for runs per layer call)
_dtype_names: dict[torch.dtype, str] = {}


def plan_key(op: str, dtype: torch.dtype, m: int, n: int, k: int, rank: int,
             fp32_precision: str | None = None) -> tuple:
    """(op, dtype name, M bucket, N, K, rank bucket): N and K exact (a model has a handful). fp32 is
    keyed with its precision, "float32/tf32" or "float32/ieee" (fp32_precision, else the current one:
    fp32_precision_now): tiles tuned for tensor-core dots are not those of exact FMA dots."""
    name = _dtype_names.get(dtype)
    if name is None:
        name = _dtype_names[dtype] = str(dtype).removeprefix("torch.")
    if dtype is torch.float32:
        name = f"{name}/{fp32_precision or fp32_precision_now()}"
    # m_bucket(m), rank_bucket(rank) inlined: a Python call costs ~0.1 µs, a third of a lookup
    return (op, name, 16 if m <= 16 else 1 << (m - 1).bit_length(), n, k,
            16 if rank <= 16 else 1 << (rank - 1).bit_length())


# device -> its table {plan_key: Plan}, loaded once per process. Keyed by the torch.device itself:
# reading device.type builds a new string each time (~0.5-1 µs here), hashing the device ~0.1 µs
_tables: dict[torch.device, dict[tuple, Plan]] = {}


def _device_table(device: torch.device) -> dict[tuple, Plan]:
    table = _tables.get(device)
    if table is None:
        table = _tables[device] = load_tables(device)
    return table


def load_tables(device: torch.device) -> dict[tuple, Plan]:
    """The plans measured for `device`'s model: the shipped table lora_kernels/configs/<kind>.json, then
    the user's cache <tuning dir>/<kind>.json (later wins; kind = device_kind(device)). A file that cannot
    serve (corrupt, another device's, another format version) or an entry that cannot (bad strategy,
    config, key) is skipped with a warning naming the file and the reason: the defaults, never a crash."""
    kind = device_kind(device)
    table: dict[tuple, Plan] = {}
    paths = [SHIPPED_DIR / f"{kind}.json"]
    try:
        paths.append(user_table_path(device))
    except RuntimeError as exc:   # Path.home(): no HOME and no passwd entry (a container's arbitrary uid)
        warnings.warn(f"lora_kernels plan table: no user cache ({exc}; set LORA_KERNELS_TUNING_DIR); "
                      "using the shipped or default plans", stacklevel=3)
    for path in paths:
        try:
            present = path.is_file()
        except OSError as exc:   # is_file raises, not answers False, for EACCES (another user's directory)
            warnings.warn(f"lora_kernels plan table {path}: unreadable ({type(exc).__name__}: {exc}); using "
                          "the default plans", stacklevel=3)
            continue
        if present:
            table.update(read_table(path, kind))
    return table


def clear_tables() -> None:
    """Forget the tables loaded in this process: the next lookup reads the files again (the tuner calls
    this after writing, so its plans apply at once)."""
    _tables.clear()


def plan_for(op: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, rank: int) -> Plan:
    """The plan of one matmul: out (M, N) from a (M, K) x (K, N) GEMM plus a rank-`rank` LoRA term.
    op "forward": N = out_features, K = in_features; op "dx": N = in_features, K = out_features."""
    plan = _forced.get()
    if plan is not None:
        return plan
    table = _tables.get(device)
    if table is None:
        table = _device_table(device)
    return table.get(plan_key(op, dtype, m, n, k, rank), DEFAULT_PLAN)


def demote_to_split(op: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, rank: int,
                    reason: str) -> None:
    """A fused plan from this device's table could not launch (reason): its key serves split from now
    on, in this process; warns once per key."""
    table = _device_table(device)
    key = plan_key(op, dtype, m, n, k, rank)
    plan = table.get(key, DEFAULT_PLAN)
    table[key] = SPLIT
    warnings.warn(f"lora_kernels: the plan table's {plan_name(plan)} for {key} cannot launch on "
                  f"{device_name(device)} ({reason.splitlines()[0] if reason else 'no reason given'}); "
                  "that shape runs the split strategy from now on (re-run python -m lora_kernels.tune)",
                  stacklevel=4)


# ----------------------------------------------------------------------------- devices

# Words of a GPU's name that are not the model: the vendor's, and (ending the model) a memory size or
# a form factor, as in "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 NVL".
_GPU_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "instinct", "radeon"}
_GPU_VARIANT_WORD = re.compile(r"\d+gb|sxm\d*|pcie|hbm\d*e?|nvl|mig")


def gpu_slug(name: str) -> str:
    """A GPU's model as a file-name slug: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA A100-SXM4-80GB" -> "a100", "NVIDIA GeForce RTX 4090" -> "rtx-4090"; "cuda" if nothing is left."""
    words = []
    for word in re.split(r"[\s_/-]+", name.lower()):
        word = re.sub(r"[^a-z0-9]", "", word)
        if _GPU_VARIANT_WORD.fullmatch(word):
            break
        if word and word not in _GPU_VENDOR_WORDS:
            words.append(word)
    return "-".join(words) or "cuda"


def device_name(device: torch.device | str) -> str:
    """The GPU's name on CUDA ("NVIDIA H200"), else the device type ("cpu": the Triton interpreter)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def device_kind(device: torch.device | str) -> str:
    """The model whose plans serve `device`, the tables' file name: gpu_slug of the GPU's name on CUDA
    (all H200s share "h200"), else the device type ("cpu")."""
    device = torch.device(device)
    return gpu_slug(device_name(device)) if device.type == "cuda" else device.type


def user_table_path(device: torch.device | str) -> Path:
    """The user's cache file for `device`'s model, <tuning dir>/<kind>.json (_env.tuning_dir_from_env):
    where the tuner writes by default."""
    return _env.tuning_dir_from_env() / f"{device_kind(device)}.json"


# ----------------------------------------------------------------------------- table files

SHIPPED_DIR = Path(__file__).parent / "configs"
FORMAT = "lora_kernels.plans"
FORMAT_VERSION = 1
# {"format": FORMAT, "version": 1, "device_kind": "h200", "device_name": "NVIDIA H200",
#  "torch": "2.9.0", "triton": "3.5.0", "created_utc": "...",
#  "entries": [{"op": "forward", "dtype": "bfloat16", "m": 4096, "n": 4096, "k": 4096, "rank": 16,
#               ("fp32_precision": "tf32" | "ieee", float32 entries only),
#               "strategy": "fused", "config": {MatmulConfig fields} | null,
#               "times_ms": {plan_name: median ms, ...}, "skipped": {plan_name: reason, ...}}, ...]}
# m and rank are the measured sizes: an entry serves their buckets (m_bucket, rank_bucket). times_ms and
# skipped record the measurement; lookups read op..config only.

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(MatmulConfig)}
_POWER_OF_TWO_FIELDS = ("block_m", "block_n", "block_k", "block_r", "num_warps")


def plan_name(plan: Plan) -> str:
    """A plan in one word, the key of times_ms: "split", "fused" (heuristic tiles) or
    "fused:128x256x64,r16,g8,w8,s3,k1" (block M x N x K, rank tile, group, warps, stages, split-K)."""
    cfg = plan.config
    if cfg is None:
        return plan.strategy
    return (f"{plan.strategy}:{cfg.block_m}x{cfg.block_n}x{cfg.block_k},r{cfg.block_r},g{cfg.group_m},"
            f"w{cfg.num_warps},s{cfg.num_stages},k{cfg.split_k}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _parse_config(raw: Any) -> MatmulConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"config {raw!r}: expected an object of MatmulConfig fields or null")
    missing = _CONFIG_FIELDS - {"split_k"} - raw.keys()
    unknown = raw.keys() - _CONFIG_FIELDS
    if missing or unknown:
        raise ValueError(f"config {raw}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    bad = [name for name, value in raw.items() if not _positive_int(value)
           or (name in _POWER_OF_TWO_FIELDS and value & (value - 1))
           or (name.startswith("block_") and value < 16)
           or (name == "num_warps" and value > 32)]   # a block holds at most 1024 threads
    if bad:   # Triton's tiles and warps are powers of two, tl.dot's tiles >= 16: else a user's call fails to compile
        raise ValueError(f"config {raw}: {bad} must be positive integers (tiles and warps powers of two, "
                         "tiles at least 16, at most 32 warps)")
    return MatmulConfig(**raw)


def parse_entry(entry: Any) -> tuple[tuple, Plan]:
    """One table entry -> (plan_key, Plan); ValueError naming what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"entry {entry!r} is not an object")
    missing = [name for name in ("op", "dtype", "m", "n", "k", "rank", "strategy") if name not in entry]
    if missing:
        raise ValueError(f"entry {entry} lacks {missing}")
    if entry["op"] not in OPS:
        raise ValueError(f"op {entry['op']!r}: expected one of {OPS}")
    dtype = getattr(torch, entry["dtype"], None) if isinstance(entry["dtype"], str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {entry['dtype']!r} is not a torch dtype")
    sizes = [entry[name] for name in ("m", "n", "k", "rank")]
    if not all(_positive_int(size) for size in sizes):
        raise ValueError(f"m, n, k, rank {sizes}: expected positive integers")
    if entry["strategy"] not in STRATEGIES:
        raise ValueError(f"strategy {entry['strategy']!r}: expected one of {STRATEGIES}")
    config = _parse_config(entry.get("config"))
    if entry["strategy"] == "split" and config is not None:
        raise ValueError("the split strategy takes no config (torch runs the GEMM)")
    precision = None
    if dtype is torch.float32:   # measured at one fp32 precision: it serves that one only
        precision = entry.get("fp32_precision")
        if precision not in ("tf32", "ieee"):
            raise ValueError(f"fp32_precision {precision!r}: a float32 entry says \"tf32\" or \"ieee\"")
    return plan_key(entry["op"], dtype, *sizes, fp32_precision=precision), Plan(entry["strategy"], config)


def read_table(path: Path, kind: str) -> dict[tuple, Plan]:
    """The plans of one table file written for device kind `kind`; a warning and {} for a file that
    cannot serve, a warning per entry skipped."""
    def skip(reason: str) -> dict:
        warnings.warn(f"lora_kernels plan table {path}: {reason}; using the default plans", stacklevel=3)
        return {}

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:   # json.JSONDecodeError is a ValueError
        return skip(f"unreadable ({type(exc).__name__}: {exc})")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return skip(f"not a plan table (expected \"format\": {FORMAT!r})")
    if doc.get("version") != FORMAT_VERSION:
        return skip(f"format version {doc.get('version')!r}, this lora_kernels reads {FORMAT_VERSION}")
    if doc.get("device_kind") != kind:
        return skip(f"measured on {doc.get('device_name')!r} (kind {doc.get('device_kind')!r}), not this "
                    f"{kind!r} device")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        return skip("\"entries\" is not a list")
    table: dict[tuple, Plan] = {}
    for index, entry in enumerate(entries):
        try:
            key, plan = parse_entry(entry)
        except ValueError as exc:
            warnings.warn(f"lora_kernels plan table {path}: entry {index} skipped: {exc}", stacklevel=2)
            continue
        table[key] = plan
    return table


def entry_of(op: str, dtype: torch.dtype, m: int, n: int, k: int, rank: int, plan: Plan,
             times_ms: dict[str, float], skipped: dict[str, str]) -> dict[str, Any]:
    """One measured shape as a table entry (the inverse of parse_entry, plus the measurement); a float32
    one records the fp32 precision it was measured at (fp32_precision_now)."""
    entry = {"op": op, "dtype": str(dtype).removeprefix("torch."), "m": m, "n": n, "k": k, "rank": rank,
             "strategy": plan.strategy, "config": None if plan.config is None else dataclasses.asdict(plan.config),
             "times_ms": times_ms, "skipped": skipped}
    if dtype is torch.float32:
        entry["fp32_precision"] = fp32_precision_now()
    return entry


def write_table(path: Path, device: torch.device | str, entries: list[dict[str, Any]]) -> None:
    """Write a table file for `device` atomically (a reader never sees half a file). The entries of the
    same device's table already at `path` that `entries` do not measure again are kept; a corrupt file
    there is replaced (with a warning); another device's table there is a ValueError."""
    path = Path(path)
    kind = device_kind(device)
    merged: dict[tuple, dict[str, Any]] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            old = None
            warnings.warn(f"lora_kernels plan table {path}: unreadable ({type(exc).__name__}: {exc}); "
                          "replacing it", stacklevel=2)
        if isinstance(old, dict) and old.get("format") == FORMAT and old.get("device_kind") != kind:
            raise ValueError(f"{path} holds the plans of {old.get('device_name')!r} (kind "
                             f"{old.get('device_kind')!r}), not this {kind!r} device: choose another output")
        if (isinstance(old, dict) and old.get("format") == FORMAT and old.get("version") == FORMAT_VERSION
                and isinstance(old.get("entries"), list)):
            for entry in old["entries"]:
                with contextlib.suppress(ValueError):
                    merged[parse_entry(entry)[0]] = entry
    for entry in entries:
        merged[parse_entry(entry)[0]] = entry
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "device_kind": kind, "device_name": device_name(device),
           "torch": torch.__version__, "triton": triton_version,
           "created_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
           "entries": list(merged.values())}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
