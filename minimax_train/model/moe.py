"""The MoE block: softmax router, top-k with renormalised weights, SwiGLU experts.

The router, the experts and the token movement (permute -> experts -> unpermute, the `dispatcher`) come
from the ModelParts given at construction (model/parts.py); the local dispatcher here is the
single-process reference: dropless (exact, as transformers) or capacity with token drop. A layout's
dispatcher has the same interface (parts.Dispatcher): dispatcher(x [T,H], route, experts) -> (out [T,H],
the route the load-balancing statistics count, {"tokens_per_expert": [E], "dropped": scalar}).

Capacity rule (shared with the expert-parallel dispatcher, which applies it over the tokens of its whole
EP group, rank-major): capacity per expert C = ceil(capacity_factor * tokens * top_k / E). The (token, slot)
assignments to expert e are ranked in (rank, token, slot) order; the first C are kept, the rest dropped.
A dropped assignment contributes nothing: a token with all slots dropped leaves the MoE block as zeros, so
the layer passes it through the residual only. Weights are not renormalised over the kept slots.
Statistics: tokens_per_expert counts routed assignments (before the drop); dropped counts dropped
(token, slot) assignments."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.experts import grouped_swiglu, to_autocast
from ..ops.fused import weighted_slot_sum
from .config import ModelConfig
from .layers import ACTIVATIONS


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [T, E] (input dtype)
    probs: torch.Tensor  # [T, E] fp32 softmax
    weights: torch.Tensor  # [T, k] fp32, renormalised
    experts: torch.Tensor  # [T, k] int64

    @classmethod
    def cat(cls, routes: list[RouterOutput]) -> RouterOutput:
        """The routes of consecutive token chunks as one route over all their tokens."""
        return cls(**{f.name: torch.cat([getattr(r, f.name) for r in routes]) for f in fields(cls)})


class Router(nn.Module):
    """`view` maps the stored weight to the tensor used (a layout's hook, e.g. for sequence-sharded input)."""

    def __init__(self, cfg: ModelConfig, weight: nn.Parameter | None = None, view=None):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        if weight is None:
            weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))
        self.weight = weight
        self.view = view

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x, self.weight if self.view is None else self.view(self.weight))
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_e = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, weights=top_w, experts=top_e)


class Experts(nn.Module):
    """All experts' weights as two 3-D tensors (transformers v5's in-memory layout): gate_up_proj [E, 2I, H]
    (gate rows, then up rows) and down_proj [E, H, I]; a layout may pass its own (sharded) parameters."""

    def __init__(self, cfg: ModelConfig, gate_up: nn.Parameter | None = None, down: nn.Parameter | None = None):
        super().__init__()
        e, i, h = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        self.gate_up_proj = gate_up if gate_up is not None else nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = down if down is not None else nn.Parameter(torch.empty(e, h, i))
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor, counts_cpu: list[int] | None = None):
        return grouped_swiglu(x_sorted, counts, self.gate_up_proj, self.down_proj, self.act, counts_cpu)


def expert_capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """Assignments each expert accepts: ceil(capacity_factor * tokens * top_k / num_experts)."""
    return int(math.ceil(capacity_factor * tokens * top_k / num_experts))


def expert_counts(flat_e: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (int64 [E]) of expert ids `flat_e`: torch.bincount's result, but a
    scatter-add, which does not read the largest id back to the host (bincount syncs on CUDA)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_e.device)
    return counts.scatter_add_(0, flat_e.long(), torch.ones_like(flat_e, dtype=torch.long))


def capacity_keep(
    flat_e: torch.Tensor, num_experts: int, capacity: int, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep mask over flattened (token, slot) assignments `flat_e` [T*k] (expert ids): an assignment's
    position is `offsets[e]` (assignments to e that come before these tokens, e.g. on lower ranks) plus
    its index among this tensor's assignments to e in (token, slot) order; it is kept iff position < capacity."""
    n = flat_e.numel()
    order = torch.argsort(flat_e, stable=True)
    counts = expert_counts(flat_e, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(flat_e)
    pos[order] = torch.arange(n, device=flat_e.device) - starts[flat_e[order]]
    if offsets is not None:
        pos = pos + offsets.to(pos.dtype)[flat_e]
    return pos < capacity


class LocalDispatcher:
    """Single-process token routing: sort (token, slot) pairs by expert, run, scatter back.

    routing "dropless" (transformers, exact) or "capacity" (see the module docstring for the rule)."""

    def __init__(self, routing: str = "dropless", capacity_factor: float = 1.25):
        if routing not in ("dropless", "capacity"):
            raise ValueError(f"moe_routing '{routing}' unknown; use dropless or capacity")
        self.routing, self.capacity_factor = routing, capacity_factor

    def __call__(self, x: torch.Tensor, route: RouterOutput, experts: Experts) -> tuple[torch.Tensor, dict]:
        t, k = route.experts.shape
        num_experts = experts.gate_up_proj.shape[0]
        flat_e = route.experts.reshape(-1)
        counts = expert_counts(flat_e, num_experts)
        dropped = torch.zeros((), dtype=torch.long, device=x.device)
        if self.routing == "capacity":
            cap = expert_capacity(self.capacity_factor, t, k, num_experts)
            keep = capacity_keep(flat_e, num_experts, cap)
            kept = int(keep.sum())
            order = torch.argsort(torch.where(keep, flat_e, num_experts), stable=True)[:kept]
            run_counts = expert_counts(flat_e[order], num_experts)
            dropped = dropped + (t * k - kept)
        else:
            order = torch.argsort(flat_e, stable=True)
            run_counts = counts
        token_of = order // k
        (xin,) = to_autocast(x)  # gather k copies in the matmul dtype, not fp32
        y = experts(xin[token_of], run_counts)
        # back to slot order (dropped slots zero), then each token's k outputs weighted and summed (one
        # fused kernel on CUDA) instead of an atomic index_add_ after a separate weighting pass
        slots = y.new_zeros(t * k, y.shape[-1]).index_copy(0, order, y)
        out = weighted_slot_sum(slots.view(t, k, -1), route.weights).to(x.dtype)
        return out, route, {"tokens_per_expert": counts, "dropped": dropped}


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, parts):
        super().__init__()
        self.jitter = cfg.router_jitter_noise
        self.gate = parts.router(cfg)
        self.experts = parts.experts(cfg)
        self.dispatcher = parts.dispatcher(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput, dict]:
        """(output, route for the load-balancing statistics, {"tokens_per_expert", "dropped"})."""
        if self.training and self.jitter > 0:
            # under sequence parallelism every tp rank draws the same noise for its own shard
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return self.dispatcher(x, self.gate(x), self.experts)


def load_balancing_stats(route: RouterOutput, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-layer pieces of transformers' aux loss: top-k assignment counts [E], summed probs [E], rows."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=route.probs.device)
    counts.scatter_add_(0, route.experts.reshape(-1), torch.ones_like(route.experts.reshape(-1), dtype=torch.float32))
    return counts, route.probs.sum(0), route.probs.shape[0]


def load_balancing_loss(counts: torch.Tensor, prob_sum: torch.Tensor, rows: int, num_experts: int) -> torch.Tensor:
    """transformers' load_balancing_loss_func on stats pooled over all layers: E * sum_e f_e P_e."""
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
