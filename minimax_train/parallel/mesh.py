"""The process mesh: one object that knows every parallel dimension and owns the process groups.

Attention / dense layout (one DeviceMesh, rank = (dp_i * cp + cp_i) * tp + tp_i, tp fastest):
    world = dp x cp x tp
Expert layout (a second DeviceMesh over the same ranks, rank = (edp_i * ep + ep_i) * etp + etp_i):
    world = edp x ep x etp
etp must divide tp, so an expert-tensor-parallel group lies inside one attention tensor-parallel group;
with etp == tp the expert-parallel groups fold over cp first, then dp (design.md: "EP may fold over CP
and DP ranks"); the remaining factor, edp, replicates experts and is the data-parallel dimension of
the expert parameters.

A single process (no torchrun) is world 1: no process group is created, every group is None and the
collective helpers are no-ops. Nothing here is global: build one ParallelMesh and pass it around.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENGINES = ("fsdp2", "deepspeed")
BACKENDS = ("auto", "nccl", "gloo")


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message names the key and values that would."""


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel (attention and dense layers)
    cp: int = 1  # context parallel (zigzag chunks of each packed row)
    ep: int = 1  # expert parallel
    etp: int = 1  # expert tensor parallel (must divide tp)
    sequence_parallel: bool = False  # shard activations over tp between the TP regions (needs tp > 1)
    engine: str = "fsdp2"  # data-parallel engine
    zero_stage: int = 1  # deepspeed engine only: ZeRO stage 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed engine only: optimiser state and step on the CPU
    moe_overlap_chunks: int = 1  # token groups per micro-batch for dispatch/compute overlap
    lasp: str = "plus"  # context-parallel lightning attention: plus (one all-gather) | serial (LASP's ring)
    grad_sync: str = "step"  # fsdp2 with accumulation: reduce-scatter once per step | every micro-batch ("micro")
    backend: str = "auto"  # torch.distributed backend: auto = nccl on GPU, gloo on CPU
    timeout_min: int = 30  # collective timeout

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for key in ("tp", "cp", "ep", "etp", "moe_overlap_chunks", "timeout_min"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ParallelConfigError(f"parallel.{key}: must be a positive integer, got {v!r}")
        if self.engine not in ENGINES:
            raise ParallelConfigError(f"parallel.engine: unknown '{self.engine}'; use one of {', '.join(ENGINES)}")
        if self.backend not in BACKENDS:
            raise ParallelConfigError(f"parallel.backend: unknown '{self.backend}'; use one of {', '.join(BACKENDS)}")
        if self.grad_sync not in ("step", "micro"):
            raise ParallelConfigError(
                f"parallel.grad_sync: unknown '{self.grad_sync}'; use step (reduce-scatter "
                f"once per optimiser step) or micro (after every micro-batch)"
            )
        if self.grad_sync == "micro" and self.engine == "deepspeed":
            raise ParallelConfigError(
                "parallel.grad_sync=micro is an fsdp2 setting; with DeepSpeed the ZeRO stage "
                "decides (stage 2 and 3 reduce every micro-batch)"
            )
        if self.lasp not in ("plus", "serial"):
            raise ParallelConfigError(f"parallel.lasp: unknown '{self.lasp}'; use plus or serial")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ParallelConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.sequence_parallel and self.tp == 1:
            raise ParallelConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.tp % self.etp:
            raise ParallelConfigError(
                f"parallel.etp={self.etp} must divide parallel.tp={self.tp}; valid: {_fmt(_divisors(self.tp))}"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fmt(xs) -> str:
    return ", ".join(str(x) for x in xs) if xs else "none"


@dataclass(frozen=True)
class Layout:
    """The sizes of every dimension, validated against the world size (and the model when given)."""

    world: int
    dp: int
    cp: int
    tp: int
    ep: int
    etp: int
    edp: int


def resolve_layout(cfg: ParallelConfig, world_size: int, model_cfg=None) -> Layout:
    """Check that the layout can be built on `world_size` ranks for `model_cfg` (a ModelConfig or
    None) and derive dp and edp. Errors name the key and list the values that would work."""
    cfg.validate()
    w = world_size
    if w % cfg.tp:
        raise ParallelConfigError(
            f"parallel.tp={cfg.tp} does not divide the world size {w}; valid: {_fmt(_divisors(w))}"
        )
    if (w // cfg.tp) % cfg.cp:
        raise ParallelConfigError(
            f"parallel.cp={cfg.cp} does not divide world/tp={w // cfg.tp} "
            f"(world {w}, tp {cfg.tp}); valid: {_fmt(_divisors(w // cfg.tp))}"
        )
    dp = w // (cfg.tp * cfg.cp)
    ep_room = dp * cfg.cp * (cfg.tp // cfg.etp)  # ranks an expert-parallel group may fold over
    if ep_room % cfg.ep:
        raise ParallelConfigError(
            f"parallel.ep={cfg.ep} does not divide dp*cp*(tp/etp)={ep_room} (dp {dp}, cp {cfg.cp}, tp {cfg.tp}, "
            f"etp {cfg.etp}); valid: {_fmt(_divisors(ep_room))}"
        )
    if model_cfg is not None:
        heads, kv = model_cfg.num_attention_heads, model_cfg.num_key_value_heads
        if heads % cfg.tp:
            ok = [d for d in _divisors(w) if heads % d == 0]
            raise ParallelConfigError(
                f"parallel.tp={cfg.tp} does not divide num_attention_heads={heads}; valid: {_fmt(ok)}"
            )
        if kv % cfg.tp and cfg.tp % kv:
            ok = [d for d in _divisors(w) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
            raise ParallelConfigError(
                f"parallel.tp={cfg.tp}: num_key_value_heads={kv} must divide or be divisible by tp; valid: {_fmt(ok)}"
            )
        e = model_cfg.num_local_experts
        if e % cfg.ep:
            ok = [d for d in _divisors(ep_room) if e % d == 0]
            raise ParallelConfigError(f"parallel.ep={cfg.ep} does not divide num_local_experts={e}; valid: {_fmt(ok)}")
        inter = model_cfg.intermediate_size
        if inter % cfg.etp:
            ok = [d for d in _divisors(cfg.tp) if inter % d == 0]
            raise ParallelConfigError(
                f"parallel.etp={cfg.etp} does not divide intermediate_size={inter}; valid: {_fmt(ok)}"
            )
    return Layout(world=w, dp=dp, cp=cfg.cp, tp=cfg.tp, ep=cfg.ep, etp=cfg.etp, edp=w // (cfg.ep * cfg.etp))


def rank_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """Pure description of every group as lists of global ranks (what the DeviceMeshes build)."""
    import itertools

    def groups(shape, dim):
        out = {}
        for idx in itertools.product(*[range(s) for s in shape]):
            r = 0
            for i, s in zip(idx, shape):
                r = r * s + i
            key = idx[:dim] + idx[dim + 1 :]
            out.setdefault(key, []).append(r)
        return [sorted(v) for _, v in sorted(out.items())]

    a = (layout.dp, layout.cp, layout.tp)
    e = (layout.edp, layout.ep, layout.etp)
    return {
        "dp": groups(a, 0),
        "cp": groups(a, 1),
        "tp": groups(a, 2),
        "edp": groups(e, 0),
        "ep": groups(e, 1),
        "etp": groups(e, 2),
    }


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

    Attributes: world_size, rank, local_rank, device, layout, {dp,cp,tp,ep,etp,edp}_size,
    {dp,cp,tp,ep,etp,edp}_rank, {dp,cp,tp,ep,etp,edp}_group, dp_cp_group (the group dense gradients
    are reduced over), device_mesh (dims dp, cp, tp), expert_mesh (dims edp, ep, etp).
    Groups and meshes are None in a single process."""

    def __init__(
        self, cfg: ParallelConfig, *, world_size: int, rank: int, local_rank: int, device: torch.device, model_cfg=None
    ):
        self.cfg = cfg
        self.world_size, self.rank, self.local_rank, self.device = world_size, rank, local_rank, device
        self.layout = resolve_layout(cfg, world_size, model_cfg)
        L = self.layout
        for name in ("dp", "cp", "tp", "ep", "etp", "edp"):
            setattr(self, f"{name}_size", getattr(L, name))
        # coordinates (row-major, last dim fastest)
        self.tp_rank = rank % L.tp
        self.cp_rank = (rank // L.tp) % L.cp
        self.dp_rank = rank // (L.tp * L.cp)
        self.etp_rank = rank % L.etp
        self.ep_rank = (rank // L.etp) % L.ep
        self.edp_rank = rank // (L.etp * L.ep)
        self.device_mesh = self.expert_mesh = self.dp_cp_mesh = None
        self.dp_group = self.cp_group = self.tp_group = None
        self.ep_group = self.etp_group = self.edp_group = self.dp_cp_group = None
        if world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            dtype = device.type
            self.device_mesh = init_device_mesh(dtype, (L.dp, L.cp, L.tp), mesh_dim_names=("dp", "cp", "tp"))
            self.expert_mesh = init_device_mesh(dtype, (L.edp, L.ep, L.etp), mesh_dim_names=("edp", "ep", "etp"))
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
    def from_env(cls, cfg: ParallelConfig, *, device: str = "auto", model_cfg=None) -> ParallelMesh:
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
        resolve_layout(cfg, world, model_cfg)
        if world > 1 and not dist.is_initialized():
            backend = cfg.backend
            if backend == "auto":
                backend = "nccl" if dev.type == "cuda" else "gloo"
            if backend == "nccl" and dev.type != "cuda":
                raise ParallelConfigError("parallel.backend=nccl needs CUDA devices (train.device=cpu); use gloo")
            kw = {"device_id": dev} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=cfg.timeout_min), **kw)
        return cls(cfg, world_size=world, rank=rank, local_rank=local_rank, device=dev, model_cfg=model_cfg)

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
        return (
            f"world {L.world} = dp {L.dp} x cp {L.cp} x tp {L.tp}; experts: edp {L.edp} x ep {L.ep} x etp {L.etp}; "
            f"device {self.device}"
        )


def build_mesh(cfg: ParallelConfig, device: str = "auto", model_cfg=None) -> ParallelMesh:
    return ParallelMesh.from_env(cfg, device=device, model_cfg=model_cfg)


__all__ = [
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelMesh",
    "Layout",
    "resolve_layout",
    "rank_groups",
    "build_mesh",
]
