"""Chunked LM loss: the [tokens, vocab] logits never exist for all tokens at once.

    total = chunked_loss_sum(hidden, labels, loss_fn, chunk_tokens)

splits the N tokens into chunks of `chunk_tokens` and sums loss_fn(hidden_chunk, labels_chunk) (a scalar
sum over the chunk, e.g. lm_head + cross-entropy). Under autograd each chunk runs inside a non-reentrant
activation checkpoint, which keeps only the chunk's inputs: its logits are recomputed in backward, one
chunk at a time, so the peak is one chunk's logits + their gradient instead of all tokens' (cost: one
more lm_head forward GEMM per token). Without grad (evaluation) the chunks simply run one after another.

loss_fn may contain collectives (the vocabulary-parallel cross-entropy): the chunk count depends only on
N, so every rank that sees the same N runs the same chunks, forward and recompute, in the same order.
Chunks whose labels are all -100 contribute 0 with a zero gradient (reduction="sum" semantics).

On CUDA, `fused_linear_cross_entropy_sum` is the same sum through Liger-Kernel's fused linear
cross-entropy (chunked lm_head GEMM + an in-place Triton softmax/gradient kernel, gradients computed in
forward): no fp32 logits, no log_softmax tensors, no recomputed lm_head GEMM."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def chunked_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn, chunk_tokens: int) -> torch.Tensor:
    """sum_c loss_fn(hidden[c], labels[c]) over chunks c of `chunk_tokens` tokens; hidden [N, H], labels [N].
    chunk_tokens <= 0 or N <= chunk_tokens: loss_fn(hidden, labels) itself (the unchunked path)."""
    n = labels.shape[0]
    if hidden.shape[0] != n:
        raise ValueError(f"chunked_loss_sum: hidden has {hidden.shape[0]} tokens, labels {n}")
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return loss_fn(hidden, labels)
    # split (not slicing): one SplitBackward concatenates the chunks' gradients, instead of one full-size
    # zero-filled [N, H] gradient per chunk
    pieces = zip(hidden.split(chunk_tokens), labels.split(chunk_tokens))
    if not torch.is_grad_enabled():
        return sum(loss_fn(h, y) for h, y in pieces)
    total = None
    for h, y in pieces:
        part = checkpoint(loss_fn, h, y, use_reentrant=False, preserve_rng_state=False)
        total = part if total is None else total + part
    return total


@functools.cache  # one import attempt per process, not one per micro-batch
def liger_linear_cross_entropy():
    """Liger-Kernel's fused linear cross-entropy, or None where it does not import (CPU machines)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def fused_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over labels != -100 of the fp32 token cross-entropy of hidden [N, H] @ weight [V, H]^T (Liger)."""
    from .experts import to_autocast

    fused = require_liger("the fused linear cross-entropy (train.loss_kernel=chunked does without)")
    # the weight in the matmul dtype once (autocast would cast it again for every chunk); gradients of the
    # weight accumulate in fp32 over the chunks whatever the parameter dtype
    hidden, weight = to_autocast(hidden, weight)
    # chunk_mem_const=4: 4 * H * N / V tokens per chunk (4096 of a 16K-token micro-batch at H 2048, V 32K)
    return fused(
        hidden, weight, labels, ignore_index=-100, reduction="sum", accum_dtype=torch.float32, chunk_mem_const=4
    )


def require_liger(feature: str):
    """liger_linear_cross_entropy(), or a MissingExtraError naming the extra that installs it."""
    from minimax_train.errors import import_extra

    return (
        liger_linear_cross_entropy()
        or import_extra("liger_kernel.transformers.functional", "cuda", feature).liger_fused_linear_cross_entropy
    )


LOSS_KERNELS = ("auto", "chunked", "liger")

__all__ = [
    "LOSS_KERNELS",
    "chunked_loss_sum",
    "fused_linear_cross_entropy_sum",
    "liger_linear_cross_entropy",
    "require_liger",
]
