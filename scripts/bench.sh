#!/usr/bin/env bash
# The main job: sets up .venv, then runs the benchmarks in their default configurations: the
# single-adapter lora_linear, then the multi-adapter multi_lora_linear (results in bench/results/).
# Arguments go to both scripts (e.g. --full, --device cuda); BENCH=single or BENCH=multi runs one;
# BENCH=e2e runs the end-to-end SmolLM2-135M comparison (bench/bench_peft_model.py) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY="${VENV:-.venv}/bin/python"
case "${BENCH:-all}" in
  single) exec "$PY" bench/bench_lora_linear.py "$@" ;;
  multi)  exec "$PY" bench/bench_multi_lora_linear.py "$@" ;;
  e2e)    exec "$PY" bench/bench_peft_model.py "$@" ;;
  all)    "$PY" bench/bench_lora_linear.py "$@" && exec "$PY" bench/bench_multi_lora_linear.py "$@" ;;
  *)      echo "BENCH=${BENCH}: expected single, multi, e2e or all" >&2; exit 2 ;;
esac
