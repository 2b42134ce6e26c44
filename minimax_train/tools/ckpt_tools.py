"""Checkpoint tools: inspect, convert, export-hf, import-hf.

    tools/ckpt.py inspect CKPT [--tensors] [--json]
    tools/ckpt.py convert CKPT --out DST [--format dcp|torch|hf] [--world N --tp .. --cp .. --ep .. --etp ..]
    tools/ckpt.py export-hf CKPT --out HF_DIR [--dtype bf16]
    tools/ckpt.py import-hf HF_DIR --out CKPT_DIR [-- trainer overrides]

CKPT is one checkpoint (checkpoint.dir/step_XXXXXXXX) or a checkpoint.dir, meaning its latest complete one
(minimax_train.train.checkpoint: a torch.distributed.checkpoint (DCP) directory of {"model", "optim"}, plus
meta.pt and config.yaml).

About layouts: a DCP checkpoint stores every tensor with its global shape, split into the chunks its ranks
held; loading reshards to whatever layout the loading job has. Every layout stores every tensor under
the single-process model's key and shape (the expert gate/up weight too: expert_parallel.standard_gate_up
maps the in-memory [E, 2, I, H] form of etp > 1 to transformers' [E, 2I, H]), so resuming under a different
tp / cp / ep / etp / dp needs no conversion: start the trainer with the new parallel.* settings and the
same checkpoint.dir. What `convert` does: it checks the target layout against the model (the trainer's
resolve_layout rules plus the vocabulary / zigzag constraints) and the saved data position (the global
rows consumed must divide by the new dp), then writes a consolidated copy:
- dcp: a complete checkpoint directory (model, optimizer, meta, config with the target parallel.* set),
  written by one process into a single file set, which the trainer resumes under the target layout;
- torch: one torch.save file of the whole state ({"model": ..., "optim": ...}, full tensors);
- hf: the transformers export (same code as `export-hf` / python -m minimax_train.export).
All three hold the whole checkpoint in this process's memory. A checkpoint written with etp > 1 before
that mapping existed stores gate/up as [E, 2, I, H]; `inspect` says so and `convert` (dcp / torch) rewrites
it in the standard form, which every layout and export then read.

export-hf is minimax_train.export.export. import-hf loads a transformers MiniMax directory with
minimax_train.hf.load_hf and saves it with the trainer's CheckpointManager as step 0 of a checkpoint.dir,
with fresh AdamW state and the data loader's initial position for the job config given by the overrides
(the trainer's Hydra config, e.g. `-- data=jsonl train.seq_len=4096`): starting the trainer with
checkpoint.dir=CKPT_DIR and the same overrides resumes from those weights."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

GATE_UP = "mlp.experts.gate_up_proj"


class CkptToolError(ValueError):
    pass


# ---- reading -------------------------------------------------------------------------------------------------------
def _resolve(path: str | os.PathLike) -> Path:
    from minimax_train.train.checkpoint import resolve_checkpoint

    return resolve_checkpoint(path)


def read_config(path: Path) -> dict:
    """The checkpoint's config.yaml as a plain dict (not validated: paths in it may not exist here)."""
    from omegaconf import OmegaConf

    from minimax_train.train.checkpoint import CONFIG

    f = Path(path) / CONFIG
    if not f.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(f), resolve=True) or {}


