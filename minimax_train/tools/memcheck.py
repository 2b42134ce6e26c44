"""Measure the peak memory of real training steps on CPU, to check the layout planner's estimate.

Each rank of a small gloo job (spawned here, one process per rank) builds the model exactly as the
trainer's build_model does (seeded MiniMaxForCausalLM, activation checkpointing, then
minimax_train.parallel.parallelize: tensor + sequence parallelism when tp > 1, FSDP2 over dp), the
trainer's AdamW (minimax_train.train.optim.build_optimizer), and runs a few optimiser steps with the
trainer's own `forward_backward` (gradient accumulation, FSDP no-sync on all but the last micro-batch),
gradient clipping and `optimizer.step()`, on random packed rows of several documents.

What is measured, per rank:
- peak_rss_delta_bytes: the growth of the resident set from just before the model is built to its peak
  (VmHWM after a reset), with glibc malloc told to return freed blocks above 64 KiB to the OS, after a
  warm-up run of the same layout on a small model (so lazily loaded code, caches and thread pools are not
  counted). It includes gloo's own buffers and allocator slack, like a GPU's reserved memory would.
  This is what the planner is compared with (validate_cpu), for every layout.
- peak_tensor_bytes (spec.profile=True): the peak of live tensor bytes from the profiler's memory events
  (torch.profiler, profile_memory=True), the CPU analogue of torch.cuda.max_memory_allocated. Exact in one
  process (it agrees with the RSS growth within 2.5% there); under gloo it drifted upwards by several MB
  per step in our runs (frees on gloo's own threads are apparently not all recorded), so it is not used
  for multi-process layouts.
The largest of the ranks is reported (ranks of one layout are symmetric up to the routing)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class MeasureSpec:
    name: str
    world: int = 1
    tp: int = 1
    seq_len: int = 256
    micro_batch_size: int = 2  # rows per micro-batch (per dp rank)
    accum: int = 2  # micro-batches per optimiser step
    steps: int = 2  # optimiser steps (>= 2: the Adam state exists from step 1 on)
    activation_checkpointing: str = "none"
    grad_sync: str = "step"  # parallel.grad_sync: FSDP reduce-scatter once per step or every micro-batch
    docs_per_row: int = 2
    seed: int = 1234
    profile: bool = False  # also count tensor bytes with the profiler (exact in one process only)
    pp: int = 1  # pipeline stages (parallel.pp), with parallel.pp_schedule
    pp_schedule: str = "1f1b"

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: `5` > /proc/self/clear_refs). ru_maxrss cannot be used
    after a spawn: exec keeps the parent's high-water mark from the fork."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), else the process's ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def packed_batch(spec: MeasureSpec, vocab: int, step: int, dp_rank: int, mb: int):
    """A PackedBatch of micro_batch_size rows, each with docs_per_row documents (random lengths)."""
    import torch

    from minimax_train.data.batch import PackedBatch

    g = torch.Generator().manual_seed(spec.seed + 1000 * step + 100 * dp_rank + mb)
    b, t = spec.micro_batch_size, spec.seq_len
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    bounds, pos = [0], torch.empty(b, t, dtype=torch.long)
    for r in range(b):
        cuts = sorted(torch.randperm(t - 1, generator=g)[: spec.docs_per_row - 1].add(1).tolist())
        starts = [0] + cuts
        ends = cuts + [t]
        for s, e in zip(starts, ends):
            pos[r, s:e] = torch.arange(e - s)
            labels[r, e - 1] = -100
            bounds.append(r * t + e)
    return PackedBatch(
        input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=torch.tensor(bounds, dtype=torch.int32)
    )


_MARK = 7919 * 8  # bytes of a marker allocation that separates phases in the memory events


def _mark():
    import gc

    import torch

    if os.environ.get("MEMCHECK_GC"):
        gc.collect()
    torch.empty(_MARK // 8, dtype=torch.float64)


def _peak_from_profile(prof):
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    phases, ppeak = [], 0
    for e in events:
        n = e.nbytes()
        if n == _MARK:
            phases.append((round(ppeak / 1e6, 2), round(cur / 1e6, 2)))
            ppeak = 0
        cur += n
        peak = max(peak, cur)
        ppeak = max(ppeak, cur)
    phases.append((round(ppeak / 1e6, 2), round(cur / 1e6, 2)))
    return peak, cur, phases


def _train_steps(cfg, spec: MeasureSpec, mesh, steps: int, mark: bool = False) -> list[float]:
    """Build the model as the trainer does for this layout and run `steps` optimiser steps."""
    import torch

    from minimax_train.config import OptimConfig
    from minimax_train.model.init import InitSource
    from minimax_train.parallel.data_parallel import is_sharded
    from minimax_train.parallel.parallelize import build_model
    from minimax_train.train.engine import TorchEngine
    from minimax_train.train.optim import build_optimizer, clip_grad_norm
    from minimax_train.train.step import forward_backward

    def marker():
        if mark:
            _mark()

    torch.manual_seed(spec.seed)
    memory = dict(activation_checkpointing=spec.activation_checkpointing)  # as train.engine.build_model
    if mesh.layout.pp > 1:
        from minimax_train.parallel.pipeline import build_pipeline
        from minimax_train.train.engine import PipelineEngine

        pipe = build_pipeline(cfg, mesh, InitSource(cfg, spec.seed), micro_batch_size=spec.micro_batch_size,
                              seq_len=spec.seq_len, memory=memory)  # fmt: skip
        model = pipe.owner
        optimizer, _ = build_optimizer(model, OptimConfig(), device=mesh.device, sharded=mesh.dp_size > 1)
        engine = PipelineEngine(pipe, optimizer, mesh)
    else:
        model = build_model(cfg, mesh, InitSource(cfg, spec.seed), reduce_dtype=torch.float32, memory=memory)
        optimizer, _ = build_optimizer(model, OptimConfig(), device=mesh.device, sharded=is_sharded(model))
        engine = TorchEngine(model, optimizer, spec.grad_sync)
    params = [p for p in model.parameters() if p.requires_grad]
    marker()
    losses = []
    model.train()
    for step in range(steps):
        batches = [packed_batch(spec, cfg.vocab_size, step, mesh.dp_rank, i) for i in range(spec.accum)]
        fb = forward_backward(
            model,
            batches,
            mesh=mesh,
            coef=float(cfg.router_aux_loss_coef),
            engine=engine,
        )
        marker()
        clip_grad_norm(params, 1.0, group=mesh.pp_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marker()
        losses.append(float(fb.lm_sum) / fb.global_tokens)
    return losses


def _warm_up(cfg, spec: MeasureSpec, mesh) -> None:
    """The same layout and steps on a small copy of the model, so that lazily imported modules, caches
    (DTensor sharding propagation, FSDP), thread pools and allocator arenas exist before the baseline RSS."""
    import dataclasses
    import gc

    small = dataclasses.replace(
        cfg,
        hidden_size=64,
        intermediate_size=64,
        head_dim=8,
        vocab_size=512,
        num_hidden_layers=2,
        softmax_every=2,
        layer_types=None,
        block_size=16,
    )
    _train_steps(small, dataclasses.replace(spec, seq_len=64, micro_batch_size=1), mesh, steps=2)
    gc.collect()
    mesh.barrier()


def measure_rank(model_cfg: dict, spec: MeasureSpec) -> dict[str, Any]:
    """Run the spec on this rank (the process group, if any, already initialised). Returns the numbers."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from minimax_train.model.config import ModelConfig
    from minimax_train.parallel.mesh import ParallelConfig, ParallelMesh

    cfg = ModelConfig(**model_cfg)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    pc = ParallelConfig(
        tp=spec.tp, sequence_parallel=spec.tp > 1, etp=spec.tp, pp=spec.pp, pp_schedule=spec.pp_schedule
    )
    mesh = ParallelMesh(pc, world_size=world, rank=rank, local_rank=rank, device=torch.device("cpu"), model_cfg=cfg)
    _warm_up(cfg, spec, mesh)
    _reset_peak_rss()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    ctx = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if spec.profile else contextlib.nullcontext()
    with ctx as prof:
        losses = _train_steps(cfg, spec, mesh, spec.steps, mark=spec.profile)
    peak, end, phases = _peak_from_profile(prof) if spec.profile else (0, 0, [])
    return {
        "rank": rank,
        "peak_tensor_bytes": peak,
        "end_tensor_bytes": end,
        "phases": phases,
        "peak_rss_delta_bytes": max(0, _max_rss_bytes() - rss0),
        "seconds": time.perf_counter() - t0,
        "losses": losses,
    }


