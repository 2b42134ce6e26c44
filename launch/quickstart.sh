#!/usr/bin/env bash
# The README's main job, on a fresh machine with nothing but python3: set up .venv, train the tiny
# MiniMax on the embedded corpus (CPU, about three minutes), export the last checkpoint to a transformers
# directory, generate text from it with transformers' generate and plot the loss curve.
# Running it again resumes (or, when finished, just re-exports) the same run.
# Extra arguments are Hydra overrides for the training run, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/tools/bootstrap.sh")
py="$venv/bin/python"
run=${MINIMAX_QUICKSTART_DIR:-$root/runs/quickstart}
cd "$root"
# conf/recipe/quickstart.yaml: 850 steps of 8 rows x 128 tokens (0.87M tokens) of the tiny model at width
# 128, validation over the whole held-out split.
echo "[quickstart] training the tiny model on the embedded corpus -> $run"
"$py" -m minimax_train.train recipe=quickstart hydra.run.dir="$run" checkpoint.dir="$run/checkpoints" "$@"
echo "[quickstart] exporting the last checkpoint -> $run/hf"
"$py" -m minimax_train.export --checkpoint "$run/checkpoints" --out "$run/hf" --overwrite
# transformers' generate on the export: greedy search with repetition_penalty=1.3 and
# no_repeat_ngram_size=4 (the defaults of minimax_train/tools/sample.py; plain greedy loops on a model
# this small). It prints the settings, the sample and its distinct identifiers / most frequent 4-gram.
echo "[quickstart] generating with transformers from $run/hf"
"$py" -m minimax_train.tools.sample "$run/hf" --prompt "def main("
echo "[quickstart] plotting $run/metrics.jsonl -> $run/plots"
"$py" tools/plot_metrics.py "$run" --out "$run/plots" --smooth 25
echo "[quickstart] done: metrics in $run/metrics.jsonl, loss curve $run/plots/loss.png, checkpoints in $run/checkpoints, transformers export in $run/hf"
