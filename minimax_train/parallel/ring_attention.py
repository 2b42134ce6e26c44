"""Varlen ring attention for softmax layers on the zigzag context-parallel layout.

Queries stay on their rank; K and V (KV heads only, one batch_isend_irecv per step) rotate around the
context-parallel ring with batch_isend_irecv, the transfer of the next block overlapping the current
block's compute. At ring step s rank r holds the K/V of rank (r - s) mod cp. Each step attends the local
query segments to the visiting key segments under the document and causal mask (global doc ids and
positions, so documents need no padding), skipping segment pairs that cannot interact (keys all after the
queries, disjoint document ranges, or beyond the sliding window), and merges the partial results by
log-sum-exp into an fp32 accumulator.

Backward rotates K/V again together with dK/dV accumulators (a second ring, tag 1): at step s rank r adds
its contribution to the dK/dV of the visiting block and passes it on; after cp steps every block's
gradient is back with its owner. Per block the gradient is recomputed from the saved final output and
log-sum-exp, so nothing of size T_q x T_k outlives a block:
- "fused" (the torch backend, CPU): flash-attention style, p = exp(s - lse_final), dS = p (dO.v - delta),
  delta = rowsum(dO * O_final), with no forward recomputation;
- "recompute" (any backend, e.g. FlexAttention on GPU): recompute the block's (o_b, lse_b) with autograd and
  back-propagate the merge weights, dO_b = w_b dO and dlse_b = w_b dO.(o_b - O), w_b = exp(lse_b - lse).
Both are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops.attention import TORCH_CHUNK_ELEMS, attention_backward, merge_partial_attention, varlen_attention
from .cp_shard import CPShardInfo, zigzag_chunks

Ranges = list  # [(start, end), ...] over local rows, in order


@dataclass
class _Call:
    q_ranges: Ranges
    k_ranges: Ranges
    q_doc: torch.Tensor
    q_pos: torch.Tensor
    k_doc: torch.Tensor
    k_pos: torch.Tensor


@dataclass
class RingPlan:
    """Per ring step: the rank whose K/V visits, and the (query rows x key rows) calls that can interact."""

    rank: int
    size: int
    steps: list  # [(src_rank, [_Call, ...]), ...]

    def num_calls(self) -> int:
        return sum(len(c) for _, c in self.steps)


def _merge_ranges(segs: list[int], n: int) -> Ranges:
    out = []
    for j in segs:
        if out and out[-1][1] == j * n:
            out[-1] = (out[-1][0], (j + 1) * n)
        else:
            out.append((j * n, (j + 1) * n))
    return out


def _take(x: torch.Tensor, ranges: Ranges, dim: int = 0) -> torch.Tensor:
    if len(ranges) == 1:
        s, e = ranges[0]
        return x.narrow(dim, s, e - s)
    return torch.cat([x.narrow(dim, s, e - s) for s, e in ranges], dim=dim)


def _put(dst: torch.Tensor, ranges: Ranges, src: torch.Tensor, dim: int = 0, add: bool = False) -> None:
    off = 0
    for s, e in ranges:
        part = src.narrow(dim, off, e - s)
        if add:
            dst.narrow(dim, s, e - s).add_(part)
        else:
            dst.narrow(dim, s, e - s).copy_(part)
        off += e - s


def build_ring_plan(seq, sliding_window=None) -> RingPlan:
    """The ring schedule of a CPPackedSequence (cached on its CPShardInfo, shared by all softmax layers)."""
    info: CPShardInfo = seq.cp
    key = ("ring_plan", sliding_window)
    if key in info._cache:
        return info._cache[key]
    r, cp, rows, n = info.rank, info.size, info.rows, info.chunk
    doc_lo, doc_hi, pos_lo, pos_hi = (x.tolist() for x in info.chunk_ranges())

    def segs_of(rank):  # [(row, chunk)] per local segment of `rank`
        return [(b, c) for b in range(rows) for c in zigzag_chunks(rank, cp)]

    def interact(qa, kb) -> bool:
        (qb_, qc), (kb_, kc) = qa, kb
        if kb_ != qb_:
            return False  # rows never share a document
        if pos_lo[kb_][kc] > pos_hi[qb_][qc]:
            return False  # every key after every query
        if doc_hi[kb_][kc] < doc_lo[qb_][qc] or doc_lo[kb_][kc] > doc_hi[qb_][qc]:
            return False  # disjoint documents
        if sliding_window is not None and pos_lo[qb_][qc] - pos_hi[kb_][kc] >= sliding_window:
            return False
        return True

    mine = segs_of(r)
    steps = []
    for s in range(cp):
        src = (r - s) % cp
        theirs = segs_of(src)
        k_doc_all, k_pos_all = info.rank_doc_pos(src)
        groups: dict[tuple, list[int]] = {}
        for a, qa in enumerate(mine):
            ks = tuple(b for b, kb in enumerate(theirs) if interact(qa, kb))
            if ks:
                groups.setdefault(ks, []).append(a)
        calls = []
        for ks, qs in groups.items():
            qr, kr = _merge_ranges(qs, n), _merge_ranges(list(ks), n)
            calls.append(
                _Call(
                    qr,
                    kr,
                    _take(seq.doc_ids, qr),
                    _take(seq.causal_pos, qr),
                    _take(k_doc_all, kr),
                    _take(k_pos_all, kr),
                )
            )
        steps.append((src, calls))
    plan = RingPlan(rank=r, size=cp, steps=steps)
    info._cache[key] = plan
    return plan


class _Ring:
    """Send to the next rank of the group, receive from the previous one (one batch_isend_irecv)."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size = group, size
        if size > 1:
            self.next = dist.get_global_rank(group, (rank + 1) % size)
            self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def shift(self, tensors, tag: int):
        """tensors (a tuple) go to the next rank; returns (the previous rank's tuple, requests)."""
        recv = tuple(torch.empty_like(t) for t in tensors)
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag) for t in recv]
        return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


