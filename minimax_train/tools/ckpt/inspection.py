"""Reading a checkpoint without loading it: its config, tensor metadata, step, data position and layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from minimax_train.train.checkpoint import resolve_checkpoint


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

    p = resolve_checkpoint(path)
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
        "  (a DCP checkpoint loads into any valid layout: resume with other parallel.* settings directly)",
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
