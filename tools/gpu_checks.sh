#!/usr/bin/env bash
# Every GPU check and benchmark of docs/PERFORMANCE.md in one batch, for one host with 1, 2 or 4 GPUs.
#
#   bash tools/gpu_checks.sh [all|tests|bench]      # logs and JSON under $LOG_DIR
#
# Environment: LOG_DIR (default $OUT when set, else outputs/gpu_checks/<time>), BUDGET_S (stop starting new
# steps after this many seconds; default 3000), STEPS (a bash regex of the step names to run, e.g.
# STEPS='^(t_train|layouts_8k)$'; default all; the warm-up runs unless WARMUP=0), KERNEL_CACHE_IN and
# KERNEL_CACHE_OUT (a .tgz of fla's autotuning results to restore before / save after; see the end).
# Each step has its own time limit and a line in $LOG_DIR/summary.txt; one failing step does not stop the others. A step that reaches its
# limit gets SIGINT (the benchmarks then report and write what they measured; pytest prints its summary),
# SIGKILL 10 s later.
#
# Order matters: the first step warms the kernel caches (fla's autotuned Triton kernels, FlexAttention's
# inductor graphs: ~2 minutes on a fresh machine, ~30 s afterwards) so that later steps, timed runs and
# every rank of a multi-GPU run find them compiled.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHAT="${1:-all}"
LOG_DIR="${LOG_DIR:-${OUT:-outputs/gpu_checks/$(date +%Y%m%d-%H%M%S)}}"
BUDGET_S="${BUDGET_S:-3000}"
STEPS="${STEPS:-.}"
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
PY="${PYTHON:-python3}"
NGPU="${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}"  # NGPU=N overrides (dry runs)
T0=$(date +%s)
# KERNEL_CACHE_IN=archive.tgz restores the autotuning results an earlier run saved with KERNEL_CACHE_OUT
[[ -n "${KERNEL_CACHE_IN:-}" && -f "${KERNEL_CACHE_IN:-}" ]] && tar xzf "$KERNEL_CACHE_IN" -C / 2>/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOG_DIR/gpus.txt" 2>&1

step() {  # step NAME SECONDS MIN_GPUS command...
    local name=$1 limit=$2 need=$3; shift 3
    local used=$(( $(date +%s) - T0 ))
    if [[ $name != warmup && ! $name =~ $STEPS ]]; then return; fi
    if (( NGPU < need )); then echo "$name skipped (needs $need GPUs, have $NGPU)" | tee -a "$LOG_DIR/summary.txt"; return; fi
    if (( used + 30 > BUDGET_S )); then echo "$name skipped (budget)" | tee -a "$LOG_DIR/summary.txt"; return; fi
    (( limit > BUDGET_S - used )) && limit=$(( BUDGET_S - used ))
    timeout -s INT -k 10 "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
    local rc=$?
    # leftovers of a timed-out torchrun: its workers have sessions of their own, so neither timeout nor the
    # device's end-of-command cleanup ends them (bench_moe's command line names no $LOG_DIR path)
    pkill -9 -f "$LOG_DIR/" 2>/dev/null
    pkill -9 -f "tools/bench_moe[.]py" 2>/dev/null
    echo "$name rc=$rc $(( $(date +%s) - T0 ))s" | tee -a "$LOG_DIR/summary.txt"
}
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rA)  # an array, not a function: `timeout` runs programs
L="$LOG_DIR"

# warm-up: one short trainer run of the 1B preset (compiles the training kernels once for this machine;
# WARMUP=0 skips it when an earlier batch on the same machine has warmed the caches)
[[ "${WARMUP:-1}" == 0 ]] || step warmup 400 1 "$PY" tools/bench_layouts.py --preset minimax_1b --seq-len 2048 --rows 1 --steps 2 --warmup 1 \
    --timeout 380 --layout warm:1: --workdir "$L/warm"

if [[ "$WHAT" == all || "$WHAT" == tests ]]; then
    step t_lightning 900 1 "${PYTEST[@]}" --timeout 600 tests/gpu/test_lightning_gpu.py
    step t_attention 600 1 "${PYTEST[@]}" --timeout 300 tests/gpu/test_attention_gpu.py
    step t_model 600 1 "${PYTEST[@]}" --timeout 300 tests/gpu/test_model_gpu.py
    step t_train 1200 2 "${PYTEST[@]}" -s --timeout 400 -k "not zero" tests/gpu/test_train_gpu.py
    step t_train_zero 900 2 "${PYTEST[@]}" -s --timeout 400 -k zero tests/gpu/test_train_gpu.py
    step t_context_parallel 900 2 "${PYTEST[@]}" --timeout 600 tests/gpu/test_context_parallel_gpu.py