def tensor_metadata(path: Path) -> dict[str, dict]:
    """FQN -> {shape, dtype, chunks} of every tensor in the DCP metadata (non-tensor entries: shape None)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata()
    out = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            out[fqn] = {
                "shape": list(m.size),
                "dtype": str(m.properties.dtype).removeprefix("torch."),
                "chunks": len(m.chunks),
            }
        else:
            out[fqn] = {"shape": None, "dtype": "bytes", "chunks": 1}
    return out


def _elem_size(dtype: str) -> int:
    import torch

    try:
        return torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    except (AttributeError, TypeError):
        return 0


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    from minimax_train.train.checkpoint import list_checkpoints, read_meta

    p = _resolve(path)
    blob = read_meta(p)
    meta = blob.get("meta", {})
    cfg = read_config(p)
    tensors = tensor_metadata(p)
    par = cfg.get("parallel", {})
    world = int(blob.get("world_size", 1))
    model, optim = {}, {}
    for k, v in tensors.items():
        (model if k.startswith("model.") else optim)[k] = v

    def total(d):
        n = sum(_numel(v["shape"]) for v in d.values() if v["shape"] is not None)
        b = sum(_numel(v["shape"]) * _elem_size(v["dtype"]) for v in d.values() if v["shape"] is not None)
        return n, b

    mn, mb = total(model)
    on, ob = total(optim)
    info: dict[str, Any] = {
        "path": str(p),
        "step": int(meta.get("step", -1)),
        "tokens": int(meta.get("tokens", 0)),
        "skipped_steps": int(meta.get("skipped_steps", 0)),
        "wandb_run_id": meta.get("wandb_run_id"),
        "siblings": [c.name for c in list_checkpoints(p.parent)],
        "converted": meta.get("converted"),
        "layout": {
            "world_size": world,
            "dp": int(blob.get("dp_size", meta.get("dp_size", world))),
            "tp": par.get("tp", 1),
            "cp": par.get("cp", 1),
            "ep": par.get("ep", 1),
            "etp": par.get("etp", 1),
            "sequence_parallel": par.get("sequence_parallel", False),
            "engine": par.get("engine", "fsdp2"),
            "legacy_gate_up": _is_legacy(model),
        },
        "data": _data_summary(meta.get("data")),
        "model_config": cfg.get("model", {}),
        "train": {
            k: cfg.get("train", {}).get(k) for k in ("seq_len", "global_batch_size", "micro_batch_size", "steps")
        },
        "model_tensors": len(model),
        "model_elements": mn,
        "model_bytes": mb,
        "optim_entries": len(optim),
        "optim_elements": on,
        "optim_bytes": ob,
        "tensors": tensors,
    }
    if info["model_config"]:
        try:
            from minimax_train.model.config import ModelConfig
            from minimax_train.model.flops import count_params

            mcfg = ModelConfig(**info["model_config"])
            pc = count_params(mcfg)
            info["parameters"] = {"total": pc.total, "active": pc.active}
            types = mcfg.resolved_layer_types()
            info["layer_kinds"] = {
                "softmax": types.count("full_attention"),
                "lightning": types.count("linear_attention"),
            }
        except (TypeError, ValueError):
            pass
    return info


def _numel(shape) -> int:
    n = 1
    for s in shape or []:
        n *= int(s)
    return n


def _is_legacy(model_tensors: dict) -> bool:
    """Expert gate/up stored [E, 2, I, H] (etp > 1, written before expert_parallel.standard_gate_up)."""
    return any(
        k.endswith(GATE_UP) and v["shape"] is not None and len(v["shape"]) == 4 for k, v in model_tensors.items()
    )


def _data_summary(data: Optional[dict]) -> dict:
    if not isinstance(data, dict):
        return {}
    return {
        "global_rows": data.get("rows"),
        "seq_len": data.get("seq_len"),
        "seed": data.get("seed"),
        "rows_per_source": data.get("taken"),
        "positions": [
            {"epoch": s.get("epoch"), "document": s.get("pos"), "offset": s.get("offset")}
            for s in data.get("sources", [])
        ],
    }


def format_inspect(info: dict, show_tensors: bool = False, match: Optional[str] = None) -> str:
    L = info["layout"]
    mc = info["model_config"]
    lines = [
        f"checkpoint {info['path']}",
        f"  step {info['step']:,}, tokens seen {info['tokens']:,}, skipped steps {info['skipped_steps']}"
        + (f", wandb run {info['wandb_run_id']}" if info.get("wandb_run_id") else ""),
        f"  in its directory: {', '.join(info['siblings'])}",
        f"  saved by {L['world_size']} rank(s) (dp {L['dp']}); job config layout: tp {L['tp']} (sequence parallel "
        f"{'on' if L['sequence_parallel'] else 'off'}), cp {L['cp']}, ep {L['ep']}, etp {L['etp']}, engine "
        f"{L['engine']}",
        "  (a DCP checkpoint loads into any valid layout: resume with other parallel.* settings directly)"
        if not L["legacy_gate_up"]
        else "  LEGACY: expert gate/up stored [E, 2, I, H] (etp > 1, older version); `convert` rewrites it as "
        "[E, 2I, H], which every layout and export load",
    ]
    conv = info.get("converted")
    if conv:
        t = conv.get("target_layout")
        lines.append(
            f"  converted from {conv.get('from')}"
            + (
                f" for world {t['world']}: dp {t['dp']} x cp {t['cp']} x tp "
                f"{t['tp']}, experts edp {t['edp']} x ep {t['ep']} x etp {t['etp']}"
                if t
                else ""
            )
        )
    d = info["data"]
    if d:
        pos = "; ".join(
            f"source {i}: epoch {p['epoch']} doc {p['document']} +{p['offset']}"
            for i, p in enumerate(d.get("positions", []))
        )
        lines.append(
            f"  data: {d.get('global_rows')} global rows of {d.get('seq_len')} tokens consumed (seed "
            f"{d.get('seed')}); {pos}"
        )
    if mc:
        params = info.get("parameters", {})
        kinds = info.get("layer_kinds") or {}
        lines.append(
            f"  model: vocab {mc.get('vocab_size')}, hidden {mc.get('hidden_size')}, layers "
            f"{mc.get('num_hidden_layers')} ({kinds.get('lightning', '?')} lightning, {kinds.get('softmax', '?')} "
            f"softmax), heads "
            f"{mc.get('num_attention_heads')}/{mc.get('num_key_value_heads')} x {mc.get('head_dim')}, experts "
            f"{mc.get('num_local_experts')} x {mc.get('intermediate_size')} top-{mc.get('num_experts_per_tok')}"
            + (f"; {params['total']:,} parameters ({params['active']:,} active)" if params else "")
        )
    t = info["train"]
    if any(v is not None for v in t.values()):
        lines.append(
            f"  train: seq_len {t['seq_len']}, global batch {t['global_batch_size']} rows, micro-batch "
            f"{t['micro_batch_size']}, steps {t['steps']}"
        )
    lines.append(
        f"  model state: {info['model_tensors']} tensors, {info['model_elements']:,} elements, "
        f"{info['model_bytes'] / 1e6:,.1f} MB; optimizer state: {info['optim_entries']} entries, "
        f"{info['optim_bytes'] / 1e6:,.1f} MB"
    )
    if show_tensors or match:
        lines.append(f"  {'tensor':64s} {'shape':>22s} {'dtype':>9s} {'chunks':>6s}")
        for k, v in sorted(info["tensors"].items()):
            if match and match not in k:
                continue
            if not show_tensors and not match and not k.startswith("model."):
                continue
            shape = "x".join(map(str, v["shape"])) if v["shape"] is not None else "-"
            lines.append(f"  {k:64s} {shape:>22s} {v['dtype']:>9s} {v['chunks']:>6d}")
    return "\n".join(lines)


# ---- convert -------------------------------------------------------------------------------------------------------
def load_full_state(path: Path) -> dict:
    """The whole DCP state (nested {"model": {...}, "optim": {...}}) as full tensors, in this process."""
    from torch.distributed.checkpoint.format_utils import FileSystemReader, _EmptyStateDictLoadPlanner, _load_state_dict

    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return sd


def upgrade_legacy_gate_up(sd: dict) -> int:
    """In place: legacy [E, 2, I, H] expert gate/up weights (and their Adam moments) to transformers'
    [E, 2I, H], the form every checkpoint stores now. Returns the number of tensors reshaped."""
    count = 0

    def fix(t):
        nonlocal count
        if hasattr(t, "dim") and t.dim() == 4:
            count += 1
            return t.flatten(1, 2).contiguous()
        return t

    model = sd.get("model", {})
    for k in list(model):
        if k.endswith(GATE_UP):
            model[k] = fix(model[k])
    for k, st in sd.get("optim", {}).get("state", {}).items():
        if k.endswith(GATE_UP) and isinstance(st, dict):
            for name in list(st):
                st[name] = fix(st[name])
    return count


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
    src = _resolve(path)
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
    report["upgraded_gate_up"] = upgrade_legacy_gate_up(sd)
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
    import torch
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from minimax_train.train.checkpoint import COMPLETE, CONFIG, META, _fsync_tree, _quiet_single_process

    out_root.mkdir(parents=True, exist_ok=True)
    final = out_root / step_name
    tmp = out_root / (step_name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists():
        if not overwrite:
            raise CkptToolError(f"{final} exists; pass --overwrite")
        shutil.rmtree(final)
    tmp.mkdir(parents=True)
    with _quiet_single_process():
        dcp.save({"model": sd["model"], "optim": sd["optim"]}, checkpoint_id=str(tmp), no_dist=True)
    torch.save(blob, tmp / META)
    (tmp / CONFIG).write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    _fsync_tree(tmp)
    (tmp / COMPLETE).write_text(f"{int(step_name.split('_')[-1])}\n")
    os.replace(tmp, final)
    return final


# ---- HF ------------------------------------------------------------------------------------------------------------
def export_hf(path, out, *, dtype=None, tokenizer: bool = True, overwrite: bool = False) -> Path:
    """minimax_train.export.export (the model rebuilt from config.yaml, weights loaded from the DCP checkpoint,
    written by minimax_train.hf.save_hf)."""
    from minimax_train.export import export

    src = _resolve(path)
    if _is_legacy({k: v for k, v in tensor_metadata(src).items() if k.startswith("model.")}):
        raise CkptToolError(
            f"{src} stores the expert gate/up weights as [E, 2, I, H] (etp > 1, an older version); "
            f"rewrite it first: tools/ckpt.py convert {src} --out NEW_DIR"
        )
    return export(src, out, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)


def compose_job(overrides: list[str]):
    """The trainer's JobConfig for Hydra overrides (conf/ of the repository)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from minimax_train.config import register_configs, to_job_config
    from minimax_train.train.cli import conf_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_job_config(cfg)


