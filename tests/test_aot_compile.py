"""Ahead-of-time compile of the Triton kernels for real GPUs (sm_80, sm_90), with no device.

The interpreter (TRITON_INTERPRET=1, how CPU CI runs the kernels) accepts code that the GPU
compiler rejects (``tl.dot`` on tiles under 16, ...), and it knows nothing of shared memory. This
module compiles each kernel with ``triton.compile(ASTSource(...), target=GPUTarget(...))``, as a
launch would on an A100 (sm_80) and an H100 (sm_90), and checks, for every compile:

* that it compiles, and that its shared memory (``metadata.shared``, the dynamic part, plus the
  cubin's static part) fits the target's per-block limit (sm_80: 163 KB, sm_90: 227 KB);
* that ptxas spilled no register: the cubin's per-thread stack frame and local memory are 0 bytes
  (read with ``cuobjdump --dump-resource-usage``, the binary Triton bundles; these kernels make no
  calls and keep no local arrays, so a frame is spill: ptxas -v says "N bytes stack frame, M bytes
  spill stores"). Any spill fails: the launchers' heuristics pick configs that have none (their
  comments give the registers and spills measured here);
* that a 16-bit (fp16/bf16) GEMM tile of >= 64 rows compiled for sm_90 is a ``wgmma.mma_async`` in
  the PTX (Hopper's warpgroup MMA: its tensor cores reach their peak only through wgmma).

Resource report: ``python tests/test_aot_compile.py --report`` (no pytest, no GPU; as long as the
default test run, seconds when Triton's cache already holds its compiles) compiles the same cases
and writes bench/results/kernel-resources.md and .json: per kernel, config, dtype/precision and
target, the registers per thread, spill bytes, shared memory, warps, CTAs that fit per SM, and the
matrix instruction in the PTX (wgmma / mma.sync / FMA).

What is compiled -- the configs and every kernel argument come from the launchers themselves
(lora_kernels/triton/lora_linear.py, lora_kernels/triton/multi_lora_linear.py), not copied here: each
launch site builds its kernel's keyword arguments with an argument builder of its launcher module
(shrink_arguments, fused_matmul_arguments, ...), and ``kernel_arguments`` below calls the same builders
with meta tensors of representative sizes and the views the launchers pass; ``launch_signature`` turns
the result into the compile's signature (a tensor a pointer to its dtype, an int i32/i64, a float fp32,
the tl.constexpr parameters constants), so an argument added or renamed reaches both:

* Configs: every distinct config that ``shrink_config`` / ``fused_matmul_config`` / ``rows_config``
  return over M in {1, 16, 17, 64, 65, 256, 257, 8192} x rank in {1, 8, 12, 16, 32, 64, 128, 256}
  x K, N in {64, 1024, 4096, 8192, 16384} (rows: P and Q over the union of these sets), which takes
  every branch of the heuristics, for what else the launcher passes them: ``fp32_dot`` (None for
  16-bit inputs; fp32's dot precision, "ieee" -- exact, FMA dots -- or "tf32") and the call's
  dropout flag (shrink DROPOUT, fused EPILOGUE_DROPOUT, rows DROPOUT_R), so each call site gets
  exactly the configs its launch can pick (today 9 shrink, 10 fused-matmul, 18 rows-matmul configs
  for 16-bit inputs or fp32 on tf32; 6, 6, 9 for exact fp32); for the fused GEMM also every config
  the tuner's search space (``candidate_configs``, what ``fused_candidates`` returns) holds at
  Llama-3-8B's layer shapes (TUNED_SHAPES x TUNED_M, rank 16), each precision: a "dx" plan's at the
  dX call with dropout, the split-K ones (split_k > 1) as the partials-only GEMM (SPLIT_K_PARTIALS);
  ``expand_config`` over M x N for the expand kernel (in place after torch's GEMM, or summing the
  split-K partials: BASE_PARTIALS, SPLIT_K 2 and 8);
  the multi-adapter kernels: every ``segmented_config`` over the row tiles (metadata's 16 and 64)
  x rank (6 configs per fp32_dot) for the segmented shrink and expand, the rows-matmul configs
  (without dropout) for the per-adapter weight gradients; flags SEGMENT_IS_ADAPTER, HAS_RANKS,
  STORE_T_SUM, RANK_ON_P and the expand's unrolled split count NUM_T_SPLITS (1 and MAX_SPLITS);
  dropout_mask_kernel has its one launch.
* Dtypes: fp16, bf16, fp32, with DOT_PRECISION / LORA_DOT_PRECISION as ``dot_precision`` /
  ``lora_precision`` give them; fp32 twice, as both values of torch's fp32 matmul precision
  give it ("ieee" by default, "tf32" when the user allows it: allow_tf32 or fp32_precision).
* Call sites ("usages") and constexpr flags, as the launchers pass them: shrink fwd (x, A; DROPOUT
  on/off) and bwd (dY, Bᵀ); fused fwd (x, W0ᵀ, Bᵀ; HAS_BIAS on/off, STORE_T_SUM) and bwd (dY, W0, A;
  STORE_T_SUM on/off x EPILOGUE_DROPOUT on/off), fwd-splitk (fwd's operands, fp32 partials out);
  expand fwd (y in place, or the partials with HAS_BIAS on/off; Bᵀ) and bwd (dX;
  A; STORE_T_SUM x EPILOGUE_DROPOUT, in place or from partials); rows dA (fp32 dU left, input-dtype x right;
  DROPOUT_R on/off) and dB (input-dtype dY left, fp32 T right). Rank partials, t_sum and the
  rows output are fp32; x, w, bias, v, out the input dtype.
* Specialization: "aligned" is the signature a launch with 16-aligned sizes gets (Triton's JIT
  makes ints equal to 1 -- the unit strides -- constexprs and marks pointers and ints divisible by
  16): widest vector loads, deepest cp.async pipelining, so (nearly always) the most shared memory.
  "plain" is the signature with no specialization at all (odd sizes such as rank 12, unaligned
  views): the narrowest loads.

What runs by default (today 1,164 compiles, about 10 minutes on 2 cores from a cold Triton cache -- 1,204
took 11 on a busy machine, 914 before the tuner's candidates and the expand kernel about 6 --, one worker
per core compiling while the tests collect the results), since the whole product takes far longer:

* every config x every dtype/precision x both targets, aligned, at the heaviest call site that
  picks it: call sites and flag sets are listed heaviest first in KERNELS (shrink fwd with DROPOUT,
  fused bwd with STORE_T_SUM and EPILOGUE_DROPOUT, rows dA with DROPOUT_R, ...), and a config
  only a lighter one picks (a tuner candidate only the forward's shapes give) is swept there; each
  further call site (fused fwd, shrink bwd, rows dB, ...) sweeps its own configs too, but not for
  fp16 (fp16 and bf16 compile the same code but for the MMA type). Shared memory is set by the
  tiles, stages, dtypes and strides, which this sweeps;
  over the whole product no other call site or flag set needed more than 10 KB over these;
* every call site x flag combination the launchers can pass, on its largest config, both targets,
  aligned, for one 16-bit and one 32-bit dtype (bf16; fp32 with tf32, the precision needing the
  most shared memory);
* the plain specialization of each call site's first flag set on its largest config, every
  dtype/precision, both targets.

``LORA_AOT_FULL=1`` runs the whole product instead (every config x call site x flags x dtype x
target x specialization; about 50 minutes on 2 cores for the 5,716 of before the configs took the
precision and dropout flag, extrapolated from 2,260 in 19).
``LORA_AOT_WORKERS=N`` sets the number of worker processes.

Under TRITON_INTERPRET=1 ``@triton.jit`` returns interpreter objects, and so do triton.language's
own jitted helpers (``tl.cdiv``, ``tl.rand``): nothing can be compiled in that process. The
compiles therefore run in worker processes (this file run as a script) whose environment lacks
TRITON_INTERPRET; ``compile_for`` compiles in-process when the kernel is a real JITFunction.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields, replace
from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile ahead of time")
torch = pytest.importorskip("torch")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lora_kernels.metadata import LONG_ROW_TILE, SHORT_ROW_TILE  # noqa: E402
from lora_kernels.triton import _common as common  # noqa: E402
from lora_kernels.triton import lora_linear as launch  # noqa: E402
from lora_kernels.triton import multi_lora_linear as multi_launch  # noqa: E402
from lora_kernels.triton.kernels import lora_linear as kernels  # noqa: E402
from lora_kernels.triton.kernels import multi_lora_linear as multi_kernels  # noqa: E402

pytestmark = pytest.mark.aot

if __name__ != "__main__" and "nvidia" not in getattr(triton.backends, "backends", {}):
    pytest.skip("this triton has no NVIDIA backend to compile for", allow_module_level=True)


@dataclass(frozen=True)
class SmLimits:
    """One SM's limits, from the CUDA C++ Programming Guide's table "Technical Specifications per
    Compute Capability" (columns 8.0 and 9.0), and the allocation rules of cuda_occupancy.h (Triton
    bundles it: triton/backends/nvidia/include/), which cudaOccupancyMaxActiveBlocksPerMultiprocessor
    follows: registers go to warps in units of 256, each warp's from one of 4 sub-partitions of 16 K;
    shared memory goes to CTAs in units of 128 B, plus 1 KB the driver reserves per CTA (sm_80 on)."""
    shared_per_sm: int            # bytes, with the largest carveout (Triton prefers shared over L1)
    shared_per_block: int         # bytes, the opt-in maximum (static + dynamic)
    regs_per_sm: int = 64 * 1024
    regs_per_block: int = 64 * 1024
    regs_per_thread: int = 255
    reg_unit: int = 256           # a warp's registers (per thread x 32) round up to this
    sub_partitions: int = 4
    warps_per_sm: int = 64        # 2048 threads
    ctas_per_sm: int = 32
    shared_reserved: int = 1024   # per CTA
    shared_unit: int = 128


SM_LIMITS = {80: SmLimits(shared_per_sm=164 * 1024, shared_per_block=163 * 1024),    # A100
             90: SmLimits(shared_per_sm=228 * 1024, shared_per_block=227 * 1024)}    # H100
SHARED_LIMIT = {arch: limits.shared_per_block for arch, limits in SM_LIMITS.items()}
TARGETS = {arch: GPUTarget("cuda", arch, 32) for arch in SM_LIMITS}


# ---------------------------------------------------------------------------------------------
# The reusable part: compile one kernel for one target, in this process or in a worker.
# ---------------------------------------------------------------------------------------------

class AotCompileError(RuntimeError):
    """triton.compile failed; the message is the compiler's."""


