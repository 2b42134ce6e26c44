#!/usr/bin/env bash
# The README's main job, on a fresh machine with nothing but python3: set up .venv, train the tiny
# MiniMax on the embedded corpus (CPU, a few minutes), export the last checkpoint to a transformers
# directory and generate text from it with transformers' own pipeline.
# Running it again resumes (or, when finished, just re-exports) the same run.
# Extra arguments are Hydra overrides for the training run, e.g. `bash launch/quickstart.sh train.steps=50`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/tools/bootstrap.sh")
py="$venv/bin/python"
run=${MINIMAX_QUICKSTART_DIR:-$root/runs/quickstart}
cd "$root"
echo "[quickstart] training the tiny model on the embedded corpus -> $run"
"$py" -m minimax_train.train hydra.run.dir="$run" checkpoint.dir="$run/checkpoints" "$@"
echo "[quickstart] exporting the last checkpoint -> $run/hf"
"$py" -m minimax_train.export --checkpoint "$run/checkpoints" --out "$run/hf" --overwrite
echo "[quickstart] generating with transformers from $run/hf"
"$py" - "$run/hf" <<'PY'
import sys
from transformers import pipeline
gen = pipeline("text-generation", model=sys.argv[1], device="cpu")
out = gen("def main(", max_new_tokens=40, do_sample=False)[0]["generated_text"]
print("-" * 60 + "\n" + out + "\n" + "-" * 60)
PY
echo "[quickstart] done: metrics in $run/metrics.jsonl, checkpoints in $run/checkpoints, transformers export in $run/hf"
