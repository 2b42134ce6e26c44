"""Tensor parallelism (Megatron style), optionally with sequence parallelism: the parts a tp layout gives
the model at construction (parallel/model_parts.py composes them).

Layout over the P ranks of the tp mesh. Every parameter is a DTensor on that mesh with its single-process
(transformers) shape, so a DCP checkpoint reshards to any tp, to tp=1 and to FSDP-only layouts, and FSDP2
composes over the other mesh dims:

    embed_tokens, lm_head           Shard(0)  vocabulary rows (vocab_parallel.py); the loss is a
                                              vocabulary-parallel cross-entropy, logits never gathered
    lightning qkv_proj              Shard(0)  rows are head-major (q_i, k_i, v_i): whole heads per rank
    lightning output_gate, norm     Shard(0)  head-major features; the norm's mean of squares is summed
                                              over the tp group; the layer's decays are this rank's heads'
    lightning out_proj, o_proj      Shard(1)  row-parallel: partial sums, reduced on the way out
    softmax q_proj                  Shard(0)  query heads
    softmax k_proj, v_proj          Shard(0)  if P divides the KV heads, else Replicate (P % kv == 0):
                                              each rank uses the KV head its query heads read
    experts gate_up_proj            Shard(1)  of [gate; up] (2I rows), when the experts follow tp (ep = 1,
                                              etp = tp); pair_gate_up exchanges columns so rank r computes
                                              act(gate_r) * up_r
    experts down_proj               Shard(2)  columns I_r; partial sums, reduced on the way out
    norms, router                   Replicate

(Megatron keeps [gate_r; up_r] contiguous per rank instead: no Shard placement describes that and DCP
rejects it, hence the exchange: one all-to-all of N_routed x 2I/P per MoE layer and direction.)

Activations: with sequence_parallel, the residual stream between the attention/MoE blocks is split along
the packed tokens ([T/P, H] per rank, rank r holding tokens [r*T/P, (r+1)*T/P)): each block all-gathers
its input and reduce-scatters its output (TPRegion); without it, the residual stream is replicated and
blocks all-reduce their output. Replicated parameters that see only a sequence shard (the norms and the
router under SP) all-reduce their gradients over tp in backward (TPRegion.replicated). The router runs on
the tokens of the residual stream; its outputs are all-gathered so every tp rank routes all tokens
identically and the load-balancing statistics are those of all tokens: aux_loss and expert_load equal the
single-process values on every tp rank.

Loss contract: every tp rank passes the same micro-batch. out.lm_loss_sum is the sum over ALL the
micro-batch's loss tokens and out.num_loss_tokens their count, identical on every tp rank (the
cross-entropy all-reduces per-token statistics, never logits). Do not sum them over tp; gradients come out
right on every rank (Megatron's convention: a tensor replicated over tp carries its full gradient).
LMHead.forward gives the full [T, V] logits on every rank (all-gathered).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from ..model.moe import Experts, RouterOutput
from ..model.parts import LMHead, Region
from ..ops.cross_entropy import chunked_loss_sum
from ..ops.experts import grouped_linear, to_autocast, use_grouped_mm
from .collectives import (
    all_reduce_sum,
    copy_to_tp,
    gather_last_dim,
    gather_seq,
    gather_seq_two_ways,
    pair_gate_up,
    reduce_from_tp,
    scatter_seq,
)
from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_embedding, vocab_range


def local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank computes with: a DTensor's local shard, or the tensor itself."""
    return p.to_local() if isinstance(p, DTensor) else p


def sharded_parameter(shape: tuple[int, ...], mesh, placements: list[Placement], *, ones: bool = False) -> nn.Parameter:
    """An uninitialised parameter of logical `shape` sharded on `mesh` (on the current default device, e.g.
    meta): only this rank's local part is allocated. Sharded dims must divide evenly (the layout module
    checks every model dim a layout splits before any process group exists)."""
    local_shape = list(shape)
    for mesh_dim, pl in enumerate(placements):
        if isinstance(pl, Shard):
            n = mesh.size(mesh_dim)
            if local_shape[pl.dim] % n:
                raise ValueError(f"cannot shard dim {pl.dim} of {tuple(shape)} evenly over {n} ranks")
            local_shape[pl.dim] //= n
    t = torch.ones(local_shape) if ones else torch.empty(local_shape)
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return nn.Parameter(DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride))


