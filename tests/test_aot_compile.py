"""Ahead-of-time compile of the Triton kernels for real GPUs (sm_80, sm_90), with no device.

The interpreter (TRITON_INTERPRET=1, how CPU CI runs the kernels) accepts code that the GPU
compiler rejects (``tl.dot`` on tiles under 16, ...), and it knows nothing of shared memory. This
module compiles each kernel with ``triton.compile(ASTSource(...), target=GPUTarget(...))``, as a
launch would on an A100 (sm_80) and an H100 (sm_90), and checks that it compiles and that
``metadata.shared`` fits the target's per-block limit (sm_80: 163 KB, sm_90: 227 KB).

What is compiled -- the configs, constexprs and pointer types come from the launchers themselves
(lora_kernels/triton/lora_linear.py, lora_kernels/triton/multi_lora_linear.py), not copied here:

* Configs: every distinct config that ``shrink_config`` / ``fused_matmul_config`` / ``rows_config``
  return over M in {1, 16, 17, 64, 65, 256, 257, 8192} x rank in {1, 8, 12, 16, 32, 64, 128, 256}
  x K, N in {64, 1024, 4096, 8192, 16384} (rows: P and Q over the union of these sets), which takes
  every branch of the heuristics (today 6 shrink, 16 fused-matmul, 9 rows-matmul configs);
  the multi-adapter kernels: every ``segmented_config`` over M x segments in {1, 8, 64, 1024} x
  rank (6 configs) for the segmented shrink and expand, the rows-matmul configs for the
  per-adapter weight gradients; flags SEGMENT_IS_ADAPTER, HAS_RANKS, STORE_T_SUM, RANK_ON_P and
  the segment-scan width BLOCK_S (1 to 1024);
  dropout_mask_kernel has its one launch.
* Dtypes: fp16, bf16, fp32, with DOT_PRECISION / LORA_DOT_PRECISION as ``dot_precision`` /
  ``lora_precision`` give them; fp32 twice, as both settings of torch's allow_tf32 switch
  give it ("ieee" by default, "tf32" when the user allows it).
* Call sites ("usages") and constexpr flags, as the launchers pass them: shrink fwd (x, A; DROPOUT
  on/off) and bwd (dY, Bᵀ); fused fwd (x, W0ᵀ, Bᵀ; HAS_BIAS on/off, STORE_T_SUM) and bwd (dY, W0, A;
  STORE_T_SUM on/off x EPILOGUE_DROPOUT on/off); rows dA (fp32 dU left, input-dtype x right;
  DROPOUT_R on/off) and dB (input-dtype dY left, fp32 T right). Rank partials, t_sum and the
  rows output are fp32; x, w, bias, v, out the input dtype.
* Specialization: "aligned" is the signature a launch with 16-aligned sizes gets (Triton's JIT
  makes ints equal to 1 -- the unit strides -- constexprs and marks pointers and ints divisible by
  16): widest vector loads, deepest cp.async pipelining, so (nearly always) the most shared memory.
  "plain" is the signature with no specialization at all (odd sizes such as rank 12, unaligned
  views): the narrowest loads.

What runs by default (today 628 compiles, about 4 minutes on 2 cores: one worker process per
core compiles while the tests collect the results), since the whole product takes far longer:

* every config x every dtype/precision x both targets, aligned, at each kernel's heaviest call
  site (shrink fwd with DROPOUT, fused bwd with STORE_T_SUM and EPILOGUE_DROPOUT, rows dA with
  DROPOUT_R). Shared memory is set by the tiles, stages, dtypes and strides, which this sweeps;
  over the whole product no other call site or flag set needed more than 10 KB over these;
* every other call site x flag combination the launchers can pass, on each kernel's largest
  config, both targets, aligned, for one 16-bit and one 32-bit dtype (bf16; fp32 with tf32, the
  precision needing the most shared memory);
* the plain specialization on each kernel's largest config, every dtype/precision, both targets.

``LORA_AOT_FULL=1`` runs the whole product instead (every config x call site x flags x dtype x
target x specialization: today 5,716 compiles; about 50 minutes on 2 cores, extrapolated from 2,260 in 19).
``LORA_AOT_WORKERS=N`` sets the number of worker processes.

Under TRITON_INTERPRET=1 ``@triton.jit`` returns interpreter objects, and so do triton.language's
own jitted helpers (``tl.cdiv``, ``tl.rand``): nothing can be compiled in that process. The
compiles therefore run in worker processes (this file run as a script) whose environment lacks
TRITON_INTERPRET; ``compile_for`` compiles in-process when the kernel is a real JITFunction.
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import astuple, dataclass, fields
from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile ahead of time")
torch = pytest.importorskip("torch")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from lora_kernels.triton import lora_linear as launch  # noqa: E402
from lora_kernels.triton import multi_lora_linear as multi_launch  # noqa: E402
from lora_kernels.triton.kernels import lora_linear as kernels  # noqa: E402
from lora_kernels.triton.kernels import multi_lora_linear as multi_kernels  # noqa: E402

pytestmark = pytest.mark.aot

if __name__ != "__main__" and "nvidia" not in getattr(triton.backends, "backends", {}):
    pytest.skip("this triton has no NVIDIA backend to compile for", allow_module_level=True)

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # bytes of shared memory per block (opt-in maximum)
TARGETS = {arch: GPUTarget("cuda", arch, 32) for arch in SHARED_LIMIT}


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
    object) the metadata of the same compile done in a worker process without TRITON_INTERPRET.
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
    return SimpleNamespace(metadata=SimpleNamespace(**response["metadata"]))


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
            response = {"ok": True, "metadata": metadata}
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
# Signatures as a launch specializes them.
# ---------------------------------------------------------------------------------------------

def launch_signature(kernel, args: dict, constexprs: dict, aligned: bool):
    """(signature, constexprs, attrs) for `kernel` launched with `args` (name -> a pointer type such
    as "*fp16", an int, or a float) plus the `constexprs` it is given by keyword.
    aligned: as Triton's JIT specializes the launch -- an int equal to 1 becomes a constexpr,
    pointers (torch allocations) and ints divisible by 16 get tt.divisibility 16.
    Not aligned: no specialization (every int a runtime i32/i64, no hints)."""
    name = kernel.fn.__name__
    unknown = [a for a in kernel.arg_names if a not in args and a not in constexprs]
    extra = [a for a in list(args) + list(constexprs) if a not in kernel.arg_names]
    assert not unknown and not extra, (
        f"{name}'s arguments changed (not given here: {unknown}; no longer arguments: {extra}): update "
        f"this test's argument builders to match the launcher in lora_kernels/triton/lora_linear.py")
    signature, consts, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name], hinted = value, True
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


SHRINK_CONFIGS = _unique(launch.shrink_config(m, k, r) for m in M_VALUES for k in WIDTHS for r in RANKS)
FUSED_CONFIGS = _unique(launch.fused_matmul_config(m, n, k, r)
                        for m in M_VALUES for n in WIDTHS for k in WIDTHS for r in RANKS)
ROWS_CONFIGS = _unique(launch.rows_config(p, q) for p in ROWS_SIZES for q in ROWS_SIZES)
SEGMENT_COUNTS = (1, 8, 64, 1024)   # adapters (ids) or caller segments
SEGMENTED_CONFIGS = _unique(multi_launch.segmented_config(m, s, r)
                            for m in M_VALUES for s in SEGMENT_COUNTS for r in RANKS)


@dataclass(frozen=True)
class DropoutMaskConfig:
    """dropout_keep_mask's literal launch: BLOCK_M=32, BLOCK_K=64, backend default warps/stages."""
    block_m: int = 32
    block_k: int = 64
    num_warps: int | None = None
    num_stages: int | None = None


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TRITON_DTYPE = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


