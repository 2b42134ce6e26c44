"""The one home of layout rules: every parallel dimension checked against the world size, the model and the
batch, before any process group exists. The config validation, the mesh, the parallel parts, the DeepSpeed
engine, the checkpoint tools and the planner all call `resolve_layout`, so a layout fails with the same
message everywhere; every error names the key and lists the values that would work.

Pipeline stages are outermost: rank = pp_i * (world / pp) + (rank within the stage), and inside one stage
Attention / dense layout (rank = (dp_i * cp + cp_i) * tp + tp_i, tp fastest):  world/pp = dp x cp x tp
Expert layout over the same ranks (rank = (edp_i * ep + ep_i) * etp + etp_i):   world/pp = edp x ep x etp
etp divides tp, so an expert-tensor-parallel group lies inside one tensor-parallel group; expert-parallel
groups fold over cp first, then dp; edp replicates the experts. Pipeline rules (schedules, the split of the
layers into stages) live in pipeline_layout.py and are checked from here."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

from minimax_train.errors import MinimaxError

ENGINES = ("fsdp2", "deepspeed")
BACKENDS = ("auto", "nccl", "gloo")


class ParallelConfigError(MinimaxError, ValueError):
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
    pp: int = 1  # pipeline-parallel stages (ranks), outermost dimension
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zb | zbv | dualpipev
    pp_virtual_stages: int = 0  # model chunks per pp rank; 0 = the schedule's own (1, or 2 for multi-stage ones)
    pp_split: Optional[list[int]] = field(default=None)  # first layer of stages 1..S-1 (None: balanced split)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for key in ("tp", "cp", "ep", "etp", "pp", "moe_overlap_chunks", "timeout_min"):
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
        from .pipeline_layout import check_pipeline_config

        check_pipeline_config(self)


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
    pp: int = 1

    @property
    def stage_world(self) -> int:
        """Ranks of one pipeline stage (dp x cp x tp)."""
        return self.world // self.pp


def resolve_layout(cfg: ParallelConfig, world_size: int | None, model_cfg=None, train_cfg=None) -> Layout | None:
    """Check that the layout can be built on `world_size` ranks (None: the checks that need no world size,
    e.g. while a config is composed) for `model_cfg` (a ModelConfig or None) and `train_cfg` (a TrainConfig
    or None), and derive dp and edp. Raises ParallelConfigError naming the key and the values that work."""
    cfg.validate()
    if cfg.engine == "deepspeed":
        check_deepspeed_layout(cfg)
    layout = None if world_size is None else _world_layout(cfg, world_size)  # the world first, as the planner
    if model_cfg is not None:
        check_model_split(cfg, model_cfg, world_size)
    if train_cfg is not None:
        check_batch_split(cfg, train_cfg)
    if cfg.pp > 1:
        from .pipeline_layout import check_pipeline_layout

        check_pipeline_layout(cfg, model_cfg, train_cfg, None if layout is None else layout.dp)
    if layout is not None and model_cfg is not None and model_cfg.moe_routing == "capacity":
        if ep_token_replicas(layout, cfg) > 1:
            raise ParallelConfigError(
                "model.moe_routing=capacity with tokens replicated inside the EP group (tp > 1 without sequence "
                "parallelism and etp < tp) would count each token several times against the capacity; use "
                f"parallel.etp={cfg.tp} or parallel.sequence_parallel=true"
            )
    return layout


def _world_layout(cfg: ParallelConfig, world: int) -> Layout:
    """dp and edp of `cfg` on `world` ranks, or ParallelConfigError when the world does not split that way."""
    if world % cfg.pp:
        raise ParallelConfigError(
            f"parallel.pp={cfg.pp} does not divide the world size {world}; valid: {_fmt(_divisors(world))}"
        )
    w = world // cfg.pp  # the ranks of one stage
    where = f" (world {world} / pp {cfg.pp})" if cfg.pp > 1 else ""
    if w % cfg.tp:
        raise ParallelConfigError(
            f"parallel.tp={cfg.tp} does not divide the world size {w}{where}; valid: {_fmt(_divisors(w))}"
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
    edp = w // (cfg.ep * cfg.etp)
    return Layout(world=world, dp=dp, cp=cfg.cp, tp=cfg.tp, ep=cfg.ep, etp=cfg.etp, edp=edp, pp=cfg.pp)


def rank_groups(layout: Layout) -> dict[str, list[list[int]]]:
    """Pure description of every group as lists of global ranks (what the DeviceMeshes build)."""

    def groups(shape, dim):
        out = {}
        for idx in itertools.product(*[range(s) for s in shape]):
            r = 0
            for i, s in zip(idx, shape):
                r = r * s + i
            key = idx[:dim] + idx[dim + 1 :]
            out.setdefault(key, []).append(r)
        return [sorted(v) for _, v in sorted(out.items())]

    a = (layout.pp, layout.dp, layout.cp, layout.tp)
    e = (layout.pp, layout.edp, layout.ep, layout.etp)
    return {
        "pp": groups(a, 0),
        "dp": groups(a, 1),
        "cp": groups(a, 2),
        "tp": groups(a, 3),
        "edp": groups(e, 1),
        "ep": groups(e, 2),
        "etp": groups(e, 3),
    }


def _world_divisors(world: int | None, n: int) -> list[int]:
    return _divisors(world) if world is not None else _divisors(n)


def check_model_split(cfg: ParallelConfig, model_cfg, world_size: int | None = None) -> None:
    """Every model dimension a layout splits divides evenly: heads, KV heads and the vocabulary by tp, the
    experts by ep, the expert FFN width by etp."""
    heads, kv = model_cfg.num_attention_heads, model_cfg.num_key_value_heads
    cands = _world_divisors(world_size, heads)
    if heads % cfg.tp:
        ok = [d for d in cands if heads % d == 0]
        raise ParallelConfigError(
            f"parallel.tp={cfg.tp} does not divide num_attention_heads={heads}; valid: {_fmt(ok)}"
        )
    if kv % cfg.tp and cfg.tp % kv:
        ok = [d for d in cands if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
        raise ParallelConfigError(
            f"parallel.tp={cfg.tp}: num_key_value_heads={kv} must divide or be divisible by tp; valid: {_fmt(ok)}"
        )
    vocab = model_cfg.vocab_size
    if vocab % cfg.tp:
        ok = [d for d in cands if heads % d == 0 and vocab % d == 0]
        raise ParallelConfigError(
            f"parallel.tp={cfg.tp} does not divide vocab_size={vocab} (the embedding and lm_head are split by "
            f"vocabulary rows); pad model.vocab_size to a multiple of {cfg.tp}, or use tp in: {_fmt(ok)}"
        )
    e = model_cfg.num_local_experts
    if e % cfg.ep:
        ok = [d for d in _world_divisors(world_size, e) if e % d == 0]
        raise ParallelConfigError(f"parallel.ep={cfg.ep} does not divide num_local_experts={e}; valid: {_fmt(ok)}")
    inter = model_cfg.intermediate_size
    if inter % cfg.etp:
        ok = [d for d in _divisors(cfg.tp) if inter % d == 0]
        raise ParallelConfigError(
            f"parallel.etp={cfg.etp} does not divide intermediate_size={inter}; valid: {_fmt(ok)}"
        )


def check_batch_split(cfg: ParallelConfig, train_cfg) -> None:
    """Rows split into 2*cp zigzag chunks; sequence parallelism splits a micro-batch's tokens over tp."""
    t = train_cfg.seq_len
    if cfg.cp > 1 and t % (2 * cfg.cp):
        raise ParallelConfigError(
            f"train.seq_len={t} must be divisible by 2 * parallel.cp = {2 * cfg.cp} (context parallelism splits "
            f"each row into 2*cp zigzag chunks)"
        )
    if cfg.sequence_parallel and (train_cfg.micro_batch_size * t) % cfg.tp:
        raise ParallelConfigError(
            f"parallel.sequence_parallel: micro_batch_size * seq_len = {train_cfg.micro_batch_size * t} "
            f"must be divisible by parallel.tp={cfg.tp}"
        )