def _compute_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _block_backward_fused(q, k, v, o, lse, do, delta, q_doc, q_pos, k_doc, k_pos, scale, sliding_window):
    """Gradients of one (query rows, key rows) block given the FINAL output/lse of the query rows:
    ops.attention's backward math with the merged lse and row = -delta (delta = rowsum(dO * O_final))."""
    chunk = max(1, TORCH_CHUNK_ELEMS // max(1, q.shape[1] * k.shape[0]))
    return attention_backward(q, k, v, lse, do, -delta, q_doc, q_pos, k_doc, k_pos, scale, sliding_window, chunk)


def _block_backward_recompute(q, k, v, o, lse, do, call, scale, sliding_window, backend):
    """Same gradients through autograd: recompute the block's partial (o_b, lse_b) and back-propagate the
    log-sum-exp merge into it (works with every varlen_attention backend)."""
    cd = lse.dtype
    with torch.enable_grad():
        qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
        ob, lseb = varlen_attention(
            qg,
            kg,
            vg,
            q_doc=call.q_doc,
            q_pos=call.q_pos,
            k_doc=call.k_doc,
            k_pos=call.k_pos,
            scale=scale,
            sliding_window=sliding_window,
            return_lse=True,
            backend=backend,
        )
        lse_f = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
        w = torch.where(
            torch.isneginf(lseb.detach().to(cd)), torch.zeros_like(lse), torch.exp(lseb.detach().to(cd) - lse_f)
        )  # [Hq, Tq]
        wt = w.transpose(0, 1).unsqueeze(-1)
        do_b = (wt * do.to(cd)).to(ob.dtype)
        dlse_b = (w * (do.to(cd) * (ob.detach().to(cd) - o.to(cd))).sum(-1).transpose(0, 1)).to(lseb.dtype)
        return torch.autograd.grad((ob, lseb), (qg, kg, vg), (do_b, dlse_b))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, group, scale, sliding_window, backend, bwd):
        cd = _compute_dtype(q)
        T, Hq, _ = q.shape
        Dv = v.shape[-1]
        ring = _Ring(group, plan.size, plan.rank)
        acc_o = torch.zeros(T, Hq, Dv, dtype=cd, device=q.device)
        acc_lse = torch.full((Hq, T), float("-inf"), dtype=cd, device=q.device)
        cur = (k.contiguous(), v.contiguous())
        last = len(plan.steps) - 1
        for s, (_, calls) in enumerate(plan.steps):
            reqs = None
            if s < last:
                nxt, reqs = ring.shift(cur, tag=0)
            for call in calls:
                o_c, lse_c = varlen_attention(
                    _take(q, call.q_ranges),
                    _take(cur[0], call.k_ranges),
                    _take(cur[1], call.k_ranges),
                    q_doc=call.q_doc,
                    q_pos=call.q_pos,
                    k_doc=call.k_doc,
                    k_pos=call.k_pos,
                    scale=scale,
                    sliding_window=sliding_window,
                    return_lse=True,
                    backend=backend,
                )
                m_o, m_lse = merge_partial_attention(
                    _take(acc_o, call.q_ranges), _take(acc_lse, call.q_ranges, 1), o_c, lse_c
                )
                _put(acc_o, call.q_ranges, m_o.to(cd))
                _put(acc_lse, call.q_ranges, m_lse.to(cd), dim=1)
            if reqs is not None:
                _wait(reqs)
                cur = nxt
        o = acc_o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, acc_lse)
        ctx.plan, ctx.group, ctx.scale, ctx.window = plan, group, scale, sliding_window
        ctx.backend, ctx.bwd = backend, bwd
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        plan = ctx.plan
        cd = lse.dtype
        T, Hq, D = q.shape
        Tk, Hkv, Dv = v.shape
        ring = _Ring(ctx.group, plan.size, plan.rank)
        do = do.contiguous()
        delta = (do.to(cd) * o.to(cd)).sum(-1).transpose(0, 1).contiguous() if ctx.bwd == "fused" else None
        dq = torch.zeros(T, Hq, D, dtype=cd, device=q.device)
        cur = (k.contiguous(), v.contiguous())
        last = len(plan.steps) - 1
        d_reqs = d_recv = None
        for s, (_, calls) in enumerate(plan.steps):
            reqs = None
            if s < last:
                nxt, reqs = ring.shift(cur, tag=0)
            # this step's contribution to the visiting block's dK, dV (fp32 accumulators travel the ring)
            contrib = (
                torch.zeros(Tk, Hkv, D, dtype=cd, device=q.device),
                torch.zeros(Tk, Hkv, Dv, dtype=cd, device=q.device),
            )
            for call in calls:
                kb, vb = _take(cur[0], call.k_ranges), _take(cur[1], call.k_ranges)
                qb, ob, dob = (_take(x, call.q_ranges) for x in (q, o, do))
                lseb = _take(lse, call.q_ranges, 1)
                if ctx.bwd == "fused":
                    g = _block_backward_fused(
                        qb,
                        kb,
                        vb,
                        ob,
                        lseb,
                        dob,
                        _take(delta, call.q_ranges, 1),
                        call.q_doc,
                        call.q_pos,
                        call.k_doc,
                        call.k_pos,
                        ctx.scale,
                        ctx.window,
                    )
                else:
                    g = _block_backward_recompute(qb, kb, vb, ob, lseb, dob, call, ctx.scale, ctx.window, ctx.backend)
                _put(dq, call.q_ranges, g[0].to(cd), add=True)
                _put(contrib[0], call.k_ranges, g[1].to(cd), add=True)
                _put(contrib[1], call.k_ranges, g[2].to(cd), add=True)
            if d_reqs is not None:  # the block's gradient so far, from the ranks it visited before
                _wait(d_reqs)
                contrib[0].add_(d_recv[0])
                contrib[1].add_(d_recv[1])
            if plan.size > 1:
                d_recv, d_reqs = ring.shift(contrib, tag=1)
            else:
                d_recv = contrib
            if reqs is not None:
                _wait(reqs)
                cur = nxt
        if d_reqs is not None:
            _wait(d_reqs)
        dk, dv = d_recv
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def _resolve_backend(q, backend):
    if backend == "auto":
        return "flex" if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) else "torch"
    return backend