def _precisions(dtype: torch.dtype) -> list[tuple[str, str]]:
    """(dot_precision, lora_precision) pairs the launcher may pass for `dtype`: under both settings
    of torch.backends.cuda.matmul.allow_tf32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        pairs = []
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            pairs.append((launch.dot_precision(dtype), launch.lora_precision(dtype)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return _unique(pairs)


# Representative sizes for the "aligned" signature: multiples of 16, as typical layers have.
M, K, N, R, S = 512, 1024, 2048, 16, 4
SEED, P_DROP = 123457, 0.1
DROP = {"seed": SEED, "dropout_p": P_DROP, "dropout_scale": 1.0 / (1.0 - P_DROP)}


def _shrink_args(usage: str, dt: str) -> dict:
    """lora_linear.shrink: fwd (x (M, K), lora_a (R, K)); bwd (grad_y (M, N), lora_b.T = (R, N) view)."""
    k = K if usage == "fwd" else N
    a_strides = (k, 1) if usage == "fwd" else (1, R)
    return dict(x_ptr=f"*{dt}", a_ptr=f"*{dt}", out_ptr="*fp32", M=M, K=k, R=R, k_per_split=k // S,
                stride_xm=k, stride_xk=1, stride_ar=a_strides[0], stride_ak=a_strides[1],
                stride_os=M * R, stride_om=R, **DROP)


def _fused_args(usage: str, dt: str, flags: dict) -> dict:
    """lora_linear.fused_matmul: fwd (x, weight.T, bias, xAᵀ partials, lora_b.T -> y, t_sum);
    bwd (grad_y, weight, out as bias placeholder, dY·B partials, lora_a -> dX, t_sum | partials)."""
    if usage == "fwd":   # x (M, K) · W0ᵀ (K, N); v = lora_b.T: (R, N) view of (N, R)
        n, k, w_strides, v_strides = N, K, (1, K), (1, R)
    else:                # dY (M, N) · W0 (N, K); v = lora_a (R, K)
        n, k, w_strides, v_strides = K, N, (K, 1), (K, 1)
    return dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", t_ptr="*fp32", v_ptr=f"*{dt}",
                out_ptr=f"*{dt}", t_sum_ptr="*fp32", M=M, N=n, K=k, R=R, num_t_splits=S,
                stride_xm=k, stride_xk=1, stride_wk=w_strides[0], stride_wn=w_strides[1],
                stride_ts=M * R, stride_tm=R, stride_vr=v_strides[0], stride_vn=v_strides[1],
                stride_om=n, stride_on=1, stride_sm=R if flags["STORE_T_SUM"] else 0,
                stride_bias=1 if flags["HAS_BIAS"] else 0, scale=2.0, **DROP)


def _rows_args(usage: str, dt: str) -> dict:
    """lora_linear.rows_matmul: dA = dTᵀ (fp32 (M, R)) · dropout(x) ((M, K), input dtype);
    dB = dYᵀ ((M, N), input dtype) · hidden (fp32 (M, R))."""
    if usage == "dA":
        left, right, p, q = "*fp32", f"*{dt}", R, K
    else:
        left, right, p, q = f"*{dt}", "*fp32", N, R
    return dict(l_ptr=left, r_ptr=right, out_ptr="*fp32", M=M, P=p, Q=q, rows_per_split=M // S,
                stride_lm=p, stride_lp=1, stride_rm=q, stride_rq=1, stride_os=p * q, stride_op=q,
                alpha=2.0, **DROP)


# multi-adapter kernels: L adapter stacks, S segments; index tensors are int32
L = 8
INDEX_ARGS = dict(rows_ptr="*i32", seg_starts_ptr="*i32", seg_adapters_ptr="*i32", ranks_ptr="*i32")


def _seg_shrink_args(usage: str, dt: str) -> dict:
    """multi_lora_linear.segmented_shrink: fwd (x (M, K), lora_a (L, R, K));
    bwd (grad_y (M, N), lora_b.transpose(1, 2) = (L, R, N) view of (L, N, R))."""
    k = K if usage == "fwd" else N
    a_strides = (R * K, K, 1) if usage == "fwd" else (N * R, 1, R)
    return dict(x_ptr=f"*{dt}", a_ptr=f"*{dt}", out_ptr="*fp32", **INDEX_ARGS,
                K=k, R=R, S=S, k_per_split=k // S, stride_xm=k, stride_xk=1,
                stride_al=a_strides[0], stride_ar=a_strides[1], stride_ak=a_strides[2],
                stride_os=M * R, stride_om=R)


def _seg_expand_args(usage: str, dt: str, flags: dict) -> dict:
    """multi_lora_linear.segmented_expand_: fwd (y (M, N) += T · lora_b.transpose(1, 2), (L, R, N) view);
    bwd (dX (M, K) += dU · lora_a (L, R, K))."""
    n, v_strides = (N, (N * R, 1, R)) if usage == "fwd" else (K, (R * K, K, 1))
    return dict(t_ptr="*fp32", v_ptr=f"*{dt}", out_ptr=f"*{dt}", t_sum_ptr="*fp32", **INDEX_ARGS,
                scales_ptr="*fp32", N=n, R=R, S=S, num_t_splits=S, stride_ts=M * R, stride_tm=R,
                stride_vl=v_strides[0], stride_vr=v_strides[1], stride_vn=v_strides[2],
                stride_om=n, stride_on=1, stride_sm=R if flags["STORE_T_SUM"] else 0)


def _seg_rows_args(usage: str, dt: str) -> dict:
    """multi_lora_linear.segmented_rows_matmul: dA[j] = s_j dUᵀ (fp32 (M, R)) · x ((M, K), input dtype);
    dB[j] = s_j dYᵀ ((M, N), input dtype) · T (fp32 (M, R)); out (SPLITS, L, P, Q) fp32."""
    if usage == "dA":
        left, right, p, q = "*fp32", f"*{dt}", R, K
    else:
        left, right, p, q = f"*{dt}", "*fp32", N, R
    return dict(l_ptr=left, r_ptr=right, out_ptr="*fp32", rows_ptr="*i32", adapter_starts_ptr="*i32",
                ranks_ptr="*i32", scales_ptr="*fp32", P=p, Q=q, R=R, num_splits=S,
                stride_lm=p, stride_lp=1, stride_rm=q, stride_rq=1,
                stride_os=L * p * q, stride_ol=p * q, stride_op=q)


def _flag_sets(**choices) -> list[dict]:
    """Every combination of the given flags: FLAG=(values...)."""
    combos = [{}]
    for name, values in choices.items():
        combos = [dict(c, **{name: v}) for c in combos for v in values]
    return combos


# kernel name -> (kernel, configs, {usage: flag combinations the launcher can pass}); the first usage
# and its first flag set are the heaviest code path, swept over every config.
KERNELS = {
    "shrink": (kernels.lora_shrink_kernel, SHRINK_CONFIGS, {
        "fwd": _flag_sets(DROPOUT=(True, False)),                       # forward: dropout(x) · Aᵀ
        "bwd": _flag_sets(DROPOUT=(False,)),                            # backward: dY · B
    }),
    "fused": (kernels.lora_fused_matmul_kernel, FUSED_CONFIGS, {
        "bwd": _flag_sets(HAS_BIAS=(False,), STORE_T_SUM=(True, False), EPILOGUE_DROPOUT=(True, False)),
        "fwd": _flag_sets(HAS_BIAS=(True, False), STORE_T_SUM=(True,), EPILOGUE_DROPOUT=(False,)),
    }),
    "rows": (kernels.lora_rows_matmul_kernel, ROWS_CONFIGS, {
        "dA": _flag_sets(DROPOUT_R=(True, False)),                      # dA = dTᵀ · dropout(x)
        "dB": _flag_sets(DROPOUT_R=(False,)),                           # dB = dYᵀ · hidden
    }),
    "dropout_mask": (kernels.dropout_mask_kernel, [DropoutMaskConfig()], {"mask": [{}]}),
    # BLOCK_S: the segment scan's width, 1 to MAX_BLOCK_S (a power of two)
    "seg_shrink": (multi_kernels.segmented_shrink_kernel, SEGMENTED_CONFIGS, {
        "fwd": _flag_sets(SEGMENT_IS_ADAPTER=(False, True), HAS_RANKS=(True, False),
                          BLOCK_S=(multi_launch.MAX_BLOCK_S, 1)),
        "bwd": _flag_sets(SEGMENT_IS_ADAPTER=(True,), HAS_RANKS=(True, False), BLOCK_S=(64,)),
    }),
    "seg_expand": (multi_kernels.segmented_expand_kernel, SEGMENTED_CONFIGS, {
        "bwd": _flag_sets(SEGMENT_IS_ADAPTER=(True,), HAS_RANKS=(True, False), STORE_T_SUM=(True, False),
                          BLOCK_S=(multi_launch.MAX_BLOCK_S,)),
        "fwd": _flag_sets(SEGMENT_IS_ADAPTER=(False, True), HAS_RANKS=(True, False), STORE_T_SUM=(True, False),
                          BLOCK_S=(1, 64)),
    }),
    "seg_rows": (multi_kernels.segmented_rows_matmul_kernel, ROWS_CONFIGS, {
        "dA": _flag_sets(HAS_RANKS=(True, False), RANK_ON_P=(True,)),
        "dB": _flag_sets(HAS_RANKS=(True, False), RANK_ON_P=(False,)),
    }),
}


_ABBREV = {"block_m": "m", "block_n": "n", "block_k": "k", "block_r": "r", "block_p": "p", "block_q": "q",
           "group_m": "g", "num_warps": "w", "num_stages": "s"}


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
        cfg = "".join(f"{_ABBREV.get(f.name, f.name)}{getattr(self.config, f.name)}"
                      for f in fields(self.config) if getattr(self.config, f.name) is not None)
        spec = "aligned" if self.aligned else "plain"
        return f"{self.kernel}-{self.usage}-{flags}-{self.dtype}{prec}-{cfg}-sm{self.arch}-{spec}"

    def build(self):
        """(kernel, signature, constexprs, attrs, num_warps, num_stages) as the launcher launches it."""
        kernel = KERNELS[self.kernel][0]
        flags, c, dt = dict(self.flags), self.config, TRITON_DTYPE.get(self.dtype)
        if self.kernel == "shrink":
            args = _shrink_args(self.usage, dt)
            const = dict(flags, BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k,
                         DOT_PRECISION=self.precision[0])
        elif self.kernel == "fused":
            args = _fused_args(self.usage, dt, flags)
            const = dict(flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, BLOCK_R=c.block_r,
                         GROUP_M=c.group_m, DOT_PRECISION=self.precision[0], LORA_DOT_PRECISION=self.precision[1])
        elif self.kernel == "rows":
            args = _rows_args(self.usage, dt)
            # rows_matmul passes lora_precision(compute dtype) = lora_precision(input dtype)
            const = dict(flags, BLOCK_P=c.block_p, BLOCK_Q=c.block_q, BLOCK_M=c.block_m,
                         DOT_PRECISION=self.precision[1])
        elif self.kernel == "seg_shrink":
            args = _seg_shrink_args(self.usage, dt)
            const = dict(flags, BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k,
                         DOT_PRECISION=self.precision[0])
        elif self.kernel == "seg_expand":
            args = _seg_expand_args(self.usage, dt, flags)
            const = dict(flags, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_R=multi_launch.EXPAND_BLOCK_R,
                         LORA_DOT_PRECISION=self.precision[1])
        elif self.kernel == "seg_rows":
            args = _seg_rows_args(self.usage, dt)
            const = dict(flags, BLOCK_P=c.block_p, BLOCK_Q=c.block_q, BLOCK_M=c.block_m,
                         DOT_PRECISION=self.precision[1])
        else:
            args = dict(out_ptr="*i8", M=M, K=K, seed=SEED, dropout_p=P_DROP)
            const = dict(BLOCK_M=c.block_m, BLOCK_K=c.block_k)
        signature, constexprs, attrs = launch_signature(kernel, args, const, self.aligned)
        return kernel, signature, constexprs, attrs, c.num_warps, c.num_stages

    def request(self) -> dict:
        kernel, signature, constexprs, attrs, num_warps, num_stages = self.build()
        return _request(kernel, signature, constexprs, TARGETS[self.arch], num_warps, num_stages, attrs)


def _largest(configs):
    return max(configs, key=lambda c: (astuple(c)[:-2], c.num_warps or 0, c.num_stages or 0))


# The other call sites and flag combinations are compiled for one 16-bit and one 32-bit dtype:
# bf16, and fp32 with the precision that needs the most shared memory (tf32 when allowed).
FLAG_DTYPES = (("bf16", ("tf32", "tf32")), ("fp32", ("tf32", "tf32")))


def _all_cases(full: bool) -> list[Case]:
    """The compiles to check: the whole product when `full`, else the reduction of the docstring."""
    cases = []
    for name, (_, configs, usages) in KERNELS.items():
        dtype_precisions = ([("-", ())] if name == "dropout_mask" else
                            [(d, p) for d in DTYPES for p in _precisions(DTYPES[d])])
        big = _largest(configs)
        heaviest = (next(iter(usages)), next(iter(usages.values()))[0])
        for (usage, flag_sets), config, (dt, prec), arch, aligned in itertools.product(
                usages.items(), configs, dtype_precisions, TARGETS, (True, False)):
            for flags in flag_sets:
                is_heaviest = (usage, flags) == heaviest
                keep = full or (
                    (aligned and is_heaviest)                  # every config x dtype x target
                    or (aligned and config == big and (dt == "-" or (dt, prec) in FLAG_DTYPES))
                    or (not aligned and is_heaviest and config == big))
                if keep:
                    cases.append(Case(name, usage, tuple(flags.items()), dt, prec, config, arch, aligned))
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

    for case in selected:
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


@pytest.mark.parametrize("case", CASES, ids=str)
def test_compiles_within_shared_memory(case, aot_results):
    futures, submit = aot_results
    if case not in futures:
        submit(case)
    try:
        compiled = _remote_result(futures[case].result(timeout=900))
    except AotCompileError as exc:
        pytest.fail(f"{case} does not compile for sm_{case.arch}:\n{exc}", pytrace=False)
    shared, limit = compiled.metadata.shared, SHARED_LIMIT[case.arch]
    if shared > limit:
        pytest.fail(f"{case}: needs {shared} B of shared memory per block, sm_{case.arch} allows {limit} B "
                    f"(a launch raises OutOfResources)", pytrace=False)


if __name__ == "__main__" and sys.argv[1:] == ["--aot-worker"]:
    _worker_main()
