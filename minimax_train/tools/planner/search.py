"""Search: every layout the trainer accepts for a workload, each estimated, the fastest that fit first."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from minimax_train.tools.planner.inputs import Assumptions, Layout, PlanError, Workload
from minimax_train.tools.planner.memory import Memory, capacity_bytes, estimate_memory
from minimax_train.tools.planner.step_time import StepTime, estimate_time

ENGINE_STAGES = (("fsdp2", 3), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3))
AC_MODES = ("none", "selective", "full")
GRAD_SYNCS = ("step", "micro")


@dataclass
class Plan:
    layout: Layout
    memory: Memory
    time: StepTime
    fits: bool
    capacity: float


def estimate(w: Workload, lay: Layout, a: Optional[Assumptions] = None) -> Plan:
    a = a or Assumptions()
    mem = estimate_memory(w, lay, a)
    cap = capacity_bytes(w, a)
    return Plan(lay, mem, estimate_time(w, lay, a), mem.total <= cap, cap)


@dataclass
class Constraints:
    """Fix any dimension (None: enumerate it)."""

    tp: Optional[int] = None
    cp: Optional[int] = None
    ep: Optional[int] = None
    etp: Optional[int] = None
    engines: tuple = ("fsdp2", "deepspeed")
    zero_stages: Optional[tuple] = None
    ac: Optional[tuple] = None
    grad_sync: tuple = ("step", "micro")  # fsdp2 gradient sync with accumulation (parallel.grad_sync)
    offload: tuple = (False, True)  # deepspeed optimiser offload off / on
    micro_batch_rows: Optional[int] = None
    max_tp: Optional[int] = None  # default: gpus_per_node
    pp: Optional[int] = 1  # pipeline stages; None: enumerate (every divisor of the GPUs up to the layers)
    pp_schedules: tuple = ("1f1b",)  # schedules to consider when pp > 1


def _divisors(n: int) -> list[int]:
    return [x for x in range(1, n + 1) if n % x == 0]


def layout_error(
    w: Workload,
    tp: int,
    cp: int,
    ep: int,
    etp: int,
    engine: str = "fsdp2",
    zero_stage: int = 3,
    pp: int = 1,
    pp_schedule: str = "1f1b",
) -> Optional[str]:
    """Why this layout cannot run (the trainer's messages), or None."""
    from minimax_train.parallel.mesh import ParallelConfig, ParallelConfigError, resolve_layout

    cfg = w.model
    try:
        pc = ParallelConfig(
            tp=tp,
            cp=cp,
            ep=ep,
            etp=etp,
            sequence_parallel=tp > 1,
            engine=engine,
            zero_stage=zero_stage if engine == "deepspeed" else 1,
            pp=pp,
            pp_schedule=pp_schedule,
        )
        lay = resolve_layout(pc, w.num_gpus, cfg)
    except ParallelConfigError as e:
        return str(e)
    if cfg.vocab_size % tp:
        return f"parallel.tp={tp} does not divide vocab_size={cfg.vocab_size} (vocabulary-parallel embedding)"
    if ep == 1 and etp == tp and cfg.intermediate_size % tp:
        return f"parallel.tp={tp} does not divide intermediate_size={cfg.intermediate_size} (experts with etp = tp)"
    if w.seq_len % (2 * cp):
        return f"seq_len={w.seq_len} must be divisible by 2*parallel.cp={2 * cp} (zigzag context parallelism)"
    if w.rows % lay.dp:
        return (
            f"the global batch has {w.rows} rows of {w.seq_len} tokens, not divisible by dp={lay.dp} "
            f"(world {w.num_gpus} / (pp {pp} x tp {tp} x cp {cp})): raise the batch or use more tp/cp"
        )
    return None


def enumerate_layouts(w: Workload, c: Optional[Constraints] = None) -> Iterable[Layout]:
    c = c or Constraints()
    if c.pp is not None:
        pps = [c.pp]
    else:
        pps = [x for x in _divisors(w.num_gpus) if x <= w.model.num_hidden_layers]
    for pp in pps:
        for sched in c.pp_schedules if pp > 1 else ("1f1b",):
            yield from _stage_layouts(w, c, pp, sched)


def _stage_layouts(w: Workload, c: Constraints, pp: int, sched: str) -> Iterable[Layout]:
    """The layouts of one pp degree and schedule: tp x cp x dp over the ranks of a stage."""
    from minimax_train.parallel.layout import ParallelConfig, ParallelConfigError
    from minimax_train.parallel.pipeline_layout import check_microbatches, virtual_stages

    if w.num_gpus % pp:
        return
    N = w.num_gpus // pp
    vpp = virtual_stages(ParallelConfig(pp_schedule=sched))
    max_tp = c.max_tp or w.gpu.gpus_per_node
    tps = [c.tp] if c.tp else [x for x in _divisors(N) if x <= max_tp]
    for tp in tps:
        cps = [c.cp] if c.cp else _divisors(N // tp) if N % tp == 0 else []
        for cp in cps:
            if N % (tp * cp):
                continue
            dp = N // (tp * cp)
            etps = [c.etp] if c.etp else _divisors(tp)
            for etp in etps:
                room = dp * cp * (tp // etp) if tp % etp == 0 else 0
                eps = (
                    [c.ep]
                    if c.ep
                    else [x for x in _divisors(room) if w.model.num_local_experts % x == 0]
                    if room
                    else []
                )
                for ep in eps:
                    if layout_error(w, tp, cp, ep, etp, pp=pp, pp_schedule=sched) is not None:
                        continue
                    edp = N // (ep * etp)
                    rows_per_dp = w.rows // dp
                    mbrs = [c.micro_batch_rows] if c.micro_batch_rows else _divisors(rows_per_dp)
                    for mb in mbrs:
                        if mb < 1 or rows_per_dp % mb:
                            continue
                        accum = rows_per_dp // mb
                        if pp > 1:
                            try:
                                check_microbatches(ParallelConfig(pp=pp, pp_schedule=sched), accum, "the batch")
                            except ParallelConfigError:
                                continue
                        for engine, stage in ENGINE_STAGES:
                            if engine not in c.engines or (
                                engine == "deepspeed" and c.zero_stages and stage not in c.zero_stages
                            ):
                                continue
                            if engine == "deepspeed" and (tp, cp, ep, etp, pp) != (1, 1, 1, 1, 1):
                                continue  # the DeepSpeed engine is data parallel only
                            syncs = ("step", "micro") if (accum > 1 and stage == 3 and pp == 1) else ("step",)
                            offloads = c.offload if engine == "deepspeed" else (False,)
                            for sync, off in itertools.product(syncs, offloads):
                                if sync not in c.grad_sync:
                                    continue
                                for ac in c.ac or AC_MODES:
                                    yield Layout(
                                        tp, cp, dp, ep, etp, edp, engine, stage, sync, ac, mb, accum, off,
                                        pp=pp, pp_schedule=sched, vpp=vpp,
                                    )  # fmt: skip


@dataclass
class PlanResult:
    workload: Workload
    assumptions: Assumptions
    plans: list  # fitting plans, best first
    closest: list  # smallest-memory plans when nothing fits
    enumerated: int
    fitting: int


def plan(w: Workload, a: Optional[Assumptions] = None, c: Optional[Constraints] = None, top: int = 5) -> PlanResult:
    """Every valid layout, estimated; the `top` fastest that fit (or the smallest when none fits)."""
    a = a or Assumptions()
    c = c or Constraints()
    _check_fixed(w, c)
    fits, others, n = [], [], 0
    for lay in enumerate_layouts(w, c):
        n += 1
        p = estimate(w, lay, a)
        (fits if p.fits else others).append(p)
    if n == 0:
        raise PlanError(_no_layout_message(w, c))
    # fastest first; step times within 0.5% count as equal, and then fewer micro-batches (bigger GEMMs, less
    # per-micro-batch overhead, which the model does not price) and less memory win
    fits.sort(key=lambda p: (round(math.log(p.time.step) / math.log(1.005)), p.layout.accum, p.memory.total))
    closest = sorted(others, key=lambda p: p.memory.total)[:top] if not fits else []
    return PlanResult(w, a, fits[:top], closest, n, len(fits))


def _check_fixed(w: Workload, c: Constraints) -> None:
    """A fully or partly fixed layout that cannot work: the trainer's error message."""
    for key in ("tp", "cp", "ep", "etp", "micro_batch_rows"):
        v = getattr(c, key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise PlanError(f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")
    if c.tp and w.num_gpus % c.tp:
        raise PlanError(
            f"parallel.tp={c.tp} does not divide the GPU count {w.num_gpus}; valid: "
            f"{', '.join(map(str, _divisors(w.num_gpus)))}"
        )
    if c.tp and c.cp and c.ep and c.etp:
        err = layout_error(w, c.tp, c.cp, c.ep, c.etp)
        if err:
            raise PlanError(err)
    if c.engines == ("deepspeed",):
        from minimax_train.parallel.layout import check_deepspeed_layout
        from minimax_train.parallel.mesh import ParallelConfig, ParallelConfigError

        try:
            check_deepspeed_layout(
                ParallelConfig(
                    tp=c.tp or 1, cp=c.cp or 1, ep=c.ep or 1, etp=c.etp or 1, engine="deepspeed", zero_stage=3
                )
            )
        except ParallelConfigError as e:
            raise PlanError(str(e)) from None
    if c.tp and c.etp and c.tp % c.etp:
        raise PlanError(
            f"parallel.etp={c.etp} must divide parallel.tp={c.tp}; valid: {', '.join(map(str, _divisors(c.tp)))}"
        )


def _no_layout_message(w: Workload, c: Constraints) -> str:
    tp = c.tp or 1
    cp = c.cp or 1
    err = layout_error(w, tp, cp, c.ep or 1, c.etp or 1)
    if err:
        return f"no valid layout: {err}"
    return (
        f"no valid layout for {w.num_gpus} GPUs, seq_len {w.seq_len}, {w.rows} rows per step with the given "
        f"constraints (check --micro-batch and the fixed dimensions)"
    )
