#!/usr/bin/env bash
# The test command: sets up .venv, then runs the suite (tests/, and the benchmarks' smoke tests in
# bench/) with the Triton kernels interpreted on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TRITON_INTERPRET=1
exec "${VENV:-.venv}/bin/python" -m pytest tests bench --benchmark-disable "$@"
