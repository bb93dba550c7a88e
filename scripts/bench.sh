#!/usr/bin/env bash
# The main job: sets up .venv, then runs the single-adapter benchmark in its default configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec "${VENV:-.venv}/bin/python" bench/bench_lora_linear.py "$@"
