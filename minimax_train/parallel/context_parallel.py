"""Context parallelism: million-token rows split over the cp ranks of the mesh, one layout for both layers.

    ids, labels, seq = shard_for_context_parallel(batch.input_ids, batch.labels, batch.cu_seqlens,
                                                  mesh.cp_rank, mesh.cp_size, batch.position_ids)
    apply_context_parallel(model, mesh.cp_group)          # once, after building (and TP-sharding) the model
    out = model(ids, labels=labels, seq=seq)

- cp_shard.py: the zigzag shard (2*cp chunks per row, rank r keeps r and 2cp-1-r), local cu_seqlens,
  global doc ids / causal positions, per-document RoPE positions; no document padding.
- lasp.py: LASP+ for lightning layers (one all-gather of per-chunk affine state summaries).
- ring_attention.py: varlen ring attention for softmax layers (K/V rotation, lse merge, dK/dV ring).

Losses: out.lm_loss_sum and out.num_loss_tokens are this rank's shares (its local labels); sum both over
the cp group (and dp) for the row's loss. The aux loss is already the whole row's: apply_context_parallel
sets model.model.aux_stats_group = cp_group, so the load-balancing statistics are summed (differentiably)
over the cp ranks before the loss. Gradients: every cp rank holds the same weights; dense gradients are
summed/averaged over dp x cp (mesh.dp_cp_group, what FSDP does); see cp_loss_for_backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.attention import LightningAttention, SoftmaxAttention
from .cp_shard import (
    CPPackedSequence,
    CPShardInfo,
    build_cp_sequence,
    shard_for_context_parallel,
    unshard_from_context_parallel,
    zigzag_chunks,
    zigzag_token_index,
)
from .data_parallel import decoder_layers
from .lasp import LaspCore, lasp_attention
from .ring_attention import RingAttentionCore, build_ring_plan, ring_attention


def apply_context_parallel(
    model: nn.Module,
    cp_group,
    *,
    lasp: str = "plus",
    attention_backend: str = "auto",
    ring_backward: str = "auto",
    lightning_backend: str = "auto",
) -> nn.Module:
    """Install the context-parallel cores on every attention layer (in place) and make the aux loss sum its
    statistics over cp_group. Works before or after tensor parallelism / FSDP wrapping (only the `.core`
    attribute of each attention module changes). lasp: "plus" (LASP+) or "serial" (the LASP baseline).
    The model then expects CPPackedSequence inputs (shard_for_context_parallel); a plain PackedSequence
    still runs locally (e.g. evaluation on the full row)."""
    for layer in decoder_layers(model):
        attn = layer.self_attn
        if isinstance(attn, LightningAttention) or hasattr(attn, "slopes"):
            attn.core = LaspCore(cp_group, mode=lasp, backend=lightning_backend)
        elif isinstance(attn, SoftmaxAttention) or hasattr(attn, "core"):
            attn.core = RingAttentionCore(cp_group, backend=attention_backend, backward=ring_backward)
        else:
            raise ValueError(f"apply_context_parallel: unknown attention module {type(attn).__name__}")
    getattr(model, "model", model).aux_stats_group = cp_group
    return model


def shard_batch(batch, cp_rank: int, cp_size: int):
    """shard_for_context_parallel for a PackedBatch-like object (input_ids, labels, position_ids,
    cu_seqlens). Returns (local_input_ids, local_labels, seq)."""
    return shard_for_context_parallel(
        batch.input_ids,
        batch.labels,
        batch.cu_seqlens,
        cp_rank,
        cp_size,
        position_ids=getattr(batch, "position_ids", None),
    )


def cp_loss_for_backward(out, global_loss_tokens: float, grad_average_size: int, aux_coef: float) -> torch.Tensor:
    """The per-rank loss whose gradients, AVERAGED over grad_average_size ranks (dp x cp, as FSDP does),
    equal those of (sum of token losses) / global_loss_tokens + aux_coef * aux of the unsplit batch:
    lm_loss_sum * grad_average_size / global_loss_tokens + aux_coef * aux. (The aux term needs no cp
    factor: its all-reduce's backward already sums the cp ranks' gradients onto each rank.)"""
    return out.lm_loss_sum.float() * (grad_average_size / global_loss_tokens) + aux_coef * out.aux_loss.float()


def reduce_loss_over_cp(
    lm_loss_sum: torch.Tensor, num_loss_tokens: torch.Tensor, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, loss tokens) of the whole row: both summed over the cp group (detached)."""
    t = torch.stack([lm_loss_sum.detach().double(), num_loss_tokens.detach().double()])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t[0], t[1]


__all__ = [
    "apply_context_parallel",
    "shard_for_context_parallel",
    "shard_batch",
    "unshard_from_context_parallel",
    "build_cp_sequence",
    "CPPackedSequence",
    "CPShardInfo",
    "LaspCore",
    "RingAttentionCore",
    "lasp_attention",
    "ring_attention",
    "build_ring_plan",
    "cp_loss_for_backward",
    "reduce_loss_over_cp",
    "zigzag_chunks",
    "zigzag_token_index",
]
