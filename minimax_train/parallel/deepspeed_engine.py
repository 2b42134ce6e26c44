"""DeepSpeed ZeRO (stage 0-3, optional CPU optimiser offload) as the alternative data-parallel engine
(`parallel.engine=deepspeed`, `parallel.zero_stage`, `parallel.offload_optimizer`).

The trainer keeps its own loss normalisation, learning-rate schedule and checkpoint format; DeepSpeed
owns the gradient reduction, the clipping on the global norm and the (partitioned) optimiser step:

- the loop's micro-batch loss lm_loss_sum * dp / global_tokens + coef * aux / accum is back-propagated
  with `engine.backward(loss, scale_wrt_gas=False)` (no 1/accum rescale: the loss is already normalised)
  and DeepSpeed averages gradients over the dp group, exactly as FSDP2 does;
- the accumulation boundary is set explicitly on the last micro-batch, then one `engine.step()` clips to
  `optim.clip_grad` (DeepSpeed's `gradient_clipping`), skips the update when the global norm is not
  finite, and steps the client torch AdamW on the fp32 (master) partitions; its global norm is reported;
- the lr is written into the client optimiser's param groups every step (no DeepSpeed scheduler);
- checkpoints stay torch.distributed.checkpoint: the model and optimiser state are consolidated per
  parameter (DeepSpeed's safe_get_full_* API) into the state-dict layout that FSDP2 / one process write
  (fqn -> fp32 weight; optim state fqn -> step, exp_avg, exp_avg_sq), so a DeepSpeed checkpoint resumes
  under any engine and stage, exports with python -m minimax_train.export, and vice versa. Nothing is
  unpickled: DeepSpeed's own save_checkpoint/load_checkpoint are not used.

Only data parallelism (tp = cp = ep = etp = 1). fp32 on CPU (gloo); bf16 on GPU (`bf16.enabled`, fp32
master weights in the ZeRO optimiser). The first deepspeed.initialize of a machine JIT-compiles a small
comm extension (about 30 s): keep TORCH_EXTENSIONS_DIR on a persistent disk."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import nn

from .layout import check_deepspeed_layout

log = logging.getLogger(__name__)

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def ds_config(job, *, accum: int, dp: int, bf16: bool) -> dict:
    """The DeepSpeed config dict of a job (what a ds_config.json would hold)."""
    p, t = job.parallel, job.train
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if p.zero_stage == 3:
        # keep every parameter partitioned between uses (no persistence threshold surprises in tests)
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": t.micro_batch_size * accum * dp,  # the first ramp row's (set_batch follows the ramp)
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(job.optim.clip_grad),  # 0: off
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def zero3_partitioner(job, *, bf16: bool):
    """parallelize.build_model's `partition` for ZeRO-3: deepspeed.zero.Init on each module as soon as its
    parameters are filled, so each rank keeps 1/dp of every parameter (what zero.Init does when a model is
    constructed inside it; here the values come from the layout-independent init or an HF source first).
    deepspeed.initialize then takes the partitioned parameters as they are. The trainer builds ZeRO-3 models
    this way (train/loop.py build_model): the initial values are bit-identical to one process
    (tests/test_init_layouts.py) and a 2-rank run's losses and gradient norms equal those of a model built
    whole and partitioned by deepspeed.initialize, bit for bit. A partitioned parameter is an empty 1-D
    tensor until gathered (its shape is ds_shape): anything that looks at parameter shapes before the
    first forward must read ds_shape (train/optim.py param_groups does; before it did, every matrix fell
    into the no-decay group, which showed as a 1.5e-5 relative grad-norm drift at step 3)."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": job.train.micro_batch_size,
        "zero_optimization": ds_config(job, accum=1, dp=1, bf16=bf16)["zero_optimization"],
        "bf16": {"enabled": bool(bf16)},
    }

    def partition(module: nn.Module) -> None:
        deepspeed.zero.Init(module=module, config_dict_or_path=config)

    return partition


