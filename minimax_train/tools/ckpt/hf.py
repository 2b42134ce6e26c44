"""export-hf and import-hf: between the trainer's checkpoints and transformers MiniMax directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from minimax_train.tools.ckpt.errors import CkptToolError
from minimax_train.train.checkpoint import resolve_checkpoint


def export_hf(path, out, *, dtype=None, tokenizer: bool = True, overwrite: bool = False) -> Path:
    """minimax_train.export.export (the model rebuilt from config.yaml, weights loaded from the DCP checkpoint,
    written by minimax_train.hf.save_hf)."""
    from minimax_train.export import export

    return export(resolve_checkpoint(path), out, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)


def import_hf(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    overrides: Optional[list[str]] = None,
    *,
    overwrite: bool = False,
    max_file_bytes: int = 1 << 30,
) -> Path:
    """A transformers MiniMax directory -> step_00000000 of checkpoint.dir `out` (model, fresh AdamW state, the
    data loader's initial position for the job): what the trainer's CheckpointManager saves for the loaded
    model in one process, written tensor by tensor (hf/stream_import.py), so the host memory is about one
    tensor, not the model. The DCP data goes into files of about max_file_bytes."""
    import torch

    from minimax_train.conf_tree import compose_job
    from minimax_train.config import job_to_yaml
    from minimax_train.data import build_loader, load_tokenizer
    from minimax_train.hf import read_hf_config
    from minimax_train.hf.stream_import import import_checkpoint
    from minimax_train.tools.ckpt.convert import write_step_dir
    from minimax_train.train.checkpoint import latest_checkpoint, plain, rng_state, step_dir_name
    from minimax_train.train.optim import build_optimizer

    hf_dir, out = Path(hf_dir), Path(out)
    model_cfg = read_hf_config(hf_dir)  # clear errors for a missing / foreign directory
    if latest_checkpoint(out) is not None and not overwrite:
        raise CkptToolError(f"{out} already holds checkpoints; choose another --out or pass --overwrite")
    job = compose_job(*(overrides or []))
    job.model = model_cfg
    job.checkpoint.init_from_hf = None
    tok = load_tokenizer(job.data)
    if len(tok) > model_cfg.vocab_size:
        raise CkptToolError(
            f"the tokenizer of data.tokenizer={job.data.tokenizer!r} has {len(tok)} tokens, more than "
            f"the model's vocab_size={model_cfg.vocab_size}: pass the data overrides you train with"
        )
    loader = build_loader(
        job.data,
        tok,
        seq_len=job.train.seq_len,
        micro_batch_size=job.train.micro_batch_size,
        dp_rank=0,
        dp_size=1,
        seed=job.train.seed,
        split="train",
    )
    if out.exists():  # leftovers of a crashed save; with overwrite, the checkpoints already there
        for p in out.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or (overwrite and p.name.startswith("step_"))):
                shutil.rmtree(p)
    meta = {
        "step": 0,
        "tokens": 0,
        "skipped_steps": 0,
        "consecutive_nonfinite": 0,
        "wandb_run_id": None,
        "data": loader.state_dict(),
        "dp_size": 1,
        "imported_from": str(hf_dir.absolute()),
    }
    blob = {"meta": plain(meta), "ranks": [plain({"rng": rng_state()})], "world_size": 1, "dp_size": 1}

    def write(tmp: Path) -> None:
        make_optimizer = lambda m: build_optimizer(m, job.optim, device=torch.device("cpu"), sharded=False)[0]  # noqa: E731
        import_checkpoint(hf_dir, tmp, model_cfg, make_optimizer, max_file_bytes=max_file_bytes)

    return write_step_dir(out, step_dir_name(0), write, blob, job_to_yaml(job), overwrite=overwrite)
