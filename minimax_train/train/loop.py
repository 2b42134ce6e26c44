"""The training loop: one function, `train(job, run_dir)`, used by the Hydra entry point and by tests.

Per optimiser step on every rank: take `accum` micro-batches, all-reduce the number of loss tokens
(one small all-reduce), back-propagate each micro-batch's lm_loss_sum / global_tokens (times the
data-parallel size, because FSDP averages gradients) plus coef * aux_loss / accum, clip, skip the
update when the loss or gradient norm is not finite, step AdamW, all-reduce the step's statistics
(second small all-reduce, which also carries the preemption flag), write metrics, evaluate and save
when due. The same global batch therefore gives the same update in any data-parallel layout."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from minimax_train.config import ConfigError, JobConfig, check_batch_layout, job_to_container, job_to_yaml
from minimax_train.errors import MinimaxError, import_extra
from minimax_train.model.config import RESUME_FIELDS, shape_mismatches
from minimax_train.parallel.data_parallel import is_sharded, set_gradient_sync
from minimax_train.parallel.mesh import ParallelMesh
from minimax_train.train.checkpoint import CheckpointError, CheckpointManager, rng_state, set_rng_state
from minimax_train.train.faults import Faults
from minimax_train.train.metrics import (
    MetricsWriter,
    WandbLogger,
    format_duration,
    format_progress,
    max_memory_gb,
    peak_tflops,
)
from minimax_train.train.optim import build_optimizer, clip_grad_norm, set_lr
from minimax_train.train.profiler import StepProfiler
from minimax_train.train.schedule import LRSchedule

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


class StopFlag:
    """SIGTERM / SIGUSR1 (slurm preemption, torchrun shutdown) -> save at the end of this step and exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.name: Optional[str] = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.name is None:
            self.name = signal.Signals(signum).name
            log.warning("received %s: will save a checkpoint after this step and exit", self.name)

    def install(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        _term_with_parent()
        for s in self.SIGNALS:
            sig = getattr(signal, s, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handler)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _term_with_parent() -> None:
    """Under a bare torchrun, SIGUSR1 kills the agent (launch/torchrun.sh makes it immune) and would leave
    its workers running orphaned: ask Linux for SIGTERM when our parent dies, so they save and exit."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the README says to use launch/torchrun.sh
        pass


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(job: JobConfig, mesh: ParallelMesh, *, bf16: bool = False, init_from_hf: Optional[str] = None):
    """This rank's shards of the model, built on the meta device for the layout and filled from the
    layout-independent init of train.seed (or, with init_from_hf, from the transformers checkpoint read by
    slices); FSDP2 over dp unless DeepSpeed owns data parallelism (ZeRO-3: each module partitioned as soon as
    it is filled)."""
    from minimax_train.model.init import InitSource
    from minimax_train.parallel.parallelize import build_model as build_for_layout

    _seed_all(job.train.seed)  # data order and router jitter; the weights do not use the global RNG
    if init_from_hf:
        from minimax_train.hf import SafetensorsSource

        source = SafetensorsSource(init_from_hf, job.model)
        log.info("initialising from transformers weights in %s (each rank reads its own slices)", init_from_hf)
    else:
        source = InitSource(job.model, job.train.seed)
    partition = None
    if job.parallel.engine == "deepspeed" and job.parallel.zero_stage == 3:  # never whole on a rank
        from minimax_train.parallel.deepspeed_engine import zero3_partitioner

        partition = zero3_partitioner(job, bf16=bf16 and mesh.device.type == "cuda")
    memory = dict(
        activation_checkpointing=job.train.activation_checkpointing,
        moe_chunk_tokens=job.train.moe_chunk_tokens,
        loss_chunk_tokens=job.train.loss_chunk_tokens,
    )
    return build_for_layout(
        job.model,
        mesh,
        source,
        param_dtype=torch.bfloat16 if (bf16 and mesh.device.type == "cuda") else None,
        reduce_dtype=torch.float32,
        fsdp=job.parallel.engine != "deepspeed",  # DeepSpeed wraps it with its optimiser (build_engine)
        memory=memory,
        partition=partition,
    )


class TorchEngine:
    """The default engine (FSDP2 or one process): plain autograd, our global-norm clip, the torch optimiser.
    parallel.engine=deepspeed uses minimax_train.parallel.deepspeed_engine.DeepSpeedEngine, which has the
    same methods."""

    name = "fsdp2"

    def __init__(self, model, optimizer, grad_sync: str = "step"):
        self.model = self.module = model
        self.optimizer = optimizer
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.grad_sync = grad_sync

    def micro_batch(self, index: int, last: bool) -> None:
        # "step": FSDP keeps unsharded gradients across micro-batches and reduce-scatters once (less traffic);
        # "micro": reduce-scatter after every micro-batch, only sharded gradients are kept (less memory)
        set_gradient_sync(self.model, last or self.grad_sync == "micro")

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self._params, max_norm)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def set_batch(self, global_batch_size: int, accum: int) -> None:
        pass  # the loop hands forward_backward `accum` micro-batches; nothing here counts them

    def train(self):
        self.model.train()

    def close(self) -> None:
        pass


def build_engine(
    job: JobConfig, mesh: ParallelMesh, *, accum: int, bf16: bool = False, init_from_hf: Optional[str] = None
):
    """(engine adapter, optimiser implementation name) for parallel.engine."""
    if job.parallel.engine == "deepspeed":  # before the model is built
        import_extra("deepspeed", "deepspeed", "parallel.engine=deepspeed")
    model = build_model(job, mesh, bf16=bf16, init_from_hf=init_from_hf)
    if job.parallel.engine == "deepspeed":
        from minimax_train.parallel.deepspeed_engine import DeepSpeedEngine

        # offloaded optimiser state lives on the host: step it with the CPU (foreach) AdamW
        opt_device = torch.device("cpu") if job.parallel.offload_optimizer else mesh.device
        optimizer, opt_impl = build_optimizer(model, job.optim, device=opt_device, sharded=True)
        engine = DeepSpeedEngine(model, optimizer, job, mesh, accum=accum, bf16=bf16)
        return engine, f"{opt_impl} in DeepSpeed ZeRO-{job.parallel.zero_stage}"
    optimizer, opt_impl = build_optimizer(model, job.optim, device=mesh.device, sharded=is_sharded(model))
    return TorchEngine(model, optimizer, job.parallel.grad_sync), opt_impl


def check_init_checkpoint(init_from: str, model_cfg) -> Path:
    """The checkpoint checkpoint.init_from names, after checking that its model has the current shapes
    (CheckpointError listing the fields that differ); differences that keep the shapes (rope_theta, ...)
    are logged."""
    import dataclasses

    from minimax_train.model.config import shape_mismatches
    from minimax_train.train.checkpoint import CheckpointError, resolve_checkpoint, saved_model_config

    path = resolve_checkpoint(init_from)
    saved = saved_model_config(path)
    bad = shape_mismatches(saved, model_cfg)
    if bad:
        raise CheckpointError(
            f"checkpoint.init_from={init_from!r}: the model shapes differ from {path}'s ({'; '.join(bad)}); "
            f"set these model.* fields as the checkpoint has them"
        )
    changed = [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(model_cfg, f.name)!r}"
        for f in dataclasses.fields(model_cfg)
        if getattr(saved, f.name) != getattr(model_cfg, f.name)
    ]
    if changed:
        log.info("checkpoint.init_from: model settings changed from %s: %s", path.name, "; ".join(changed))
    return path


def load_init_checkpoint(path, what: str, model, optimizer, optim_cfg, mesh: ParallelMesh) -> None:
    """Weights (what="model") or weights and AdamW state ("model+optim") of checkpoint `path` into this run's
    layout (DCP reshards); the optimiser's hyperparameters stay this run's (optim.*)."""
    from minimax_train.train.checkpoint import load_model_and_optim
    from minimax_train.train.optim import apply_hyperparameters

    with_optim = what == "model+optim"
    load_model_and_optim(Path(path), model, optimizer, no_dist=mesh.world_size == 1, with_optim=with_optim)
    if with_optim:
        apply_hyperparameters(optimizer if optimizer is not None else model.client_optimizer, optim_cfg)


def _local_eval(model, loader, iters: int, device, autocast, mesh: ParallelMesh) -> torch.Tensor:
    """[lm_loss_sum, loss tokens] over up to `iters` held-out micro-batches of this rank."""
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    it = iter(loader)
    model.eval()
    with torch.no_grad():
        for _ in range(iters):
            try:
                b = next(it).to(device, non_blocking=True)
            except StopIteration:
                break
            with autocast():
                out = model(**model_inputs(b, mesh))
            acc[0] += out.lm_loss_sum.double()
            acc[1] += out.num_loss_tokens.double()
    model.train()
    return acc


def model_inputs(b, mesh: ParallelMesh) -> dict:
    """Keyword arguments of the model for one micro-batch on this rank: with context parallelism, this
    cp rank's zigzag share of every row (lm_loss_sum / num_loss_tokens then cover that share only)."""
    if mesh.cp_size > 1:
        from minimax_train.parallel.context_parallel import shard_batch

        ids, labels, seq = shard_batch(b, mesh.cp_rank, mesh.cp_size)
        return {"input_ids": ids, "labels": labels, "seq": seq}
    return {"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids, "cu_seqlens": b.cu_seqlens}


def local_loss_tokens(b, mesh: ParallelMesh) -> int:
    """Loss tokens this rank computes for micro-batch b (its cp share under context parallelism), so that
    the sum over the dp x cp group is the global count."""
    if mesh.cp_size > 1:
        from minimax_train.parallel.cp_shard import zigzag_token_index

        idx = zigzag_token_index(b.labels.shape[0], b.labels.shape[1], mesh.cp_rank, mesh.cp_size)
        return int((b.labels.reshape(-1)[idx] != -100).sum())
    return b.num_loss_tokens()


@dataclass
class ForwardBackward:
    global_tokens: float  # loss tokens of the whole global batch (all dp ranks)
    lm_sum: torch.Tensor  # this rank's summed token cross-entropy (fp64 scalar)
    aux_sum: torch.Tensor  # this rank's summed per-micro-batch aux losses (fp64 scalar)
    expert_load: torch.Tensor  # this rank's [layers, experts] token counts (fp64)


def forward_backward(
    model,
    batches,
    *,
    mesh: ParallelMesh,
    autocast=contextlib.nullcontext,
    coef: float,
    inject_nan: bool = False,
    engine=None,
) -> ForwardBackward:
    """Accumulate the gradient of one optimiser step's share of this rank: `batches` are its micro-batches.

    The gradient (after FSDP's average over the dp group) is that of
        sum(token CE over the global batch) / global loss tokens + coef * mean(aux loss over all micro-batches)
    so any split of the same global rows over ranks and micro-batches gives the same update. `engine`
    (TorchEngine by default) owns the gradient-sync switch and backward (DeepSpeed: engine.backward)."""
    if engine is None:
        engine = TorchEngine(model, None)
    device = mesh.device
    accum = len(batches)
    ntok = torch.tensor([sum(local_loss_tokens(b, mesh) for b in batches)], dtype=torch.float64, device=device)
    mesh.all_reduce(ntok, group=mesh.dp_cp_group)
    global_tokens = max(float(ntok.item()), 1.0)
    scale = float(mesh.grad_reduce_size)  # FSDP / DeepSpeed average gradients over this many ranks
    lm_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    load = None
    for i, b in enumerate(batches):
        b = b.to(device, non_blocking=True)
        engine.micro_batch(i, i == accum - 1)
        with autocast():
            out = model(**model_inputs(b, mesh))
        loss_mb = out.lm_loss_sum.float() * (scale / global_tokens) + (coef / accum) * out.aux_loss.float()
        if inject_nan:
            loss_mb = loss_mb * float("nan")
        engine.backward(loss_mb)
        lm_sum += out.lm_loss_sum.detach().double()
        aux_sum += out.aux_loss.detach().double()
        el = out.expert_load.detach().double()
        load = el if load is None else load + el
    if inject_nan:
        lm_sum += float("nan")
    return ForwardBackward(global_tokens, lm_sum, aux_sum, load)


def _same_model(path: Path, saved: JobConfig, job: JobConfig) -> None:
    """Resume only into the model the checkpoint was trained as (the layout may differ)."""
    diff = shape_mismatches(saved.model, job.model, RESUME_FIELDS)
    if diff:
        raise CheckpointError(
            f"checkpoint {path} holds another model than this run's ({', '.join(diff)}, as checkpoint -> run): "
            f"resume it with the checkpoint's model settings, or start a new run in another checkpoint.dir"
        )


def train(job: JobConfig, run_dir: str | os.PathLike) -> TrainResult:
    """Run (or resume) the job. Collective: every rank of a torchrun job calls it. `run_dir` is rank 0's
    output directory (other ranks receive it)."""
    from minimax_train.data import DataError, build_loader, load_tokenizer

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
        bf16 = job.train.precision == "bf16" or (job.train.precision == "auto" and device.type == "cuda")

        def autocast():
            if not bf16:
                return contextlib.nullcontext()
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

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
        init_hf = job.checkpoint.init_from_hf if not resume_from else None
        init_ckpt = None
        if job.checkpoint.init_from and not resume_from:  # a restarted continuation resumes from its own
            init_ckpt = mesh.broadcast_object(str(check_init_checkpoint(job.checkpoint.init_from, job.model)))
        if job.checkpoint.init_from_hf:  # the model is the HF one, also when resuming (its weights: only when not)
            from minimax_train.hf import read_hf_config

            hf_cfg = read_hf_config(job.checkpoint.init_from_hf)
            if hf_cfg != job.model:
                log.warning(
                    "checkpoint.init_from_hf: the model config comes from %s (it differs from model.*)",
                    job.checkpoint.init_from_hf,
                )
                job.model = hf_cfg
                from minimax_train.parallel.layout import resolve_layout

                resolve_layout(job.parallel, mesh.world_size, job.model, job.train)  # the layout vs the HF shapes
        if len(tokenizer) > job.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={job.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({len(tokenizer)} tokens, data.tokenizer={job.data.tokenizer!r})"
            )
        loader_kw = dict(
            seq_len=T,
            micro_batch_size=job.train.micro_batch_size,
            dp_rank=mesh.dp_rank,
            dp_size=dp,
            seed=job.train.seed,
        )
        train_loader = build_loader(job.data, tokenizer, split="train", **loader_kw)
        for src in train_loader.stats["sources"]:
            if src["max_token_id"] is not None and src["max_token_id"] >= job.model.vocab_size:
                raise DataError(
                    f"{src['label']}: holds token id {src['max_token_id']}, outside model.vocab_size="
                    f"{job.model.vocab_size}: it was tokenised with another tokenizer, or raise model.vocab_size"
                )
            log.info(
                "data %s: %s documents, %d malformed records skipped",
                src["label"],
                src["documents"],
                src["bad_records"],
            )
        valid_loader = None
        if job.train.eval_interval > 0:
            try:
                valid_loader = build_loader(job.data, tokenizer, split="valid", **loader_kw)
            except DataError as e:
                raise DataError(
                    f"{e} (validation: train.eval_interval={job.train.eval_interval}; set "
                    f"train.eval_interval=0 to train without a held-out split)"
                ) from None

        # ---- model and optimiser -----------------------------------------------------------------------------
        engine, opt_impl = build_engine(job, mesh, accum=accum, bf16=bf16, init_from_hf=init_hf)
        model = engine.model  # what forward runs on
        # what checkpoints read and write: the model and torch optimiser, or the DeepSpeed adapter itself
        ckpt_model, ckpt_optim = (engine, None) if engine.name == "deepspeed" else (engine.model, engine.optimizer)
        coef = float(job.model.router_aux_loss_coef)
        from minimax_train.model.flops import count_params, train_flops_per_token

        flops_per_token = train_flops_per_token(job.model, T)
        peak = peak_tflops(device, job.logging.peak_tflops)
        n_params = count_params(job.model)

        # ---- resume, or a new run from another run's checkpoint -----------------------------------------------
        step, tokens, skipped, consecutive, wandb_id = 0, 0, 0, 0, None
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
            t0 = time.perf_counter()
            loaded = manager.load_latest(ckpt_model, ckpt_optim, check_job=lambda p, saved: _same_model(p, saved, job))
            resume_from, meta, mine, blob = str(loaded[0]), *loaded[1:]
            step, tokens = int(meta["step"]), int(meta["tokens"])
            skipped, consecutive = int(meta["skipped_steps"]), int(meta["consecutive_nonfinite"])
            wandb_id = meta.get("wandb_run_id")
            train_loader.load_state_dict(meta["data"])
            if mine is not None:
                set_rng_state(mine["rng"])
            else:
                log.warning("world size changed (%d -> %d): RNG streams reseeded", blob["world_size"], mesh.world_size)
                _seed_all(job.train.seed + 1000003 * step)  # same on every rank, as at the start (TP ranks must agree)
            log.info("resumed from %s (step %d, %.2fs)", resume_from, step, time.perf_counter() - t0)
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
            stats = torch.cat([lm_sum.view(1), aux_sum.view(1), flags, load.flatten()])
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

            load2 = stats[3:].view(load.shape)
            mean = load2.mean(dim=1).clamp(min=1e-9)
            imbalance = float((load2.max(dim=1).values / mean).max().item())
            tps = G * T / dt
            tflops = flops_per_token * tps / mesh.world_size / 1e12
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
                acc = _local_eval(model, valid_loader, job.train.eval_iters, device, autocast, mesh)
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