# glibc malloc: serve every allocation above 64 KiB with mmap and unmap it on free, so the resident set
# follows the live tensors (otherwise freed blocks stay in the heap and the RSS only grows).
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "0",
    "MALLOC_TOP_PAD_": "0",
    "MALLOC_ARENA_MAX": "2",
}


def measure(model_cfg, spec: MeasureSpec, timeout: float = 600.0, spawn: bool = True) -> dict[str, Any]:
    """Peak memory of `spec` (world processes) for a ModelConfig or its dict. Returns the largest rank's
    numbers plus every rank's, and the spec."""
    import dataclasses

    if dataclasses.is_dataclass(model_cfg):
        model_cfg = dataclasses.asdict(model_cfg)
    if spec.world == 1 and not spawn:
        ranks = [measure_rank(model_cfg, spec)]
    else:
        from minimax_train.tools.spawn import run_distributed

        try:
            # MALLOC_ENV from the children's start: freed tensors go back to the OS
            ranks = run_distributed(
                measure_rank,
                spec.world,
                model_cfg,
                spec,
                timeout=timeout,
                backend="gloo" if spec.world > 1 else None,
                env=MALLOC_ENV,
            )
        except (RuntimeError, TimeoutError) as e:
            raise type(e)(f"memory measurement {spec.name!r}: {e}") from None
    top = max(ranks, key=lambda r: r["peak_tensor_bytes"])
    return {
        "spec": asdict(spec),
        "peak_tensor_bytes": top["peak_tensor_bytes"],
        "peak_rss_delta_bytes": max(r["peak_rss_delta_bytes"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "ranks": ranks,
    }


# ---- the planner check -----------------------------------------------------------------------------------------------
# A model large enough that parameters, optimiser state and activations dominate the process's own noise,
# small enough for a few CPU steps in seconds: both attention kinds, GQA, 4 experts top-2, 9.4M parameters.
VALIDATION_MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=4,
    softmax_every=2,
    block_size=64,
    rope_theta=10000.0,
    max_position_embeddings=8192,
)
VALIDATION_SPECS = (
    MeasureSpec("1 process", world=1, seq_len=256),
    MeasureSpec("dp=2 FSDP2, full AC", world=2, seq_len=256, activation_checkpointing="full"),
    MeasureSpec("tp=2 + SP", world=2, tp=2, seq_len=256),
    MeasureSpec("dp=2 FSDP2, micro sync", world=2, seq_len=256, grad_sync="micro"),
)


def planner_estimate(model_cfg, spec: MeasureSpec):
    """The planner's Memory for a measured spec (CPU: fp32, reference kernels, foreach AdamW, FSDP2 over dp,
    experts with etp = tp, gradient sync once per step as the trainer)."""
    from minimax_train.model.config import ModelConfig
    from minimax_train.parallel.layout import ParallelConfig
    from minimax_train.parallel.pipeline_layout import virtual_stages
    from minimax_train.tools.planner import Layout, Workload, estimate_memory, gpu_spec

    cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig(**model_cfg)
    cpu = gpu_spec("custom", memory_gib=1e3, peak_tflops=1.0, intra_gbps=1.0, inter_gbps=1.0)
    dp = spec.dp
    w = Workload(
        cfg,
        seq_len=spec.seq_len,
        global_batch_tokens=spec.seq_len * spec.micro_batch_size * spec.accum * dp,
        num_gpus=spec.world,  # pp x tp x dp
        gpu=cpu,
        precision="fp32",
        kernels="reference",
        optimizer="foreach",
    )
    lay = Layout(
        tp=spec.tp,
        cp=1,
        dp=dp,
        ep=1,
        etp=spec.tp,
        edp=dp,
        engine="fsdp2",
        zero_stage=3,
        grad_sync=spec.grad_sync,
        ac=spec.activation_checkpointing,
        micro_batch_rows=spec.micro_batch_size,
        accum=spec.accum,
        pp=spec.pp,
        pp_schedule=spec.pp_schedule,
        vpp=virtual_stages(ParallelConfig(pp_schedule=spec.pp_schedule)),
    )
    return estimate_memory(w, lay)


def validate_cpu(specs=VALIDATION_SPECS, model_cfg=None) -> list[dict]:
    """Measure each spec (peak RSS growth of the busiest rank) and compare with the planner's total
    (parameters + gradients + optimiser state + activations + communication buffers, or the optimiser
    step's temporary when larger). error = estimate / measured - 1."""
    model_cfg = model_cfg or VALIDATION_MODEL
    rows = []
    for spec in specs:
        m = measure(model_cfg, spec)
        est = planner_estimate(model_cfg, spec)
        measured = m["peak_rss_delta_bytes"]
        rows.append(
            {
                "name": spec.name,
                "spec": asdict(spec),
                "measured_bytes": measured,
                "measured_per_rank": [r["peak_rss_delta_bytes"] for r in m["ranks"]],
                "estimate_bytes": est.total,
                "error": est.total / measured - 1,
                "estimate": {
                    "parameters": est.parameters,
                    "gradients": est.gradients,
                    "optimizer": est.optimizer,
                    "activations": est.activations,
                    "comm_buffers": est.comm_buffers,
                    "optimizer_step_temp": est.optimizer_step_temp,
                },
                "seconds": m["seconds"],
            }
        )
    return rows


def format_validation(rows: list[dict]) -> str:
    mb = 1e6
    out = [
        "planner estimate vs measured peak memory of CPU training steps (fp32, the trainer's model build, "
        "forward_backward, AdamW; 2 optimizer steps x 2 micro-batches of 2 rows; busiest rank's peak RSS growth)",
        f"{'layout':24s} {'seq':>5s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'activ':>7s} {'comm':>6s} "
        f"{'estimate':>9s} {'measured':>9s} {'error':>7s}",
    ]
    for r in rows:
        e = r["estimate"]
        out.append(
            f"{r['name']:24s} {r['spec']['seq_len']:5d} {e['parameters'] / mb:7.1f} {e['gradients'] / mb:7.1f} "
            f"{e['optimizer'] / mb:7.1f} {e['activations'] / mb:7.1f} {e['comm_buffers'] / mb:6.1f} "
            f"{r['estimate_bytes'] / mb:9.1f} {r['measured_bytes'] / mb:9.1f} {r['error']:+7.1%}"
        )
    out.append(
        "(MB = 1e6 bytes; model: hidden 256, 4 layers (2 lightning, 2 softmax), 4 experts of 512 top-2, "
        "vocab 4096, 9.4M parameters)"
    )
    return "\n".join(out)
