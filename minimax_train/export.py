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


def _earlier_hint(path: Path) -> str:
    from minimax_train.train.checkpoint import list_checkpoints

    earlier = [p.name for p in list_checkpoints(path.parent) if p.name < path.name]
    return f"earlier checkpoints in {path.parent}: {', '.join(earlier)}" if earlier else "no earlier checkpoint"


def load_checkpoint_model(checkpoint: str | Path):
    """(model in fp32 on CPU, JobConfig, resolved step dir) of a checkpoint or checkpoint.dir: the whole
    model in memory (tests and tools; the export streams). A damaged checkpoint or one holding NaN/inf
    weights is refused, naming the earlier ones."""
    from minimax_train.errors import CheckpointError
    from minimax_train.model import MiniMaxForCausalLM
    from minimax_train.train.checkpoint import load_checked, read_saved_job, resolve_checkpoint
    from minimax_train.train.ckpt_safety import first_nonfinite

    path = resolve_checkpoint(checkpoint)
    hint = _earlier_hint(path)
    try:
        job = read_saved_job(path)
        model = MiniMaxForCausalLM(job.model)
        load_checked(path, model, None, no_dist=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; export another checkpoint ({hint})") from None
    bad = first_nonfinite(model.state_dict())
    if bad:
        raise CheckpointError(f"{path}: {bad} holds NaN or inf: refusing to export it ({hint})")
    return model.eval(), job, path


def check_out_dir(out: Path, checkpoint: Path) -> None:
    """--out must not be, contain or lie inside a checkpoint or checkpoint.dir: --overwrite empties --out
    before writing, and nothing of a training run may go with it, whatever --overwrite says."""
    from minimax_train.errors import CheckpointError
    from minimax_train.train.checkpoint import STEP_RE, holds_checkpoints

    out, ck = Path(out).absolute().resolve(), Path(checkpoint).absolute().resolve()
    clash = None
    for p in (out, *out.parents):
        if p == ck or holds_checkpoints(p):
            clash = "is" if p == out else f"is inside {p}, which is"
            break
    if clash is None and (ck.is_relative_to(out) or (out.is_dir() and _holds_step_dir(out, STEP_RE))):
        clash = "contains"
    if clash:
        raise CheckpointError(
            f"--out {out} {clash} a training checkpoint (or checkpoint.dir): export never writes there, with or "
            f"without --overwrite; choose an --out outside the checkpoint dirs (nothing was changed)"
        )


def _holds_step_dir(root: Path, step_re) -> bool:
    return any(d.is_dir() and step_re.match(d.name) for d in root.rglob("step_*"))


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: Optional[torch.dtype] = None,
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    from minimax_train.errors import CheckpointError
    from minimax_train.hf.stream_export import export_checkpoint
    from minimax_train.train.checkpoint import read_saved_job, resolve_checkpoint
    from minimax_train.train.ckpt_safety import FILE_ERRORS, quiet_dcp_errors, short_reason

    check_out_dir(Path(out), Path(checkpoint))  # before anything is read or written
    path = resolve_checkpoint(checkpoint)
    hint = _earlier_hint(path)
    try:
        job = read_saved_job(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; export another checkpoint ({hint})") from None
    tok = None
    if tokenizer:
        from minimax_train.data import load_tokenizer

        tok = load_tokenizer(job.data)
    out = Path(out)
    try:
        with quiet_dcp_errors():
            export_checkpoint(path, out, job.model, dtype=dtype, tokenizer=tok, overwrite=overwrite)
    except CheckpointError as e:  # e.g. NaN/inf weights (first: it is also a ValueError)
        raise CheckpointError(f"{e} ({hint})") from None
    except (FileExistsError, ValueError):  # the output dir or the dtype: the user's choice, said as it is
        raise
    except (ImportError, NameError, AttributeError, TypeError):  # a defect of ours, not a damaged checkpoint
        raise
    except FILE_ERRORS as e:  # DCP's errors of a damaged checkpoint
        raise CheckpointError(
            f"{path}: its model/optimiser data (.metadata, *.distcp) cannot be read ({short_reason(e)}); "
            f"export another checkpoint ({hint})"
        ) from None
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
    from minimax_train.errors import run_cli

    def body():
        out = export(
            args.checkpoint,
            args.out,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            tokenizer=not args.no_tokenizer,
            overwrite=args.overwrite,
        )
        print(out)

    return run_cli("minimax_train.export", body)


if __name__ == "__main__":
    sys.exit(main())