fi
if [[ "$WHAT" == all || "$WHAT" == bench ]]; then
    step kernels 900 1 "$PY" tools/bench_kernels.py --budget 0.3 --out "$L/kernels.json"
    # ours profiles its last step (one of the 5 timed ones; the median ignores it): ours/profile/rank0_ops.txt
    PROF=(--ours-arg logging.profile_start=8 --ours-arg logging.profile_steps=1)
    for t in 8192 32768; do
        step "train_1b_$t" 1200 1 "$PY" tools/bench_train.py --preset minimax_1b --seq-len $t --steps 8 --warmup 3 \
            "${PROF[@]}" --workdir "$L/bt_1b_$t" --out "$L/train_1b_$t.json"
        step "train_slice_$t" 1200 1 "$PY" tools/bench_train.py --preset minimax_slice --seq-len $t --steps 8 --warmup 3 \
            "${PROF[@]}" --workdir "$L/bt_slice_$t" --out "$L/train_slice_$t.json"
    done
    LAYOUTS=(--layout 1gpu:1: --layout tp2:2:tp=2 --layout dp2:2:)
    (( NGPU >= 4 )) && LAYOUTS+=(--layout tp4:4:tp=4 --layout dp4:4: --layout tp2dp2:4:tp=2)
    step layouts_8k 1800 2 "$PY" tools/bench_layouts.py --preset minimax_1b --seq-len 8192 --rows 4 --steps 8 \
        --warmup 3 --timeout 300 "${LAYOUTS[@]}" --workdir "$L/lay8k" --out "$L/layouts_8k.json"
    step cp_lightning 900 2 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" tools/bench_cp.py --mode lightning \
        --seqlens 32768,262144,1048576 --profile --json "$L/cp_lightning.json"
    step moe_ep 600 2 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" tools/bench_moe.py --chunks 1,2,4
    # the same over slower links, where the all-to-all is a large share of the step (what the overlap is
    # for): NCCL through host shared memory (P2P off: comparable to inter-node InfiniBand), and
    # through host sockets (slower than any real interconnect: the all-to-all outweighs the compute)
    step moe_ep_shm 600 2 env NCCL_P2P_DISABLE=1 "$PY" -m torch.distributed.run --standalone \
        --nproc-per-node "$NGPU" tools/bench_moe.py --chunks 1,2,4
    step moe_ep_slow_link 600 2 env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 \
        "$PY" -m torch.distributed.run --standalone \
        --nproc-per-node "$NGPU" tools/bench_moe.py --chunks 1,2,4
    # context parallelism over every GPU of the host: tokens/s per GPU from 32K to the longest sequence that
    # fits with full recomputation and 16K-token MoE chunks (planner: 1M at cp=4 on 80 GB cards, 54 GiB per
    # GPU; 1M at cp=2 needs 106 GiB per GPU, i.e. 141 GB H200s; else 512K at cp=2), LASP+ vs the serial-ring
    # LASP baseline at the longest
    GPU_GIB=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30 if torch.cuda.is_available() else 0)")
    LONG=$(( NGPU >= 4 || GPU_GIB >= 130 ? 1048576 : 524288 ))
    for t in 32768 131072 $LONG; do
        LAY=(--layout "cp${NGPU}_plus_$t:$NGPU:cp=$NGPU")
        (( t == LONG )) && LAY+=(--layout "cp${NGPU}_serial_$t:$NGPU:cp=$NGPU,lasp=serial")
        step "cp_$t" $(( t == LONG ? 1200 : 400 )) 2 "$PY" tools/bench_layouts.py --preset minimax_1b --seq-len $t \
            --rows 1 --steps $(( t == LONG ? 4 : 6 )) --warmup $(( t == LONG ? 2 : 3 )) --ac full --moe-chunk 16384 \
            --timeout $(( t == LONG ? 500 : 300 )) "${LAY[@]}" --workdir "$L/cp_$t" --out "$L/cp_$t.json"
    done
fi
if [[ -n "${KERNEL_CACHE_OUT:-}" ]]; then
    # fla's autotuned choices (Triton's *.autotune.json files, kept because fla turns on cache_results): a
    # few KB, and with them a fresh machine compiles only the winning configuration of each kernel instead
    # of benchmarking every candidate
    find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.autotune.json' > "$LOG_DIR/kernel_cache.list" 2>/dev/null
    [[ -s "$LOG_DIR/kernel_cache.list" ]] && tar czf "$KERNEL_CACHE_OUT" -P -T "$LOG_DIR/kernel_cache.list" \
        && echo "kernel cache: $(wc -l < "$LOG_DIR/kernel_cache.list") entries, $(du -h "$KERNEL_CACHE_OUT" | cut -f1)" \
        | tee -a "$LOG_DIR/summary.txt"
fi
echo "done in $(( $(date +%s) - T0 ))s; logs in $LOG_DIR"
