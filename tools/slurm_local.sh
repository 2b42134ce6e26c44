#!/usr/bin/env bash
# Start/stop a throw-away two-node Slurm cluster on this machine (root, Debian).
#
#   tools/slurm_local.sh start    # installs slurm+munge with apt if missing, prints env lines
#   eval "$(tools/slurm_local.sh env)"
#   NPROC_PER_NODE=1 sbatch -N2 launch/slurm.sbatch trainer.max_steps=20
#   tools/slurm_local.sh status | logs | stop
#
# Nodes n1, n2 (1 CPU each, override with --cpus-per-node N / --nodes a,b,c)
# live in $MINIMAX_SLURM_DIR (default /tmp/mmslurm-local); see tests/slurm/cluster.py and __main__.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${MINIMAX_PYTHON:-}" ]]; then PY="$MINIMAX_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m tests.slurm "$@"
