#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install the package into it.
# Sourced by tests/run.sh and examples/quickstart.sh. Sets $PY to the venv's python.
# Usage: source scripts/setup_env.sh [extras]      (extras default: test)
set -euo pipefail
_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_VENV="${VENV:-$_ROOT/.venv}"
_EXTRAS="${1:-test}"
if [ ! -x "$_VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $_VENV"
  python3 -m venv "$_VENV"
  "$_VENV/bin/python" -m pip install -q -U pip
fi
PY="$_VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (pinned: an unpinned torch pulls a multi-GB CUDA build)"
  "$PY" -m pip install -q torch==2.13.0
fi
_STAMP="$_VENV/.megatron-installed-$_EXTRAS"
if [ ! -f "$_STAMP" ] || [ "$_ROOT/pyproject.toml" -nt "$_STAMP" ] || [ "$_ROOT/setup.py" -nt "$_STAMP" ] \
   || [ -n "$(find "$_ROOT/csrc" -newer "$_STAMP" -type f 2>/dev/null | head -n1)" ]; then
  echo "[setup] installing the package (editable) with extras [$_EXTRAS]"
  "$PY" -m pip install -q setuptools wheel pybind11 numpy
  (cd "$_ROOT" && "$PY" -m pip install -q --no-build-isolation -e ".[$_EXTRAS]")
  touch "$_STAMP"
fi
export PY
