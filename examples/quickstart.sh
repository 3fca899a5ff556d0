#!/usr/bin/env bash
# Quickstart: set up .venv and run a tiny tensor-parallel demo on 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
"$PY" -m torch.distributed.run --nproc_per_node 2 examples/tp_demo.py