def compile_for(kernel, signature: dict, constexprs: dict, target: GPUTarget,
                num_warps: int | None, num_stages: int | None, attrs: dict | None = None):
    """Compile `kernel` (a @triton.jit function) ahead of time for `target`, no device needed.

    signature: every argument name -> Triton type ("*fp16", "i32", "fp32", ...) or "constexpr";
    constexprs: name -> value for the "constexpr" ones; attrs: {(arg index,): [["tt.divisibility",
    16]]} hints as a launch's specialization adds them; num_warps / num_stages None: backend default.
    Returns an object with ``.metadata.shared`` (bytes), ``.metadata.num_warps``, ...: the
    CompiledKernel when `kernel` is a JITFunction, else (TRITON_INTERPRET=1 made it an interpreter
    object) the metadata and ``.resources`` (asm_resources) of the same compile done in a worker
    process without TRITON_INTERPRET; ``kernel_resources`` reads either.
    Raises AotCompileError with the compiler's message when it does not compile."""
    options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    if isinstance(kernel, JITFunction):
        src = ASTSource(fn=kernel, signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs or {}))
        try:
            return triton.compile(src, target=target, options=options)
        except Exception as exc:   # CompilationError, ptxas errors, MLIR pass failures
            raise AotCompileError(_describe(exc)) from exc
    return _remote_result(_pool().submit(_request(kernel, signature, constexprs, target, num_warps, num_stages,
                                                  attrs)).result())


def _request(kernel, signature, constexprs, target, num_warps, num_stages, attrs) -> dict:
    """compile_for's arguments as a worker request (JSON): the kernel by module and name."""
    return {
        "module": kernel.fn.__module__, "name": kernel.fn.__name__,
        "signature": signature, "constexprs": constexprs,
        "attrs": [[list(k), v] for k, v in (attrs or {}).items()],
        "target": [target.backend, target.arch, target.warp_size],
        "num_warps": num_warps, "num_stages": num_stages,
    }


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ != "CompilationError":   # its message already points into the kernel source
        text += "\n" + "".join(traceback.format_exception(exc)[-6:])
    return text


def _remote_result(response: dict):
    if not response["ok"]:
        raise AotCompileError(response["error"])
    return SimpleNamespace(metadata=SimpleNamespace(**response["metadata"]), resources=response["resources"])


