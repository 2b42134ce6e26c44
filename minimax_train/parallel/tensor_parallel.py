"""Tensor parallelism (Megatron style), optionally with sequence parallelism, for MiniMaxForCausalLM.

Order in the trainer (every rank builds / loads the same full model first):

    tp_mesh = mesh.device_mesh["tp"]                 # ParallelMesh; tests: init_device_mesh("cpu", (P,))
    if ep == 1 and etp == tp:                        # experts tensor-parallel here (etp = tp)
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=sp)
    else:                                            # experts owned by expert_parallel.py
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=sp, experts=False)
        apply_expert_parallel(model, mesh)
    apply_context_parallel(model, mesh.cp_group)     # if cp > 1 (only swaps attention `.core`s)
    apply_fsdp(model, mesh)                          # FSDP2 over dp[_cp] of the same DeviceMesh, AFTER TP
    optimizer = ...                                  # after all wrapping: it must see the DTensor parameters

Layout over the P ranks of the tp mesh (every parameter becomes a DTensor on that mesh, so DCP reshards
checkpoints between layouts and FSDP2 composes over the other dims of the same DeviceMesh):

    embed_tokens, lm_head           Shard(0)  vocabulary rows (vocab_parallel.py); the loss is a
                                              vocabulary-parallel cross-entropy, logits never gathered
    lightning qkv_proj              Shard(0)  rows are head-major (q_i, k_i, v_i): whole heads per rank
    lightning output_gate, norm     Shard(0)  head-major features; the norm's mean of squares is summed
                                              over the tp group; `slopes` (a buffer) is sliced likewise
    lightning out_proj, o_proj      Shard(1)  row-parallel: partial sums, reduced on the way out
    softmax q_proj                  Shard(0)  query heads
    softmax k_proj, v_proj          Shard(0)  if P divides the KV heads, else Replicate (P % kv == 0):
                                              each rank uses the KV head its query heads read
    experts gate_up_proj            Shard(1)  of [gate; up] (2I rows); tp_ops.pair_gate_up exchanges
                                              columns so rank r computes act(gate_r) * up_r
    experts down_proj               Shard(2)  columns I_r; partial sums, reduced on the way out
    norms, router                   Replicate

Every parameter keeps its single-process (transformers) shape, so a DCP checkpoint reshards to any tp, to
tp=1 and to FSDP-only layouts. (Megatron keeps [gate_r; up_r] contiguous per rank instead: no Shard
placement describes that, DCP rejects it, hence the exchange: one all-to-all of N_routed x 2I/P per MoE
layer and direction.)

Activations: with sequence_parallel, the residual stream between the attention/MoE blocks is split along
the packed tokens ([T/P, H] per rank, rank r holding tokens [r*T/P, (r+1)*T/P)): each block all-gathers
its input and reduce-scatters its output; without it, the residual stream is replicated and blocks
all-reduce their output. Replicated parameters that see only a sequence shard (the norms and the router
under SP) all-reduce their gradients over tp in backward. The router runs on the tokens of the residual
stream (a shard under SP); its outputs are all-gathered so every tp rank routes all tokens identically,
the expert FFNs run expert-tensor-parallel (etp = tp) on all tokens, and the load-balancing statistics are
those of all tokens: aux_loss and expert_load equal the single-process values on every tp rank.

Loss contract: every tp rank passes the same micro-batch (input_ids, labels, cu_seqlens). out.lm_loss_sum
is the sum over ALL the micro-batch's loss tokens and out.num_loss_tokens their count, identical on every
tp rank (the cross-entropy all-reduces per-token statistics, never logits). Do not sum them over tp; the
trainer's loss (lm_loss_sum * dp*cp / global_tokens + coef * aux) needs no tp factor, and gradients come out
right on every rank (Megatron's convention: a tensor replicated over tp carries its full gradient).
return_logits=True gives the full [B, T, V] logits on every rank (all-gathered).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from ..model.attention import LightningAttention, SoftmaxAttention
from ..model.moe import MoE, RouterOutput
from ..ops.cross_entropy import chunked_loss_sum
from ..ops.experts import grouped_linear, to_autocast, use_grouped_mm
from .tp_ops import (
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


@dataclass
class TPContext:
    """The tp group as the modules see it."""

    mesh: object  # 1-D DeviceMesh
    group: object  # its ProcessGroup
    size: int
    rank: int
    sequence_parallel: bool

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
        w = _local(p)
        return copy_to_tp(w, self.group) if self.sequence_parallel else w


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


@contextlib.contextmanager
def _with_params(module: nn.Module, **tensors: torch.Tensor):
    """Run the module's own forward with some parameters replaced by (local) tensors, then restore them."""
    saved = {name: module._parameters[name] for name in tensors}
    module._parameters.update(tensors)
    try:
        yield
    finally:
        module._parameters.update(saved)


