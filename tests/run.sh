#!/usr/bin/env bash
# The README's test command: set up (or reuse) .venv, install, run the whole suite.
# Extra arguments go to pytest, e.g.  bash tests/run.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
echo "[tests] ruff"
"$PY" -m ruff check .
echo "[tests] pytest"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