def ring_attention(
    q, k, v, seq, group, *, scale: float, sliding_window=None, backend: str = "auto", backward: str = "auto"
) -> torch.Tensor:
    """Softmax attention of one context-parallel shard: q [T_local, Hq, D], k/v [T_local, Hkv, D] of the
    local tokens of a CPPackedSequence; returns [T_local, Hq, Dv], the corresponding rows of the
    single-process result. backward: "fused" (torch backend only), "recompute", or "auto"."""
    info: CPShardInfo = seq.cp
    world = 1 if group is None and not dist.is_initialized() else dist.get_world_size(group)
    if world != info.size:
        raise ValueError(f"context-parallel group has {world} ranks but the sequence was sharded for cp={info.size}")
    backend = _resolve_backend(q, backend)
    if backward == "auto":
        backward = "fused" if backend == "torch" else "recompute"
    if backward not in ("fused", "recompute"):
        raise ValueError(f"ring attention backward must be 'auto', 'fused' or 'recompute', got {backward!r}")
    if backward == "fused" and backend != "torch":
        raise ValueError("ring attention backward='fused' needs backend='torch'; use 'recompute' with flex")
    if sliding_window is not None:
        sliding_window = int(sliding_window)
    plan = build_ring_plan(seq, sliding_window)
    return _RingAttention.apply(q, k, v, plan, group, float(scale), sliding_window, backend, backward)


class RingAttentionCore:
    """The softmax attention core under context parallelism (model/parts.py's SoftmaxCore, given by model_parts).

    A sequence without CP metadata (a plain PackedSequence: the whole row on this rank) falls back to the
    local computation."""

    def __init__(self, group, *, backend: str = "auto", backward: str = "auto"):
        self.group, self.backend, self.backward = group, backend, backward

    def __call__(self, q, k, v, seq, *, scale, sliding_window):
        if getattr(seq, "cp", None) is None:
            return varlen_attention(
                q,
                k,
                v,
                q_doc=seq.doc_ids,
                q_pos=seq.causal_pos,
                k_doc=seq.doc_ids,
                k_pos=seq.causal_pos,
                scale=scale,
                sliding_window=sliding_window,
                backend=self.backend,
            )
        return ring_attention(
            q,
            k,
            v,
            seq,
            self.group,
            scale=scale,
            sliding_window=sliding_window,
            backend=self.backend,
            backward=self.backward,
        )

    def __repr__(self) -> str:
        return f"RingAttentionCore(backend={self.backend!r}, backward={self.backward!r})"


__all__ = ["RingAttentionCore", "RingPlan", "build_ring_plan", "ring_attention"]
