#!/usr/bin/env bash
# Create (once) the virtual environment minimax_train runs in, then print its path.
# Idempotent: a stamp named after the dependency files skips work when nothing changed.
# Everything goes through tools/constraints.txt so pip never swaps in a CUDA build of torch.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MINIMAX_VENV:-$root/.venv}
key=$(cat "$root/tools/constraints.txt" "$root/tools/requirements.txt" "$root/pyproject.toml" | sha1sum | cut -c1-12)
stamp="$venv/.minimax-deps-$key"
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing dependencies into $venv (first run: a few minutes)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -c "$root/tools/constraints.txt" torch==2.13.0 >&2
  DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q -c "$root/tools/constraints.txt" -r "$root/tools/requirements.txt" >&2
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2
  rm -f "$venv"/.minimax-deps-*
  touch "$stamp"
fi
echo "$venv"
