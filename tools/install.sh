#!/usr/bin/env bash
# Install aerialseg into .venv without any CUDA package, then prove it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU wheel of torch first, by path, from the folder pip's config names as find-links.
WHEELS=${AERIALSEG_TORCH_WHEELS:-$(.venv/bin/pip config get global.find-links 2>/dev/null || echo /opt/wheels)}
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
  WHEEL=$(ls "$WHEELS"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$WHEEL" ]; then
    $PIP install -q "$WHEEL"
  else
    $PIP install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -q --find-links "$WHEELS" -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python tools/check_no_cuda.py
