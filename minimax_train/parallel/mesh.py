"""The process mesh: one object that knows every parallel dimension and owns the process groups.

Pipeline stages outermost (rank = pp_i * world/pp + rank within the stage), then inside a stage
Attention / dense layout (one DeviceMesh, rank = (dp_i * cp + cp_i) * tp + tp_i, tp fastest):
    world = pp x dp x cp x tp
Expert layout (a second DeviceMesh over the same ranks, rank = (edp_i * ep + ep_i) * etp + etp_i):
    world = pp x edp x ep x etp
etp must divide tp, so an expert-tensor-parallel group lies inside one attention tensor-parallel group;
with etp == tp the expert-parallel groups fold over cp first, then dp; the remaining factor, edp,
replicates experts and is the data-parallel dimension of the expert parameters. The rules live in
layout.py.

A single process (no torchrun) is world 1: no process group is created, every group is None and the
collective helpers are no-ops. Nothing here is global: build one ParallelMesh and pass it around.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .layout import Layout, ParallelConfig, ParallelConfigError, rank_groups, resolve_layout


def barrier(device: torch.device | None = None) -> None:
    """A barrier over the default group (NCCL is told the device, so it does not guess one)."""
    if device is not None and device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def destroy_process_groups(*, failed: bool = False, device: torch.device | None = None) -> None:
    """Tear torch.distributed down. After a clean run all ranks first meet at a barrier, so none (rank 0 hosts
    the TCPStore) leaves while a peer still talks to it; a failed rank skips it (its peers may never arrive)."""
    if not dist.is_initialized():
        return
    try:
        if not failed and dist.get_world_size() > 1:
            barrier(device)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group_teardown(device: torch.device | None = None):
    """Run the body, then destroy_process_groups: with the barrier after a clean run, without after an error."""
    try:
        yield
    except BaseException:
        destroy_process_groups(failed=True, device=device)
        raise
    destroy_process_groups(device=device)


class ParallelMesh:
    """Coordinates of this rank in every dimension, the DeviceMeshes and the process groups.

    Attributes: world_size, rank, local_rank, device, layout, {pp,dp,cp,tp,ep,etp,edp}_size,
    {pp,dp,cp,tp,ep,etp,edp}_rank, {pp,dp,cp,tp,ep,etp,edp}_group, dp_cp_group (the group dense gradients
    are reduced over), device_mesh (dims dp, cp, tp; pp, dp, cp, tp with pipeline parallelism), expert_mesh
    (dims edp, ep, etp; pp first likewise).
    Groups and meshes are None in a single process."""

    def __init__(
        self,
        cfg: ParallelConfig,
        *,
        world_size: int,
        rank: int,
        local_rank: int,
        device: torch.device,
        model_cfg=None,
        train_cfg=None,
    ):
        self.cfg = cfg
        self.world_size, self.rank, self.local_rank, self.device = world_size, rank, local_rank, device
        self.layout = resolve_layout(cfg, world_size, model_cfg, train_cfg)
        L = self.layout
        for name in ("pp", "dp", "cp", "tp", "ep", "etp", "edp"):
            setattr(self, f"{name}_size", getattr(L, name))
        # coordinates (row-major, last dim fastest)
        self.pp_rank = rank // L.stage_world
        self.tp_rank = rank % L.tp
        self.cp_rank = (rank // L.tp) % L.cp
        self.dp_rank = (rank // (L.tp * L.cp)) % L.dp
        self.etp_rank = rank % L.etp
        self.ep_rank = (rank // L.etp) % L.ep
        self.edp_rank = (rank // (L.etp * L.ep)) % L.edp
        self.device_mesh = self.expert_mesh = self.dp_cp_mesh = None
        self.dp_group = self.cp_group = self.tp_group = self.pp_group = None
        self.ep_group = self.etp_group = self.edp_group = self.dp_cp_group = None
        if world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            dtype = device.type
            pp = (L.pp,) if L.pp > 1 else ()  # no pp dimension without pipeline parallelism
            pp_name = ("pp",) if L.pp > 1 else ()
            self.device_mesh = init_device_mesh(
                dtype, (*pp, L.dp, L.cp, L.tp), mesh_dim_names=(*pp_name, "dp", "cp", "tp")
            )
            self.expert_mesh = init_device_mesh(
                dtype, (*pp, L.edp, L.ep, L.etp), mesh_dim_names=(*pp_name, "edp", "ep", "etp")
            )
            if L.pp > 1:
                self.pp_group = self.device_mesh.get_group("pp")
            self.dp_group = self.device_mesh.get_group("dp")
            self.cp_group = self.device_mesh.get_group("cp")
            self.tp_group = self.device_mesh.get_group("tp")
            self.edp_group = self.expert_mesh.get_group("edp")
            self.ep_group = self.expert_mesh.get_group("ep")
            self.etp_group = self.expert_mesh.get_group("etp")
            if L.cp == 1:
                self.dp_cp_mesh, self.dp_cp_group = self.device_mesh["dp"], self.dp_group
            else:
                self.dp_cp_mesh = self.device_mesh["dp", "cp"]._flatten("dp_cp")
                self.dp_cp_group = self.dp_cp_mesh.get_group()

    # ---- construction from the launcher's environment ------------------------------------------------
    @classmethod
    def from_env(cls, cfg: ParallelConfig, *, device: str = "auto", model_cfg=None, train_cfg=None) -> ParallelMesh:
        """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun, srun wrappers); initialise the default process group
        when world > 1. device: auto | cpu | cuda."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise ParallelConfigError("train.device=cuda but no CUDA device is visible")
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        # validate before any collective so a bad layout fails identically and fast on every rank
        resolve_layout(cfg, world, model_cfg, train_cfg)
        if world > 1 and not dist.is_initialized():
            backend = cfg.backend
            if backend == "auto":
                backend = "nccl" if dev.type == "cuda" else "gloo"
            if backend == "nccl" and dev.type != "cuda":
                raise ParallelConfigError("parallel.backend=nccl needs CUDA devices (train.device=cpu); use gloo")
            kw = {"device_id": dev} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=cfg.timeout_min), **kw)
        return cls(
            cfg,
            world_size=world,
            rank=rank,
            local_rank=local_rank,
            device=dev,
            model_cfg=model_cfg,
            train_cfg=train_cfg,
        )

    # ---- helpers ----------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_reduce_size(self) -> int:
        """Ranks that dense gradients are averaged over (FSDP's dp x cp)."""
        return self.layout.dp * self.layout.cp

    def all_reduce(self, t: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over `group` (default: the whole world); a no-op in a single process."""
        if self.world_size > 1:
            dist.all_reduce(t, op=op, group=group)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            barrier(self.device)

    def broadcast_object(self, obj, src: int = 0):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def destroy(self, failed: bool = False) -> None:
        if self.world_size > 1:
            destroy_process_groups(failed=failed, device=self.device)

    def describe(self) -> str:
        L = self.layout
        pp = f"pp {L.pp} ({self.cfg.pp_schedule}) x " if L.pp > 1 else ""
        return (
            f"world {L.world} = {pp}dp {L.dp} x cp {L.cp} x tp {L.tp}; experts: edp {L.edp} x ep {L.ep} x "
            f"etp {L.etp}; device {self.device}"
        )


__all__ = [
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelMesh",
    "Layout",
    "resolve_layout",
    "rank_groups",
]
