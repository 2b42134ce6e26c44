"""The training loop: one function, `train(job, run_dir)`, used by the Hydra entry point and by tests.

Per optimiser step on every rank: take `accum` micro-batches, all-reduce the number of loss tokens
(one small all-reduce), back-propagate each micro-batch's lm_loss_sum / global_tokens (times the
data-parallel size, because FSDP averages gradients) plus coef * aux_loss / accum, clip, skip the
update when the loss or gradient norm is not finite, step AdamW, all-reduce the step's statistics
(second small all-reduce, which also carries the preemption flag), write metrics, evaluate and save
when due. The same global batch therefore gives the same update in any data-parallel layout.

The pieces: train/setup.py (precision, init source, data), train/engine.py (model and engine),
train/step.py (forward/backward of a step, evaluation), train/resume.py (resume and init_from),
train/signals.py (preemption), train/metrics.py (records, console, W&B)."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from minimax_train.config import JobConfig, check_batch_layout, job_to_container, job_to_yaml
from minimax_train.errors import MinimaxError
from minimax_train.parallel.mesh import ParallelMesh
from minimax_train.train.checkpoint import CheckpointManager, rng_state
from minimax_train.train.engine import build_engine, seed_all
from minimax_train.train.faults import Faults
from minimax_train.train.metrics import (
    MetricsWriter,
    WandbLogger,
    format_duration,
    format_progress,
    load_imbalance,
    max_memory_gb,
    peak_tflops,
)
from minimax_train.train.optim import set_lr
from minimax_train.train.profiler import StepProfiler
from minimax_train.train.resume import RunState, load_init_checkpoint, resume_latest
from minimax_train.train.schedule import LRSchedule
from minimax_train.train.setup import autocast_factory, build_data, resolve_init, use_bf16
from minimax_train.train.signals import StopFlag
from minimax_train.train.step import forward_backward, local_eval

log = logging.getLogger("minimax_train.train")

RESOLVED_CONFIG = "config_resolved.yaml"


class NonFiniteError(MinimaxError):
    """The run stopped on consecutive non-finite steps (exit 3, so schedulers can tell it apart)."""

    exit_code = 3


@dataclass
class TrainResult:
    step: int
    tokens: int
    last_loss: Optional[float]
    skipped_steps: int
    preempted: bool
    checkpoint: Optional[str]
    run_dir: str


def train(job: JobConfig, run_dir: str | os.PathLike) -> TrainResult:
    """Run (or resume) the job. Collective: every rank of a torchrun job calls it. `run_dir` is rank 0's
    output directory (other ranks receive it)."""
    from minimax_train.data import load_tokenizer

    faults = Faults(rank=int(os.environ.get("RANK", "0")))
    stop = StopFlag()
    stop.install()  # first: a preemption signal during start-up must not kill the process
    try:
        mesh = ParallelMesh.from_env(job.parallel, device=job.train.device, model_cfg=job.model, train_cfg=job.train)
    except BaseException:
        stop.restore()
        raise
    wandb_logger = None
    metrics = None
    engine = None
    profiler = None
    failed = True
    try:
        run_dir = Path(mesh.broadcast_object(str(Path(run_dir).absolute())))
        if not mesh.is_main:
            logging.getLogger("minimax_train").setLevel(logging.WARNING)
        T = job.train.seq_len
        dp = mesh.layout.dp
        ramp = job.train.ramp()
        check_batch_layout(job.train, dp)  # every ramp row splits over dp x micro_batch_size
        G = ramp.rows_at(0)
        accum = check_batch_layout(job.train, dp, G)
        device = mesh.device
        bf16 = use_bf16(job, device)
        autocast = autocast_factory(bf16, device)

        # ---- checkpoints: where, and is there one to resume -------------------------------------------------
        ckpt_root = Path(job.checkpoint.dir) if job.checkpoint.dir else run_dir / "checkpoints"
        ckpt_root = Path(mesh.broadcast_object(str(ckpt_root.absolute())))
        manager = CheckpointManager(ckpt_root, mesh, keep_last=job.checkpoint.keep_last, faults=faults)
        manager.guard_fresh_start(job.checkpoint.resume, job.checkpoint.overwrite)  # before anything is touched
        manager.prepare()
        resume_from = manager.latest() if job.checkpoint.resume else None
        resume_from = mesh.broadcast_object(str(resume_from) if resume_from else None)

        # ---- data (before the model: data errors surface before any heavy work) ------------------------------
        tokenizer = load_tokenizer(job.data)
        init_hf, init_ckpt = resolve_init(job, mesh, resume_from)
        train_loader, valid_loader = build_data(job, mesh, tokenizer)

        # ---- model and optimiser -----------------------------------------------------------------------------
        engine, opt_impl = build_engine(job, mesh, accum=accum, bf16=bf16, init_from_hf=init_hf)
        model = engine.model  # what forward runs on
        # what checkpoints read and write: the model and torch optimiser, or the DeepSpeed adapter itself
        ckpt_model, ckpt_optim = (engine, None) if engine.name == "deepspeed" else (engine.model, engine.optimizer)
        coef = float(job.model.router_aux_loss_coef)
        from minimax_train.model.flops import count_params, train_flops

        peak = peak_tflops(device, job.logging.peak_tflops)
        n_params = count_params(job.model)

        # ---- resume, or a new run from another run's checkpoint -----------------------------------------------
        state = RunState()
        if init_ckpt:
            t0 = time.perf_counter()
            load_init_checkpoint(init_ckpt, job.checkpoint.init_load, ckpt_model, ckpt_optim, job.optim, mesh)
            log.info(
                "initialised %s from %s (%.2fs); a new run from step 0",
                job.checkpoint.init_load,
                init_ckpt,
                time.perf_counter() - t0,
            )
        if resume_from:
            # a changed world reseeds, the same on every rank, as at the start (TP ranks must agree)
            state = resume_latest(
                manager,
                ckpt_model,
                ckpt_optim,
                job,
                mesh,
                train_loader,
                reseed=lambda at: seed_all(job.train.seed + 1000003 * at),
            )
            resume_from = state.resumed_from
        step, tokens, skipped, consecutive, wandb_id = (
            state.step,
            state.tokens,
            state.skipped,
            state.consecutive,
            state.wandb_id,
        )
        if step >= job.train.steps:
            log.info("checkpoint step %d >= train.steps=%d: nothing to do", step, job.train.steps)
        schedule = LRSchedule(job.optim, job.train.steps, ramp)
        G = ramp.rows_at(tokens)
        accum = check_batch_layout(job.train, dp, G)
        engine.set_batch(G, accum)

        # ---- outputs -----------------------------------------------------------------------------------------
        config_yaml = job_to_yaml(job)
        if mesh.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RESOLVED_CONFIG).write_text(config_yaml)
            metrics = MetricsWriter(run_dir / job.logging.metrics_file)
            wandb_logger = WandbLogger(job.logging.wandb, run_dir, job_to_container(job), wandb_id)
            wandb_id = wandb_logger.run_id
        log.info("run dir %s | checkpoints %s | %s", run_dir, ckpt_root, mesh.describe())
        log.info(
            "model %.2fM params (%.2fM active/token) | batch %d rows x %d tokens = %d tokens/step%s, micro %d, "
            "accum %d, dp %d | %s | precision %s | optimizer %s",
            n_params.total / 1e6,
            n_params.active / 1e6,
            G,
            T,
            G * T,
            f" (ramp {list(zip(ramp.thresholds, ramp.rows))})" if ramp.ramped else "",
            job.train.micro_batch_size,
            accum,
            dp,
            schedule.describe(),
            "bf16" if bf16 else "fp32",
            opt_impl,
        )

        def save(at_step: int) -> Path:
            t0 = time.perf_counter()
            meta = {
                "step": at_step,
                "tokens": tokens,
                "skipped_steps": skipped,
                "consecutive_nonfinite": consecutive,
                "wandb_run_id": wandb_id,
                "data": train_loader.state_dict(),
                "dp_size": dp,
            }
            path = manager.save(at_step, ckpt_model, ckpt_optim, meta, {"rng": rng_state()}, config_yaml)
            log.info("saved checkpoint %s (%.2fs)", path, time.perf_counter() - t0)
            return path

        grad_group = mesh.dp_cp_group
        last_saved = step if resume_from else None
        last_ckpt = resume_from
        last_loss = None
        step_times: list[float] = []
        start_step, start_tokens = step, tokens
        it = iter(train_loader)
        engine.train()
        profiler = StepProfiler(
            job.logging.profile_start, job.logging.profile_steps, run_dir / "profile", mesh.rank, device
        )

        while step < job.train.steps:
            profiler.before_step(step + 1)
            t_start = time.perf_counter()
            if ramp.rows_at(tokens) != G:  # a ramp threshold was reached: this step takes the new batch
                G = ramp.rows_at(tokens)
                accum = check_batch_layout(job.train, dp, G)
                engine.set_batch(G, accum)
                log.info("step %d: global batch %d rows (%d tokens) after %d tokens", step + 1, G, G * T, tokens)
            lr = schedule.lr(step)
            set_lr(engine.lr_optimizer, lr)
            batches = [next(it) for _ in range(accum)]
            # model FLOPs of these rows as packed (each document's own attention), counted on the host;
            # divided by cp because the cp ranks of a dp rank hold the same rows and the sum runs over dp x cp
            local_flops = sum(train_flops(job.model, torch.diff(b.cu_seqlens).tolist()) for b in batches)
            fb = forward_backward(
                model,
                batches,
                mesh=mesh,
                autocast=autocast,
                coef=coef,
                inject_nan=faults.hit("nan", step + 1),
                engine=engine,
            )
            global_tokens, lm_sum, aux_sum, load = fb.global_tokens, fb.lm_sum, fb.aux_sum, fb.expert_load

            max_norm = job.optim.clip_grad if job.optim.clip_grad > 0 else float("inf")
            # DeepSpeed: reduces, clips, steps (skipping a non-finite global norm) here; step() is then a no-op
            grad_norm = engine.clip_grad_norm(max_norm)
            # one all-reduce for the statistics and the stop flag over dp x cp (tp ranks hold the same
            # statistics); with tp > 1 the flag first goes round the tp group, so every rank stops together
            flags = torch.tensor([0.0 if stop.name is None else 1.0], dtype=torch.float64, device=device)
            if mesh.layout.tp > 1:
                mesh.all_reduce(flags, group=mesh.tp_group, op=dist.ReduceOp.MAX)
            if mesh.layout.pp > 1:  # the pipeline stages' statistics are already summed (train/step.py)
                mesh.all_reduce(flags, group=mesh.pp_group, op=dist.ReduceOp.MAX)
            flops = torch.tensor([local_flops / mesh.cp_size], dtype=torch.float64, device=device)
            stats = torch.cat([lm_sum.view(1), aux_sum.view(1), flags, load.flatten(), flops])
            mesh.all_reduce(stats, group=grad_group)
            gn = float(grad_norm.item())
            stats = stats.cpu()  # one device-to-host copy for everything below
            lm_loss = float(stats[0]) / global_tokens
            aux_loss = float(stats[1]) / (accum * mesh.grad_reduce_size)
            stop_requested = bool(stats[2] > 0)
            loss = lm_loss + coef * aux_loss
            finite = math.isfinite(loss) and math.isfinite(gn)
            if finite:
                engine.step()
                faults.maybe_poison(step + 1, engine.module)
                consecutive = 0
            else:
                skipped += 1
                consecutive += 1
            engine.zero_grad()
            step += 1
            tokens += G * T
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t_start
            step_times.append(dt)
            profiler.after_step(step)
            if step == start_step + 1 and device.type == "cuda" and dt > 20 and mesh.is_main:
                log.info(
                    "the first step took %.0f s: one-time kernel compilation (fla's autotuned Triton kernels, "
                    "FlexAttention), cached on this machine for later runs; the ETA leaves it out",
                    dt,
                )

            if not finite:
                log.warning(
                    "step %d: non-finite %s (loss %s, grad norm %s): update skipped (%d in a row, %d total)",
                    step,
                    "loss" if not math.isfinite(loss) else "gradient",
                    loss,
                    gn,
                    consecutive,
                    skipped,
                )
            else:
                last_loss = loss

            imbalance = load_imbalance(stats[3:-1].view(load.shape))
            tps = G * T / dt
            tflops = float(stats[-1]) / dt / mesh.world_size / 1e12
            rec: dict[str, Any] = {
                "step": step,
                "loss": loss,
                "lm_loss": lm_loss,
                "aux_loss": aux_loss,
                "lr": lr,
                "grad_norm": gn,
                "tokens": tokens,
                "global_batch_size": G,
                "tokens_per_s": tps,
                "tflops_per_device": tflops,
                "model_flops": float(stats[-1]),  # of the global batch as packed (model/flops.train_flops)
                "mfu": (tflops / peak) if peak else None,
                "max_memory_gb": max_memory_gb(device),
                "expert_load_imbalance": imbalance,
                "step_time_s": dt,
                "loss_tokens": int(global_tokens),
                "skipped": not finite,
                "skipped_steps": skipped,
            }
            rec.update(train_loader.step_metrics())
            if valid_loader is not None and (step % job.train.eval_interval == 0 or step == job.train.steps):
                pipeline = getattr(engine, "pipeline", None)
                acc = local_eval(model, valid_loader, job.train.eval_iters, device, autocast, mesh, pipeline)
                mesh.all_reduce(acc, group=grad_group)
                rec["val_loss"] = float(acc[0] / acc[1].clamp(min=1)) if acc[1] > 0 else None
                rec["val_tokens"] = int(acc[1])  # loss tokens behind val_loss, over all ranks

            if mesh.is_main:
                metrics.write(rec)
                wandb_logger.log(rec)
                if (
                    step % job.logging.interval == 0
                    or step == job.train.steps
                    or step == start_step + 1
                    or stop_requested
                ):
                    recent = step_times[1:][-20:] or step_times
                    eta = (job.train.steps - step) * (sum(recent) / len(recent))
                    log.info(format_progress(rec, job.train.steps, eta))
            if not finite and consecutive >= job.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"stopping: {consecutive} consecutive optimiser steps ({step - consecutive + 1}..{step}) had a "
                    f"non-finite loss or gradient (train.max_nonfinite_steps={job.train.max_nonfinite_steps}); "
                    f"their updates were skipped, the weights are those of step {step - consecutive}. Lower "
                    f"optim.lr or lengthen optim.warmup_steps, check the data, or resume from the last checkpoint "
                    f"({last_ckpt or 'none saved yet'})."
                )
            faults.maybe_kill("kill", step)

            due = job.checkpoint.interval > 0 and step % job.checkpoint.interval == 0
            if due or stop_requested:
                last_ckpt = str(save(step))
                last_saved = step
            faults.maybe_signal(step)
            if stop_requested:
                log.warning(
                    "stopping after step %d on %s (checkpoint %s)", step, stop.name or "a peer's signal", last_ckpt
                )
                failed = False
                return TrainResult(step, tokens, last_loss, skipped, True, last_ckpt, str(run_dir))

        if job.checkpoint.save_final and last_saved != step:
            last_ckpt = str(save(step))
        total = sum(step_times)
        if step_times:
            log.info(
                "done: %d steps in %s (%.1fk tokens/s), last loss %s, %d skipped",
                step - start_step,
                format_duration(total),
                (tokens - start_tokens) / max(total, 1e-9) / 1e3,
                f"{last_loss:.4f}" if last_loss is not None else "n/a",
                skipped,
            )
        failed = False
        return TrainResult(step, tokens, last_loss, skipped, False, last_ckpt, str(run_dir))
    finally:
        stop.restore()
        if profiler is not None:
            try:
                profiler.close()
            except Exception as e:  # never mask the run's own error
                log.warning("could not write the profile: %s", e)
        if engine is not None:
            engine.close()
        if metrics is not None:
            metrics.close()
        if wandb_logger is not None:
            wandb_logger.finish(exit_code=1 if failed else 0)
        mesh.destroy(failed=failed)
