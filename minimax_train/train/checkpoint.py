"""Atomic, resumable checkpoints.

Layout of checkpoint.dir:
    step_00000100/            one complete checkpoint (the name never exists before it is complete)
        .metadata, *.distcp   torch.distributed.checkpoint of {"model": ..., "optim": ...} (resharding-capable;
                              every tensor in the single-process model's shape and key, whatever the layout:
                              expert_parallel.standard_gate_up maps its in-memory [E, 2, I, H] form)
        meta.pt               step, tokens, counters, wandb run id, and per-rank RNG and data-loader states
                              (plain types and tensors only: loaded with torch.load(weights_only=True))
        config.yaml           the resolved job config (export rebuilds the model from it)
        COMPLETE              written last, before the rename
    step_00000200.tmp/        a save in progress (or one that crashed): ignored, removed at the next start

A save writes everything into step_X.tmp, fsyncs, writes COMPLETE and renames the directory: a crash at
any point leaves either the previous complete checkpoints or the new one, never a half one that looks
complete. keep_last prunes older complete checkpoints after each successful save."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from minimax_train.errors import CheckpointError
from minimax_train.parallel.expert_parallel import standard_gate_up
from minimax_train.parallel.mesh import ParallelMesh

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
META = "meta.pt"
CONFIG = "config.yaml"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return STEP_RE.match(path.name) is not None and (path / COMPLETE).is_file() and (path / META).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step dir, or a checkpoint.dir meaning its latest complete checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if is_complete(p):
        return p
    if STEP_RE.match(p.name) or p.name.endswith(".tmp"):
        raise CheckpointError(f"{str(p)!r} is an incomplete checkpoint (no {COMPLETE} marker)")
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint (step_XXXXXXXX with {COMPLETE}) in {str(p)!r}")
    return latest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            try:
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
    _fsync_dir(path)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes the intent is to save in a single process': that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


# ---- RNG state ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    if isinstance(x, (list, tuple)):
        return tuple(_tuplify(v) for v in x)
    return x


def plain(obj):
    """Make a loader state weights_only-loadable: numpy scalars/arrays become python values/lists."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ---- the manager ----------------------------------------------------------------------------------
class CheckpointManager:
    def __init__(self, root: str | os.PathLike, mesh: ParallelMesh, keep_last: int = 0, faults=None):
        self.root = Path(root)
        self.mesh = mesh
        self.keep_last = keep_last
        self.faults = faults

    def prepare(self) -> None:
        """Create the dir and remove leftovers of crashed saves/prunes (rank 0), then sync."""
        if self.mesh.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for p in self.root.iterdir():
                if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".deleting")):
                    log.warning("removing incomplete checkpoint %s", p)
                    shutil.rmtree(p, ignore_errors=True)
        self.mesh.barrier()

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.root)

    # ---- save -------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, meta: dict, rank_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. `meta` is rank 0's global state, `rank_state` this rank's
        (RNG, data position)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.mesh.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.mesh.barrier()
        # an engine adapter (DeepSpeed) gives full-tensor state dicts in the same layout itself
        model_sd, optim_sd = model.get_state_dict() if optimizer is None else get_state_dict(model, optimizer)
        with _quiet_single_process(), standard_gate_up({"model": model_sd, "optim": optim_sd}) as state:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=self.mesh.world_size == 1)
        ranks = self.mesh.all_gather_object(plain(rank_state))
        if self.mesh.is_main:
            torch.save(
                {
                    "meta": plain(meta),
                    "ranks": ranks,
                    "world_size": self.mesh.world_size,
                    "dp_size": self.mesh.layout.dp,
                },
                tmp / META,
            )
            (tmp / CONFIG).write_text(config_yaml)
            _fsync_tree(tmp)
            if self.faults is not None:
                self.faults.maybe_kill("save_crash", step)
            with open(tmp / COMPLETE, "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # re-saving a step (e.g. a resumed run ending where it resumed)
                old = self.root / (final.name + ".deleting")
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.mesh.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        found = list_checkpoints(self.root)
        for old in found[: -self.keep_last]:
            gone = old.with_name(old.name + ".deleting")
            os.rename(old, gone)  # no longer looks complete before its files go
            shutil.rmtree(gone, ignore_errors=True)

    # ---- load -------------------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer) -> tuple[dict, Optional[dict], dict]:
        """Load model and optimiser (resharding to the current layout) and return (meta, this rank's
        state or None when the layout changed, the whole meta file)."""
        load_model_and_optim(path, model, optimizer, no_dist=self.mesh.world_size == 1)
        blob = read_meta(path)
        ranks = blob["ranks"]
        mine = ranks[self.mesh.rank] if blob["world_size"] == self.mesh.world_size else None
        return blob["meta"], mine, blob


def read_meta(path: Path) -> dict:
    return torch.load(Path(path) / META, map_location="cpu", weights_only=True)


def load_model_and_optim(path: Path, model, optimizer=None, *, no_dist: bool | None = None) -> None:
    """Load the model (and optimiser) state of checkpoint `path` into the current layout (DCP reshards)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if no_dist is None:
        no_dist = not (dist.is_available() and dist.is_initialized())
    if optimizer is None and hasattr(model, "set_state_dict"):  # an engine adapter (DeepSpeed)
        model_sd, optim_sd = model.get_state_dict()
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process(), standard_gate_up(state):
            dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
        model.set_state_dict(state["model"], state["optim"])
        return
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        with _quiet_single_process(), standard_gate_up({"model": model_sd}) as state:
            dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
        set_model_state_dict(model, model_sd)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process(), standard_gate_up(state):
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
