"""Context parallelism: million-token rows split over the cp ranks of the mesh, one layout for both layers.

    ids, labels, seq = shard_for_context_parallel(batch.input_ids, batch.labels, batch.cu_seqlens,
                                                  mesh.cp_rank, mesh.cp_size, batch.position_ids)
    out = model(ids, labels=labels, seq=seq)   # a model built with the layout's parts (model_parts.py)

- cp_shard.py: the zigzag shard (2*cp chunks per row, rank r keeps r and 2cp-1-r), local cu_seqlens,
  global doc ids / causal positions, per-document RoPE positions; no document padding.
- lasp.py: LASP+ for lightning layers (one all-gather of per-chunk affine state summaries).
- ring_attention.py: varlen ring attention for softmax layers (K/V rotation, lse merge, dK/dV ring).

Losses: out.lm_loss_sum and out.num_loss_tokens are this rank's shares (its local labels); sum both over
the cp group (and dp) for the row's loss. The aux loss is already the whole row's: the layout's parts give
the model a CPStatsReducer, so the load-balancing statistics are summed (differentiably) over the cp ranks
before the loss. Gradients: every cp rank holds the same weights; dense gradients are
summed/averaged over dp x cp (mesh.dp_cp_group, what FSDP does); see cp_loss_for_backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_reduce_sum
from .cp_shard import (
    CPPackedSequence,
    CPShardInfo,
    build_cp_sequence,
    shard_for_context_parallel,
    unshard_from_context_parallel,
    zigzag_chunks,
    zigzag_token_index,
)
from .lasp import LaspCore, lasp_attention
from .ring_attention import RingAttentionCore, build_ring_plan, ring_attention


class CPStatsReducer:
    """The load-balancing statistics of the whole row: summed over the cp ranks that hold its chunks, in
    forward and backward (the aux loss of every rank then equals the unsplit one)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, counts, prob_sum, rows):
        rows_t = torch.tensor(float(rows), device=counts.device)
        return (
            all_reduce_sum(counts, self.group),
            all_reduce_sum(prob_sum, self.group),
            all_reduce_sum(rows_t, self.group),
        )


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
    "CPStatsReducer",
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