def _worker_main() -> None:
    """Worker loop (this file run as a script, TRITON_INTERPRET unset): one JSON request per
    stdin line, one JSON response per line on the original stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)   # whatever the compiler prints goes to stderr, not into the protocol
    for line in sys.stdin:
        req = json.loads(line)
        try:
            kernel = getattr(importlib.import_module(req["module"]), req["name"])
            compiled = compile_for(kernel, req["signature"], req["constexprs"], GPUTarget(*req["target"]),
                                   req["num_warps"], req["num_stages"],
                                   attrs={tuple(k): v for k, v in req["attrs"]})
            metadata = {k: v for k, v in compiled.metadata._asdict().items()
                        if isinstance(v, (int, float, str, bool)) or v is None}
            response = {"ok": True, "metadata": metadata, "resources": asm_resources(compiled.asm)}
        except AotCompileError as exc:
            response = {"ok": False, "error": str(exc)}
        except Exception as exc:
            response = {"ok": False, "error": _describe(exc)}
        protocol.write(json.dumps(response) + "\n")


class _Worker:
    """One worker process; restarted if it dies."""

    def __init__(self):
        self.proc = None
        self.stderr = None

    def _start(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--aot-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env, text=True, bufsize=1)

    def request(self, req: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            line = ""
        if line:
            return json.loads(line)
        rc = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-4000:]
        self.proc = None
        return {"ok": False, "error": f"compile worker died (exit status {rc}); its stderr ends:\n{tail}"}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class _Pool:
    """Worker processes behind a thread pool: submit() returns a Future of the response."""

    def __init__(self, size: int):
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="aot-compile")
        self._local = threading.local()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def _worker(self) -> _Worker:
        worker = getattr(self._local, "worker", None)
        if worker is None:
            worker = self._local.worker = _Worker()
            with self._lock:
                self._workers.append(worker)
        return worker

    def submit(self, request: dict) -> Future:
        return self._executor.submit(lambda: self._worker().request(request))

    def close(self):
        self._executor.shutdown(wait=True, cancel_futures=True)
        for worker in self._workers:
            worker.close()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            _POOL = _Pool(int(os.environ.get("LORA_AOT_WORKERS", 0)) or max(1, min(cores, 8)))
        return _POOL


def _close_pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(_close_pool)


# ---------------------------------------------------------------------------------------------
# What a compiled kernel needs of the GPU: registers, spills, shared memory, CTAs per SM, and
# which matrix instructions it uses.
# ---------------------------------------------------------------------------------------------

# cuobjdump --dump-resource-usage, one line per function: "REG:255 STACK:696 SHARED:1024 LOCAL:0 ..."
_RESOURCE_LINE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)((?:\.\w+)+)")


def matrix_instructions(ptx: str) -> list[str]:
    """The distinct matrix instructions in `ptx`, as "kind.shape.input-type" ("wgmma.m64n128k16.bf16",
    "mma.sync.m16n8k16.f16", "mma.sync.m16n8k8.tf32"); [] when every dot became FMA."""
    found = []
    for kind, suffix in _MMA.findall(ptx):
        parts = suffix.strip(".").split(".")
        shape = next(i for i, p in enumerate(parts) if re.fullmatch(r"m\d+n\d+k\d+", p))
        types = [p for p in parts[shape + 1:] if p not in ("row", "col")]   # D, A, B[, C] types
        found.append(f"{'wgmma' if kind.startswith('wgmma') else kind}.{parts[shape]}.{types[1]}")
    return sorted(set(found))


def asm_resources(asm) -> dict:
    """What the cubin in `asm` (a compiled kernel's asm dict) needs per thread and per CTA, as
    cuobjdump (Triton's bundled copy, knobs.nvidia.cuobjdump) reads it from the ELF: registers,
    stack frame and local bytes, static shared bytes; and the PTX's matrix_instructions. JSON-able."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(asm["cubin"])
        cubin.flush()
        dump = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    functions = _RESOURCE_LINE.findall(dump)
    if len(functions) != 1:
        raise RuntimeError(f"expected one function in cuobjdump --dump-resource-usage, got:\n{dump}")
    _, registers, stack, static_shared, local = functions[0]
    return {"registers": int(registers), "stack": int(stack), "local": int(local),
            "static_shared": int(static_shared), "mma": matrix_instructions(asm["ptx"])}


@dataclass(frozen=True)
class Resources:
    """One compiled kernel's needs on `arch`. Bytes; registers, stack and local are per thread."""
    arch: int
    registers: int
    stack: int                # stack frame: these kernels make no calls, so this is register spill
    local: int
    static_shared: int
    dynamic_shared: int       # metadata.shared: what Triton's launcher asks for
    num_warps: int
    mma: tuple                # matrix_instructions

    @property
    def spill(self) -> int:
        return self.stack + self.local

    @property
    def shared(self) -> int:
        return self.static_shared + self.dynamic_shared

    def ctas_per_sm(self) -> tuple[int, str]:
        """(CTAs that fit on one SM, what limits them: "regs", "smem", "warps" or "ctas"), as
        cuda_occupancy.h's cudaOccMaxActiveBlocksPerMultiprocessor computes it."""
        lim = SM_LIMITS[self.arch]
        regs_per_warp = -(-self.registers * 32 // lim.reg_unit) * lim.reg_unit
        # the hardware's per-CTA check counts warps rounded up to the sub-partitions
        if (regs_per_warp * -(-self.num_warps // lim.sub_partitions) * lim.sub_partitions > lim.regs_per_block
                or self.registers > lim.regs_per_thread):
            by_regs = 0
        else:
            warps_per_partition = lim.regs_per_sm // lim.sub_partitions // max(regs_per_warp, 1)
            by_regs = warps_per_partition * lim.sub_partitions // self.num_warps
        smem_per_cta = -(-(self.shared + lim.shared_reserved) // lim.shared_unit) * lim.shared_unit
        by_smem = lim.shared_per_sm // smem_per_cta if self.shared <= lim.shared_per_block else 0
        limits = {"warps": lim.warps_per_sm // self.num_warps, "ctas": lim.ctas_per_sm,
                  "regs": by_regs, "smem": by_smem}
        limiter = min(limits, key=limits.get)   # on a tie the thread and CTA caps, which no tuning lifts
        return limits[limiter], limiter

    def mma_summary(self) -> str:
        """"wgmma bf16, mma.sync tf32", ...; "FMA" when there is no matrix instruction."""
        return ", ".join(_mma_kinds(f"{m.rsplit('.', 2)[0]} {m.rsplit('.', 1)[1]}" for m in self.mma)) or "FMA"


def _mma_kinds(kinds) -> list[str]:
    """Distinct "kind type" strings, wgmma before mma.sync before FMA, f16 before bf16 before tf32."""
    rank = {"wgmma": 0, "mma.sync": 1, "FMA": 2, "f16": 0, "bf16": 1, "tf32": 2}
    return sorted(set(kinds), key=lambda k: [rank.get(w, 3) for w in k.split()] + [k])


def kernel_resources(compiled, arch: int) -> Resources:
    """Resources of compile_for's result (a CompiledKernel, or a worker's answer)."""
    found = getattr(compiled, "resources", None) or asm_resources(compiled.asm)
    return Resources(arch=arch, registers=found["registers"], stack=found["stack"], local=found["local"],
                     static_shared=found["static_shared"], dynamic_shared=compiled.metadata.shared,
                     num_warps=compiled.metadata.num_warps, mma=tuple(found["mma"]))


# ---------------------------------------------------------------------------------------------
# Signatures as a launch specializes them.
# ---------------------------------------------------------------------------------------------

def constexpr_names(kernel) -> list[str]:
    """`kernel`'s parameters annotated tl.constexpr (a JITFunction or, under TRITON_INTERPRET=1, an
    interpreter object: both keep the Python function as .fn)."""
    return [name for name, annotation in kernel.fn.__annotations__.items() if annotation is triton.language.constexpr]


def launch_signature(kernel, arguments: dict, aligned: bool):
    """(signature, constexprs, attrs) for `kernel` launched with the keyword `arguments` a launcher's
    argument builder returns (name -> a tensor, an int, a float, or a constexpr parameter's value); a
    tensor is a pointer to its dtype ("*fp16", "*i32", ...), a meta tensor will do.
    aligned: as Triton's JIT specializes the launch -- an int equal to 1 becomes a constexpr,
    pointers (torch allocations) and ints divisible by 16 get tt.divisibility 16.
    Not aligned: no specialization (every int a runtime i32/i64, no hints)."""
    name = kernel.fn.__name__
    unknown = [a for a in kernel.arg_names if a not in arguments]
    extra = [a for a in arguments if a not in kernel.arg_names]
    assert not unknown and not extra, (
        f"{name}'s arguments and its launcher's argument builder disagree (not given: {unknown}; not "
        f"parameters: {extra}): update the builder in lora_kernels/triton/lora_linear.py or multi_lora_linear.py")
    constexprs = constexpr_names(kernel)
    signature, consts, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = arguments[name]
        if name in constexprs:
            signature[name], consts[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name], hinted = POINTER_TYPE[value.dtype], True
        elif isinstance(value, bool):
            raise TypeError(f"{name}: pass bools as constexprs")
        elif isinstance(value, int):
            if aligned and value == 1:
                signature[name], consts[name] = "constexpr", 1
                continue
            signature[name], hinted = ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
        elif isinstance(value, float):
            signature[name], hinted = "fp32", False
        else:
            raise TypeError(f"{name}: unsupported argument {value!r}")
        if aligned and hinted:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


# ---------------------------------------------------------------------------------------------
# What the launchers may pick.
# ---------------------------------------------------------------------------------------------

M_VALUES = (1, 16, 17, 64, 65, 256, 257, 8192)
RANKS = (1, 8, 12, 16, 32, 64, 128, 256)
WIDTHS = (64, 1024, 4096, 8192, 16384)   # K and N (the decode tiles narrow with N)
ROWS_SIZES = tuple(sorted(set(M_VALUES + RANKS + WIDTHS)))


def _unique(items):
    return list(dict.fromkeys(items))


ROW_TILES = (SHORT_ROW_TILE, LONG_ROW_TILE)   # AdapterBatch.row_tile: the segmented kernels' BLOCK_M


# The heuristics' answers over the sizes above, for what else they take: fp32_dot (None for 16-bit
# inputs, fp32's dot precision: "ieee" exact, FMA; "tf32") and the call's dropout flag, as each
# launcher passes them.
def shrink_configs(fp32_dot: str | None, dropout: bool) -> list:
    return _unique(launch.shrink_config(m, k, r, fp32_dot, dropout) for m in M_VALUES for k in WIDTHS for r in RANKS)


# The tuner's fused search space (launch.fused_candidates) at Llama-3-8B's layer shapes, (K, N) of the
# forward (the dX op swaps them), for these token counts, rank 16.
TUNED_SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336))
TUNED_M = (16, 32, 128, 1024, 4096)


def tuned_configs(fp32_dot: str | None, ops: tuple[str, ...]) -> list:
    """Every config launch.candidate_configs returns for `ops` at the shapes above."""
    return _unique(c for op in ops for k, n in TUNED_SHAPES for m in TUNED_M
                   for c in launch.candidate_configs(op, m, *((n, k) if op == "forward" else (k, n)), 16, fp32_dot))


def fused_configs(fp32_dot: str | None, epilogue_dropout: bool, split_k_partials: bool = False) -> list:
    """The heuristic's configs and the tuner's candidates a call with these flags can run: the dX call
    with dropout only a "dx" plan's; the split-K GEMM (SPLIT_K_PARTIALS) the candidates with split_k > 1,
    compiled once per tile (split_k is the grid's second axis, no constexpr: one compile serves 2, 4, 8)."""
    tuned = tuned_configs(fp32_dot, ("dx",) if epilogue_dropout else ("dx", "forward"))
    if split_k_partials:
        return _unique(replace(c, split_k=2) for c in tuned if c.split_k > 1)
    return _unique([launch.fused_matmul_config(m, n, k, r, fp32_dot, epilogue_dropout)
                    for m in M_VALUES for n in WIDTHS for k in WIDTHS for r in RANKS]
                   + [c for c in tuned if c.split_k == 1])


def expand_configs() -> list:
    return _unique(launch.expand_config(m, n) for m in M_VALUES for n in WIDTHS)


def rows_configs(fp32_dot: str | None, dropout: bool) -> list:
    return _unique(common.rows_config(p, q, fp32_dot, dropout) for p in ROWS_SIZES for q in ROWS_SIZES)


def segmented_configs(fp32_dot: str | None) -> list:
    return _unique(multi_launch.segmented_config(row_tile, r, fp32_dot) for row_tile in ROW_TILES for r in RANKS)


@dataclass(frozen=True)
class DropoutMaskConfig:
    """dropout_keep_mask's launch: its fixed tile, backend default warps/stages."""
    block_m: int = launch.MASK_BLOCK_M
    block_k: int = launch.MASK_BLOCK_K
    num_warps: int | None = None
    num_stages: int | None = None


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@contextlib.contextmanager
def _fp32_matmuls_on_tf32(tf32: bool):
    """The launchers' precision helpers (lora_kernels/triton/_common.py) as they answer with cuBLAS's fp32
    matmuls on tf32 or not (common.fp32_matmul_uses_tf32 replaced for the block: torch's own flags stay
    untouched, whichever of its two APIs set them)."""
    reader = common.fp32_matmul_uses_tf32
    common.fp32_matmul_uses_tf32 = lambda: tf32
    try:
        yield
    finally:
        common.fp32_matmul_uses_tf32 = reader


def _precisions(dtype: torch.dtype) -> list[tuple[str, str]]:
    """(dot_precision, lora_precision) pairs the launcher may pass for `dtype`: with cuBLAS's fp32
    matmuls on tf32 and not."""
    pairs = []
    for tf32 in (False, True):
        with _fp32_matmuls_on_tf32(tf32):
            pairs.append((common.dot_precision(dtype), common.lora_precision(dtype)))
    return _unique(pairs)


# Representative sizes for the "aligned" signature: multiples of 16, as typical layers have. The
# multi-adapter kernels: L adapter slots, A of them active.
M, K, N, R, S = 512, 1024, 2048, 16, 4
L, A = 4, 2
P_DROP = 0.1
SCALE = 2.0

POINTER_TYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
                torch.int32: "*i32", torch.int8: "*i8"}


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor with shape and strides but no storage: what a launch's signature sees of one."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _index(*shape: int) -> torch.Tensor:
    """An int32 index tensor of an AdapterBatch (tile map, rows, starts, adapters, ranks, active)."""
    return _meta(*shape, dtype=torch.int32)


def _dropout(on: bool) -> tuple[float, torch.Tensor | None]:
    """(dropout_p, seed) of a call with dropout on or off: the seed a 0-d int64 tensor."""
    return (P_DROP, _meta(dtype=torch.int64)) if on else (0.0, None)


def _segments(segment_is_adapter: bool, has_ranks: bool) -> tuple:
    """(tiles, rows, seg_starts, seg_adapters, ranks) of a batch: the by-segment view (seg_adapters) or the
    by-adapter one (None: segment j is adapter j); true ranks or none (every adapter at the stack's R)."""
    return (_index(M + L, 2), _index(M), _index(L + 1), None if segment_is_adapter else _index(L),
            _index(L) if has_ranks else None)


def kernel_arguments(kernel: str, usage: str, flags: dict, dtype: str, config) -> dict:
    """The keyword arguments the launcher passes `kernel` at call site `usage` with `flags`, from its own
    argument builder (lora_kernels/triton/lora_linear.py, multi_lora_linear.py) given meta tensors of the
    sizes above and the views the launcher passes (W0ᵀ, Bᵀ: transposed views of the stored weights)."""
    dt = DTYPES.get(dtype)
    fwd = usage.startswith("fwd")
    if kernel == "shrink":    # fwd: x (M, K), lora_a (R, K); bwd: grad_y (M, N), lora_b.T (R, N) view of (N, R)
        x, a = ((_meta(M, K, dtype=dt), _meta(R, K, dtype=dt)) if fwd
                else (_meta(M, N, dtype=dt), _meta(N, R, dtype=dt).T))
        return launch.shrink_arguments(x, a, _meta(S, M, R), x.shape[1] // S, *_dropout(flags["DROPOUT"]), config)
    if kernel == "fused":
        # fwd: x (M, K) · weight.T (K, N) view, lora_b.T (R, N) view; bwd: grad_y (M, N) · weight (N, K), lora_a (R, K)
        if fwd:
            x, w, v = _meta(M, K, dtype=dt), _meta(N, K, dtype=dt).T, _meta(N, R, dtype=dt).T
        else:
            x, w, v = _meta(M, N, dtype=dt), _meta(N, K, dtype=dt), _meta(R, K, dtype=dt)
        m, k, n = M, x.shape[1], w.shape[1]
        partials = flags["SPLIT_K_PARTIALS"]   # the GEMM's (SPLIT_K, M, N) fp32 partials over K ranges
        out = _meta(config.split_k, m, n) if partials else _meta(m, n, dtype=dt)
        return launch.fused_matmul_arguments(
            x, w, _meta(n, dtype=dt) if flags["HAS_BIAS"] else None, _meta(S, M, R), v, out,
            _meta(M, R) if flags["STORE_T_SUM"] else None, SCALE, *_dropout(flags["EPILOGUE_DROPOUT"]),
            k // S if partials else k, config)
    if kernel == "expand":
        # fwd: y (M, N) in place, lora_b.T (R, N) view; bwd: dX (M, K) in place, lora_a (R, K);
        # BASE_PARTIALS: the split-K GEMM's (SPLIT_K, M, N) fp32 partials summed into out
        out, v = ((_meta(M, N, dtype=dt), _meta(N, R, dtype=dt).T) if fwd
                  else (_meta(M, K, dtype=dt), _meta(R, K, dtype=dt)))
        n = out.shape[1]
        return launch.expand_arguments(
            out, _meta(S, M, R), v, _meta(M, R) if flags["STORE_T_SUM"] else None,
            _meta(n, dtype=dt) if flags["HAS_BIAS"] else None,
            _meta(flags["SPLIT_K"], M, n) if flags["BASE_PARTIALS"] else None,
            SCALE, *_dropout(flags["EPILOGUE_DROPOUT"]), config)
    if kernel == "rows":      # dA = dUᵀ (fp32 (M, R)) · dropout(x) ((M, K)); dB = dYᵀ ((M, N)) · T (fp32 (M, R))
        left, right = (_meta(M, R), _meta(M, K, dtype=dt)) if usage == "dA" else (_meta(M, N, dtype=dt), _meta(M, R))
        return launch.rows_matmul_arguments(left, right, _meta(S, left.shape[1], right.shape[1]), M // S, SCALE,
                                            *_dropout(flags["DROPOUT_R"]), config)
    if kernel == "dropout_mask":
        return launch.dropout_mask_arguments(_meta(M, K, dtype=torch.int8), _meta(dtype=torch.int64), P_DROP)
    if kernel == "seg_shrink":
        # fwd: x (M, K), lora_a (L, R, K); bwd: grad_y (M, N), lora_b.transpose(1, 2): (L, R, N) view of (L, N, R)
        x, a = ((_meta(M, K, dtype=dt), _meta(L, R, K, dtype=dt)) if fwd
                else (_meta(M, N, dtype=dt), _meta(L, N, R, dtype=dt).transpose(1, 2)))
        return multi_launch.segmented_shrink_arguments(
            x, a, _meta(S, M, R), *_segments(flags["SEGMENT_IS_ADAPTER"], flags["HAS_RANKS"]), x.shape[1] // S,
            config)
    if kernel == "seg_expand":
        # fwd: y (M, N) += T · lora_b.transpose(1, 2) ((L, R, N) view); bwd: dX (M, K) += dU · lora_a (L, R, K)
        out, v = ((_meta(M, N, dtype=dt), _meta(L, N, R, dtype=dt).transpose(1, 2)) if fwd
                  else (_meta(M, K, dtype=dt), _meta(L, R, K, dtype=dt)))
        return multi_launch.segmented_expand_arguments(
            out, _meta(flags["NUM_T_SPLITS"], M, R), v, _meta(L), _meta(M, R) if flags["STORE_T_SUM"] else None,
            *_segments(flags["SEGMENT_IS_ADAPTER"], flags["HAS_RANKS"]), config)
    if kernel == "seg_rows":
        # dA[j] = s_j dUᵀ (fp32 (M, R)) · x ((M, K)); dB[j] = s_j dYᵀ ((M, N)) · T (fp32 (M, R));
        # partials (SPLITS, A, P, Q) fp32 over the active adapters
        left, right = (_meta(M, R), _meta(M, K, dtype=dt)) if usage == "dA" else (_meta(M, N, dtype=dt), _meta(M, R))
        return multi_launch.segmented_rows_matmul_arguments(
            left, right, _meta(S, A, left.shape[1], right.shape[1]), _index(A), _index(M), _index(L + 1),
            _index(L) if flags["HAS_RANKS"] else None, _meta(L), R, flags["RANK_ON_P"], config)
    raise ValueError(f"unknown kernel {kernel!r}")


def _flag_sets(**choices) -> list[dict]:
    """Every combination of the given flags: FLAG=(values...)."""
    combos = [{}]
    for name, values in choices.items():
        combos = [dict(c, **{name: v}) for c in combos for v in values]
    return combos


# kernel name -> (kernel, configs, {usage: flag combinations the launcher can pass}): configs(flags,
# fp32_dot) lists what the launcher's heuristic picks for a call with those flags. Usages and flag
# sets are listed heaviest first: each config is swept at the first call site that picks it.
KERNELS = {
    "shrink": (kernels.lora_shrink_kernel, lambda f, fp32_dot: shrink_configs(fp32_dot, f["DROPOUT"]), {
        "fwd": _flag_sets(DROPOUT=(True, False)),                       # forward: dropout(x) · Aᵀ
        "bwd": _flag_sets(DROPOUT=(False,)),                            # backward: dY · B
    }),
    "fused": (kernels.lora_fused_matmul_kernel,
              lambda f, fp32_dot: fused_configs(fp32_dot, f["EPILOGUE_DROPOUT"], f["SPLIT_K_PARTIALS"]), {
        "bwd": _flag_sets(HAS_BIAS=(False,), STORE_T_SUM=(True, False), EPILOGUE_DROPOUT=(True, False),
                          SPLIT_K_PARTIALS=(False,)),
        "fwd": _flag_sets(HAS_BIAS=(True, False), STORE_T_SUM=(True,), EPILOGUE_DROPOUT=(False,),
                          SPLIT_K_PARTIALS=(False,)),
        # split-K: the GEMM's fp32 partials only (the expand kernel adds bias and the LoRA term), with
        # the forward's operands (W0ᵀ); dX's call differs by W0's strides alone: 40 compiles saved
        "fwd-splitk": _flag_sets(HAS_BIAS=(False,), STORE_T_SUM=(False,), EPILOGUE_DROPOUT=(False,),
                                 SPLIT_K_PARTIALS=(True,)),
    }),
    # in place after torch's GEMM (the split strategy, SPLIT_K 1), or summing the split-K GEMM's partials
    "expand": (kernels.lora_expand_kernel, lambda f, fp32_dot: expand_configs(), {
        "bwd": _flag_sets(HAS_BIAS=(False,), STORE_T_SUM=(True, False), EPILOGUE_DROPOUT=(True, False),
                          BASE_PARTIALS=(True,), SPLIT_K=(8,))
               + _flag_sets(HAS_BIAS=(False,), STORE_T_SUM=(True, False), EPILOGUE_DROPOUT=(True, False),
                            BASE_PARTIALS=(False,), SPLIT_K=(1,)),
        "fwd": _flag_sets(HAS_BIAS=(True, False), STORE_T_SUM=(True,), EPILOGUE_DROPOUT=(False,),
                          BASE_PARTIALS=(True,), SPLIT_K=(8, 2))
               + _flag_sets(HAS_BIAS=(False,), STORE_T_SUM=(True,), EPILOGUE_DROPOUT=(False,),
                            BASE_PARTIALS=(False,), SPLIT_K=(1,)),
    }),
    "rows": (kernels.lora_rows_matmul_kernel, lambda f, fp32_dot: rows_configs(fp32_dot, f["DROPOUT_R"]), {
        "dA": _flag_sets(DROPOUT_R=(True, False)),                      # dA = dTᵀ · dropout(x)
        "dB": _flag_sets(DROPOUT_R=(False,)),                           # dB = dYᵀ · hidden
    }),
    "dropout_mask": (kernels.dropout_mask_kernel, lambda f, fp32_dot: [DropoutMaskConfig()], {"mask": [{}]}),
    "seg_shrink": (multi_kernels.segmented_shrink_kernel, lambda f, fp32_dot: segmented_configs(fp32_dot), {
        "fwd": _flag_sets(SEGMENT_IS_ADAPTER=(False, True), HAS_RANKS=(True, False)),
        "bwd": _flag_sets(SEGMENT_IS_ADAPTER=(True,), HAS_RANKS=(True, False)),
    }),
    # NUM_T_SPLITS: the rank partials the expand sums unrolled, 1 to MAX_SPLITS (the most loads in flight)
    "seg_expand": (multi_kernels.segmented_expand_kernel, lambda f, fp32_dot: segmented_configs(fp32_dot), {
        "bwd": _flag_sets(SEGMENT_IS_ADAPTER=(True,), HAS_RANKS=(True, False), STORE_T_SUM=(True, False),
                          NUM_T_SPLITS=(common.MAX_SPLITS, 1)),
        "fwd": _flag_sets(SEGMENT_IS_ADAPTER=(False, True), HAS_RANKS=(True, False), STORE_T_SUM=(True, False),
                          NUM_T_SPLITS=(common.MAX_SPLITS, 1)),
    }),
    "seg_rows": (multi_kernels.segmented_rows_matmul_kernel, lambda f, fp32_dot: rows_configs(fp32_dot, False), {
        "dA": _flag_sets(HAS_RANKS=(True, False), RANK_ON_P=(True,)),
        "dB": _flag_sets(HAS_RANKS=(True, False), RANK_ON_P=(False,)),
    }),
}


_ABBREV = {"block_m": "m", "block_n": "n", "block_k": "k", "block_r": "r", "block_p": "p", "block_q": "q",
           "group_m": "g", "num_warps": "w", "num_stages": "s", "split_k": "sk", "expand_stages": "es"}


def _config_str(config) -> str:
    """"m128n128k64r32g8w8s3": the config's set fields, abbreviated."""
    return "".join(f"{_ABBREV.get(f.name, f.name)}{getattr(config, f.name)}"
                   for f in fields(config) if getattr(config, f.name) is not None)


@dataclass(frozen=True)
class Case:
    kernel: str
    usage: str
    flags: tuple            # ((name, bool), ...)
    dtype: str              # input dtype ("-" for dropout_mask)
    precision: tuple        # (DOT_PRECISION, LORA_DOT_PRECISION), () where the kernel has none
    config: object
    arch: int
    aligned: bool

    def __str__(self):
        flags = "".join(f"{''.join(w[0] for w in n.split('_'))}{int(v)}" for n, v in self.flags) or "noflags"
        prec = "-" + "/".join(_unique(self.precision)) if self.precision else ""
        spec = "aligned" if self.aligned else "plain"
        return f"{self.kernel}-{self.usage}-{flags}-{self.dtype}{prec}-{_config_str(self.config)}-sm{self.arch}-{spec}"

    def build(self):
        """(kernel, signature, constexprs, attrs, num_warps, num_stages) as the launcher launches it: its
        keyword arguments from the launcher's argument builder (kernel_arguments), with torch's fp32 matmul
        setting that gives this case's precision."""
        kernel = KERNELS[self.kernel][0]
        with _fp32_matmuls_on_tf32(self.precision[:1] == ("tf32",)):
            arguments = kernel_arguments(self.kernel, self.usage, dict(self.flags), self.dtype, self.config)
        # the call this case stands for: its flags, and precisions as the launcher reads torch's setting
        assert {name: arguments[name] for name, _ in self.flags} == dict(self.flags), (self, arguments)
        assert all(arguments[name] in self.precision for name in ("DOT_PRECISION", "LORA_DOT_PRECISION")
                   if name in arguments), (self, arguments)
        signature, constexprs, attrs = launch_signature(kernel, arguments, self.aligned)
        num_stages = self.config.expand_stages if self.kernel == "seg_expand" else self.config.num_stages
        return kernel, signature, constexprs, attrs, self.config.num_warps, num_stages

    def request(self) -> dict:
        kernel, signature, constexprs, attrs, num_warps, num_stages = self.build()
        return _request(kernel, signature, constexprs, TARGETS[self.arch], num_warps, num_stages, attrs)


def _largest(configs):
    return max(configs, key=lambda c: (astuple(c)[:-2], c.num_warps or 0, c.num_stages or 0))


# The other call sites and flag combinations are compiled for one 16-bit and one 32-bit dtype:
# bf16, and fp32 with the precision that needs the most shared memory (tf32 when allowed).
FLAG_DTYPES = (("bf16", ("tf32", "tf32")), ("fp32", ("tf32", "tf32")))


@functools.lru_cache(maxsize=None)
def call_site_configs(name: str, flags: tuple, dtype: str, precision: tuple) -> list:
    """The configs KERNELS[name]'s launcher picks for a call with `flags` ((name, value), ...) on
    `dtype` inputs at `precision` (common.fp32_dot: fp32's dot precision, None for 16-bit inputs)."""
    return KERNELS[name][1](dict(flags), precision[0] if dtype == "fp32" else None)


@functools.lru_cache(maxsize=None)
def _sweep(name: str, dtype: str, precision: tuple) -> tuple[tuple[str, tuple, object], ...]:
    """(usage, flags, config) for each config the launcher picks for each call site (usage) of
    KERNELS[name] on `dtype` at `precision`, with the first (heaviest) flag set that picks it."""
    sweep = []
    for usage, flag_sets in KERNELS[name][2].items():
        seen = set()
        for flags in flag_sets:
            for config in call_site_configs(name, tuple(flags.items()), dtype, precision):
                if config not in seen:
                    seen.add(config)
                    sweep.append((usage, tuple(flags.items()), config))
    return tuple(sweep)


def _swept(case: Case) -> bool:
    """Whether `case` is one of the sweep's compiles: aligned, with the first flag set of its call site
    that picks its config; fp16 only at each kernel's first call site (fp16 and bf16 compile the same
    code but for the MMA type: over the 116 pairs of the first report, the same spills and at most 8
    registers apart)."""
    return (case.aligned and (case.usage, case.flags, case.config) in _sweep(case.kernel, case.dtype, case.precision)
            and (case.dtype != "fp16" or case.usage == next(iter(KERNELS[case.kernel][2]))))


def _all_cases(full: bool) -> list[Case]:
    """The compiles to check: the whole product when `full`, else the reduction of the docstring."""
    cases = []
    for name, (_, _, usages) in KERNELS.items():
        dtype_precisions = ([("-", ())] if name == "dropout_mask" else
                            [(d, p) for d in DTYPES for p in _precisions(DTYPES[d])])
        for (dt, prec), (usage, flag_sets) in itertools.product(dtype_precisions, usages.items()):
            for flags in flag_sets:
                flags = tuple(flags.items())
                configs = call_site_configs(name, flags, dt, prec)
                big = _largest(configs)
                for config, arch, aligned in itertools.product(configs, TARGETS, (True, False)):
                    case = Case(name, usage, flags, dt, prec, config, arch, aligned)
                    if full or (
                            _swept(case)                               # every config x dtype x target
                            or (aligned and config == big and (dt == "-" or (dt, prec) in FLAG_DTYPES))
                            or (not aligned and flags == tuple(flag_sets[0].items()) and config == big)):
                        cases.append(case)
    return cases


FULL = os.environ.get("LORA_AOT_FULL", "") not in ("", "0")
CASES = _all_cases(FULL)


@pytest.fixture(scope="module")
def aot_results(request):
    """Submits every selected case to the worker pool at once (one worker per core), so the
    compiles overlap; each test then waits for its own. Case -> Future of the worker response."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
                and "case" in item.callspec.params]
    futures = {}

    def submit(case):
        futures[case] = _pool().submit(case.request())

    for case in _unique(selected):   # each test below parametrizes its own list of the cases
        submit(case)
    yield futures, submit
    _close_pool()


def test_compile_for_helper():
    """compile_for itself, on the small mask kernel: in-process with real JITFunctions, through a
    worker under TRITON_INTERPRET=1."""
    kernel, signature, constexprs, attrs, num_warps, num_stages = Case(
        "dropout_mask", "mask", (), "-", (), DropoutMaskConfig(), 90, True).build()
    compiled = compile_for(kernel, signature, constexprs, TARGETS[90], num_warps, num_stages, attrs)
    assert compiled.metadata.num_warps == 4
    assert 0 <= compiled.metadata.shared <= SHARED_LIMIT[90]
    res = kernel_resources(compiled, 90)   # cuobjdump on the cubin, in-process or in the worker
    assert 0 < res.registers <= 255 and res.spill == 0 and res.mma == ()   # a mask: no dot
    assert res.ctas_per_sm()[0] >= 1


def test_ctas_per_sm_follows_cuda_occupancy():
    """Resources.ctas_per_sm against cuda_occupancy.h's arithmetic, worked by hand."""
    def ctas(arch, registers, num_warps, shared, static_shared=0):
        return Resources(arch, registers, 0, 0, static_shared, shared, num_warps, ()).ctas_per_sm()

    # 255 regs -> 8192 per warp (255 x 32 = 8160, rounded to 256): 2 warps in each 16 K sub-partition,
    # 8 per SM: one 8-warp CTA, though shared memory (96 + 1 static + 1 reserved KB) would allow 2
    assert ctas(90, 255, 8, 96 * 1024, static_shared=1024) == (1, "regs")
    assert ctas(90, 218, 8, 96 * 1024) == (1, "regs")          # 7168 per warp: still 2 per sub-partition
    # 38 regs -> 1280 per warp, 12 per sub-partition: 12 CTAs of 4 warps; 33 KB each: 4 fit in 164 KB
    assert ctas(80, 38, 4, 32 * 1024) == (4, "smem")
    assert ctas(90, 38, 4, 32 * 1024) == (6, "smem")          # 228 KB // 33 KB
    assert ctas(90, 32, 4, 0) == (16, "warps")                 # 64 warps per SM; registers allow 16 too
    assert ctas(90, 40, 1, 0) == (32, "ctas")                  # 1 KB reserved each: 228 would fit
    assert ctas(80, 64, 4, 80 * 1024) == (2, "smem")          # 2 x (80 + 1) KB <= 164 KB
    assert ctas(80, 64, 4, 163 * 1024) == (1, "smem")          # the per-block maximum
    assert ctas(80, 64, 4, 163 * 1024 + 1) == (0, "smem")      # over it: no launch
    assert ctas(90, 128, 16, 0) == (1, "regs")                 # 16 warps x 4096 = the whole 64 K


def test_matrix_instructions_reads_ptx():
    ptx = """
        wgmma.fence.sync.aligned;
        wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, p, 1, 1, 0, 1;
        wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r2}, %rd3, %rd4, p, 1, 1, 0, 1;
        wgmma.commit_group.sync.aligned;
        mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r5}, {%r6}, {%f2};
        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r5}, {%r6}, {%f2};
    """
    assert matrix_instructions(ptx) == ["mma.sync.m16n8k16.f16", "mma.sync.m16n8k8.tf32", "wgmma.m64n128k16.bf16"]
    assert matrix_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == []
    res = Resources(90, 64, 0, 0, 0, 0, 4, tuple(matrix_instructions(ptx)))
    assert res.mma_summary() == "wgmma bf16, mma.sync f16, mma.sync tf32"
    assert Resources(90, 64, 0, 0, 0, 0, 4, ()).mma_summary() == "FMA"


def _case_resources(case: Case, aot_results) -> Resources:
    """`case` compiled (by the worker pool; submitted now if the fixture did not), its Resources.
    Fails the test when it does not compile."""
    futures, submit = aot_results
    if case not in futures:
        submit(case)
    try:
        compiled = _remote_result(futures[case].result(timeout=900))
    except AotCompileError as exc:
        pytest.fail(f"{case} does not compile for sm_{case.arch}:\n{exc}", pytrace=False)
    return kernel_resources(compiled, case.arch)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiles_within_shared_memory(case, aot_results):
    res = _case_resources(case, aot_results)
    limit = SHARED_LIMIT[case.arch]
    if res.shared > limit:
        pytest.fail(f"{case}: needs {res.shared} B of shared memory per block ({res.dynamic_shared} B dynamic, "
                    f"{res.static_shared} B static), sm_{case.arch} allows {limit} B (a launch raises "
                    f"OutOfResources)", pytrace=False)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_no_register_spills(case, aot_results):
    res = _case_resources(case, aot_results)
    if res.spill:
        pytest.fail(f"{case}: ptxas spills registers: {res.registers} registers and a {res.stack} B stack frame "
                    f"(+ {res.local} B local memory) per thread, each spill a local-memory round trip. Fewer "
                    f"accumulator elements per thread (num_warps up, a smaller tile), a shallower reduction tile "
                    f"or fewer stages frees registers: change the launcher's heuristic (the config functions of "
                    f"lora_kernels/triton/lora_linear.py, multi_lora_linear.py)", pytrace=False)


# The kernels whose GEMM multiplies two input-dtype tiles (x · A, x · W0ᵀ, dY · W0, dY · B), and the
# config field that is the tile's rows. Hopper runs a 16-bit tile of >= 64 rows (one warpgroup of 4
# warps per 64 rows) as wgmma at about twice mma.sync's rate. The other dots (rows_matmul, the
# segmented expand and rows kernels, fused's LoRA term) multiply an fp32 operand.
GEMM16_ROWS = {"shrink": "block_m", "fused": "block_m", "seg_shrink": "block_m"}
WGMMA_CASES = [c for c in CASES if c.arch == 90 and c.dtype in ("fp16", "bf16") and c.kernel in GEMM16_ROWS
               and getattr(c.config, GEMM16_ROWS[c.kernel]) >= 64]


@pytest.mark.parametrize("case", WGMMA_CASES, ids=str)
def test_sm90_16bit_gemm_uses_wgmma(case, aot_results):
    res = _case_resources(case, aot_results)
    ptx_type = {"fp16": "f16", "bf16": "bf16"}[case.dtype]
    if not any(m.startswith("wgmma.") and m.endswith("." + ptx_type) for m in res.mma):
        pytest.fail(f"{case}: a {getattr(case.config, GEMM16_ROWS[case.kernel])}-row {case.dtype} GEMM tile "
                    f"for sm_90 compiled without wgmma (matrix instructions in the PTX: "
                    f"{', '.join(res.mma) or 'none, FMA only'})", pytrace=False)


# ---------------------------------------------------------------------------------------------
# The resource report: python tests/test_aot_compile.py --report
# ---------------------------------------------------------------------------------------------

REPORT_COMMAND = "python tests/test_aot_compile.py --report"
REPORT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench", "results")


def _report_row(case: Case, response: dict) -> dict:
    row = {"case": str(case), "kernel": case.kernel, "usage": case.usage, "flags": dict(case.flags),
           "dtype": case.dtype, "precision": list(case.precision), "config": _config_str(case.config),
           "arch": case.arch, "specialization": "aligned" if case.aligned else "plain"}
    if not response["ok"]:
        return dict(row, error=response["error"])
    compiled = _remote_result(response)
    res = kernel_resources(compiled, case.arch)
    ctas, limiter = res.ctas_per_sm()
    return dict(row, registers=res.registers, spill=res.spill, stack=res.stack, local=res.local,
                shared=res.shared, static_shared=res.static_shared, dynamic_shared=res.dynamic_shared,
                num_warps=res.num_warps, num_stages=compiled.metadata.num_stages, ctas_per_sm=ctas,
                limited_by=limiter, mma=list(res.mma), mma_summary=res.mma_summary())


def _order(case: Case) -> tuple:
    """Sort key: kernel, call site, flags, config as KERNELS lists them; dtype, precision, target."""
    usages = KERNELS[case.kernel][2]
    configs = call_site_configs(case.kernel, case.flags, case.dtype, case.precision)
    return (list(KERNELS).index(case.kernel), list(usages).index(case.usage),
            usages[case.usage].index(dict(case.flags)), not case.aligned, configs.index(case.config),
            list(DTYPES).index(case.dtype) if case.dtype in DTYPES else -1, case.precision, case.arch)


def _flags_str(flags: dict) -> str:
    return ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in flags.items()) or "-"


def _md_rows(rows: list[dict], columns: list[str]) -> list[str]:
    cells = {
        "kernel": lambda r: r["kernel"], "call site": lambda r: r["usage"],
        "flags": lambda r: _flags_str(r["flags"]), "spec.": lambda r: r["specialization"],
        "config": lambda r: f"`{r['config']}`",
        "dtype": lambda r: r["dtype"] + (f" ({'/'.join(_unique(r['precision']))})" if r["precision"] else ""),
        "sm": lambda r: str(r["arch"]), "regs": lambda r: str(r["registers"]),
        "spill B": lambda r: f"**{r['spill']}**" if r["spill"] else "0",
        "smem KB": lambda r: f"{r['shared'] / 1024:.1f}", "warps": lambda r: str(r["num_warps"]),
        "CTAs/SM": lambda r: f"{r['ctas_per_sm']} ({r['limited_by']})", "MMA": lambda r: r["mma_summary"]}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            lines.append("| " + " | ".join(cells[c](r) if c in ("kernel", "call site", "flags", "spec.", "config",
                                                                   "dtype", "sm") else "-" for c in columns)
                         + " |  <- does not compile")
        else:
            lines.append("| " + " | ".join(cells[c](r) for c in columns) + " |")
    return lines


def write_report(results: dict, out_dir: str) -> tuple[str, str]:
    """kernel-resources.md and .json in `out_dir` from {Case: worker response}; returns their paths."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    cases = sorted(results, key=_order)
    rows = [_report_row(c, results[c]) for c in cases]
    ok = [r for r in rows if "error" not in r]
    tools = {"triton": triton.__version__, "cuobjdump": knobs.nvidia.cuobjdump.version,
             **{f"ptxas sm_{arch}": get_ptxas(arch).version for arch in TARGETS}}
    limits = {f"sm_{arch}": vars(lim) for arch, lim in SM_LIMITS.items()}
    base = os.path.join(out_dir, "kernel-resources")
    with open(base + ".json", "w") as f:   # one row a line: diffs stay readable
        head = json.dumps({"command": REPORT_COMMAND, "cases": "full" if FULL else "default", "tools": tools,
                           "limits": limits})
        f.write(head[:-1] + ', "rows": [\n' + ",\n".join(
            json.dumps({k: v for k, v in r.items() if k != "mma_summary"}) for r in rows) + "\n]}\n")

    worst = ["| kernel | sm | compiles | max regs | spills | max smem KB | min CTAs/SM | MMA |", "|" + "---|" * 8]
    for name in KERNELS:
        for arch in TARGETS:
            group = [r for r in ok if r["kernel"] == name and r["arch"] == arch]
            if not group:
                continue
            spills = [r for r in group if r["spill"]]
            fewest = min(group, key=lambda r: r["ctas_per_sm"])
            worst.append(
                f"| {name} | {arch} | {len(group)} | {max(r['registers'] for r in group)} | "
                + (f"**{len(spills)}** (up to {max(r['spill'] for r in spills)} B)" if spills else "none")
                + f" | {max(r['shared'] for r in group) / 1024:.1f} | "
                + f"{fewest['ctas_per_sm']} ({fewest['limited_by']}) | "
                + ", ".join(_mma_kinds(k for r in group for k in r["mma_summary"].split(", "))) + " |")
    spilled = [r for r in ok if r["spill"]]
    swept_ids = {str(c) for c in cases if _swept(c)}
    swept = [r for r in rows if r["case"] in swept_ids]
    others = [r for r in rows if r["case"] not in swept_ids]
    md = [
        "# Kernel resources on sm_80 and sm_90 (static: ahead-of-time compiles, no GPU)",
        "",
        f"Generated by `{REPORT_COMMAND}` (from the repository root, with the project's venv; no GPU, no "
        "pytest; writes this file and kernel-resources.json). Do not edit by hand.",
        "",
        f"What: the {'whole product' if FULL else 'default case list'} of tests/test_aot_compile.py, "
        f"{len(rows)} compiles: every config the launchers' heuristics pick, each dtype/precision, each "
        "target, at the heaviest call site that picks it; every call site and flag set on its largest config "
        "(bf16, fp32 on tf32); each call site's unspecialized signature on its largest config. Compiled with "
        "`triton.compile(ASTSource, target=GPUTarget(\"cuda\", arch, 32))` by "
        + ", ".join(f"{k} {v}" for k, v in tools.items() if k != "cuobjdump")
        + f"; registers, stack frame and static shared memory read from each cubin by cuobjdump "
        f"{tools['cuobjdump']} `--dump-resource-usage`; the matrix instructions found in the PTX.",
        "",
        "Columns: **regs** registers per thread; **spill B** stack frame + local memory per thread (these "
        "kernels make no calls, so any is register spill); **smem KB** shared memory per CTA (Triton's "
        "dynamic + the cubin's static); **CTAs/SM** how many CTAs fit on one SM and what limits them "
        "(regs, smem, warps, ctas), by cuda_occupancy.h's arithmetic with the largest shared-memory "
        "carveout (sm_80: 64 K registers, 164 KB, 64 warps, 32 CTAs; sm_90: the same with 228 KB); "
        "**MMA** the matrix instructions in the PTX (wgmma, mma.sync, with their input type), FMA when none.",
        "",
        "Worst values: max registers "
        + f"{max(r['registers'] for r in ok)} ({max(ok, key=lambda r: r['registers'])['case']}); "
        + (f"**{len(spilled)} compiles spill** (up to {max(r['spill'] for r in spilled)} B: "
           f"{max(spilled, key=lambda r: r['spill'])['case']})" if spilled else "no spill")
        + f"; min CTAs/SM {min(r['ctas_per_sm'] for r in ok)} "
        + f"({min(ok, key=lambda r: r['ctas_per_sm'])['case']})"
        + (f"; **{len(rows) - len(ok)} do not compile**" if len(ok) < len(rows) else "") + ". "
        "The tests fail on any spill (test_no_register_spills).",
        "",
        *worst,
        "",
        "## Every config, at the heaviest call site that picks it",
    ]
    for name, (_, _, usages) in KERNELS.items():
        for usage, flag_sets in usages.items():
            for flags in flag_sets:
                group = [r for r in swept if (r["kernel"], r["usage"], r["flags"]) == (name, usage, flags)]
                if group:
                    md += ["", f"### {name}: {usage}, {_flags_str(flags)}", "",
                           *_md_rows(group, ["config", "dtype", "sm", "regs", "spill B", "smem KB", "warps",
                                             "CTAs/SM", "MMA"])]
    md += ["", "## Other call sites and flags, and the unspecialized signature (largest config)", "",
           *_md_rows(others, ["kernel", "call site", "flags", "spec.", "config", "dtype", "sm", "regs", "spill B",
                              "smem KB", "warps", "CTAs/SM", "MMA"])]
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    return base + ".md", base + ".json"


def _report_main(argv: list[str]) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python tests/test_aot_compile.py",
                                     description="Compile the AOT cases (no GPU) and write kernel-resources.md/.json.")
    parser.add_argument("--report", action="store_true", required=True)
    parser.add_argument("--out", default=REPORT_DIR, help="output folder (default: bench/results)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    futures = {case: _pool().submit(case.request()) for case in CASES}
    results = {case: future.result() for case, future in futures.items()}
    _close_pool()
    paths = write_report(results, args.out)
    failed = [str(c) for c, r in results.items() if not r["ok"]]
    print(f"{len(results)} compiles in {time.monotonic() - start:.0f} s -> {', '.join(map(os.path.relpath, paths))}"
          + (f"; {len(failed)} do not compile: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--aot-worker"]:
        _worker_main()
    else:
        sys.exit(_report_main(sys.argv[1:]))
