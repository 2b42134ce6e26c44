"""What a plan is asked about (Workload, Assumptions) and what it chooses (Layout); PlanError for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minimax_train.errors import MinimaxError
from minimax_train.model.config import ModelConfig

if TYPE_CHECKING:
    from minimax_train.tools.planner.hardware import GPUSpec


class PlanError(MinimaxError, ValueError):
    """Bad planner input (unknown preset, impossible fixed layout, bad numbers): a one-line message."""


@dataclass
class Workload:
    model: ModelConfig
    seq_len: int  # tokens per packed row
    global_batch_tokens: int  # tokens per optimiser step (a multiple of seq_len)
    num_gpus: int
    gpu: GPUSpec
    precision: str = "bf16"  # bf16 (GPU: bf16 compute, fp32 master/grads/Adam) | fp32 (CPU runs)
    kernels: str = "gpu"  # gpu (fla, flash/flex, grouped GEMM) | reference (the CPU torch kernels)
    optimizer: str = "fused"  # fused (no step temporary) | foreach (one temporary of the optimiser shard)
    model_name: str = ""
    loss_chunk_tokens: int = 8192  # the trainer's train.loss_chunk_tokens (0: logits of all tokens at once)
    moe_chunk_tokens: int = 0  # the trainer's train.moe_chunk_tokens (0: the MoE sublayer on all tokens at once)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def cached(self, key, fn):
        """Per-workload memo of model-only quantities (shapes, FLOPs, parameter splits)."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def __post_init__(self):
        if self.precision not in ("bf16", "fp32"):
            raise PlanError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.kernels not in ("gpu", "reference"):
            raise PlanError(f"kernels must be gpu or reference, got {self.kernels!r}")
        if self.optimizer not in ("fused", "foreach"):
            raise PlanError(f"optimizer must be fused or foreach, got {self.optimizer!r}")
        for k in ("seq_len", "global_batch_tokens", "num_gpus"):
            if int(getattr(self, k)) < 1:
                raise PlanError(f"{k} must be a positive integer, got {getattr(self, k)}")
        if self.global_batch_tokens % self.seq_len:
            raise PlanError(
                f"global batch of {self.global_batch_tokens} tokens is not a whole number of rows of "
                f"seq_len={self.seq_len} (use a multiple, e.g. {self.seq_len * max(1, self.global_batch_tokens // self.seq_len)})"
            )
        if self.seq_len > self.model.max_position_embeddings:
            raise PlanError(
                f"seq_len={self.seq_len} exceeds the model's max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )

    @property
    def rows(self) -> int:
        return self.global_batch_tokens // self.seq_len

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class Assumptions:
    compute_efficiency: float = 0.5  # achieved fraction of peak FLOP/s in the kernels
    margin: float = 0.10  # fraction of (memory - reserve) kept free (fragmentation, spikes)
    reserve_gib: float = 2.0  # CUDA context, NCCL buffers, allocator reserve
    moe_imbalance: float = 1.0  # routed rows on the busiest rank / the balanced share
    ep_overlap: float = 0.5  # fraction of expert all-to-all time hidden behind expert compute
    dp_overlap: bool = True  # data-parallel traffic runs behind compute (FSDP prefetch, bucketed reduces)
    host_gbps: float = 25.0  # GPU <-> host copies per GPU (PCIe 5 x16 in practice), for optimiser offload
    host_adam_elems_per_s: float = 1.0e9  # CPU AdamW throughput per GPU's share of host cores (offload)


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    ep: int
    etp: int
    edp: int
    engine: str  # fsdp2 | deepspeed
    zero_stage: int  # fsdp2: 3
    grad_sync: str  # step | micro (only differs when accum > 1 and parameters are sharded)
    ac: str  # none | selective | full
    micro_batch_rows: int
    accum: int
    offload: bool = False  # deepspeed only: optimiser state and step on the host (parallel.offload_optimizer)
    pp: int = 1  # pipeline stages (ranks); tp x cp x dp are then the ranks of one stage
    pp_schedule: str = "1f1b"
    vpp: int = 1  # model chunks (virtual stages) per pp rank

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    def engine_label(self) -> str:
        return "fsdp2" if self.engine == "fsdp2" else f"ds-z{self.zero_stage}" + ("-offload" if self.offload else "")

    def short(self) -> str:
        pp = f"pp{self.pp}-{self.pp_schedule}{f'-v{self.vpp}' if self.vpp > 1 else ''} " if self.pp > 1 else ""
        return (
            f"{pp}tp{self.tp} cp{self.cp} dp{self.dp} ep{self.ep} etp{self.etp} {self.engine_label()} "
            f"sync-{self.grad_sync} ac-{self.ac} mb{self.micro_batch_rows}x{self.accum}"
        )

    def overrides(self) -> str:
        """The trainer's Hydra overrides for this layout."""
        parts = [
            f"parallel.tp={self.tp}",
            f"parallel.cp={self.cp}",
            f"parallel.ep={self.ep}",
            f"parallel.etp={self.etp}",
            f"parallel.sequence_parallel={str(self.tp > 1).lower()}",
            f"parallel.engine={self.engine}",
        ]
        if self.engine == "deepspeed":
            parts.append(f"parallel.zero_stage={self.zero_stage}")
            if self.offload:
                parts.append("parallel.offload_optimizer=true")
        elif self.grad_sync == "micro":
            parts.append("parallel.grad_sync=micro")
        if self.pp > 1:
            parts += [f"parallel.pp={self.pp}", f"parallel.pp_schedule={self.pp_schedule}"]
            if self.vpp > 1 and self.pp_schedule.startswith("interleaved"):
                parts.append(f"parallel.pp_virtual_stages={self.vpp}")
        parts.append(f"train.activation_checkpointing={self.ac}")
        return " ".join(parts)
