"""Pipeline parallelism on torch.distributed.pipelining (TorchTitan's recipe): this rank's stages of the
model as PipelineStages, driven by one of its schedules (pipeline_layout.SCHEDULES).

    owner  = MiniMaxForCausalLM(cfg, parts)     # on the meta device: only this rank's layers (ModelShare),
                                                # with the whole model's parameter names
    stages = [PipelineStageModule(owner, spec)] # one per model chunk of this rank; each shares the owner's
                                                # modules and is its own FSDP2 root over dp x cp
    owner.to_empty(device); fill_parameters(owner, source)   # layout-independent values, only local layers

Checkpoints, the optimiser and the gradient clip see the owner (names independent of pp); the schedule sees
the stages. What torch.distributed.pipelining cannot carry is kept beside it, on purpose:
- packed-document metadata (cu_seqlens, positions; a cp shard's zigzag sequence) differs in length per
  micro-batch, so it is not split by the schedule: the schedule carries the micro-batch index (a [1] tensor)
  and every stage looks its micro-batch's inputs up in the step's PipelineStep;
- the load-balancing statistics of all layers feed one aux loss, so they travel with the residual stream as a
  second activation (counts, summed probabilities, rows); the probabilities carry the aux gradient back;
- the per-micro-batch results the metrics need (summed cross-entropy, aux loss, expert loads per layer) are
  recorded by the stages in PipelineStep and summed over the pp group by the trainer.
Shapes are static (static stage metadata, no warm-up inference run): every micro-batch has micro_batch_size
x seq_len tokens, divided by cp and, under sequence parallelism, by tp."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..model.config import ModelConfig
from ..model.init import WeightSource, fill_parameters
from ..model.layers import PackedSequence
from ..model.transformer import MiniMaxForCausalLM
from .data_parallel import apply_fsdp
from .layout import uses_expert_parallel
from .mesh import ParallelMesh
from .model_parts import model_parts
from .pipeline_layout import SCHEDULES, StageSpec, pipeline_stages


@dataclass
class PipelineStep:
    """One schedule run: the micro-batches' inputs, the loss scaling, and what the stages recorded."""

    inputs: list[dict]
    loss_scale: float = 1.0  # on the summed token cross-entropy (dp*cp / global loss tokens)
    aux_scale: float = 0.0  # on each micro-batch's aux loss (coef / micro-batches)
    inject_nan: bool = False
    autocast: object = contextlib.nullcontext
    keep: Optional[set] = None  # micro-batches whose results count (eval pads the last round); None: all
    lm_sum: float = 0.0
    aux_sum: float = 0.0
    loss_tokens: float = 0.0
    loads: dict = field(default_factory=dict)  # layer index -> [E] fp64 expert loads summed over micro-batches
    _seqs: dict = field(default_factory=dict)

    def micro_batch(self, i: int):
        """(input_ids, labels, PackedSequence) of micro-batch i, the sequence built once for all local stages."""
        x = self.inputs[i]
        if i not in self._seqs:
            ids = x["input_ids"]
            if "seq" in x:
                self._seqs[i] = x["seq"]
            else:
                b, t = ids.shape
                self._seqs[i] = PackedSequence.build(b, t, ids.device, x.get("cu_seqlens"), x.get("position_ids"))
        return x["input_ids"], x["labels"], self._seqs[i]

    def record(self, spec: StageSpec, i: int, out) -> None:
        if self.keep is not None and i not in self.keep:
            return
        if out.expert_load is not None:
            for j, layer in enumerate(spec.layers):
                el = out.expert_load[j].double()
                self.loads[layer] = el if layer not in self.loads else self.loads[layer] + el
        if spec.is_last:
            self.lm_sum += out.lm_loss_sum.detach().double()
            self.aux_sum += out.aux_loss.detach().double()
            self.loss_tokens += out.num_loss_tokens.detach().double()


class PipelineStageModule(nn.Module):
    """One pipeline stage: the owner's layers of `spec` (shared modules), the embedding if it is the first
    stage, the final norm and lm_head if it is the last. forward(*activations, mb) -> (hidden, stats), or
    the micro-batch's scaled loss on the last stage (what the schedule back-propagates)."""

    def __init__(self, owner: MiniMaxForCausalLM, spec: StageSpec, boundary_dtype: torch.dtype):
        super().__init__()
        self.spec = spec
        held = owner.model.decoder_layers()
        self.layers = nn.ModuleList(held[i] for i in spec.layers)
        self.embed_tokens = owner.model.embed_tokens if spec.is_first else None
        self.norm = owner.model.norm if spec.is_last else None
        self.lm_head = owner.lm_head if spec.is_last else None
        self._owner = (owner,)  # not a submodule: this stage's parameters() must be its own only
        self.boundary_dtype = boundary_dtype
        self.step: Optional[PipelineStep] = None  # set by PipelineRunner before each schedule run

    def forward(self, *activations, mb: torch.Tensor):
        step, spec = self.step, self.spec
        i = int(mb.reshape(-1)[0])
        ids, labels, seq = step.micro_batch(i)
        inputs = ids if spec.is_first else activations
        with step.autocast():
            out = self._owner[0].forward_stage(
                spec.layers, inputs, seq, first=spec.is_first, last=spec.is_last, labels=labels
            )
        step.record(spec, i, out)
        if not spec.is_last:
            return out.hidden.to(self.boundary_dtype), out.stats
        loss = out.lm_loss_sum.float() * step.loss_scale + step.aux_scale * out.aux_loss.float()
        return loss * float("nan") if step.inject_nan else loss


def _identity_loss(output, target):
    return output