def import_hf(
    hf_dir: str | os.PathLike, out: str | os.PathLike, overrides: Optional[list[str]] = None, *, overwrite: bool = False
) -> Path:
    """A transformers MiniMax directory -> step_00000000 of checkpoint.dir `out` (model, fresh AdamW state, the
    data loader's initial position for the job), saved by the trainer's CheckpointManager in one process."""
    import torch

    from minimax_train.config import job_to_yaml
    from minimax_train.data import build_loader, load_tokenizer
    from minimax_train.hf import load_hf, read_hf_config
    from minimax_train.parallel.mesh import ParallelConfig, ParallelMesh
    from minimax_train.train.checkpoint import CheckpointManager, latest_checkpoint, rng_state
    from minimax_train.train.optim import build_optimizer

    hf_dir, out = Path(hf_dir), Path(out)
    model_cfg = read_hf_config(hf_dir)  # clear errors for a missing / foreign directory
    if latest_checkpoint(out) is not None and not overwrite:
        raise CkptToolError(f"{out} already holds checkpoints; choose another --out or pass --overwrite")
    job = compose_job(overrides or [])
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
    model = load_hf(hf_dir, dtype=torch.float32)
    optimizer, _ = build_optimizer(model, job.optim, device=torch.device("cpu"), sharded=False)
    mesh = ParallelMesh(ParallelConfig(), world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))
    if overwrite and out.exists():
        for p in out.iterdir():
            if p.is_dir() and p.name.startswith("step_"):
                shutil.rmtree(p)
    manager = CheckpointManager(out, mesh, keep_last=0)
    manager.prepare()
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
    return manager.save(0, model, optimizer, meta, {"rng": rng_state()}, job_to_yaml(job))


