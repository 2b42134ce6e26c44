"""Resume and continuation plumbing around train/checkpoint.py: a run resumes only into the model its
checkpoint was trained as (the layout may differ), and a new run may start from another run's checkpoint
(checkpoint.init_from) with the same shapes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minimax_train.config import JobConfig
from minimax_train.model.config import RESUME_FIELDS, shape_mismatches
from minimax_train.parallel.mesh import ParallelMesh
from minimax_train.train.checkpoint import CheckpointError

log = logging.getLogger("minimax_train.train")


def check_init_checkpoint(init_from: str, model_cfg) -> Path:
    """The checkpoint checkpoint.init_from names, after checking that its model has the current shapes
    (CheckpointError listing the fields that differ); differences that keep the shapes (rope_theta, ...)
    are logged."""
    import dataclasses

    from minimax_train.train.checkpoint import resolve_checkpoint, saved_model_config

    path = resolve_checkpoint(init_from)
    saved = saved_model_config(path)
    bad = shape_mismatches(saved, model_cfg)
    if bad:
        raise CheckpointError(
            f"checkpoint.init_from={init_from!r}: the model shapes differ from {path}'s ({'; '.join(bad)}); "
            f"set these model.* fields as the checkpoint has them"
        )
    changed = [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(model_cfg, f.name)!r}"
        for f in dataclasses.fields(model_cfg)
        if getattr(saved, f.name) != getattr(model_cfg, f.name)
    ]
    if changed:
        log.info("checkpoint.init_from: model settings changed from %s: %s", path.name, "; ".join(changed))
    return path


def load_init_checkpoint(path, what: str, model, optimizer, optim_cfg, mesh: ParallelMesh) -> None:
    """Weights (what="model") or weights and AdamW state ("model+optim") of checkpoint `path` into this run's
    layout (DCP reshards); the optimiser's hyperparameters stay this run's (optim.*)."""
    from minimax_train.train.checkpoint import load_model_and_optim
    from minimax_train.train.optim import apply_hyperparameters

    with_optim = what == "model+optim"
    load_model_and_optim(Path(path), model, optimizer, no_dist=mesh.world_size == 1, with_optim=with_optim)
    if with_optim:
        apply_hyperparameters(optimizer if optimizer is not None else model.client_optimizer, optim_cfg)


def check_same_model(path: Path, saved: JobConfig, job: JobConfig) -> None:
    """Resume only into the model the checkpoint was trained as (the layout may differ)."""
    diff = shape_mismatches(saved.model, job.model, RESUME_FIELDS)
    if diff:
        raise CheckpointError(
            f"checkpoint {path} holds another model than this run's ({', '.join(diff)}, as checkpoint -> run): "
            f"resume it with the checkpoint's model settings, or start a new run in another checkpoint.dir"
        )


@dataclass
class RunState:
    """Where a run stands: the counters a checkpoint carries (zero for a new run)."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0
    consecutive: int = 0
    wandb_id: Optional[str] = None
    resumed_from: Optional[str] = None


def resume_latest(manager, model, optimizer, job: JobConfig, mesh: ParallelMesh, train_loader, reseed) -> RunState:
    """Load the newest readable checkpoint of `manager` into model / optimiser (DCP reshards into this layout)
    and the data loader; restore this rank's RNG, or call reseed(step) when the world size changed."""
    t0 = time.perf_counter()
    loaded = manager.load_latest(model, optimizer, check_job=lambda p, saved: check_same_model(p, saved, job))
    path, meta, mine, blob = str(loaded[0]), *loaded[1:]
    state = RunState(
        step=int(meta["step"]),
        tokens=int(meta["tokens"]),
        skipped=int(meta["skipped_steps"]),
        consecutive=int(meta["consecutive_nonfinite"]),
        wandb_id=meta.get("wandb_run_id"),
        resumed_from=path,
    )
    train_loader.load_state_dict(meta["data"])
    if mine is not None:
        from minimax_train.train.checkpoint import set_rng_state

        set_rng_state(mine["rng"])
    else:
        log.warning("world size changed (%d -> %d): RNG streams reseeded", blob["world_size"], mesh.world_size)
        reseed(state.step)
    log.info("resumed from %s (step %d, %.2fs)", path, state.step, time.perf_counter() - t0)
    return state


__all__ = ["RunState", "check_init_checkpoint", "check_same_model", "load_init_checkpoint", "resume_latest"]
