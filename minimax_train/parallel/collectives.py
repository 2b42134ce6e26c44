"""The autograd collectives of every parallel technique (tensor, context, expert), each stating its forward
and its backward. Tensor parallelism follows Megatron's mappings for packed [T, ...] tokens: inside a tp
group a *replicated* tensor carries its full gradient on every rank, a *sharded* tensor the gradient of
its shard.

    copy_to_tp            identity          | all-reduce      enter a TP region from replicated tokens
    reduce_from_tp        all-reduce        | identity        leave a TP region to replicated tokens
    gather_seq            all-gather dim 0  | reduce-scatter  enter a TP region from sequence shards (SP)
    scatter_seq           reduce-scatter 0  | all-gather      leave a TP region to sequence shards (SP)
    gather_seq_two_ways   all-gather dim 0  | reduce-scatter (1st output) + own chunk (2nd output)
    all_reduce_sum        all-reduce        | all-reduce      a sum of per-rank partial terms used by all ranks
    gather_last_dim       all-gather dim -1 | own slice       full logits from vocabulary shards
    pair_gate_up          all-to-all        | all-to-all      expert TP: [gate;up] column shards -> (gate_r, up_r)
    all_gather_stacked    all-gather -> [world, ...] | reduce-scatter (sum)   LASP+ state summaries
    send_state/recv_state point-to-point    | point-to-point back            serial LASP (the baseline)

Every op is the identity when the group has one rank. The group is a torch.distributed ProcessGroup
(DeviceMesh.get_group())."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Ranks in `group`; None means no group (one rank)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn); the GPU images'
# older torch has only the old ones
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather0(x: torch.Tensor, group) -> torch.Tensor:
    p = group_size(group)
    x = x.contiguous()
    out = x.new_empty((p * x.shape[0],) + tuple(x.shape[1:]))
    all_gather_flat(out, x, group=group)
    return out


def _reduce_scatter0(x: torch.Tensor, group) -> torch.Tensor:
    p = group_size(group)
    if x.shape[0] % p:
        raise ValueError(f"reduce-scatter over {p} tp ranks needs a multiple of {p} tokens, got {x.shape[0]}")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // p,) + tuple(x.shape[1:]))
    reduce_scatter_flat(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter0(g, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather0(g, ctx.group), None


class _GatherSeqTwoWays(torch.autograd.Function):
    """One all-gather, two outputs: the first feeds per-rank partial computations (its gradients are
    summed over ranks), the second feeds computations replicated on every rank (its gradient is already
    the full one: each rank keeps its own chunk)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[0]
        y = _all_gather0(x, group)
        return y, y.detach().clone()

    @staticmethod
    def backward(ctx, g_partial, g_replicated):
        grad = None
        if g_partial is not None:
            grad = _reduce_scatter0(g_partial, ctx.group)
        if g_replicated is not None:
            r = group_rank(ctx.group)
            own = g_replicated[r * ctx.n : (r + 1) * ctx.n]
            grad = own.clone() if grad is None else grad + own
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[-1]
        p = group_size(group)
        parts = _all_gather0(x.movedim(-1, 0), group).view((p, ctx.n) + tuple(x.shape[:-1]))
        return parts.movedim(1, -1).movedim(0, -2).reshape(tuple(x.shape[:-1]) + (p * ctx.n,))

    @staticmethod
    def backward(ctx, g):
        r = group_rank(ctx.group)
        return g[..., r * ctx.n : (r + 1) * ctx.n].contiguous(), None


def copy_to_tp(x, group):
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def all_reduce_sum(x, group):
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


def gather_seq(x, group):
    return x if group_size(group) == 1 else _GatherSeq.apply(x, group)


def scatter_seq(x, group):
    return x if group_size(group) == 1 else _ScatterSeq.apply(x, group)


def gather_seq_two_ways(x, group):
    return (x, x) if group_size(group) == 1 else _GatherSeqTwoWays.apply(x, group)


def gather_last_dim(x, group):
    return x if group_size(group) == 1 else _GatherLastDim.apply(x, group)


# ---- expert tensor parallelism: pair the gate and up halves -------------------------------------------------
#
# gate_up_proj [E, 2I, H] is stored as a standard Shard(1) DTensor (rows 0..I-1 gate, I..2I-1 up), so that
# checkpoints, FSDP2 and the optimiser state need nothing special. Rank s then holds global rows
# [s*2I/P, (s+1)*2I/P): two sub-chunks of c = I/P rows, global chunk indices m = 2s and 2s+1 of the 2P
# chunks of [gate; up]. Chunk m < P is gate chunk m, chunk m >= P is up chunk m-P; rank q needs gate chunk q
# and up chunk q (its down_proj Shard(2) columns are chunk q of I). So after h = x @ W_local^T, sub-chunk j
# of rank s's columns goes to rank (2s+j) mod P; rank q receives gate chunk q from rank q//2 and up chunk q
# from rank (P+q)//2 > q//2, i.e. [gate_q | up_q] in source-rank order. One all-to-all of N x I/P x 2 per
# rank each way (Megatron stores [gate_r; up_r] per rank instead, which a Shard placement cannot describe).