# ---- command line ----------------------------------------------------------------------------------------------------
def build_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="tools/ckpt.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{inspect,convert,export-hf,import-hf}")
    p = sub.add_parser("inspect", help="step, tokens seen, saving layout, config, tensor shapes")
    p.add_argument("checkpoint", help="a step_XXXXXXXX dir or a checkpoint.dir (its latest)")
    p.add_argument("--tensors", action="store_true", help="list every tensor (model and optimizer)")
    p.add_argument("--match", help="list the tensors whose name contains this")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser(
        "convert",
        help="validate a target layout and write a consolidated dcp / torch / hf copy",
        description="Validate a target parallel layout for the checkpoint's model and data position "
        "and write a consolidated copy. DCP checkpoints reshard when loaded, so the trainer "
        "can resume the original under any valid layout without this; convert changes the "
        "format (and rewrites a legacy [E, 2, I, H] expert gate/up form as [E, 2I, H]).",
    )
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="dcp: a checkpoint.dir; torch: a file; hf: a directory")
    p.add_argument("--format", default="dcp", choices=("dcp", "torch", "hf"))
    p.add_argument("--world", type=int, help="target world size (GPUs); validates tp/cp/ep/etp against it")
    for k in ("tp", "cp", "ep", "etp"):
        p.add_argument(f"--{k}", type=int, default=1)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="hf only: weights dtype")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("export-hf", help="transformers directory (python -m minimax_train.export)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--no-tokenizer", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser(
        "import-hf",
        help="transformers directory -> step 0 of a checkpoint.dir the trainer resumes",
        description="Load a transformers MiniMax directory and save it as step_00000000 of a "
        "checkpoint.dir (fresh AdamW state, the data loader at its start). Trainer "
        "overrides after `--` choose the data, optimizer and batch settings; start training "
        "with checkpoint.dir=OUT and the same overrides.",
    )
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True, help="the checkpoint.dir to create")
    p.add_argument("--overwrite", action="store_true")
    p.usage = "tools/ckpt.py import-hf HF_DIR --out CKPT_DIR [--overwrite] [-- trainer overrides ...]"
    return ap