# ---- the TP versions of the model's modules (mixed into the module's own class) -------------------------------


class _TPEmbedding:
    """Vocabulary-parallel embedding: this rank's rows, zeros elsewhere, summed (reduce-scattered under SP)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tp: TPContext = self._tp
        return tp.exit(vocab_parallel_embedding(input_ids, _local(self.weight), self._vocab_start))


class _TPLMHead:
    """Vocabulary-parallel lm_head; calling it returns the FULL logits (all-gathered: evaluation, export).
    The training loss goes through `_tp_lm_loss_sum`, which keeps the logits sharded."""

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self._tp.enter(hidden), _local(self.weight))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return gather_last_dim(self.local_logits(hidden), self._tp.group)


def _tp_lm_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, logits: Optional[torch.Tensor]) -> torch.Tensor:
    """MiniMaxForCausalLM.lm_loss_sum under TP: the sum over all the micro-batch's tokens, on every tp rank."""
    if logits is not None:  # the full logits were asked for anyway
        return F.cross_entropy(logits.reshape(labels.numel(), -1).float(), labels, ignore_index=-100, reduction="sum")
    head = self.lm_head
    tp: TPContext = head._tp
    hidden = tp.enter(hidden)  # all the micro-batch's tokens (SP: all-gathered once, not per chunk)
    weight = _local(head.weight)

    def loss_fn(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(F.linear(h, weight), y, head._vocab_start, tp.group).sum()

    # every tp rank holds the same labels, hence the same chunks: the collectives inside line up
    return chunked_loss_sum(hidden, labels, loss_fn, self.loss_chunk_tokens)


class _TPReplicatedNorm:
    """RMSNorm on the residual stream (replicated weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _with_params(self, weight=self._tp.replicated(self.weight)):
            return super().forward(x)


class _TPHeadShardedNorm:
    """The lightning output RMSNorm over all heads' features, with this rank's heads: the sum of squares is
    all-reduced over tp (forward and backward), the weight is this rank's Shard(0) slice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        total = self.weight.shape[0]  # global feature count (DTensor shape)
        ss = all_reduce_sum(x32.pow(2).sum(-1, keepdim=True), self._tp.group)
        x32 = x32 * torch.rsqrt(ss / total + self.eps)
        return _local(self.weight) * x32.to(dtype)


class _TPLocalLinear:
    """nn.Linear (no bias) computing with this rank's shard of a column- or row-parallel weight.
    `_rows` (replicated KV heads): use only these rows of a Replicate weight; its gradient is summed over tp."""

    _rows: Optional[tuple[int, int]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _local(self.weight)
        if self._rows is not None:
            w = copy_to_tp(w, self._tp.group)[self._rows[0] : self._rows[1]]
        return F.linear(x, w)


class _TPAttention:
    """Either attention kind: all tokens in (all-gather / copy), local heads inside (the children are local
    linears, so the module's own forward and its pluggable `.core` run unchanged on local heads), partial
    sums out (reduce-scatter / all-reduce)."""

    def forward(self, x: torch.Tensor, seq) -> torch.Tensor:
        return self._tp.exit(super().forward(self._tp.enter(x), seq))


class _TPRouter:
    def forward(self, x: torch.Tensor) -> RouterOutput:
        with _with_params(self, weight=self._tp.replicated(self.weight)):
            return super().forward(x)


class _TPExperts:
    """Expert tensor parallelism with etp = tp: [N, H] tokens (all of them, sorted by expert) -> this rank's
    partial sum of every expert's output over its I/P slice of the intermediate features."""

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, counts_cpu: list[int] | None = None):
        (x_sorted,) = to_autocast(x_sorted)
        grouped = use_grouped_mm(x_sorted)
        sizes = None if grouped else (counts_cpu if counts_cpu is not None else counts.tolist())
        h = grouped_linear(x_sorted, counts, _local(self.gate_up_proj), sizes)
        g, u = pair_gate_up(h, self._tp.group).chunk(2, dim=-1)
        return grouped_linear(self.act(g) * u, counts, _local(self.down_proj), sizes)


class _TPMoE:
    """Router on the residual stream's tokens; routing of all tokens made identical on every tp rank; the
    dispatcher runs the (etp = tp) experts on all tokens; partial outputs reduced on the way out.
    Returns the route of ALL tokens for the load-balancing statistics (their gradient is the full one on
    every rank, so each rank keeps its own tokens' share in backward)."""

    def forward(self, x: torch.Tensor):
        tp: TPContext = self._tp
        if self.training and self.jitter > 0:
            # under SP every rank draws the same noise for its own shard (the RNG streams agree over tp)
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        local = self.gate(x)
        if tp.sequence_parallel:
            x_all = gather_seq(x, tp.group)
            k, e = local.weights.shape[1], local.probs.shape[1]
            packed = torch.cat([local.weights, local.probs, local.logits.float(), local.experts.float()], dim=-1)
            for_dispatch, for_stats = gather_seq_two_ways(packed, tp.group)
            route, stats_route = (_unpack_route(t, k, e, local.logits.dtype) for t in (for_dispatch, for_stats))
        else:
            x_all = copy_to_tp(x, tp.group)
            route = RouterOutput(
                logits=copy_to_tp(local.logits, tp.group),
                probs=copy_to_tp(local.probs, tp.group),
                weights=copy_to_tp(local.weights, tp.group),
                experts=local.experts,
            )
            stats_route = local
        out, stats = self.dispatcher(x_all, route, self.experts)
        return tp.exit(out), stats_route, stats


class _TPMoEStatistics:
    """experts=False under sequence parallelism: the MoE block (and its dispatcher, e.g. expert parallelism)
    runs on this rank's token shard; the route returned for the load-balancing statistics and the expert
    load are made those of all the micro-batch's tokens (identical on every tp rank)."""

    def forward(self, x: torch.Tensor):
        tp: TPContext = self._tp
        out, local, stats = super().forward(x)
        k, e = local.weights.shape[1], local.probs.shape[1]
        packed = torch.cat([local.weights, local.probs, local.logits.float(), local.experts.float()], dim=-1)
        _, for_stats = gather_seq_two_ways(packed, tp.group)
        stats = dict(stats)
        for key in ("tokens_per_expert", "dropped"):
            if key in stats:
                stats[key] = reduce_from_tp(stats[key].detach(), tp.group)
        return out, _unpack_route(for_stats, k, e, local.logits.dtype), stats


def _unpack_route(t: torch.Tensor, k: int, e: int, logits_dtype) -> RouterOutput:
    w, p, lg, ex = t.split([k, e, e, k], dim=-1)
    return RouterOutput(logits=lg.to(logits_dtype), probs=p, weights=w, experts=ex.round().long())


# ---- applying it ------------------------------------------------------------------------------------------------

_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _mix_in(module: nn.Module, mixin: type, tp: TPContext, **attrs) -> None:
    """Give `module` the TP behaviour by switching it to a subclass of (mixin, its class), as FSDP2 does."""
    cls = type(module)
    if not issubclass(cls, mixin):
        key = (mixin, cls)
        if key not in _CLASS_CACHE:
            _CLASS_CACHE[key] = type(f"TP{cls.__name__}", (mixin, cls), {})
        module.__class__ = _CLASS_CACHE[key]
    module._tp = tp
    for k, v in attrs.items():
        setattr(module, k, v)


class _Distributor:
    def __init__(self, mesh):
        self.mesh = mesh
        self.done: dict[int, nn.Parameter] = {}  # old parameter id -> DTensor parameter (tied weights)

    def __call__(self, module: nn.Module, name: str, placement: Placement) -> None:
        p = module._parameters[name]
        if isinstance(p, DTensor):
            raise ValueError(
                f"apply_tensor_parallel: {type(module).__name__}.{name} is already a DTensor "
                f"(tensor parallelism applied twice, or FSDP applied before TP)"
            )
        new = self.done.get(id(p))
        if new is None:
            src = None if p.is_meta else 0  # rank 0's values win: every rank starts from the same weights
            new = nn.Parameter(
                distribute_tensor(p.detach(), self.mesh, [placement], src_data_rank=src), requires_grad=p.requires_grad
            )
            self.done[id(p)] = new
        setattr(module, name, new)


def check_tensor_parallel(cfg, tp: int, *, experts: bool = True) -> None:
    """Raise ValueError naming the model key when the model cannot be split over tp ranks."""

    def bad(key, msg):
        raise ValueError(f"tensor parallelism (tp={tp}): model.{key} {msg}")

    if cfg.num_attention_heads % tp:
        bad("num_attention_heads", f"={cfg.num_attention_heads} is not divisible by tp")
    kv = cfg.num_key_value_heads
    if kv % tp and tp % kv:
        bad("num_key_value_heads", f"={kv}: tp must divide it or be a multiple of it")
    if cfg.vocab_size % tp:
        bad("vocab_size", f"={cfg.vocab_size} is not divisible by tp (pad the vocabulary)")
    if experts and cfg.intermediate_size % tp:
        bad("intermediate_size", f"={cfg.intermediate_size} is not divisible by tp (etp = tp)")


def apply_tensor_parallel(model: nn.Module, tp_mesh, *, sequence_parallel: bool, experts: bool = True) -> nn.Module:
    """Shard `model` (a MiniMaxForCausalLM built identically on every rank, not yet FSDP-wrapped) over the 1-D
    DeviceMesh `tp_mesh`, in place. Parameters become DTensors on tp_mesh (see the module docstring for the
    layout); forward/backward communicate over tp_mesh.get_group(). A tp mesh of size 1 leaves the model as is.

    experts=False: only the router is made tensor-parallel-aware; the expert weights and the dispatcher are
    left to apply_expert_parallel (call it next), which receives the residual stream's tokens (this rank's
    shard under SP, else the replicated micro-batch). Under SP the load-balancing statistics and the
    expert load are still gathered over tp, so aux_loss / expert_load are the whole micro-batch's."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tensor_parallel needs a 1-D tp mesh (e.g. device_mesh['tp']), got {tp_mesh.ndim}-D")
    size = tp_mesh.size()
    if size == 1:
        return model
    cfg = model.config
    check_tensor_parallel(cfg, size, experts=experts)
    tp = TPContext(
        mesh=tp_mesh,
        group=tp_mesh.get_group(),
        size=size,
        rank=tp_mesh.get_local_rank(),
        sequence_parallel=sequence_parallel,
    )
    dist_ = _Distributor(tp_mesh)
    inner = model.model
    lo, _ = vocab_range(cfg.vocab_size, tp.rank, size)

    dist_(inner.embed_tokens, "weight", Shard(0))
    _mix_in(inner.embed_tokens, _TPEmbedding, tp, _vocab_start=lo)
    dist_(model.lm_head, "weight", Shard(0))  # the same DTensor when tied
    _mix_in(model.lm_head, _TPLMHead, tp, _vocab_start=lo)
    model.lm_loss_sum = types.MethodType(_tp_lm_loss_sum, model)

    norms = [inner.norm]
    norms += [n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    for norm in norms:
        dist_(norm, "weight", Replicate())
        _mix_in(norm, _TPReplicatedNorm, tp)

    heads_local = cfg.num_attention_heads // size
    h0, h1 = tp.rank * heads_local, (tp.rank + 1) * heads_local
    for layer in inner.layers:
        attn = layer.self_attn
        if isinstance(attn, LightningAttention):
            for lin in (attn.qkv_proj, attn.output_gate):
                dist_(lin, "weight", Shard(0))
                _mix_in(lin, _TPLocalLinear, tp)
            dist_(attn.out_proj, "weight", Shard(1))
            _mix_in(attn.out_proj, _TPLocalLinear, tp)
            dist_(attn.norm, "weight", Shard(0))
            _mix_in(attn.norm, _TPHeadShardedNorm, tp)
            attn.register_buffer("slopes", attn.slopes[h0:h1].clone(), persistent=False)
        elif isinstance(attn, SoftmaxAttention):
            dist_(attn.q_proj, "weight", Shard(0))
            _mix_in(attn.q_proj, _TPLocalLinear, tp)
            kv, d = cfg.num_key_value_heads, cfg.head_dim
            for lin in (attn.k_proj, attn.v_proj):
                if kv % size == 0:
                    dist_(lin, "weight", Shard(0))
                    _mix_in(lin, _TPLocalLinear, tp)
                else:  # more tp ranks than KV heads: replicate, each rank uses its query heads' KV head
                    head = h0 // (cfg.num_attention_heads // kv)
                    dist_(lin, "weight", Replicate())
                    _mix_in(lin, _TPLocalLinear, tp, _rows=(head * d, (head + 1) * d))
            dist_(attn.o_proj, "weight", Shard(1))
            _mix_in(attn.o_proj, _TPLocalLinear, tp)
        else:
            raise ValueError(f"apply_tensor_parallel: unknown attention module {type(attn).__name__}")
        _mix_in(attn, _TPAttention, tp)

        moe = layer.mlp
        if not isinstance(moe, MoE):
            raise ValueError(f"apply_tensor_parallel: unknown MLP module {type(moe).__name__}")
        dist_(moe.gate, "weight", Replicate())
        _mix_in(moe.gate, _TPRouter, tp)
        if experts:
            dist_(moe.experts, "gate_up_proj", Shard(1))
            dist_(moe.experts, "down_proj", Shard(2))
            _mix_in(moe.experts, _TPExperts, tp)
            _mix_in(moe, _TPMoE, tp)
        elif sequence_parallel:
            _mix_in(moe, _TPMoEStatistics, tp)

    leftovers = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if leftovers and experts:
        raise ValueError(f"apply_tensor_parallel: parameters left unsharded: {leftovers}")
    model._tp = tp
    return model


def tp_context(model: nn.Module) -> Optional[TPContext]:
    """The TPContext of a model that apply_tensor_parallel sharded, else None."""
    return getattr(model, "_tp", None)


__all__ = ["TPContext", "apply_tensor_parallel", "check_tensor_parallel", "tp_context"]
