#!/usr/bin/env bash
# The test command: sets up .venv, then runs the suite (tests/, and the benchmarks' smoke tests in
# bench/): compiled on a CUDA device, else with the Triton kernels interpreted on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY="${VENV:-.venv}/bin/python"
# TRITON_INTERPRET=1 only without a CUDA device (there, always: Triton cannot compile without one): on a
# GPU it would run every kernel interpreted (host copies, no bf16); there a value the caller set is kept.
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    export TRITON_INTERPRET=1
fi
exec "$PY" -m pytest tests bench --benchmark-disable "$@"