def check_deepspeed_layout(cfg: ParallelConfig) -> None:
    """The DeepSpeed engine does data parallelism only."""
    bad = [f"{k}={getattr(cfg, k)}" for k in ("tp", "cp", "ep", "etp", "pp") if getattr(cfg, k) != 1]
    if bad:
        raise ParallelConfigError(
            f"parallel.engine=deepspeed supports data parallelism only (tp=cp=ep=etp=pp=1), got "
            f"{', '.join(bad)}; use parallel.engine=fsdp2 for tensor/context/expert parallelism"
        )
    if cfg.zero_stage == 0:
        raise ParallelConfigError(
            "parallel.engine=deepspeed needs parallel.zero_stage 1, 2 or 3 (stage 0 is plain "
            "data parallelism: use parallel.engine=fsdp2)"
        )
    if cfg.sequence_parallel:
        raise ParallelConfigError("parallel.engine=deepspeed: sequence_parallel needs tensor parallelism (fsdp2)")


def experts_follow_tp(layout: Layout) -> bool:
    """Without expert parallelism and with etp == tp, tensor parallelism shards each expert's FFN itself."""
    return layout.tp > 1 and layout.ep == 1 and layout.etp == layout.tp


def uses_expert_parallel(layout: Layout) -> bool:
    """Whether the experts are owned by expert parallelism (the all-to-all dispatcher)."""
    return (layout.ep > 1 or layout.etp > 1 or layout.tp > 1) and not experts_follow_tp(layout)


def ep_token_replicas(layout: Layout, cfg: ParallelConfig) -> int:
    """How many ranks of each EP group hold the same tokens. Without sequence parallelism the MoE input is
    replicated over tp; an EP group that folds over tp ranks (etp < tp) then dispatches each token from
    every replica (correct, but that factor of expert compute and all-to-all bytes is wasted)."""
    if cfg.sequence_parallel or layout.tp == 1 or layout.etp == layout.tp or not uses_expert_parallel(layout):
        return 1
    counts = set()
    for group in rank_groups(layout)["ep"]:
        per_block: dict[int, int] = {}
        for r in group:
            per_block[r // layout.tp] = per_block.get(r // layout.tp, 0) + 1  # a tp block holds one token set
        counts |= set(per_block.values())
    if len(counts) != 1:
        raise ParallelConfigError(
            f"parallel.ep={layout.ep} over tp={layout.tp} with etp={layout.etp} and no sequence parallelism "
            f"replicates tokens unevenly in the EP group; use etp={layout.tp} or parallel.sequence_parallel=true"
        )
    return counts.pop()


__all__ = [
    "ENGINES",
    "BACKENDS",
    "ParallelConfig",
    "ParallelConfigError",
    "Layout",
    "resolve_layout",
    "check_model_split",
    "check_batch_split",
    "check_deepspeed_layout",
    "rank_groups",
    "experts_follow_tp",
    "uses_expert_parallel",
    "ep_token_replicas",
]