def main(argv=None) -> int:
    import torch

    from minimax_train.config import ConfigError
    from minimax_train.data import DataError
    from minimax_train.hf.convert import CheckpointError as HFError
    from minimax_train.train.checkpoint import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:  # trainer overrides for import-hf
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    args.overrides = overrides
    if overrides and args.cmd != "import-hf":
        print("ckpt: error: trainer overrides after -- only apply to import-hf", file=sys.stderr)
        return 2
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        if args.cmd == "inspect":
            info = inspect_checkpoint(args.checkpoint)
            if args.json:
                print(json.dumps(info, indent=1, default=str))
            else:
                print(format_inspect(info, args.tensors, args.match))
        elif args.cmd == "convert":
            for k in ("tp", "cp", "ep", "etp", "world"):
                v = getattr(args, k)
                if v is not None and v < 1:
                    raise CkptToolError(f"--{k} must be a positive integer, got {v}")
            if args.world is None and (args.tp, args.cp, args.ep) != (1, 1, 1):
                raise CkptToolError("--tp/--cp/--ep describe a target layout: give its --world (GPU count) too")
            rep = convert(
                args.checkpoint,
                args.out,
                fmt=args.format,
                world=args.world,
                tp=args.tp,
                cp=args.cp,
                ep=args.ep,
                etp=args.etp,
                dtype=dtypes.get(args.dtype),
                overwrite=args.overwrite,
            )
            if "target_layout" in rep:
                t = rep["target_layout"]
                print(
                    f"target layout valid: world {t['world']} = dp {t['dp']} x cp {t['cp']} x tp {t['tp']}; experts "
                    f"edp {t['edp']} x ep {t['ep']} x etp {t['etp']}"
                )
            if rep.get("upgraded_gate_up"):
                print(
                    f"rewrote {rep['upgraded_gate_up']} legacy [E, 2, I, H] expert gate/up tensors (and Adam "
                    f"moments) as [E, 2I, H]"
                )
            print(f"wrote {rep['output']} ({rep['format']})")
        elif args.cmd == "export-hf":
            out = export_hf(
                args.checkpoint,
                args.out,
                dtype=dtypes.get(args.dtype),
                tokenizer=not args.no_tokenizer,
                overwrite=args.overwrite,
            )
            print(f"wrote {out}")
        else:
            out = import_hf(args.hf_dir, args.out, args.overrides, overwrite=args.overwrite)
            print(
                f"wrote {out}; train from it with: python -m minimax_train.train checkpoint.dir={Path(args.out)} "
                + " ".join(args.overrides)
            )
    except (CkptToolError, CheckpointError, HFError, ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"ckpt: error: {e}", file=sys.stderr)
        return 2
    return 0