def _register_router_params(model: nn.Module) -> None:
    """ZeRO-3 re-gathers a module's partitioned parameters for its backward through hooks on the tensors
    it returns; the MoE router returns a RouterOutput dataclass, which those hooks cannot see. Make the
    router weight an external parameter of the enclosing MoE block (whose first output is a tensor), so
    the block's backward gathers it."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from minimax_train.model.moe import MoE

    for m in model.modules():
        if isinstance(m, MoE):
            for p in m.gate.parameters():
                p.is_external_param = True
                register_external_parameter(m, p)


class DeepSpeedEngine:
    """The trainer's view of a DeepSpeed engine: forward module, backward, step, checkpoint state."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, job, mesh, *, accum: int, bf16: bool):
        import deepspeed
        import torch.distributed as dist

        check_deepspeed_layout(job.parallel)
        self._own_group = False
        if not dist.is_initialized():  # one process: DeepSpeed still needs a (1-rank) process group
            backend = "nccl" if mesh.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(k, v)  # DeepSpeed's sanity checks read the launcher's variables
        bf16 = bf16 and mesh.device.type == "cuda"
        self.config = ds_config(job, accum=accum, dp=mesh.dp_size, bf16=bf16)
        self.client_optimizer = optimizer
        engine, ds_opt, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False
        )
        self.engine = engine
        self.optimizer = ds_opt
        self.stage = job.parallel.zero_stage
        if self.stage == 3:
            _register_router_params(engine.module)
        self._ensure_optimizer_state()
        log.info(
            "DeepSpeed ZeRO stage %d%s, %s",
            self.stage,
            " + CPU optimiser offload" if job.parallel.offload_optimizer else "",
            "bf16 (fp32 master)" if bf16 else "fp32",
        )

    # ---- the step ----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """What forward is called on (the DeepSpeed engine: its hooks gather ZeRO-3 parameters)."""
        return self.engine

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    def micro_batch(self, index: int, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Reduce, clip and step (DeepSpeed does all three in engine.step and skips a non-finite update);
        return the global pre-clip gradient norm."""
        self.engine.step()
        gn = self.engine.get_global_grad_norm()
        if isinstance(gn, torch.Tensor):
            gn = float(gn.item())
        return torch.tensor(float("nan") if gn is None else float(gn), dtype=torch.float64)

    def step(self) -> None:
        pass  # done in clip_grad_norm

    def zero_grad(self) -> None:
        pass  # the ZeRO optimiser clears its gradients after each step

    def set_batch(self, global_batch_size: int, accum: int) -> None:
        """Follow train.batch_ramp: DeepSpeed's own ramp hook changes the accumulation steps it expects
        (the micro-batch stays train.micro_batch_size); its config then reports the new batch."""
        if self.engine.train_batch_size() != global_batch_size:
            self.engine.set_train_batch_size(global_batch_size)
            self.config["train_batch_size"] = global_batch_size
            self.config["gradient_accumulation_steps"] = accum
            log.info(
                "DeepSpeed train_batch_size %d, gradient_accumulation_steps %d",
                self.engine.train_batch_size(),
                self.engine.gradient_accumulation_steps(),
            )

    @property
    def lr_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser whose param_groups' lr the schedule sets (DeepSpeed steps the torch AdamW it wraps)."""
        return self.client_optimizer

    def train(self):
        self.engine.train()

    # ---- checkpoint state (the layout of an unsharded model + torch AdamW) ------------------------------
    def _ensure_optimizer_state(self) -> None:
        """Create the (lazy) AdamW state of the fp32 partitions with zero moments and step 0, so that it
        can be read and written before the first step: the first update is then the same as a fresh one."""
        opt = self.client_optimizer
        for p in self._flat_params():
            st = opt.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                for k in ADAM_KEYS:
                    st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lazy = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if lazy is not None:  # ZeRO-1/2: link each parameter to its fragment of the flat state
            lazy()

    def _flat_params(self) -> list[torch.Tensor]:
        """The fp32 (master) partitions of this rank that the client optimiser steps."""
        flat = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 (set per step)
        if flat is not None:
            return list(flat)
        return [p for g in self.client_optimizer.param_groups for p in g["params"]]

    def _adam_step(self) -> torch.Tensor:
        for p in self._flat_params():
            st = self.client_optimizer.state.get(p)
            if st and "step" in st:
                return torch.as_tensor(st["step"]).detach().clone().float().cpu()
        return torch.tensor(0.0)

    def _named_params(self):
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def get_state_dict(self) -> tuple[dict, dict]:
        """(model, optimiser) state dicts with full fp32 tensors, as get_state_dict gives for an unsharded
        model and torch AdamW. Collective (every rank calls it, in the same order)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._adam_step()
        model_sd, state = {}, {}
        for n, p in self._named_params():
            model_sd[n] = safe_get_full_fp32_param(p).float().cpu().clone()
            st = {"step": step.clone()}
            for k in ADAM_KEYS:
                st[k] = safe_get_full_optimizer_state(p, k).float().cpu().clone()
            state[n] = st
        # buffers (none are persistent today) follow the module
        for n, b in self.module.named_buffers():
            if n in self.module.state_dict():
                model_sd[n] = b.detach().cpu().clone()
        groups = []
        for g in self.client_optimizer.param_groups:
            groups.append({k: v for k, v in g.items() if k != "params"})
        # torch's layout names each group's parameters; ours are the decay (>= 2-D) / no-decay split
        decay = [n for n, p in self._named_params() if len(getattr(p, "ds_shape", p.shape)) >= 2]
        rest = [n for n, _ in self._named_params() if n not in set(decay)]
        for g, names in zip(groups, (decay, rest)):
            g["params"] = names
            if isinstance(g.get("lr"), torch.Tensor):
                g["lr"] = float(g["lr"])
        return model_sd, {"state": state, "param_groups": groups}

    def set_state_dict(self, model_sd: dict, optim_sd: Optional[dict]) -> None:
        """Load full fp32 weights (and AdamW state) into the partitions (and the module's parameters)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        step = None
        for n, p in self._named_params():
            safe_set_full_fp32_param(p, model_sd[n].to(torch.float32))
            if optim_sd is not None:
                st = optim_sd["state"][n]
                for k in ADAM_KEYS:
                    safe_set_full_optimizer_state(p, st[k].to(torch.float32), k)
                step = st["step"]
        if step is not None:
            for p in self._flat_params():
                self.client_optimizer.state[p]["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        self._sync_module_from_master()

    @torch.no_grad()
    def _sync_module_from_master(self) -> None:
        """Copy the fp32 master partitions into the module's parameters (what a step ends with)."""
        opt = self.optimizer
        if self.stage < 3:  # ZeRO-1/2: this rank's partition, then all-gather
            opt.update_lp_params()
        else:  # ZeRO-3: the module's partitions
            for i in range(len(opt.fp32_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(i)  # noqa: SLF001

    def close(self) -> None:
        try:
            self.engine.destroy()
        except Exception:  # noqa: BLE001 - best effort
            pass
        if self._own_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


__all__ = ["DeepSpeedEngine", "ds_config", "zero3_partitioner"]
