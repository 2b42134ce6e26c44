"""The one place where a model is built for a layout (TorchTitan's parallelize function, at construction):

    parts  = model_parts(mesh, cfg)                      # tensor/sequence, context, expert parallel pieces
    model  = MiniMaxForCausalLM(cfg, parts, seed=None)   # on the meta device: no memory
    FSDP2  : experts over edp, decoder layers and root over dp x cp
    to_empty(device) ; fill_parameters(model, source)    # only this rank's shards exist, ever

`source` gives the values (model/init.py): InitSource(cfg, seed) for a new run (the same values in every
layout), a transformers checkpoint read by slices (hf/io.py), or a full state dict. Every piece takes its
process groups from the ParallelMesh passed in; nothing is global. Build the optimiser afterwards (it
must see the sharded parameters)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..model.config import ModelConfig
from ..model.init import WeightSource, fill_parameters
from ..model.parts import ModelParts
from ..model.transformer import MiniMaxForCausalLM
from .data_parallel import apply_fsdp
from .layout import rank_groups, uses_expert_parallel
from .mesh import ParallelMesh
from .model_parts import model_parts


def build_model(
    cfg: ModelConfig,
    mesh: ParallelMesh,
    source: WeightSource,
    *,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = torch.float32,
    fsdp: bool = True,
    memory: Optional[dict] = None,
    parts: Optional[ModelParts] = None,
    partition=None,
) -> MiniMaxForCausalLM:
    """The model of `cfg` for this rank of `mesh`, with its local shards on mesh.device filled from
    `source`. fsdp=False leaves data parallelism to another engine (DeepSpeed). memory: keyword arguments
    of MiniMaxForCausalLM.set_memory_options (activation checkpointing, MoE and loss chunks). parts: the
    layout's parts (default model_parts(mesh, cfg)), e.g. a subclass that changes one slot. partition: with
    fsdp=False, a function called on each module right after its own parameters are materialised and
    filled, which shards them (DeepSpeed ZeRO-3's zero.Init): the whole model then never exists on a rank."""
    if mesh.layout.pp > 1:
        raise ValueError("parallel.pp > 1 builds pipeline stages: use minimax_train.parallel.pipeline.build_pipeline")
    with torch.device("meta"):
        model = MiniMaxForCausalLM(cfg, parts if parts is not None else model_parts(mesh, cfg), seed=None)
    model.set_memory_options(**(memory or {}))
    divide_hooks = None
    if fsdp:
        divide_hooks = shard_data_parallel(model, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if partition is not None and not fsdp:
        _materialise_by_module(model, mesh.device, source, partition)
    else:
        model.to_empty(device=mesh.device)
        fill_parameters(model, source)
    if divide_hooks is not None:  # on the materialised parameters
        divide_hooks()
    return model


def _materialise_by_module(model: nn.Module, device, source: WeightSource, partition) -> None:
    """Materialise, fill and partition one module's own parameters at a time (peak: the largest module)."""
    for prefix, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        module.to_empty(device=device, recurse=False)
        head = f"{prefix}." if prefix else ""
        fill_parameters(model, source, names=lambda n: n.startswith(head) and "." not in n[len(head) :])
        partition(module)


def shard_data_parallel(model: nn.Module, mesh: ParallelMesh, *, param_dtype=None, reduce_dtype=torch.float32):
    """FSDP2 over the data-parallel dims: expert parameters over edp (or, when edp == 1, a gradient divide
    installed by the returned function once the parameters are materialised), then the decoder layers and
    the root over dp x cp. Returns that function, or None."""
    ignored, hooks = None, None
    if uses_expert_parallel(mesh.layout):
        ignored, hooks = _reduce_expert_grads(model, mesh, mesh.cfg.sequence_parallel, param_dtype, reduce_dtype)
    if mesh.grad_reduce_size > 1:
        apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype, ignored_params=ignored)
    return hooks


def token_replicas_over_edp(mesh: ParallelMesh, sequence_parallel: bool) -> int:
    """How many ranks of this rank's edp group hold the same tokens: without sequence parallelism the
    MoE input is identical on every tp rank of a (dp, cp) block."""
    if sequence_parallel or mesh.layout.tp == 1:
        return 1
    group = next(g for g in rank_groups(mesh.layout)["edp"] if mesh.rank in g)
    return sum(1 for r in group if r // mesh.layout.tp == mesh.rank // mesh.layout.tp)


def expert_shard_dim(p, edp: int):
    """FSDP2's placement of an expert parameter over edp: its expert dim when this rank's experts divide
    evenly over edp; else (fewer local experts than edp ranks, e.g. 8 local experts over edp 64) the first
    dim that ep/etp leave whole and that has at least edp entries, so that every edp rank holds 1/edp of it
    rather than a few ranks holding whole experts and the rest nothing (TorchTitan shards dim 1 there too)."""
    from torch.distributed.tensor import DTensor, Shard

    local = p.to_local() if isinstance(p, DTensor) else p
    if local.shape[0] % edp == 0:
        return Shard(0)
    taken = {pl.dim for pl in getattr(p, "placements", ()) if isinstance(pl, Shard)}
    for d in range(1, p.ndim):
        if d not in taken and p.shape[d] >= edp:
            return Shard(d)
    return Shard(0)


def _reduce_expert_grads(model, mesh: ParallelMesh, sequence_parallel: bool, param_dtype, reduce_dtype):
    """Expert gradients (each already the sum over its EP group's tokens, with the trainer's dp*cp loss
    scale) must be summed over the edp ranks holding distinct tokens and divided by dp*cp. With edp > 1,
    FSDP2 shards the experts over edp and divides by that factor; with edp == 1 there is nothing to
    reduce: the dense FSDP ignores the experts and a gradient hook divides. Returns the ignored params."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..model.moe import MoE

    divide = float(mesh.grad_reduce_size * token_replicas_over_edp(mesh, sequence_parallel))
    experts = [m.experts for m in model.modules() if isinstance(m, MoE)]
    if mesh.layout.edp == 1:
        params = {p for e in experts for p in e.parameters()}

        def install():
            for e in experts:
                for p in e.parameters():
                    p.register_hook(lambda g, f=divide: g / f)

        return params, (install if divide != 1.0 else None)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    edp = mesh.layout.edp
    for e in experts:
        fully_shard(
            e, mesh=mesh.expert_mesh["edp"], mp_policy=mp, shard_placement_fn=lambda p: expert_shard_dim(p, edp)
        )
        if divide != mesh.layout.edp:  # FSDP's default is the mean over edp
            e.set_gradient_divide_factor(divide)
            # a factor other than the group size becomes NCCL's PREMUL_SUM, which gloo lacks: sum, then scale
            e.set_force_sum_reduction_for_comms(True)
    return None, None


__all__ = ["build_model", "expert_shard_dim", "shard_data_parallel", "token_replicas_over_edp"]
