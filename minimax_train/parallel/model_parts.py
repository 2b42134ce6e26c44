"""The parts one layout gives the model (model/parts.py's slots), composed from the mesh in one place:
tensor (+ sequence) parallelism decides the parameters' placements and the sublayers' entry/exit, context
parallelism the attention cores and the statistics reducer, expert parallelism the experts and the
dispatcher. `model_parts(mesh)` is all the trainer calls; the model is then built with them on the meta
device (parallelize.build_model)."""

from __future__ import annotations

from torch.distributed.tensor import Shard

from ..model.config import ModelConfig
from ..model.moe import LocalDispatcher, Router
from ..model.parts import DecayRates, Linear, LocalLightningCore, LocalSoftmaxCore, ModelParts, ModelShare, RMSNorm
from .context_parallel import CPStatsReducer
from .lasp import LaspCore
from .layout import experts_follow_tp, uses_expert_parallel
from .mesh import ParallelMesh
from .ring_attention import RingAttentionCore
from .tensor_parallel import (
    SequenceParallelStats,
    TPDispatcher,
    TPExperts,
    TPRegion,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    local,
    replicated_parameter,
    sharded_parameter,
)


class ParallelParts(ModelParts):
    """The slots of model/parts.py for one rank of `mesh` (and model config `cfg`)."""

    def __init__(self, mesh: ParallelMesh, cfg: ModelConfig):
        self.mesh, self.cfg, self.pcfg = mesh, cfg, mesh.cfg
        L = mesh.layout
        self.tp = TPRegion(mesh.device_mesh["tp"], mesh.cfg.sequence_parallel) if L.tp > 1 else None
        self.cp_group = mesh.cp_group if L.cp > 1 else None
        self.experts_follow_tp = experts_follow_tp(L)
        self.expert_parallel = uses_expert_parallel(L)
        self._expert_groups = None
        heads = cfg.num_attention_heads // L.tp
        self.h0, self.h1 = mesh.tp_rank * heads, (mesh.tp_rank + 1) * heads

    # ---- tensor parallelism: placements and entry/exit ------------------------------------------------
    def embedding(self, vocab, hidden):
        return VocabParallelEmbedding(vocab, hidden, self.tp) if self.tp else super().embedding(vocab, hidden)

    def lm_head(self, hidden, vocab):
        return VocabParallelLMHead(hidden, vocab, self.tp) if self.tp else super().lm_head(hidden, vocab)

    def residual_norm(self, dim, eps):
        if not self.tp:
            return super().residual_norm(dim, eps)
        return RMSNorm(dim, eps, weight=replicated_parameter((dim,), self.tp, ones=True), view=self.tp.replicated)

    def head_norm(self, dim, eps):
        if not self.tp:
            return super().head_norm(dim, eps)
        weight = sharded_parameter((dim,), self.tp.mesh, [Shard(0)], ones=True)
        return RMSNorm(dim, eps, weight=weight, view=local, reduce_sum=self.tp.sum_over_heads)

    def linear(self, in_features, out_features, role):
        base = super().linear(in_features, out_features, role)  # validates the role
        if not self.tp:
            return base
        shape = (out_features, in_features)
        if role == "row":
            return Linear(in_features, out_features, sharded_parameter(shape, self.tp.mesh, [Shard(1)]), local)
        kv, heads = self.cfg.num_key_value_heads, self.cfg.num_attention_heads
        if role == "kv" and kv % self.tp.size:  # fewer KV heads than ranks: each uses its query heads' KV head
            head, d = self.h0 // (heads // kv), self.cfg.head_dim
            weight = replicated_parameter(shape, self.tp)
            return Linear(in_features, out_features, weight, self.tp.kv_rows((head * d, (head + 1) * d)))
        return Linear(in_features, out_features, sharded_parameter(shape, self.tp.mesh, [Shard(0)]), local)

    def region(self):
        return self.tp if self.tp else super().region()

    # ---- context parallelism: the attention cores ------------------------------------------------------
    def softmax_core(self, cfg, layer_idx):
        return RingAttentionCore(self.cp_group) if self.cp_group else LocalSoftmaxCore()

    def lightning_core(self, cfg, layer_idx):
        decays = DecayRates(cfg, layer_idx, self.h0, self.h1)  # this rank's heads
        if self.cp_group:
            return LaspCore(decays, self.cp_group, block_size=cfg.block_size, mode=self.pcfg.lasp)
        return LocalLightningCore(decays, cfg.block_size)

    def aux_stats(self):
        return CPStatsReducer(self.cp_group) if self.cp_group else super().aux_stats()

    # ---- pipeline parallelism: the layers of this rank's stages ----------------------------------------------
    def share(self, cfg):
        if self.mesh.layout.pp == 1:
            return super().share(cfg)
        from .pipeline_layout import pipeline_stages

        mine = [s for s in pipeline_stages(self.pcfg, cfg.num_hidden_layers) if s.rank == self.mesh.pp_rank]
        layers = tuple(sorted(i for s in mine for i in s.layers))
        return ModelShare(layers, embedding=any(s.is_first for s in mine), head=any(s.is_last for s in mine))

    # ---- experts --------------------------------------------------------------------------------------------
    def router(self, cfg):
        if not self.tp:
            return super().router(cfg)
        weight = replicated_parameter((cfg.num_local_experts, cfg.hidden_size), self.tp)
        return Router(cfg, weight=weight, view=self.tp.replicated)

    def _groups(self):
        if self._expert_groups is None:  # built once: the flattened ep x etp group is a collective
            from .expert_parallel import expert_groups

            self._expert_groups = expert_groups(self.mesh)
        return self._expert_groups

    def experts(self, cfg):
        if self.experts_follow_tp:
            return TPExperts(cfg, self.tp)
        if self.expert_parallel:
            from .expert_parallel import ExpertParallelExperts

            return ExpertParallelExperts(cfg, self._groups())
        return super().experts(cfg)

    def dispatcher(self, cfg):
        local_dispatch = LocalDispatcher(cfg.moe_routing, cfg.capacity_factor)
        if self.experts_follow_tp:
            return TPDispatcher(self.tp, local_dispatch)
        if not self.expert_parallel:
            return local_dispatch
        from .moe_dispatch import AllToAllDispatcher

        inner = AllToAllDispatcher(
            self._groups(),
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            cfg.moe_routing,
            cfg.capacity_factor,
            self.pcfg.moe_overlap_chunks,
        )
        return SequenceParallelStats(self.tp, inner) if (self.tp and self.tp.sequence_parallel) else inner


def model_parts(mesh: ParallelMesh, cfg: ModelConfig) -> ModelParts:
    """The parts of this rank's layout: the plain one-process parts for a world of one."""
    return ModelParts() if mesh.world_size == 1 else ParallelParts(mesh, cfg)


__all__ = ["ParallelParts", "model_parts"]
