#!/usr/bin/env bash
# Launch minimax_train on ONE node with torchrun (or, when called by
# launch/slurm.sbatch through srun, as this node's share of a multi-node job).
#
#   launch/torchrun.sh [hydra overrides...]
#   NPROC_PER_NODE=2 launch/torchrun.sh model=tiny train.steps=20   # CPU, 2 ranks
#   launch/torchrun.sh model=minimax_1b train=gpu                   # all GPUs
#
# Environment:
#   NPROC_PER_NODE   processes on this node (default: number of GPUs from
#                    `nvidia-smi -L`; 1 when there is no GPU)
#   MINIMAX_PYTHON   python to use (default: <repo>/.venv/bin/python if it
#                    exists, else python3)
#   MINIMAX_ENTRY    what each process runs (default "-m minimax_train.train";
#                    a script path also works)
#   OMP_NUM_THREADS  default: CPUs usable by this process / NPROC_PER_NODE
#   MINIMAX_ROOT     repo checkout (default: the directory above this script)
#   Multi-node mode (set by launch/slurm.sbatch, not by hand):
#   MINIMAX_NNODES, MINIMAX_RDZV_ENDPOINT (host:port), MINIMAX_RDZV_ID
#   -> c10d rendezvous instead of --standalone.
#
# Signals (the trainer saves a checkpoint and exits 0 on SIGUSR1/SIGTERM):
#  - torchrun is made immune to SIGUSR1 (by default it would die of it and
#    orphan the workers), so it ends normally when the workers exit 0.
#  - Outside Slurm, SIGUSR1/SIGTERM sent to this script are forwarded straight
#    to the training processes (torchrun's workers run in their own sessions;
#    torchrun itself would give them only 30 s after SIGTERM before SIGKILL).
#  - Inside a Slurm step, Slurm delivers signals to every process of the step
#    (workers, DataLoader workers, torchrun, this shell), so nothing is
#    forwarded. Every process of the step must survive SIGUSR1: the trainer
#    installs a handler; DataLoader workers inherit it with fork, but must
#    ignore it themselves with the spawn/forkserver start methods.
#  - Ctrl-C (SIGINT to the process group) stops torchrun, which stops the
#    workers; this script then exits with torchrun's status.
set -uo pipefail

ROOT="${MINIMAX_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

if [[ -n "${MINIMAX_PYTHON:-}" ]]; then
    PY="$MINIMAX_PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="python3"
fi

if [[ -n "${NPROC_PER_NODE:-}" ]]; then
    NPROC="$NPROC_PER_NODE"
else
    NPROC=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        # honours CUDA_VISIBLE_DEVICES only through Slurm's cgroup device
        # confinement; set NPROC_PER_NODE when you restrict GPUs by hand
        NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    [[ "$NPROC" -ge 1 ]] 2>/dev/null || NPROC=1
fi

# CPU threads per process: torchrun would force OMP_NUM_THREADS=1 otherwise.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    NCPU=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=$(( NCPU / NPROC ))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
fi

# MINIMAX_ENTRY is word-split on purpose ("-m pkg.module" or "path/script.py")
read -r -a ENTRY <<< "${MINIMAX_ENTRY:--m minimax_train.train}"

if [[ -n "${MINIMAX_RDZV_ENDPOINT:-}" ]]; then
    NODE_ARGS=(--nnodes="${MINIMAX_NNODES:?MINIMAX_NNODES not set}"
               --rdzv-backend=c10d --rdzv-endpoint="$MINIMAX_RDZV_ENDPOINT"
               --rdzv-id="${MINIMAX_RDZV_ID:-minimax}")
    # workers' MASTER_ADDR is rank 0's hostname: make sure it is one the
    # others can reach (on real clusters hostnames resolve; locally too)
else
    NODE_ARGS=(--standalone --nnodes=1)
fi

echo "[torchrun.sh] $(hostname) ${SLURMD_NODENAME:+node=$SLURMD_NODENAME }nproc=$NPROC python=$PY" \
     "entry=${ENTRY[*]} omp=$OMP_NUM_THREADS ${MINIMAX_RDZV_ENDPOINT:+rdzv=$MINIMAX_RDZV_ENDPOINT}" >&2

# torchrun itself must survive SIGUSR1 (default action: die). A no-op Python
# handler (unlike SIG_IGN) is reset to the default in the exec'd workers, so
# they behave normally until the trainer installs its own handler.
TORCHRUN=(-c 'import runpy, signal, sys
signal.signal(signal.SIGUSR1, lambda *_: None)
signal.signal(signal.SIGINT, signal.default_int_handler)  # bash starts it with SIGINT ignored
sys.argv[0] = "torchrun"
runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)')

TORCHRUN_PID=""
PENDING_SIG=""
on_signal() {
    local sig=$1 kids
    if [[ -n "${SLURM_STEP_ID:-}" ]]; then
        # Inside a Slurm job step, a signal (srun forwarding, scancel -s) goes
        # to EVERY process of the step: the workers already have it.
        echo "[torchrun.sh] $(hostname) ${SLURMD_NODENAME:-}: got SIG$sig (step-wide)" >&2
        return
    fi
    [[ -n "$TORCHRUN_PID" ]] || { PENDING_SIG=$sig; return; }
    kids=$(ps -o pid= --ppid "$TORCHRUN_PID" 2>/dev/null | tr -s ' \n' ' ')
    if [[ -n "${kids// /}" ]]; then
        echo "[torchrun.sh] $(hostname): SIG$sig -> workers $kids" >&2
        # shellcheck disable=SC2086
        kill -s "$sig" $kids 2>/dev/null || true
    else
        # still in rendezvous: nothing to save, stop torchrun itself
        echo "[torchrun.sh] $(hostname): SIG$sig before workers started -> torchrun" >&2
        kill -s TERM "$TORCHRUN_PID" 2>/dev/null || true
    fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
# Ctrl-C reaches torchrun directly (same process group); just keep waiting for it
trap ':' INT

"$PY" "${TORCHRUN[@]}" "${NODE_ARGS[@]}" --nproc-per-node="$NPROC" --max-restarts=0 \
    "${ENTRY[@]}" "$@" &
TORCHRUN_PID=$!

if [[ -n "$PENDING_SIG" ]]; then  # signalled while starting: nothing to save
    kill -s TERM "$TORCHRUN_PID" 2>/dev/null
fi

# `wait` returns early when a trapped signal arrives: loop until torchrun is gone
while :; do
    wait "$TORCHRUN_PID"
    RC=$?
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done
exit "$RC"
