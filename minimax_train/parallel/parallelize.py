"""The one place where a model is laid out over the mesh (TorchTitan's parallelize function):
tensor (+ sequence) -> context -> expert (+ expert-tensor) -> FSDP2 data parallelism. Every piece takes
its process groups from the ParallelMesh passed in; nothing is global."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .data_parallel import apply_fsdp
from .mesh import ParallelConfig, ParallelMesh


def experts_follow_tp(mesh: ParallelMesh) -> bool:
    """Without expert parallelism and with etp == tp, tensor parallelism shards each expert's FFN itself."""
    L = mesh.layout
    return L.tp > 1 and L.ep == 1 and L.etp == L.tp


def parallelize(
    model: nn.Module,
    mesh: ParallelMesh,
    cfg: ParallelConfig,
    *,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = torch.float32,
) -> nn.Module:
    """Apply every configured parallelism to a full model that is identical on all ranks, in place.
    Build the optimiser afterwards (it must see the sharded parameters)."""
    L = mesh.layout
    if L.tp > 1:
        from .tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(
            model, mesh.device_mesh["tp"], sequence_parallel=cfg.sequence_parallel, experts=experts_follow_tp(mesh)
        )
    if L.cp > 1:
        from .context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh.cp_group, lasp=cfg.lasp)
    expert_parallel = (L.ep > 1 or L.etp > 1 or L.tp > 1) and not experts_follow_tp(mesh)
    if expert_parallel:
        from .expert_parallel import apply_expert_parallel

        apply_expert_parallel(
            model, mesh, overlap_chunks=cfg.moe_overlap_chunks, sequence_parallel=cfg.sequence_parallel
        )
    ignored = None
    if expert_parallel:
        ignored = _reduce_expert_grads(model, mesh, cfg.sequence_parallel, param_dtype, reduce_dtype)
    if mesh.grad_reduce_size > 1:
        apply_fsdp(model, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype, ignored_params=ignored)
    return model


def token_replicas_over_edp(mesh: ParallelMesh, sequence_parallel: bool) -> int:
    """How many ranks of this rank's edp group hold the same tokens: without sequence parallelism the
    MoE input is identical on every tp rank of a (dp, cp) block."""
    if sequence_parallel or mesh.layout.tp == 1:
        return 1
    from .mesh import rank_groups

    group = next(g for g in rank_groups(mesh.layout)["edp"] if mesh.rank in g)
    return sum(1 for r in group if r // mesh.layout.tp == mesh.rank // mesh.layout.tp)


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
        if divide != 1.0:
            for p in params:
                p.register_hook(lambda g, f=divide: g / f)
        return params
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for e in experts:
        fully_shard(e, mesh=mesh.expert_mesh["edp"], mp_policy=mp)
        if divide != mesh.layout.edp:  # FSDP's default is the mean over edp
            e.set_gradient_divide_factor(divide)
            # a factor other than the group size becomes NCCL's PREMUL_SUM, which gloo lacks: sum, then scale
            e.set_force_sum_reduction_for_comms(True)
    return None


__all__ = ["parallelize", "experts_follow_tp"]
