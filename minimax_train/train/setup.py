"""The run's inputs, prepared before the model exists (so data and config errors surface before any heavy
work): the precision, where the weights come from (a transformers checkpoint, another run's checkpoint), the
tokenizer and the training and validation loaders of this rank's data-parallel share."""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from minimax_train.config import ConfigError, JobConfig
from minimax_train.parallel.mesh import ParallelMesh
from minimax_train.train.resume import check_init_checkpoint

log = logging.getLogger("minimax_train.train")


def use_bf16(job: JobConfig, device: torch.device) -> bool:
    return job.train.precision == "bf16" or (job.train.precision == "auto" and device.type == "cuda")


def autocast_factory(bf16: bool, device: torch.device):
    """A function returning the forward's autocast context (bf16, or nothing)."""

    def autocast():
        if not bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    return autocast


def resolve_init(job: JobConfig, mesh: ParallelMesh, resume_from: Optional[str]):
    """(transformers dir to initialise from, another run's checkpoint to initialise from): neither when
    resuming. With checkpoint.init_from_hf the model config is the HF one, also when resuming (job.model is
    replaced and the layout checked again against its shapes)."""
    init_hf = job.checkpoint.init_from_hf if not resume_from else None
    init_ckpt = None
    if job.checkpoint.init_from and not resume_from:  # a restarted continuation resumes from its own
        init_ckpt = mesh.broadcast_object(str(check_init_checkpoint(job.checkpoint.init_from, job.model)))
    if job.checkpoint.init_from_hf:
        from minimax_train.hf import read_hf_config

        hf_cfg = read_hf_config(job.checkpoint.init_from_hf)
        if hf_cfg != job.model:
            log.warning(
                "checkpoint.init_from_hf: the model config comes from %s (it differs from model.*)",
                job.checkpoint.init_from_hf,
            )
            job.model = hf_cfg
            from minimax_train.parallel.layout import resolve_layout

            resolve_layout(job.parallel, mesh.world_size, job.model, job.train)  # the layout vs the HF shapes
    return init_hf, init_ckpt


def build_data(job: JobConfig, mesh: ParallelMesh, tokenizer):
    """(training loader, validation loader or None) of this rank's dp share, after checking the tokenizer
    and the corpus against model.vocab_size."""
    from minimax_train.data import DataError, build_loader

    if len(tokenizer) > job.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={job.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({len(tokenizer)} tokens, data.tokenizer={job.data.tokenizer!r})"
        )
    loader_kw = dict(
        seq_len=job.train.seq_len,
        micro_batch_size=job.train.micro_batch_size,
        dp_rank=mesh.dp_rank,
        dp_size=mesh.layout.dp,
        seed=job.train.seed,
    )
    train_loader = build_loader(job.data, tokenizer, split="train", **loader_kw)
    for src in train_loader.stats["sources"]:
        if src["max_token_id"] is not None and src["max_token_id"] >= job.model.vocab_size:
            raise DataError(
                f"{src['label']}: holds token id {src['max_token_id']}, outside model.vocab_size="
                f"{job.model.vocab_size}: it was tokenised with another tokenizer, or raise model.vocab_size"
            )
        log.info(
            "data %s: %s documents, %d malformed records skipped",
            src["label"],
            src["documents"],
            src["bad_records"],
        )
    valid_loader = None
    if job.train.eval_interval > 0:
        try:
            valid_loader = build_loader(job.data, tokenizer, split="valid", **loader_kw)
        except DataError as e:
            raise DataError(
                f"{e} (validation: train.eval_interval={job.train.eval_interval}; set "
                f"train.eval_interval=0 to train without a held-out split)"
            ) from None
    return train_loader, valid_loader


__all__ = ["autocast_factory", "build_data", "resolve_init", "use_bf16"]
