"""Export a training checkpoint to a consolidated Hugging Face (transformers) directory.

    python -m minimax_train.export --checkpoint CKPT --out HF_DIR [--dtype bf16] [--no-tokenizer]

CKPT is one checkpoint (checkpoint.dir/step_XXXXXXXX) or a checkpoint.dir, meaning its latest complete
checkpoint. The model config is the config.yaml saved with the checkpoint; the weights are read from the
distributed checkpoint (any training layout) one tensor at a time and streamed into the sharded
safetensors files (minimax_train.hf.stream_export: the same files as minimax_train.hf.save_hf, with peak
memory about the largest tensor, not the model), together with the tokenizer of the run's data config."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("minimax_train.export")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def saved_job(checkpoint: str | Path):
    """(resolved step dir, the JobConfig saved with it) of a checkpoint or checkpoint.dir."""
    from minimax_train.config import load_job_yaml
    from minimax_train.train.checkpoint import CONFIG, resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} is missing: cannot rebuild the model of this checkpoint")
    return path, load_job_yaml(path / CONFIG)


def load_checkpoint_model(checkpoint: str | Path):
    """(model in fp32 on CPU, JobConfig, resolved step dir) of a checkpoint or checkpoint.dir (the whole
    model in memory: tests and tools; export streams)."""
    from minimax_train.model import MiniMaxForCausalLM
    from minimax_train.train.checkpoint import load_model_and_optim

    path, job = saved_job(checkpoint)
    model = MiniMaxForCausalLM(job.model)
    load_model_and_optim(path, model, None, no_dist=True)
    return model.eval(), job, path


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: Optional[torch.dtype] = None,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    from minimax_train.hf.stream_export import export_checkpoint

    path, job = saved_job(checkpoint)
    tok = None
    if tokenizer:
        from minimax_train.data import load_tokenizer

        tok = load_tokenizer(job.data)
    out = Path(out)
    export_checkpoint(path, out, job.model, dtype=dtype, tokenizer=tok, overwrite=overwrite)
    log.info("exported %s -> %s", path, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minimax_train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a step_XXXXXXXX dir, or a checkpoint.dir (its latest)")
    ap.add_argument("--out", required=True, help="output directory (transformers format)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: fp32 as trained)")
    ap.add_argument("--no-tokenizer", action="store_true", help="do not write the tokenizer files")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from minimax_train.hf.convert import CheckpointError as HFError
    from minimax_train.train.checkpoint import CheckpointError

    try:
        out = export(
            args.checkpoint,
            args.out,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            tokenizer=not args.no_tokenizer,
            overwrite=args.overwrite,
        )
    except (CheckpointError, HFError, FileNotFoundError, FileExistsError) as e:
        print(f"minimax_train.export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
