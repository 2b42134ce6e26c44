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

Safety: a fresh run refuses a dir holding another run's step dirs (unless checkpoint.overwrite, which
removes them after its own first save); a save refuses non-finite weights or optimiser state and turns a
full disk into "no space left on <dir>" (the .tmp removed, older checkpoints kept); resume skips a damaged
checkpoint (unreadable config.yaml, meta.pt or DCP data) for the previous complete one, loudly.

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
from minimax_train.train.ckpt_safety import (
    FILE_ERRORS,
    first_nonfinite,
    is_out_of_space,
    quiet_dcp_errors,
    short_reason,
)

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


def step_dirs(root: Path) -> list[Path]:
    """Every step_XXXXXXXX dir in `root`, complete or not: the checkpoints of some run."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)), key=lambda p: p.name)


def holds_checkpoints(path: Path) -> bool:
    """`path` is a checkpoint (step dir) or a checkpoint.dir (holds step dirs)."""
    path = Path(path)
    return path.is_dir() and (STEP_RE.match(path.name) is not None or bool(step_dirs(path)))


class DamagedCheckpoint(CheckpointError):
    """A complete-looking checkpoint whose files cannot be read back."""


def read_saved_job(path: Path):
    """The JobConfig saved with checkpoint `path` (its config.yaml); DamagedCheckpoint if it is unreadable."""
    from minimax_train.config import load_job_yaml

    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        raise DamagedCheckpoint(f"{path}: {CONFIG} is missing")
    try:
        return load_job_yaml(cfg)
    except Exception as e:  # yaml, OmegaConf and schema errors alike: the file is not what we wrote
        raise DamagedCheckpoint(f"{path}: {CONFIG} cannot be read ({short_reason(e)})") from None


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


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            try:
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
    _fsync_dir(path)


@contextlib.contextmanager
def quiet_single_process():
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
        self.retired: list[Path] = []  # another run's step dirs, removed after this run's first save

    def guard_fresh_start(self, resume: bool, overwrite: bool) -> None:
        """Refuse to start writing into a dir that holds another run's checkpoints, before anything in it
        is touched; with `overwrite` they are removed once this run's first save is complete."""
        found = self.mesh.broadcast_object([str(p) for p in step_dirs(self.root)] if self.mesh.is_main else None)
        if not found or (resume and list_checkpoints(self.root)):
            return
        names = Path(found[0]).name + (f" .. {Path(found[-1]).name}" if len(found) > 1 else "")
        if overwrite:
            log.warning(
                "checkpoint.overwrite=true: the %d checkpoints in %s (%s) will be removed after this run's first save",
                len(found),
                self.root,
                names,
            )
            self.retired = [Path(p) for p in found]
            return
        why = "checkpoint.resume=false" if not resume else f"none of them is complete (no {COMPLETE} marker)"
        raise CheckpointError(
            f"checkpoint.dir {self.root} holds {len(found)} checkpoints of another run ({names}) and this run "
            f"starts fresh ({why}): use another checkpoint.dir, resume them (checkpoint.resume=true), or "
            f"replace them with checkpoint.overwrite=true (they are removed after the new run's first save)"
        )

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
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.root / step_dir_name(step)
        tmp = self.root / (final.name + ".tmp")
        # an engine adapter (DeepSpeed) gives full-tensor state dicts in the same layout itself
        model_sd, optim_sd = model.get_state_dict() if optimizer is None else get_state_dict(model, optimizer)
        if self.mesh.layout.pp > 1:
            optim_sd = dict(optim_sd, param_groups=self._whole_param_groups(optim_sd["param_groups"]))
        bad = self.mesh.all_gather_object(first_nonfinite({"model": model_sd, "optim": optim_sd}))
        if any(bad):
            raise CheckpointError(
                f"refusing to save step {step}: {next(b for b in bad if b)} holds NaN or inf (the run diverged); "
                f"{self._last_good_advice()}"
            )
        if self.mesh.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.mesh.barrier()
        try:
            self._write(step, tmp, model_sd, optim_sd, meta, rank_state, config_yaml)
        except FILE_ERRORS as e:
            if self.mesh.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if is_out_of_space(e, self.root):
                raise CheckpointError(
                    f"no space left on {self.root} while saving step {step} ({short_reason(e)}); the partial "
                    f"{tmp.name} was removed and {self._last_good_advice()} Free space (or lower "
                    f"checkpoint.keep_last) and start the same command again"
                ) from None
            raise
        if self.mesh.is_main:
            self._publish(step, tmp, final)
        self.mesh.barrier()
        return final

    def _whole_param_groups(self, groups: list) -> list:
        """The optimiser's param groups naming every parameter of the model, not only this pipeline stage's:
        DCP keeps one copy of a non-tensor entry, so every rank must write the same one (loading picks each
        rank's parameters out of it by name, in any layout)."""
        names = self.mesh.all_gather_object([list(g["params"]) for g in groups])
        out = []
        for i, g in enumerate(groups):
            every = [n for rank in names for n in (rank[i] if i < len(rank) else [])]
            out.append(dict(g, params=list(dict.fromkeys(every))))
        return out

    def _write(self, step, tmp: Path, model_sd, optim_sd, meta, rank_state, config_yaml) -> None:
        import torch.distributed.checkpoint as dcp

        with quiet_single_process(), standard_gate_up({"model": model_sd, "optim": optim_sd}) as state:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=self.mesh.world_size == 1)
        ranks = self.mesh.all_gather_object(plain(rank_state))
        if self.mesh.is_main:
            if self.faults is not None:
                self.faults.maybe_fill_disk(step, tmp / META)
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
            fsync_tree(tmp)

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        """Mark `tmp` complete and give it its name (rank 0); then retire another run's and prune."""
        if self.faults is not None:
            self.faults.maybe_kill("save_crash", step)
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. a resumed run ending where it resumed)
            self._remove(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        for old in self.retired:  # checkpoint.overwrite: the old run goes once this one has a checkpoint
            if old != final and old.exists():
                self._remove(old)
        self.retired = []
        self._prune()

    def _last_good_advice(self) -> str:
        good = [p for p in list_checkpoints(self.root) if p not in self.retired]
        if not good:
            return "no checkpoint of this run was saved before (lower optim.lr or check the data, then rerun)."
        return (
            f"the last good checkpoint, {good[-1]}, is kept (starting the same command again resumes from it; "
            f"lower optim.lr or check the data first if the run diverged)."
        )

    @staticmethod
    def _remove(path: Path) -> None:
        gone = path.with_name(path.name + ".deleting")
        os.rename(path, gone)  # no longer looks complete before its files go
        shutil.rmtree(gone, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            self._remove(old)

    # ---- load -------------------------------------------------------------------------------------
    def load(self, path: Path, model, optimizer) -> tuple[dict, Optional[dict], dict]:
        """Load model and optimiser (resharding to the current layout) and return (meta, this rank's
        state or None when the layout changed, the whole meta file). DamagedCheckpoint names the file
        that does not read back; every rank raises it when one does."""
        blob = self._agree(path, lambda: read_meta(path))
        self._agree(path, lambda: load_checked(path, model, optimizer, self.mesh.world_size == 1))
        ranks = blob["ranks"]
        mine = ranks[self.mesh.rank] if blob["world_size"] == self.mesh.world_size else None
        return blob["meta"], mine, blob

    def load_latest(self, model, optimizer, check_job=None):
        """(path, meta, this rank's state, meta file) of the newest checkpoint that reads back, or None when
        there is none. A damaged one is named and skipped for the previous one (logged as an error);
        CheckpointError when none reads. check_job(path, saved JobConfig) may refuse a checkpoint."""
        damaged = []
        for path in reversed(list_checkpoints(self.root)):
            try:
                saved = self._agree(path, lambda: read_saved_job(path))
                if check_job is not None:
                    check_job(path, saved)
                meta, mine, blob = self.load(path, model, optimizer)
            except DamagedCheckpoint as e:
                damaged.append(str(e))
                log.error("DAMAGED CHECKPOINT %s; trying the previous complete checkpoint", e)
                continue
            if damaged:
                log.error("resuming from %s, older than the damaged checkpoint(s) above", path)
            return path, meta, mine, blob
        if damaged:
            raise CheckpointError(
                f"no checkpoint in {self.root} reads back: {'; '.join(damaged)}. Resume takes the newest complete "
                f"step_XXXXXXXX: restore the damaged files, or move those dirs aside (resume then takes an "
                f"older one), or start over with another checkpoint.dir or checkpoint.resume=false "
                f"checkpoint.overwrite=true"
            )
        return None

    def _agree(self, path: Path, read):
        """read() on every rank; a failure on any rank is a DamagedCheckpoint on all of them."""
        try:
            out, reason = read(), None
        except DamagedCheckpoint as e:
            out, reason = None, str(e)
        except FILE_ERRORS as e:  # torch.load / DCP / yaml raise many types for a file that is not what we wrote
            out, reason = None, f"{path}: {short_reason(e)}"
        reasons = self.mesh.all_gather_object(reason) if self.mesh.world_size > 1 else [reason]
        first = next((r for r in reasons if r), None)
        if first:
            raise DamagedCheckpoint(first)
        return out


def load_checked(path: Path, model, optimizer, no_dist: bool) -> None:
    """load_model_and_optim; DamagedCheckpoint naming `path` when its data does not read back."""
    try:
        with quiet_dcp_errors():
            load_model_and_optim(path, model, optimizer, no_dist=no_dist)
    except FILE_ERRORS as e:
        raise DamagedCheckpoint(
            f"{path}: its model/optimiser data (.metadata, *.distcp) cannot be read ({short_reason(e)})"
        ) from None


def read_meta(path: Path) -> dict:
    """meta.pt of checkpoint `path` (plain types and tensors only, so never unpickles code)."""
    try:
        return torch.load(Path(path) / META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DamagedCheckpoint(f"{path}: {META} is truncated or corrupt ({short_reason(e)})") from None


def saved_model_config(path: Path):
    """The ModelConfig in checkpoint `path`'s config.yaml (only the model section is read and checked: the
    data paths and layout of the run that wrote it need not exist here)."""
    from omegaconf import OmegaConf

    from minimax_train.model.config import ModelConfig

    f = Path(path) / CONFIG
    if not f.is_file():
        raise CheckpointError(f"{str(path)!r} has no {CONFIG}: its model cannot be checked")
    model = OmegaConf.to_container(OmegaConf.load(f), resolve=True).get("model")
    if not model:
        raise CheckpointError(f"{str(f)!r} has no model section")
    try:
        return ModelConfig(**model)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{str(f)!r}: model section unreadable ({e})") from None


def load_model_and_optim(
    path: Path, model, optimizer=None, *, no_dist: bool | None = None, with_optim: bool = True
) -> None:
    """Load the model (and optimiser) state of checkpoint `path` into the current layout (DCP reshards).
    with_optim=False: the weights only (an engine adapter's or a torch optimiser's state is left as is)."""
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
        state = {"model": model_sd, "optim": optim_sd} if with_optim else {"model": model_sd}
        with quiet_single_process(), standard_gate_up(state):
            dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
        model.set_state_dict(state["model"], state.get("optim"))
        return
    if optimizer is None or not with_optim:
        model_sd = get_model_state_dict(model)
        with quiet_single_process(), standard_gate_up({"model": model_sd}) as state:
            dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
        set_model_state_dict(model, model_sd)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with quiet_single_process(), standard_gate_up(state):
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
