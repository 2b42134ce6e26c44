#!/usr/bin/env bash
# The README's main job, on a fresh machine with nothing but python3: set up .venv, train the tiny
# MiniMax on the embedded corpus (CPU, about two minutes), export the last checkpoint to a transformers
# directory, generate text from it with transformers' own pipeline and plot the loss curve.
# Running it again resumes (or, when finished, just re-exports) the same run.
# Extra arguments are Hydra overrides for the training run, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/tools/bootstrap.sh")
py="$venv/bin/python"
run=${MINIMAX_QUICKSTART_DIR:-$root/runs/quickstart}
cd "$root"
# 1,200 steps of 8 rows x 128 tokens: ~1.2M tokens, about one epoch of the embedded corpus. Micro-batches
# of 2 rows are the fastest on CPU. Validation covers the whole held-out split (eval_iters is a cap).
quick=(train.steps=1200 train.micro_batch_size=2 train.eval_interval=300 train.eval_iters=1000
       logging.interval=100 checkpoint.interval=300)
echo "[quickstart] training the tiny model on the embedded corpus -> $run"
"$py" -m minimax_train.train hydra.run.dir="$run" checkpoint.dir="$run/checkpoints" "${quick[@]}" "$@"
echo "[quickstart] exporting the last checkpoint -> $run/hf"
"$py" -m minimax_train.export --checkpoint "$run/checkpoints" --out "$run/hf" --overwrite
echo "[quickstart] generating with transformers from $run/hf"
"$py" - "$run/hf" <<'PY'
import sys
from transformers import pipeline
gen = pipeline("text-generation", model=sys.argv[1], device="cpu")
out = gen("def main(", max_new_tokens=60, do_sample=False)[0]["generated_text"]
print("-" * 60 + "\n" + out + "\n" + "-" * 60)
PY
echo "[quickstart] plotting $run/metrics.jsonl -> $run/plots"
"$py" tools/plot_metrics.py "$run" --out "$run/plots" --smooth 25
echo "[quickstart] done: metrics in $run/metrics.jsonl, loss curve $run/plots/loss.png, checkpoints in $run/checkpoints, transformers export in $run/hf"