class PipelineModel:
    """This rank's part of a pipelined model: the owner (names, checkpoints, optimiser) and its stages."""

    def __init__(self, owner: MiniMaxForCausalLM, stages: list[PipelineStageModule], mesh: ParallelMesh, tokens: int):
        self.owner, self.modules, self.mesh = owner, stages, mesh
        self.cfg = mesh.cfg
        self._tokens = tokens  # residual-stream rows of one micro-batch on this rank
        self._stages = None
        self._schedules: dict[int, object] = {}
        self._last = None  # (micro-batches, train) of the last run

    def _pipeline_stages(self):
        if self._stages is None:
            from torch.distributed.pipelining import PipelineStage

            c = self.owner.config
            e, meta = c.num_local_experts, "meta"
            hidden = torch.empty(self._tokens, c.hidden_size, dtype=self.modules[0].boundary_dtype, device=meta)
            acts = (hidden.requires_grad_(), torch.empty(2 * e + 1, device=meta).requires_grad_())
            self._stages = []
            for mod in self.modules:
                spec = mod.spec
                inputs = (torch.zeros(1, dtype=torch.long),) if spec.is_first else acts
                outputs = (torch.empty((), device=meta).requires_grad_(),) if spec.is_last else acts
                self._stages.append(
                    PipelineStage(
                        mod,
                        spec.index,
                        spec.num_stages,
                        self.mesh.device,
                        input_args=inputs,
                        output_args=outputs,
                        group=self.mesh.pp_group,
                    )
                )
        return self._stages

    def schedule(self, micro_batches: int):
        """The torch schedule of parallel.pp_schedule for this many micro-batches (one per batch size)."""
        if micro_batches not in self._schedules:
            from torch.distributed.pipelining import schedules

            name, per_rank, _ = SCHEDULES[self.cfg.pp_schedule]
            cls = getattr(schedules, name)
            stages = self._pipeline_stages()
            self._schedules[micro_batches] = cls(
                stages[0] if per_rank == 1 else stages,
                n_microbatches=micro_batches,
                loss_fn=_identity_loss,
                scale_grads=False,  # the loss is already scaled (PipelineStep.loss_scale / aux_scale)
            )
        return self._schedules[micro_batches]

    def run(self, step: PipelineStep, train: bool = True, micro_batches: Optional[int] = None) -> PipelineStep:
        """One schedule run over step.inputs (forward and backward, or forward only)."""
        m = micro_batches or len(step.inputs)
        for mod in self.modules:
            mod.step = step
        idx = torch.arange(m, dtype=torch.long)
        sched = self.schedule(m)
        if self._last is not None and self._last != (m, train):
            # the stages are shared by the schedules of every micro-batch count and by evaluation: a schedule
            # sets their buffers up for its own count on its first run only, so make it do that again
            for flag in ("_stage_forward_initialized", "_stage_backward_initialized",
                         "_stages_forward_initialized", "_stages_backward_initialized"):  # fmt: skip
                if hasattr(sched, flag):
                    setattr(sched, flag, False)
        self._last = (m, train)
        try:
            if train:
                sched.step(idx, target=idx, mb=idx, return_outputs=False)
            else:
                sched.eval(idx, target=idx, mb=idx, return_outputs=False)
        finally:
            for mod in self.modules:
                mod.step = None
        if not train:
            from torch.distributed.fsdp import FSDPModule

            for mod in self.modules:  # forward-only leaves the roots' parameters gathered
                if isinstance(mod, FSDPModule):
                    mod.reshard()
        return step

    def expert_load(self, num_layers: int, num_experts: int, step: PipelineStep) -> torch.Tensor:
        """[layers, experts] fp64 loads of the layers this rank ran (zeros elsewhere): sum it over pp."""
        load = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=self.mesh.device)
        for layer, el in step.loads.items():
            load[layer] = el
        return load


def boundary_tokens(mesh: ParallelMesh, micro_batch_size: int, seq_len: int) -> int:
    """Rows of the residual stream between two stages on this rank (its cp share, its tp share under SP)."""
    n = micro_batch_size * seq_len // mesh.layout.cp
    return n // mesh.layout.tp if mesh.cfg.sequence_parallel else n


def build_pipeline(
    cfg: ModelConfig,
    mesh: ParallelMesh,
    source: WeightSource,
    *,
    micro_batch_size: int,
    seq_len: int,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = torch.float32,
    memory: Optional[dict] = None,
    boundary_dtype: torch.dtype = torch.float32,
) -> PipelineModel:
    """This rank's stages of `cfg` on `mesh` (parallel.pp > 1), each FSDP2-sharded over dp x cp, with only
    its own layers materialised on mesh.device and filled from `source` (as parallelize.build_model)."""
    from .parallelize import _reduce_expert_grads

    with torch.device("meta"):
        owner = MiniMaxForCausalLM(cfg, model_parts(mesh, cfg), seed=None)
    owner.set_memory_options(**(memory or {}))
    specs = [s for s in pipeline_stages(mesh.cfg, cfg.num_hidden_layers) if s.rank == mesh.pp_rank]
    stages = [PipelineStageModule(owner, s, boundary_dtype) for s in specs]
    ignored, divide_hooks = None, None
    if uses_expert_parallel(mesh.layout):
        ignored, divide_hooks = _reduce_expert_grads(owner, mesh, mesh.cfg.sequence_parallel, param_dtype, reduce_dtype)
    if mesh.grad_reduce_size > 1:
        for mod in stages:
            apply_fsdp(mod, mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype, ignored_params=ignored)
    owner.to_empty(device=mesh.device)
    fill_parameters(owner, source)
    if divide_hooks is not None:
        divide_hooks()
    return PipelineModel(owner, stages, mesh, boundary_tokens(mesh, micro_batch_size, seq_len))


__all__ = ["PipelineModel", "PipelineStageModule", "PipelineStep", "boundary_tokens", "build_pipeline"]
