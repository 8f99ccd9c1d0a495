#!/usr/bin/env bash
# Set up .venv with lightning_optim (editable) and its test tools, on a fresh machine.
#
# torch first: a bare "torch" requirement pulls a CUDA build of several GB. Without a GPU
# we ask for the CPU build of torch 2.13 (a local wheel where the machine provides one).
# Set TORCH_SPEC to choose another, e.g. TORCH_SPEC="torch==2.6.0".
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_SPEC:-}" ]; then
        "${PIP[@]}" "$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: GPU found, installing CUDA torch"
        "${PIP[@]}" "torch>=2.6"
    else
        echo "setup: no GPU, installing the CPU build of torch"
        "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
    fi
fi
"${PIP[@]}" -e ".[dev]"
.venv/bin/python -c "import torch, lightning_optim; print(f'setup: lightning_optim {lightning_optim.__version__}, torch {torch.__version__}, python in .venv/bin/python')"
