"""convert: a target layout validated for the checkpoint, and a consolidated dcp / torch / hf copy."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

from minimax_train.tools.ckpt.errors import CkptToolError
from minimax_train.tools.ckpt.hf import export_hf
from minimax_train.tools.ckpt.inspection import read_config
from minimax_train.train.checkpoint import resolve_checkpoint


def load_full_state(path: Path) -> dict:
    """The whole DCP state (nested {"model": {...}, "optim": {...}}) as full tensors, in this process."""
    from torch.distributed.checkpoint.format_utils import FileSystemReader, _EmptyStateDictLoadPlanner, _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd


def check_target_layout(cfg: dict, meta: dict, *, world: int, tp: int, cp: int, ep: int, etp: int) -> dict:
    """Validate a target layout for this checkpoint's model and data position; return the resolved sizes."""
    from minimax_train.model.config import ModelConfig
    from minimax_train.parallel.mesh import ParallelConfig, ParallelConfigError, resolve_layout

    mc = ModelConfig(**cfg["model"])
    try:
        lay = resolve_layout(ParallelConfig(tp=tp, cp=cp, ep=ep, etp=etp, sequence_parallel=tp > 1), world, mc)
    except ParallelConfigError as e:
        raise CkptToolError(f"target layout (world {world}): {e}") from None
    if mc.vocab_size % tp:
        raise CkptToolError(f"target layout: parallel.tp={tp} does not divide vocab_size={mc.vocab_size}")
    seq = (cfg.get("train") or {}).get("seq_len")
    if seq and seq % (2 * cp):
        raise CkptToolError(f"target layout: train.seq_len={seq} must be divisible by 2*parallel.cp={2 * cp}")
    gbs = (cfg.get("train") or {}).get("global_batch_size")
    if gbs and gbs % lay.dp:
        raise CkptToolError(f"target layout: train.global_batch_size={gbs} rows is not divisible by dp={lay.dp}")
    rows = (meta.get("data") or {}).get("rows")
    if rows is not None and rows % lay.dp:
        raise CkptToolError(
            f"target layout: the data loader stopped after {rows} global rows, not a multiple of "
            f"dp={lay.dp}, so the run cannot resume exactly with this dp"
        )
    return {"world": world, "dp": lay.dp, "cp": lay.cp, "tp": lay.tp, "ep": lay.ep, "etp": lay.etp, "edp": lay.edp}


def convert(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "dcp",
    world: Optional[int] = None,
    tp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int = 1,
    dtype=None,
    overwrite: bool = False,
) -> dict:
    import torch

    from minimax_train.train.checkpoint import read_meta

    if fmt not in ("dcp", "torch", "hf"):
        raise CkptToolError(f"--format {fmt!r}: use dcp, torch or hf")
    src = resolve_checkpoint(path)
    cfg = read_config(src)
    if not cfg.get("model"):
        raise CkptToolError(f"{src}: no config.yaml with a model section; cannot rebuild or validate the model")
    blob = read_meta(src)
    meta = blob.get("meta", {})
    out = Path(out)
    report: dict[str, Any] = {"source": str(src), "format": fmt}
    if world is not None:
        report["target_layout"] = check_target_layout(cfg, meta, world=world, tp=tp, cp=cp, ep=ep, etp=etp)
    if fmt == "hf":
        if etp > 1:
            raise CkptToolError("--format hf writes transformers weights; the target etp does not apply (omit --etp)")
        report["output"] = str(export_hf(src, out, dtype=dtype, overwrite=overwrite))
        return report
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise CkptToolError(f"{out} exists; choose another --out or pass --overwrite")
    sd = load_full_state(src)
    if fmt == "torch":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({**sd, "meta": meta, "config": cfg}, tmp)
        os.replace(tmp, out)
        report["output"] = str(out)
        return report
    blob = dict(blob)
    blob["meta"] = {**meta, "converted": {"from": str(src), "target_layout": report.get("target_layout")}}
    report["output"] = str(_save_dcp_step(sd, blob, cfg, out, src.name, overwrite=overwrite))
    return report


def _save_dcp_step(sd: dict, blob: dict, cfg: dict, out_root: Path, step_name: str, *, overwrite: bool) -> Path:
    """A complete checkpoint dir `out_root/step_name` (the files the trainer writes), one writer. config.yaml is
    the source's (the trainer resumes with its own command line; export rebuilds the model from it)."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from minimax_train.train.checkpoint import quiet_single_process

    def write(tmp: Path) -> None:
        with quiet_single_process():
            dcp.save({"model": sd["model"], "optim": sd["optim"]}, checkpoint_id=str(tmp), no_dist=True)

    config_yaml = OmegaConf.to_yaml(OmegaConf.create(cfg))
    return write_step_dir(out_root, step_name, write, blob, config_yaml, overwrite=overwrite)


def write_step_dir(out_root: Path, step_name: str, write, blob: dict, config_yaml: str, *, overwrite: bool) -> Path:
    """`out_root/step_name` made complete atomically, as the trainer's CheckpointManager makes it: write(tmp)
    writes the DCP data into the .tmp dir, then meta.pt (`blob`), config.yaml, fsync, COMPLETE, rename."""
    import torch

    from minimax_train.train.checkpoint import COMPLETE, CONFIG, META, fsync_tree

    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / step_name
    tmp = out_root / (step_name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists():
        if not overwrite:
            raise CkptToolError(f"{final} exists; pass --overwrite")
        shutil.rmtree(final)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        torch.save(blob, tmp / META)
        (tmp / CONFIG).write_text(config_yaml)
        fsync_tree(tmp)
        (tmp / COMPLETE).write_text(f"{int(step_name.split('_')[-1])}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)
    return final
