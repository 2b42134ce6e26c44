#!/usr/bin/env bash
# The test command of the README (and of CI): sets up .venv if needed, then runs the whole suite on CPU.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -k parity -x`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/tools/bootstrap.sh")
cd "$root"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # multi-process gloo tests oversubscribe 2 cores otherwise
# lint and format first: a style error fails in seconds, before the 15-minute suite
"$venv/bin/ruff" check --quiet . && "$venv/bin/ruff" format --check --quiet . || {
  echo "tools/test.sh: ruff found problems (run: $venv/bin/ruff check --fix . && $venv/bin/ruff format .)" >&2; exit 1; }
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider --timeout=900 "$@"