def _pair_plan(p: int, r: int):
    dests = [(2 * r) % p, (2 * r + 1) % p]  # where my sub-chunks 0 and 1 go
    srcs = [r // 2, (p + r) // 2]  # who sends me gate_r and up_r (srcs[0] < srcs[1])
    return dests, srcs


def _a2a_columns(
    blocks_by_peer: dict[int, torch.Tensor], recv_from: list[int], n: int, c: int, group, like: torch.Tensor
) -> list[torch.Tensor]:
    """Send each [n, c] block to its peer; receive one [n, c] block from each rank in recv_from (sorted)."""
    p = group_size(group)
    send_sizes = [n * c if q in blocks_by_peer else 0 for q in range(p)]
    recv_sizes = [n * c if q in recv_from else 0 for q in range(p)]
    send = (
        torch.cat([blocks_by_peer[q].contiguous().view(-1) for q in sorted(blocks_by_peer)])
        if n * c
        else like.new_empty(0)
    )
    recv = like.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=group)
    return [t.view(n, c) for t in recv.split(n * c)] if n * c else [like.new_empty(n, c)] * len(recv_from)


class _PairGateUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, group):
        p, r = group_size(group), group_rank(group)
        n, c2 = h.shape
        c = c2 // 2
        dests, srcs = _pair_plan(p, r)
        ctx.group, ctx.shape = group, (n, c, dests, srcs)
        g, u = _a2a_columns({dests[0]: h[:, :c], dests[1]: h[:, c:]}, srcs, n, c, group, h)
        return torch.cat([g, u], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        n, c, dests, srcs = ctx.shape
        back = _a2a_columns({srcs[0]: grad[:, :c], srcs[1]: grad[:, c:]}, sorted(dests), n, c, ctx.group, grad)
        got = dict(zip(sorted(dests), back))
        return torch.cat([got[dests[0]], got[dests[1]]], dim=-1), None


def pair_gate_up(h: torch.Tensor, group) -> torch.Tensor:
    """h [N, 2I/P]: this rank's columns of x @ [gate; up]^T (a Shard(1) of the 2I rows) -> [N, 2I/P] holding
    [gate chunk r | up chunk r] for this rank r (the columns matching its down_proj shard)."""
    return h if group_size(group) == 1 else _PairGateUp.apply(h, group)


# ---- context parallelism ---------------------------------------------------------------------------------------


class _AllGatherStacked(torch.autograd.Function):
    """[...] -> [world, ...]; backward sums the gradients of every rank's slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = group_size(group)
        x = x.contiguous()
        if world == 1:
            return x[None].clone()
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        all_gather_flat(out, x, group=group)
        return out.view((world,) + tuple(x.shape))

    @staticmethod
    def backward(ctx, g):
        world = g.shape[0]
        if world == 1:
            return g[0], None
        out = g.new_empty(g.shape[1:])
        reduce_scatter_flat(
            out, g.reshape((-1,) + tuple(g.shape[2:])).contiguous(), op=dist.ReduceOp.SUM, group=ctx.group
        )
        return out, None


def all_gather_stacked(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's x stacked [world, ...]; the gradient of each slice is summed onto its owner."""
    return _AllGatherStacked.apply(x, group)


class _RecvState(torch.autograd.Function):
    """Forward: receive a state from `src`. Backward: send its gradient back. `after` only orders the
    backward (its gradient, zero, flows once this node's backward has run)."""

    @staticmethod
    def forward(ctx, after, like, src, group):
        ctx.src, ctx.group = src, group
        ctx.after_dtype = after.dtype if isinstance(after, torch.Tensor) else None
        out = torch.empty_like(like)
        dist.recv(out, src=src, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        dist.send(g.contiguous(), dst=ctx.src, group=ctx.group)
        after = torch.zeros((), device=g.device, dtype=ctx.after_dtype) if ctx.needs_input_grad[0] else None
        return after, None, None, None


class _SendState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, dst, group):
        ctx.dst, ctx.group = dst, group
        ctx.meta = (state.shape, state.dtype, state.device)
        dist.send(state.contiguous(), dst=dst, group=group)
        return torch.zeros((), device=state.device)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.meta
        ds = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(ds, src=ctx.dst, group=ctx.group)
        return ds, None, None


def recv_state(after, like: torch.Tensor, src: int, group) -> torch.Tensor:
    """A tensor shaped like `like` received from `src` (its gradient goes back to `src`); `after` orders it."""
    return _RecvState.apply(after, like, src, group)


def send_state(state: torch.Tensor, dst: int, group) -> torch.Tensor:
    """Send `state` to `dst`; returns a scalar token whose backward receives the state's gradient."""
    return _SendState.apply(state, dst, group)


__all__ = [
    "group_size",
    "group_rank",
    "all_gather_flat",
    "reduce_scatter_flat",
    "all_gather_stacked",
    "recv_state",
    "send_state",
    "copy_to_tp",
    "reduce_from_tp",
    "all_reduce_sum",
    "gather_seq",
    "scatter_seq",
    "gather_seq_two_ways",
    "gather_last_dim",
    "pair_gate_up",
]
