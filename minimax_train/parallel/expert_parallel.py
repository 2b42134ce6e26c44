"""Expert parallelism (EP) and expert tensor parallelism (ETP) for the MoE blocks: the experts a layout
gives the model at construction (ExpertParallelExperts, only this rank's experts) and the groups the
all-to-all dispatcher (moe_dispatch.py) exchanges tokens over. Layout (ParallelMesh.expert_mesh, dims edp x ep x etp):
- ep rank r holds global experts [r*E/ep, (r+1)*E/ep);
- etp rank j holds slice j of every local expert's FFN width I (gate and up rows j*I/etp.., down columns);
- edp replicates; FSDP2 shards the expert parameters over it.
Expert parameters are DTensors on the 2-D ("ep", "etp") sub-mesh: down_proj [E, H, I] with
(Shard(0), Shard(2)); gate_up_proj [E, 2I, H] with (Shard(0), Replicate()) when etp == 1. With etp > 1
each rank's rows (its gate slice and its up slice) are not contiguous in [E, 2I, H], which no DTensor
placement describes, so in memory gate_up_proj is the 4-D view [E, 2, I, H] (index 0 gate, 1 up) with
(Shard(0), Shard(2)). Checkpoints never see that form: `standard_gate_up` (used by train/checkpoint.py
around every DCP save and load) presents each 4-D gate/up tensor, the parameter and its optimiser
moments, as transformers' [E, 2I, H] under the same key, this rank's block as two chunks (its gate rows
and its up rows, views of the local tensor). Every layout therefore writes the same keys and logical
shapes, and DCP reshards between any of them (ep, etp, edp, tensor_parallel.py's experts, one process,
export). Why not the alternatives: keeping [E, 2I, H] with rows permuted per rank needs the same adapter
plus an un-permute at save time; tensor_parallel.py's pairing all-to-all costs one more exchange of the
expert activations per layer and direction, and would have to live inside the pipelined exchange.
Compute always uses the local tensors.

Token layout the dispatcher assumes: every rank of a dispatch group holds its own tokens (EP folds over
the data-parallel and context-parallel ranks). Over etp the MoE input is either replicated (tensor
parallel without sequence parallel: partial outputs are all-reduced over etp) or sharded (sequence
parallel: dispatch over ep x etp); `sequence_parallel` says which. tp > 1 without sequence parallelism
and etp < tp makes an EP group fold over tp ranks that hold the same tokens: supported for dropless
routing (each token is dispatched once per replica, expert weight gradients are divided by that count)
but wasteful; use etp = tp or sequence parallelism.

Gradient semantics: an expert parameter's gradient on a rank is the sum, over every token routed to
it from the whole dispatch group, of that token's loss gradient; dense gradients stay per rank. To get
the gradient of the global loss, sum expert gradients over edp and divide by the same factor as the
dense ones (FSDP2: fully_shard(experts, mesh=expert_mesh["edp"]) with
set_gradient_divide_factor(dp * cp), the dense group's size).

Order in the trainer (parallel/parallelize.py): build the model with the layout's parts on the meta device
-> FSDP2 (experts over edp first, then the decoder layers
and root over dp x cp) -> optimiser.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..model.moe import Experts
from .layout import ep_token_replicas
from .moe_dispatch import ExpertExchange
from .tensor_parallel import local


@dataclass
class ExpertGroups:
    """Process groups and coordinates the dispatcher uses. dispatch_group is the group tokens are
    exchanged over: the EP group, or the flattened ep x etp group when sequence_parallel."""

    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0
    ep_group: Any = None
    etp_group: Any = None
    sequence_parallel: bool = False
    dispatch_group: Any = None
    dispatch_size: int = 1
    dispatch_rank: int = 0
    mesh: Any = None  # DeviceMesh ("ep", "etp") for the DTensor parameters, or None (plain tensors)
    # ranks of the dispatch group holding the same tokens (tp > 1 without sequence parallel and etp < tp):
    # each token then reaches its expert `replicas` times; expert weight gradients are divided by it
    replicas: int = 1

    def __post_init__(self):
        if self.dispatch_group is None and not self.sequence_parallel:  # default: dispatch over ep
            self.dispatch_group, self.dispatch_size, self.dispatch_rank = self.ep_group, self.ep_size, self.ep_rank


def expert_groups(mesh_or_groups, sequence_parallel: Optional[bool] = None) -> ExpertGroups:
    """ExpertGroups from a ParallelMesh, a DeviceMesh with dims ("edp",) "ep", "etp", or ExpertGroups.
    Collective when it has to build the flattened ep x etp group (sequence_parallel with etp > 1)."""
    if isinstance(mesh_or_groups, ExpertGroups):
        return mesh_or_groups
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh_or_groups, DeviceMesh):
        dm = mesh_or_groups
        sp, replicas = bool(sequence_parallel), 1
    else:  # ParallelMesh
        pm = mesh_or_groups
        sp = pm.cfg.sequence_parallel if sequence_parallel is None else bool(sequence_parallel)
        replicas = _token_replicas(pm, sp)
        dm = pm.expert_mesh
        if dm is None:  # single process
            return ExpertGroups(sequence_parallel=sp and pm.etp_size > 1)
    names = dm.mesh_dim_names or ()
    if "ep" not in names:
        raise ValueError(f"expert parallelism: the device mesh needs an 'ep' dimension, has {names}")
    sub = dm["ep", "etp"] if "etp" in names else dm["ep"]
    ep_size, ep_rank = dm.size(names.index("ep")), dm.get_local_rank("ep")
    etp_size, etp_rank = (dm.size(names.index("etp")), dm.get_local_rank("etp")) if "etp" in names else (1, 0)
    g = ExpertGroups(
        ep_size=ep_size,
        ep_rank=ep_rank,
        etp_size=etp_size,
        etp_rank=etp_rank,
        ep_group=dm.get_group("ep"),
        etp_group=dm.get_group("etp") if "etp" in names else None,
        sequence_parallel=sp and etp_size > 1,
        mesh=sub,
        replicas=replicas,
    )
    if g.sequence_parallel:
        flat = dm["ep", "etp"]._flatten("ep_etp")
        g.dispatch_group, g.dispatch_size, g.dispatch_rank = flat.get_group(), flat.size(), flat.get_local_rank()
    return g


def _token_replicas(pm, sp: bool) -> int:
    """Ranks of this rank's EP group holding the same tokens (layout.ep_token_replicas), with a warning when
    that wastes compute: prefer etp = tp or parallel.sequence_parallel."""
    from dataclasses import replace

    n = ep_token_replicas(pm.layout, replace(pm.cfg, sequence_parallel=sp))
    if n > 1:
        import warnings

        warnings.warn(
            f"expert parallelism: tp={pm.tp_size} without sequence parallelism and etp={pm.etp_size} < tp: "
            f"every token is dispatched {n} times (redundant expert compute and all-to-all); use "
            f"etp={pm.tp_size} or parallel.sequence_parallel=true",
            stacklevel=3,
        )
    return n


class ExpertParallelExperts(Experts):
    """This rank's experts (DTensor parameters on the ("ep", "etp") mesh, see the module docstring; plain
    tensors without a mesh); forward(send_x, plan) runs the pipelined all-to-all exchange. Called as a
    module so FSDP2's hooks (unshard over edp) fire. Built on the current default device (e.g. meta): only
    the local experts' local slices are allocated."""

    def __init__(self, cfg, groups: ExpertGroups):
        e, inter, h = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        if e % groups.ep_size:
            raise ValueError(f"parallel.ep={groups.ep_size} does not divide num_local_experts={e}")
        if inter % groups.etp_size:
            raise ValueError(f"parallel.etp={groups.etp_size} does not divide intermediate_size={inter}")
        el, il = e // groups.ep_size, inter // groups.etp_size
        # with etp > 1 this rank's gate rows and up rows are not contiguous in [E, 2I, H]: keep [E, 2, I, H]
        gu = torch.empty(el, 2, il, h) if groups.etp_size > 1 else torch.empty(el, 2 * il, h)
        dn = torch.empty(el, h, il)
        if groups.mesh is not None:
            from torch.distributed.tensor import DTensor, Replicate, Shard

            two_d = groups.mesh.ndim == 2
            gu_place = [Shard(0)] + ([Shard(2) if groups.etp_size > 1 else Replicate()] if two_d else [])
            dn_place = [Shard(0)] + ([Shard(2)] if two_d else [])
            gu = DTensor.from_local(gu, groups.mesh, gu_place, run_check=False)
            dn = DTensor.from_local(dn, groups.mesh, dn_place, run_check=False)
        super().__init__(cfg, gate_up=nn.Parameter(gu), down=nn.Parameter(dn))
        self.groups = groups
        self.num_experts, self.intermediate_size = e, inter

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[E_local, 2*I_local, H] (rows: gate slice then up slice) and [E_local, H, I_local]."""
        gu, dn = local(self.gate_up_proj), local(self.down_proj)
        return gu.reshape(gu.shape[0], -1, gu.shape[-1]), dn

    def forward(self, send_x: torch.Tensor, plan) -> torch.Tensor:
        gu, dn = self.local_weights()
        return ExpertExchange.apply(plan, send_x, gu, dn)

    def extra_repr(self) -> str:
        g = self.groups
        return (
            f"experts {self.num_experts} (local {self.num_experts // g.ep_size}), ep {g.ep_size} rank {g.ep_rank}, "
            f"etp {g.etp_size} rank {g.etp_rank}, sequence_parallel {g.sequence_parallel}"
        )


# ---- checkpoints: the 4-D gate/up form as transformers' [E, 2I, H] -----------------------------------------

GATE_UP = "experts.gate_up_proj"


class _GateUpAsStandard(torch.Tensor):
    """What DCP sees of a 4-D gate/up tensor t [E, 2, I, H] (a DTensor sharded on dims 0 and/or 2, or a plain
    tensor): the logical [E, 2I, H] tensor t.flatten(1, 2), this rank's block [e, 2, i, H] at (e0, 0, i0, 0)
    given as two chunks, gate rows [e, i, H] at (e0, i0, 0) and up rows at (e0, I + i0, 0). The chunks are
    views of the local tensor: a save reads them, a load writes into them (DCP's Checkpointable protocol,
    the one DTensor implements; nothing else is ever called on this object)."""

    @staticmethod
    def __new__(cls, t: torch.Tensor):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.tensor import DTensor

        e, two, inter, h = t.shape
        if isinstance(t, DTensor):
            (chunk,) = t.__create_chunk_list__()
            local = t.to_local()
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        else:
            local, offsets, sizes = t, (0, 0, 0, 0), tuple(t.shape)
        if two != 2 or offsets[1] != 0 or sizes[1] != 2 or offsets[3] != 0 or sizes[3] != h:
            raise ValueError(
                f"expert gate/up tensor {tuple(t.shape)} sharded as {offsets}+{sizes}: expected "
                f"[E, 2, I, H] sharded on dims 0 and 2 only"
            )
        r = torch.Tensor._make_wrapper_subclass(cls, (e, 2 * inter, h), dtype=t.dtype, device=local.device)
        r._chunks = [
            ChunkStorageMetadata(
                offsets=torch.Size((offsets[0], k * inter + offsets[2], 0)), sizes=torch.Size((sizes[0], sizes[2], h))
            )
            for k in range(2)
        ]
        r._views = [local[:, k] for k in range(2)]
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on the checkpoint view of an expert gate/up tensor")

    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        props = TensorProperties.create_from_tensor(self._views[0])
        return [
            WriteItem(
                index=MetadataIndex(fqn, c.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=c, properties=props, size=self.size()),
            )
            for c in self._chunks
        ]

    def __create_chunk_list__(self) -> list:
        return list(self._chunks)

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        for c, v in zip(self._chunks, self._views):
            if c.offsets == index.offset:
                return v
        raise ValueError(f"{index.fqn}: no local chunk at offset {tuple(index.offset)}")


@contextlib.contextmanager
def standard_gate_up(state: dict):
    """Within the block, every 4-D expert gate/up tensor in the (nested) state dict `state` (the parameter
    under "...experts.gate_up_proj", its optimiser moments under that key's sub-dict) is replaced, in place,
    by its [E, 2I, H] checkpoint view: dcp.save / dcp.load of `state` then write and read transformers'
    layout, whatever the expert layout. The original tensors are put back on exit (a load has filled them)."""
    swapped: list[tuple[dict, Any, torch.Tensor]] = []

    def walk(d: dict, inside: bool) -> None:
        for k, v in d.items():
            here = inside or str(k).endswith(GATE_UP)
            if isinstance(v, dict):
                walk(v, here)
            elif here and isinstance(v, torch.Tensor) and v.dim() == 4:
                swapped.append((d, k, v))
                d[k] = _GateUpAsStandard(v)

    walk(state, False)
    try:
        yield state
    finally:
        for d, k, v in swapped:
            d[k] = v


__all__ = ["ExpertGroups", "ExpertParallelExperts", "expert_groups", "standard_gate_up"]
