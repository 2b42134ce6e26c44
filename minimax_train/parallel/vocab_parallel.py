"""Vocabulary parallelism: embedding and lm_head sharded by vocabulary rows over the tp group, and a
cross-entropy that never gathers the full logits (Megatron's vocab_parallel_cross_entropy).

Rank r of P holds vocabulary rows [r*V/P, (r+1)*V/P) of embed_tokens.weight and lm_head.weight (one
Shard(0) DTensor each; the same Parameter when the embeddings are tied)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import group_size


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    if vocab_size % world:
        raise ValueError(f"vocab_size={vocab_size} is not divisible by tp={world}")
    per = vocab_size // world
    return rank * per, (rank + 1) * per


def vocab_parallel_embedding(ids: torch.Tensor, weight_local: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Rows of this rank's vocabulary slice; zeros for ids owned by other ranks (a partial sum over tp)."""
    local = ids - vocab_start
    outside = (local < 0) | (local >= weight_local.shape[0])
    e = F.embedding(local.masked_fill(outside, 0), weight_local)
    return e.masked_fill(outside[..., None], 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocabulary-sharded fp32 logits [T, V/P]; ignore_index -100 gives 0.

    Forward: all-reduce(max) of the row maxima, then one all-reduce(sum) of (target logit, sum of exps).
    Backward: softmax_local - onehot_local, times the incoming per-token gradient (no communication)."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
        n_local = logits.shape[-1]
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        z = logits - row_max[:, None]
        valid = labels != -100
        local = labels - vocab_start
        mine = valid & (local >= 0) & (local < n_local)
        idx = local.clamp(0, n_local - 1)
        target = z.gather(1, idx[:, None]).squeeze(1) * mine
        e = z.exp()
        stats = torch.stack([target, e.sum(dim=-1)])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        target, sum_exp = stats[0], stats[1]
        loss = (torch.log(sum_exp) - target) * valid
        e.div_(sum_exp[:, None])  # the local part of the softmax, kept for backward
        ctx.save_for_backward(e, idx, mine, valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, idx, mine, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(1, idx[:, None], -mine.to(grad.dtype)[:, None])
        grad.mul_((g * valid)[:, None])
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor, labels: torch.Tensor, vocab_start: int, group
) -> torch.Tensor:
    """Per-token losses [T] (fp32, 0 where labels == -100), identical on every tp rank."""
    logits_local = logits_local.float()
    if group_size(group) == 1:
        return F.cross_entropy(logits_local, labels, ignore_index=-100, reduction="none")
    return _VocabParallelCrossEntropy.apply(logits_local, labels, vocab_start, group)


__all__ = ["vocab_range", "vocab_parallel_embedding", "vocab_parallel_cross_entropy"]