class TPRegion(Region):
    """The tp group as a sublayer sees it: enter with all tokens, exit with the sum of partial outputs."""

    def __init__(self, mesh, sequence_parallel: bool):
        self.mesh, self.group = mesh, mesh.get_group()
        self.size, self.rank = mesh.size(), mesh.get_local_rank()
        self.sequence_parallel = sequence_parallel

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream -> all tokens, replicated (SP: all-gather; else identity with all-reduce backward)."""
        if self.sequence_parallel:
            return gather_seq(x, self.group)
        return copy_to_tp(x, self.group)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        """Per-rank partial sums over all tokens -> residual stream (SP: reduce-scatter; else all-reduce)."""
        if self.sequence_parallel:
            if x.shape[0] % self.size:
                raise ValueError(
                    f"sequence parallelism needs the micro-batch's tokens (B*T={x.shape[0]}) to be a "
                    f"multiple of tp={self.size}"
                )
            return scatter_seq(x, self.group)
        return reduce_from_tp(x, self.group)

    def replicated(self, p: torch.Tensor) -> torch.Tensor:
        """Local value of a Replicate parameter used on the residual stream: under SP each rank sees only its
        token shard, so the gradient is summed over tp in backward."""
        w = local(p)
        return copy_to_tp(w, self.group) if self.sequence_parallel else w

    def kv_rows(self, rows: tuple[int, int]):
        """A view taking rows [a, b) of a Replicate weight (the KV head this rank's query heads read); the
        gradient of the whole weight is summed over tp."""
        a, b = rows

        def view(p: torch.Tensor) -> torch.Tensor:
            return copy_to_tp(local(p), self.group)[a:b]

        return view

    def sum_over_heads(self, t: torch.Tensor) -> torch.Tensor:
        """A per-token sum over this rank's features, completed over all ranks' (forward and backward)."""
        return all_reduce_sum(t, self.group)


class VocabParallelEmbedding(nn.Module):
    """This rank's vocabulary rows, zeros elsewhere, summed over tp (reduce-scattered under SP)."""

    def __init__(self, vocab: int, hidden: int, region: TPRegion):
        super().__init__()
        self.region = region
        self.vocab_start, _ = vocab_range(vocab, region.rank, region.size)
        self.weight = sharded_parameter((vocab, hidden), region.mesh, [Shard(0)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.region.exit(vocab_parallel_embedding(input_ids, local(self.weight), self.vocab_start))


class VocabParallelLMHead(LMHead):
    """Vocabulary-parallel lm_head: forward gives the FULL logits (all-gathered: evaluation, export);
    loss_sum keeps the logits sharded (a vocabulary-parallel cross-entropy per chunk)."""

    def __init__(self, hidden: int, vocab: int, region: TPRegion):
        super().__init__(hidden, vocab, weight=sharded_parameter((vocab, hidden), region.mesh, [Shard(0)]))
        self.region = region
        self.vocab_start, _ = vocab_range(vocab, region.rank, region.size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(F.linear(self.region.enter(hidden), local(self.weight)), self.region.group)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        hidden = self.region.enter(hidden)  # all the micro-batch's tokens (SP: all-gathered once, not per chunk)
        weight = local(self.weight)
        group = self.region.group

        def loss_fn(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_cross_entropy(F.linear(h, weight), y, self.vocab_start, group).sum()

        # every tp rank holds the same labels, hence the same chunks: the collectives inside line up
        return chunked_loss_sum(hidden.reshape(labels.numel(), -1), labels, loss_fn, chunk_tokens)


class TPExperts(Experts):
    """Expert tensor parallelism with etp = tp: [N, H] tokens (all of them, sorted by expert) -> this rank's
    partial sum of every expert's output over its I/P slice of the intermediate features."""

    def __init__(self, cfg, region: TPRegion):
        e, i, h = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        super().__init__(
            cfg,
            gate_up=sharded_parameter((e, 2 * i, h), region.mesh, [Shard(1)]),
            down=sharded_parameter((e, h, i), region.mesh, [Shard(2)]),
        )
        self.region = region

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, counts_cpu: list[int] | None = None):
        (x_sorted,) = to_autocast(x_sorted)
        grouped = use_grouped_mm(x_sorted)
        sizes = None if grouped else (counts_cpu if counts_cpu is not None else counts.tolist())
        h = grouped_linear(x_sorted, counts, local(self.gate_up_proj), sizes)
        g, u = pair_gate_up(h, self.region.group).chunk(2, dim=-1)
        return grouped_linear(self.act(g) * u, counts, local(self.down_proj), sizes)


def _pack_route(r: RouterOutput) -> torch.Tensor:
    return torch.cat([r.weights, r.probs, r.logits.float(), r.experts.float()], dim=-1)


def _unpack_route(t: torch.Tensor, k: int, e: int, logits_dtype) -> RouterOutput:
    w, p, lg, ex = t.split([k, e, e, k], dim=-1)
    return RouterOutput(logits=lg.to(logits_dtype), probs=p, weights=w, experts=ex.round().long())


class TPDispatcher:
    """The MoE block when the experts follow tp: the route of the residual stream's tokens is made that of
    all tokens on every tp rank, `inner` (the local dispatcher) runs TPExperts on all tokens, the partial
    outputs leave through the region. Returns the route of ALL tokens for the load-balancing statistics
    (their gradient is the full one on every rank, so each rank keeps its own tokens' share in backward)."""

    def __init__(self, region: TPRegion, inner):
        self.region, self.inner = region, inner

    def __call__(self, x: torch.Tensor, local_route: RouterOutput, experts):
        tp = self.region
        if tp.sequence_parallel:
            x_all = gather_seq(x, tp.group)
            k, e = local_route.weights.shape[1], local_route.probs.shape[1]
            for_dispatch, for_stats = gather_seq_two_ways(_pack_route(local_route), tp.group)
            route, stats_route = (_unpack_route(t, k, e, local_route.logits.dtype) for t in (for_dispatch, for_stats))
        else:
            x_all = copy_to_tp(x, tp.group)
            route = RouterOutput(
                logits=copy_to_tp(local_route.logits, tp.group),
                probs=copy_to_tp(local_route.probs, tp.group),
                weights=copy_to_tp(local_route.weights, tp.group),
                experts=local_route.experts,
            )
            stats_route = local_route
        out, _, stats = self.inner(x_all, route, experts)
        return tp.exit(out), stats_route, stats

    def __repr__(self) -> str:
        return f"TPDispatcher({self.inner!r}, sequence_parallel={self.region.sequence_parallel})"


class SequenceParallelStats:
    """Experts owned by expert parallelism under sequence parallelism: `inner` (the all-to-all dispatcher)
    runs on this rank's token shard; the route returned for the load-balancing statistics and the expert
    load are made those of all the micro-batch's tokens (identical on every tp rank)."""

    def __init__(self, region: TPRegion, inner):
        self.region, self.inner = region, inner

    def __call__(self, x: torch.Tensor, route: RouterOutput, experts):
        tp = self.region
        out, local_route, stats = self.inner(x, route, experts)
        k, e = local_route.weights.shape[1], local_route.probs.shape[1]
        _, for_stats = gather_seq_two_ways(_pack_route(local_route), tp.group)
        stats = dict(stats)
        for key in ("tokens_per_expert", "dropped"):
            if key in stats:
                stats[key] = reduce_from_tp(stats[key].detach(), tp.group)
        return out, _unpack_route(for_stats, k, e, local_route.logits.dtype), stats

    def __repr__(self) -> str:
        return f"SequenceParallelStats({self.inner!r})"


def replicated_parameter(shape: tuple[int, ...], region: TPRegion, *, ones: bool = False) -> nn.Parameter:
    return sharded_parameter(shape, region.mesh, [Replicate()], ones=ones)


__all__ = [
    "local",
    "sharded_parameter",
    "replicated_parameter",
    "TPRegion",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "TPExperts",
    "TPDispatcher",
    "SequenceParallelStats",
]
