"""The expert-parallel token dispatcher: all-to-all dispatch / combine over the EP group, chunked and
pipelined (forward and backward) so one chunk's transfers overlap another chunk's expert compute.

Per MoE layer and micro-batch:
1. Router output -> (token, slot) assignments; the tokens are split into K contiguous groups ("chunks",
   parallel.moe_overlap_chunks). One all-gather over the dispatch group shares every rank's per-chunk,
   per-expert routed counts and token count (the "global router" of the MiniMax-01 paper). Everything
   else is derived from it on every rank identically: the capacity decision (capacity mode), the send
   and receive split sizes of every all-to-all, the expert-side layout. This is the layer's only host
   synchronisation (uneven all-to-all needs split sizes on the host).
2. Source side: assignments sorted by (chunk, global expert id) - experts of one EP rank are contiguous, so
   this also groups them by destination - and the token rows gathered into one send buffer.
3. `ExpertExchange` (one autograd Function for all chunks): for chunk c it waits for c's dispatch
   all-to-all while c+1's is already in flight, regroups the received rows from source-major to
   expert-major, runs the local experts' grouped SwiGLU (torch._grouped_mm on CUDA bf16, a loop on CPU),
   regroups back and starts c's combine all-to-all. Backward mirrors it: the gradient all-to-all of chunk
   c+1 is in flight while chunk c's activation gradient runs; the expert weight gradients are one grouped
   GEMM per weight over all chunks at the end, while the last chunks' gradients travel. Collectives are issued with async_op=True: on
   NCCL they run on the process group's own CUDA stream and the compute stream waits (work.wait()) only
   where a chunk's data is needed; on gloo they run on gloo's worker threads. The issue order is the same
   on every device, so CPU results equal CUDA's up to floating point, and K > 1 equals K = 1 (each token
   lives in one chunk, so its own math is unchanged).
4. Source side: combined rows times the routing weights, index_add'ed back to their tokens.

Expert tensor parallelism (ETP, each expert's FFN split over I across etp ranks), two input layouts:
- tokens replicated over the etp group (tensor parallel without sequence parallel; etp == 1 is this
  case): dispatch over the EP group; every etp rank of an EP rank receives the same rows, computes its
  I-slice, and the partial down_proj outputs are all-reduced over etp before the combine (backward: the
  gradient of the received rows is all-reduced over etp).
- tokens sharded over the etp group (sequence parallel): dispatch over the flattened ep x etp group;
  each assignment is sent to every etp rank of the expert's EP rank, each returns its partial output and
  the source sums the etp partials in its index_add. No etp collective; the same bytes as Megatron's
  all-to-all + all-gather over etp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..model.moe import capacity_keep, expert_capacity
from ..model.moe import expert_counts as count_assignments
from ..ops.experts import to_autocast
from .moe_experts import swiglu_backward_input, swiglu_forward, weight_grad


class _Done:
    def wait(self):
        return True


def all_to_all_async(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """Asynchronous uneven all_to_all_single; a local copy without a group (single process)."""
    if group is None:
        out.copy_(inp)
        return _Done()
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)


class DispatchPlan:
    """Everything the exchange needs, derived from the all-gathered counts (identical on all ranks).
    A plain class (not a dataclass) so FSDP's input casting leaves it alone."""

    __slots__ = (
        "chunks",
        "group",
        "etp_reduce_group",
        "send_rows",
        "recv_rows",
        "send_splits",
        "recv_splits",
        "expert_counts",
        "offs",
        "perm",
        "inv_perm",
        "act",
        "needs_grad",
        "wg_perm",
        "wg_counts",
        "wg_offs",
        "wg_scale",
    )

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def _upload(values: list[int], device) -> torch.Tensor:
    """Small host integers to the device in one copy (pinned + non_blocking on CUDA: no stream sync)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _block_keys(sizes: torch.Tensor) -> list[int] | None:
    """Received rows are source-major blocks (s, e) with sizes [S, E_l]; to list them expert-major (e, s),
    each block gets the key e*S + s. None when the two orders coincide."""
    s, el = sizes.shape
    if s == 1 or el == 1 or int(sizes.sum()) == 0:
        return None
    return (torch.arange(el)[None, :] * s + torch.arange(s)[:, None]).reshape(-1).tolist()


def _expert_major(keys: torch.Tensor, sizes: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather index listing source-major rows expert-major, and its inverse (device tensors)."""
    blk = torch.repeat_interleave(keys, sizes, output_size=total)
    perm = torch.argsort(blk, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(total, device=perm.device)
    return perm, inv


class ExpertExchange(torch.autograd.Function):
    """send rows (all chunks, chunk-major) -> dispatch a2a -> local experts -> combine a2a -> rows back
    in the send order. Pipelined over chunks in forward and backward (see the module docstring); the
    weight gradients are computed once for all chunks at the end of backward (moe_experts.py)."""

    @staticmethod
    def forward(ctx, plan: DispatchPlan, send_x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor):
        k_chunks, group, h = plan.chunks, plan.group, send_x.shape[1]
        cdt = send_x.dtype
        gu, dn = gate_up.detach().to(cdt), down.detach().to(cdt)
        ins = send_x.split(plan.send_rows)
        recv, dw, cw, saved = [None] * k_chunks, [None] * k_chunks, [None] * k_chunks, [None] * k_chunks
        out = send_x.new_empty(sum(plan.send_rows), h)
        out_chunks = out.split(plan.send_rows)

        def start_dispatch(c):
            recv[c] = send_x.new_empty(plan.recv_rows[c], h)
            dw[c] = all_to_all_async(recv[c], ins[c], plan.recv_splits[c], plan.send_splits[c], group)

        start_dispatch(0)
        for c in range(k_chunks):
            if c + 1 < k_chunks:
                start_dispatch(c + 1)  # in flight while chunk c computes
            dw[c].wait()
            perm, inv = plan.perm[c], plan.inv_perm[c]
            xs = recv[c] if perm is None else recv[c].index_select(0, perm)  # source-major -> expert-major
            recv[c] = None
            y, hid = swiglu_forward(xs, gu, dn, plan.act, plan.offs[c], plan.expert_counts[c])
            if plan.needs_grad:
                saved[c] = (xs, hid)
            if plan.etp_reduce_group is not None:  # sum the I-slices' partial outputs
                dist.all_reduce(y, group=plan.etp_reduce_group)
            y = y if inv is None else y.index_select(0, inv)
            cw[c] = all_to_all_async(out_chunks[c], y, plan.send_splits[c], plan.recv_splits[c], group)
        for w in cw:
            w.wait()
        if plan.needs_grad:  # through save_for_backward, so activation checkpointing can drop them
            ctx.save_for_backward(gu, dn, *[t for pair in saved for t in pair])
        ctx.plan, ctx.w_dtypes = plan, (gate_up.dtype, down.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan = ctx.plan
        gu, dn, *flat = ctx.saved_tensors
        saved = [(flat[2 * c], flat[2 * c + 1]) for c in range(plan.chunks)]
        del flat
        k_chunks, group, h = plan.chunks, plan.group, grad_out.shape[1]
        grad_out = grad_out.contiguous().to(gu.dtype)
        gins = grad_out.split(plan.send_rows)
        grad_x = grad_out.new_empty(sum(plan.send_rows), h)
        gx_chunks = grad_x.split(plan.send_rows)
        want_w = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        keep = [None] * k_chunks  # (xs, dh, a, dy) per chunk for the weight gradients
        grecv, w1, w2 = [None] * k_chunks, [None] * k_chunks, [None] * k_chunks

        def start(c):  # reverse of the combine: output gradients to the expert ranks
            grecv[c] = grad_out.new_empty(plan.recv_rows[c], h)
            w1[c] = all_to_all_async(grecv[c], gins[c], plan.recv_splits[c], plan.send_splits[c], group)

        start(0)
        for c in range(k_chunks):
            if c + 1 < k_chunks:
                start(c + 1)
            w1[c].wait()
            perm, inv = plan.perm[c], plan.inv_perm[c]
            dy = grecv[c] if perm is None else grecv[c].index_select(0, perm)
            grecv[c] = None
            xs, hid = saved[c]
            saved[c] = None
            dxs, dh, a = swiglu_backward_input(dy, hid, gu, dn, plan.act, plan.offs[c], plan.expert_counts[c])
            if want_w:
                keep[c] = (xs, dh, a, dy)
            dx = dxs if inv is None else dxs.index_select(0, inv)
            if plan.etp_reduce_group is not None:  # each etp rank holds only its I-slice's share
                dist.all_reduce(dx, group=plan.etp_reduce_group)
            w2[c] = all_to_all_async(gx_chunks[c], dx, plan.send_splits[c], plan.recv_splits[c], group)
        g_gu = g_dn = None
        if want_w:  # while the last chunks' gradients travel: one grouped GEMM per weight, all chunks
            if k_chunks == 1:
                xs, dh, a, dy = keep[0]
            else:
                xs, dh, a, dy = (torch.cat(parts) for parts in zip(*keep))
                if plan.wg_perm is not None:  # chunk-major -> expert-major over all chunks
                    xs, dh, a, dy = (t.index_select(0, plan.wg_perm) for t in (xs, dh, a, dy))
            keep = None
            if ctx.needs_input_grad[2]:
                g_gu = weight_grad(dh, xs, plan.wg_offs, plan.wg_counts)
            if ctx.needs_input_grad[3]:
                g_dn = weight_grad(dy, a, plan.wg_offs, plan.wg_counts)
            if plan.wg_scale != 1.0:  # every token arrived once per replica of it (ExpertGroups.replicas)
                g_gu, g_dn = (None if t is None else t.mul_(plan.wg_scale) for t in (g_gu, g_dn))
            g_gu = None if g_gu is None else g_gu.to(ctx.w_dtypes[0])
            g_dn = None if g_dn is None else g_dn.to(ctx.w_dtypes[1])
        for w in w2:
            w.wait()
        return None, grad_x, g_gu, g_dn


class AllToAllDispatcher:
    """Drop-in for moe.LocalDispatcher under expert parallelism.

    groups: an expert_parallel.ExpertGroups. Statistics are this rank's tokens with global expert ids:
    tokens_per_expert [E] routed (before any drop) assignments, dropped = dropped (token, slot) assignments.
    """

    def __init__(
        self,
        groups,
        num_experts: int,
        top_k: int,
        routing: str = "dropless",
        capacity_factor: float = 1.25,
        chunks: int = 1,
    ):
        if routing not in ("dropless", "capacity"):
            raise ValueError(f"moe_routing '{routing}' unknown; use dropless or capacity")
        if chunks < 1:
            raise ValueError(f"parallel.moe_overlap_chunks must be >= 1, got {chunks}")
        self.groups, self.num_experts, self.top_k = groups, num_experts, top_k
        self.routing, self.capacity_factor, self.chunks = routing, capacity_factor, chunks

    def _gather_counts(self, payload: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if g.dispatch_group is None:
            return payload[None]
        out = payload.new_empty(g.dispatch_size * payload.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, payload, group=g.dispatch_group)
        return out.view(g.dispatch_size, -1)

    def __call__(self, x: torch.Tensor, route, experts):
        g = self.groups
        e_all, k_chunks = self.num_experts, self.chunks
        t, k = route.experts.shape
        dev = x.device
        ep, el = g.ep_size, self.num_experts // g.ep_size
        rep = g.etp_size if g.sequence_parallel else 1  # copies of each assignment (one per etp rank)
        me = g.dispatch_rank
        flat_e = route.experts.reshape(-1)
        flat_w = route.weights.reshape(-1)
        bounds = [c * t // k_chunks for c in range(k_chunks + 1)]

        # 1. the global router: every rank's per-chunk routed counts and token count
        counts_k = torch.stack(
            [count_assignments(flat_e[bounds[c] * k : bounds[c + 1] * k], e_all) for c in range(k_chunks)]
        )  # [K, E]
        payload = torch.cat([counts_k.reshape(-1), torch.full((1,), t, dtype=counts_k.dtype, device=dev)])
        host = self._gather_counts(payload).cpu()  # the layer's one host sync
        routed = host[:, :-1].reshape(-1, k_chunks, e_all)  # [G, K, E]
        if self.routing == "capacity":
            cap = expert_capacity(self.capacity_factor, int(host[:, -1].sum()), k, e_all)
            flat_rc = routed.reshape(-1, e_all)
            start = (torch.cumsum(flat_rc, 0) - flat_rc).view_as(routed)  # (rank, chunk)-major prefix
            kept = (cap - start).clamp(min=0).minimum(routed)
        else:
            kept = routed
        n_kept = int(kept[me].sum())

        # 2. plan: split sizes per chunk; owner p holds experts [p*el, (p+1)*el)
        kept_owner = kept.view(-1, k_chunks, ep, el).sum(-1)  # [G, K, ep]
        mine = kept[:, :, g.ep_rank * el : (g.ep_rank + 1) * el]  # [G, K, el]: rows each source sends me
        send_splits = [[int(n) for n in kept_owner[me, c] for _ in range(rep)] for c in range(k_chunks)]
        recv_splits = [[int(n) for n in mine[:, c].sum(-1)] for c in range(k_chunks)]
        expert_counts = [[int(n) for n in mine[:, c].sum(0)] for c in range(k_chunks)]
        # one upload for every small index the device needs
        up = [n for row in expert_counts for n in row]
        if self.routing == "capacity":
            up += start[me, 0].tolist()
        keys = [_block_keys(mine[:, c]) for c in range(k_chunks)]
        for c in range(k_chunks):
            if keys[c] is not None:
                up += keys[c] + mine[:, c].reshape(-1).tolist()
        wg_counts = [sum(col) for col in zip(*expert_counts)]
        wg_keys = None
        if k_chunks > 1 and el > 1:  # weight gradients regroup all chunks' rows expert-major
            wg_keys = (torch.arange(el)[None, :] * k_chunks + torch.arange(k_chunks)[:, None]).reshape(-1).tolist()
            up += wg_keys + [n for row in expert_counts for n in row]
        up.append(int(routed[me].sum()) - n_kept)  # dropped assignments (last value)
        dev_vals = _upload(up, dev)
        pos = k_chunks * el
        ec_dev = dev_vals[:pos].view(k_chunks, el)
        offs = torch.cumsum(ec_dev, 1, dtype=torch.int32).unbind(0)
        wg_offs = torch.cumsum(ec_dev.sum(0), 0, dtype=torch.int32)
        if self.routing == "capacity":
            offsets, pos = dev_vals[pos : pos + e_all], pos + e_all
        perm, inv_perm = [None] * k_chunks, [None] * k_chunks
        for c in range(k_chunks):
            if keys[c] is not None:
                nb = len(keys[c])
                perm[c], inv_perm[c] = _expert_major(
                    dev_vals[pos : pos + nb], dev_vals[pos + nb : pos + 2 * nb], sum(recv_splits[c])
                )
                pos += 2 * nb
        wg_perm = None
        if wg_keys is not None and sum(wg_counts):
            nb = len(wg_keys)
            wg_perm, _ = _expert_major(dev_vals[pos : pos + nb], dev_vals[pos + nb : pos + 2 * nb], sum(wg_counts))
        plan = DispatchPlan(
            chunks=k_chunks,
            group=g.dispatch_group,
            etp_reduce_group=g.etp_group if (g.etp_size > 1 and not g.sequence_parallel) else None,
            send_rows=[sum(s) for s in send_splits],
            recv_rows=[sum(r) for r in recv_splits],
            send_splits=send_splits,
            recv_splits=recv_splits,
            expert_counts=expert_counts,
            offs=offs,
            perm=perm,
            inv_perm=inv_perm,
            act=experts.act,
            needs_grad=False,
            wg_perm=wg_perm,
            wg_counts=wg_counts,
            wg_offs=wg_offs,
            wg_scale=1.0 / g.replicas,
        )

        # chunk of each assignment: token i is in chunk ceil((i+1)K/T) - 1 (bounds[c] = c*T//K)
        tok = torch.arange(t * k, device=dev) // k
        key = ((tok + 1) * k_chunks + t - 1) // max(t, 1) - 1
        key = key * e_all + flat_e
        if self.routing == "capacity":
            keep = capacity_keep(flat_e, e_all, cap, offsets)
            key = torch.where(keep, key, k_chunks * e_all)

        # 3. source side: (chunk, expert)-sorted kept assignments, one copy per destination rank
        sel = torch.argsort(key, stable=True)[:n_kept]
        if rep > 1:
            blocks = sel.split([int(n) for n in kept_owner[me].reshape(-1)])
            sel = torch.cat([b for b in blocks for _ in range(rep)])
        token_of = sel // k
        (x_in,) = to_autocast(x)  # the experts' first op casts anyway: gather and ship the cheaper dtype
        send_x = x_in.index_select(0, token_of)
        plan.needs_grad = torch.is_grad_enabled() and (
            send_x.requires_grad or any(p.requires_grad for p in (experts.gate_up_proj, experts.down_proj))
        )
        y = experts(send_x, plan)
        y = y * flat_w.index_select(0, sel)[:, None].to(y.dtype)
        if rep > 1 and x.dtype in (torch.bfloat16, torch.float16):
            # k slots x etp partial sums per token: add them in fp32 (CUDA index_add order is not fixed)
            out = torch.zeros(x.shape, dtype=torch.float32, device=dev).index_add_(0, token_of, y.float()).to(x.dtype)
        else:
            out = torch.zeros_like(x).index_add_(0, token_of, y.to(x.dtype))
        return out, route, {"tokens_per_expert": counts_k.sum(0), "dropped": dev_vals[-1]}


__all__ = ["AllToAllDispatcher", "DispatchPlan"]
