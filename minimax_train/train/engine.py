"""The model and the engine that steps it: this rank's shards of the model built for the layout, the default
engine (plain autograd, FSDP2 or one process, the torch optimiser) and the choice of DeepSpeed instead."""

from __future__ import annotations

import logging
import random
from typing import Optional

import numpy as np
import torch

from minimax_train.config import JobConfig
from minimax_train.errors import import_extra
from minimax_train.parallel.data_parallel import is_sharded, set_gradient_sync
from minimax_train.parallel.mesh import ParallelMesh
from minimax_train.train.optim import build_optimizer, clip_grad_norm

log = logging.getLogger("minimax_train.train")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(job: JobConfig, mesh: ParallelMesh, *, bf16: bool = False, init_from_hf: Optional[str] = None):
    """This rank's shards of the model, built on the meta device for the layout and filled from the
    layout-independent init of train.seed (or, with init_from_hf, from the transformers checkpoint read by
    slices); FSDP2 over dp unless DeepSpeed owns data parallelism (ZeRO-3: each module partitioned as soon as
    it is filled). With parallel.pp > 1: this rank's pipeline stages (a parallel.pipeline.PipelineModel)."""
    from minimax_train.model.init import InitSource
    from minimax_train.parallel.parallelize import build_model as build_for_layout

    seed_all(job.train.seed)  # data order and router jitter; the weights do not use the global RNG
    if init_from_hf:
        from minimax_train.hf import SafetensorsSource

        source = SafetensorsSource(init_from_hf, job.model)
        log.info("initialising from transformers weights in %s (each rank reads its own slices)", init_from_hf)
    else:
        source = InitSource(job.model, job.train.seed)
    # the fused loss computes the head's gradients in forward, which DeepSpeed's parameter hooks have not
    # been tested with: DeepSpeed keeps the chunked loss unless liger is asked for by name
    loss_kernel = job.train.loss_kernel
    if loss_kernel == "auto" and job.parallel.engine == "deepspeed":
        loss_kernel = "chunked"
    memory = dict(
        activation_checkpointing=job.train.activation_checkpointing,
        moe_chunk_tokens=job.train.moe_chunk_tokens,
        loss_chunk_tokens=job.train.loss_chunk_tokens,
        loss_kernel=loss_kernel,
    )
    param_dtype = torch.bfloat16 if (bf16 and mesh.device.type == "cuda") else None
    partition = None
    if job.parallel.engine == "deepspeed" and job.parallel.zero_stage == 3:  # never whole on a rank
        from minimax_train.parallel.deepspeed_engine import zero3_partitioner

        partition = zero3_partitioner(job, bf16=param_dtype is not None)
    if mesh.layout.pp > 1:
        from minimax_train.parallel.pipeline import build_pipeline

        return build_pipeline(
            job.model,
            mesh,
            source,
            micro_batch_size=job.train.micro_batch_size,
            seq_len=job.train.seq_len,
            param_dtype=param_dtype,
            memory=memory,
            boundary_dtype=torch.bfloat16 if param_dtype is not None else torch.float32,
        )
    return build_for_layout(
        job.model,
        mesh,
        source,
        param_dtype=param_dtype,
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


class PipelineEngine(TorchEngine):
    """TorchEngine over a pipelined model (parallel.pp > 1): the torch schedule runs forward and backward of
    all micro-batches (train/step.py) and reduces FSDP gradients after the last one; the optimiser and the
    clip see this rank's parameters, the clip's norm summed over the pp group."""

    def __init__(self, pipeline, optimizer, mesh: ParallelMesh):
        super().__init__(pipeline.owner, optimizer)
        self.pipeline, self.mesh = pipeline, mesh

    def micro_batch(self, index: int, last: bool) -> None:
        pass  # the schedule turns FSDP's gradient sync off and reduces once, after the last backward

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self._params, max_norm, group=self.mesh.pp_group)


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
    if mesh.layout.pp > 1:
        optimizer, opt_impl = build_optimizer(model.owner, job.optim, device=mesh.device, sharded=mesh.dp_size > 1)
        return PipelineEngine(model, optimizer, mesh), opt_impl
    optimizer, opt_impl = build_optimizer(model, job.optim, device=mesh.device, sharded=is_sharded(model))
    return TorchEngine(model, optimizer, job.parallel.grad_sync), opt_impl


__all__ = ["PipelineEngine", "TorchEngine", "build_engine", "build_model", "seed_all"]
