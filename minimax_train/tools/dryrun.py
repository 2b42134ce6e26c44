"""Build a model of any size for one rank of a large world, on the meta device, and print that rank's
parameter, gradient and optimiser bytes next to the planner's estimate for the same layout.

    python -m minimax_train.tools.dryrun --world 256 --rank 0 model=minimax_text_01 parallel.tp=4 \\
        parallel.sequence_parallel=true parallel.cp=16 parallel.ep=4 parallel.grad_sync=micro \\
        train.seq_len=1048576 train.micro_batch_size=1 train.global_batch_size=16

torch's fake process-group backend stands in for the world (every collective returns at once, no peer
exists), so the trainer's own construction runs unchanged: the ParallelMesh of the layout, the layout's
parts (parallel/model_parts.py), the model on the meta device and FSDP2 (parallel/parallelize.py). Only
the materialisation is left out: the meta tensors already have the local shapes, and no memory is used.
Bytes: fsdp2 keeps fp32 parameters, fp32 gradients (sharded like the parameters) and two fp32 Adam moments
per local element; a DeepSpeed ZeRO stage s divides the bf16 parameters (s = 3), gradients (s >= 2) and
the 12 B fp32 master + moments (s >= 1) by dp, as the planner does."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

GiB = float(1 << 30)


@dataclass
class RankBytes:
    parameters: float
    gradients: float
    optimizer: float
    local_elements: int  # elements this rank holds after every kind of sharding


def local_elements(model) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def fake_world(world: int, rank: int) -> None:
    """A default process group of `world` ranks in this process, this one being `rank` (no peers)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def build_on_meta(job, world: int, rank: int):
    """(model on the meta device, ParallelMesh) of this rank, built as parallelize.build_model does but not
    materialised. The fake process group must be initialised."""
    import torch

    from minimax_train.model.transformer import MiniMaxForCausalLM
    from minimax_train.parallel.mesh import ParallelMesh
    from minimax_train.parallel.model_parts import model_parts
    from minimax_train.parallel.parallelize import shard_data_parallel

    mesh = ParallelMesh(
        job.parallel,
        world_size=world,
        rank=rank,
        local_rank=0,
        device=torch.device("cpu"),
        model_cfg=job.model,
        train_cfg=job.train,
    )
    with torch.device("meta"):
        model = MiniMaxForCausalLM(job.model, model_parts(mesh, job.model), seed=None)
    if job.parallel.engine != "deepspeed":
        shard_data_parallel(model, mesh)
    return model, mesh


def rank_bytes(model, mesh, engine: str, zero_stage: int) -> RankBytes:
    n = local_elements(model)
    if engine != "deepspeed":
        return RankBytes(4.0 * n, 4.0 * n, 8.0 * n, n)
    dp = mesh.layout.dp
    return RankBytes(
        2.0 * n / (dp if zero_stage >= 3 else 1),
        2.0 * n / (dp if zero_stage >= 2 else 1),
        12.0 * n / (dp if zero_stage >= 1 else 1),
        n,
    )


def planner_bytes(job, world: int, gpu: str = "h100") -> RankBytes:
    """The planner's parameter, gradient and optimiser bytes of the job's layout (bf16 precision)."""
    from minimax_train.tools.planner.hardware import gpu_spec
    from minimax_train.tools.planner.inputs import Layout, Workload
    from minimax_train.tools.planner.memory import estimate_memory

    p, t = job.parallel, job.train
    cells = p.tp * p.cp
    dp = world // cells
    rows = t.global_batch_size
    accum = max(1, rows // (dp * t.micro_batch_size))
    w = Workload(job.model, t.seq_len, rows * t.seq_len, world, gpu_spec(gpu))
    lay = Layout(
        tp=p.tp,
        cp=p.cp,
        dp=dp,
        ep=p.ep,
        etp=p.etp,
        edp=world // (p.ep * p.etp),
        engine=p.engine,
        zero_stage=3 if p.engine == "fsdp2" else p.zero_stage,
        grad_sync=p.grad_sync,
        ac="full",
        micro_batch_rows=t.micro_batch_size,
        accum=accum,
        offload=p.offload_optimizer,
    )
    m = estimate_memory(w, lay)
    return RankBytes(m.parameters, m.gradients, m.optimizer, int(m.detail["params_local_unsharded"]))


def dry_run(overrides: list[str], world: int, rank: int) -> tuple[RankBytes, RankBytes]:
    """(this rank's measured bytes, the planner's) for the job of `overrides` (conf_tree syntax)."""
    import torch.distributed as dist

    from minimax_train.conf_tree import compose_job

    job = compose_job(*overrides)
    fake_world(world, rank)
    try:
        model, mesh = build_on_meta(job, world, rank)
        got = rank_bytes(model, mesh, job.parallel.engine, job.parallel.zero_stage)
    finally:
        dist.destroy_process_group()
    return got, planner_bytes(job, world)


def format_report(got: RankBytes, plan: RankBytes) -> str:
    lines = [f"{'':12s} {'this rank':>12s} {'planner':>12s} {'diff':>8s}"]
    for key in ("parameters", "gradients", "optimizer"):
        a, b = getattr(got, key), getattr(plan, key)
        lines.append(f"{key:12s} {a / GiB:10.2f} GiB {b / GiB:8.2f} GiB {100 * (a - b) / b:+7.2f}%")
    total_a = got.parameters + got.gradients + got.optimizer
    total_b = plan.parameters + plan.gradients + plan.optimizer
    lines.append(
        f"{'total':12s} {total_a / GiB:10.2f} GiB {total_b / GiB:8.2f} GiB {100 * (total_a - total_b) / total_b:+7.2f}%"
    )
    lines.append(f"local elements: {got.local_elements:,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minimax_train.tools.dryrun", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, required=True, help="number of ranks (GPUs) of the simulated job")
    ap.add_argument("--rank", type=int, default=0, help="the rank to build")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model=minimax_text_01 parallel.tp=4")
    args = ap.parse_args(argv)
    if not 0 <= args.rank < args.world:
        ap.error(f"--rank {args.rank} is not a rank of a world of {args.world}")
    got, plan = dry_run(args.overrides, args.world, args.rank)
    print(format_report(got, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
