"""LASP+ for lightning layers: decay-aware, document-aware context parallelism with one all-gather.

Per head, gamma = exp(-lambda). Every zigzag chunk (n tokens of one row) is an affine map of the state
carried into it: S_out = A * S_in + M, with M the chunk's end state from a zero start and A = gamma^n if
no document starts at any of the chunk's positions, else 0. A rank

1. runs the lightning op on its local pieces (local cu_seqlens: document starts and segment starts) from a
   zero state, giving the local outputs and, per local segment, M (the final state of its last piece);
2. all-gathers M of every chunk (fp32 [cp, 2*rows, H, d, d]; A follows from the shared metadata);
3. composes the incoming state of its chunks in global chunk order, S_in(c+1) = A_c S_in(c) + M_c, from
   S_in = 0 at every row start;
4. adds the carried state's contribution to the tokens before the chunk's first document start:
   o_t += gamma^(t+1) q_t S_in (t = 0, 1, ... inside the chunk).

Backward is exact: autograd runs through the composition, the all-gather's backward is a reduce-scatter
(sum) of the gradients of every chunk's M, and the lightning op back-propagates the gradient of its final
states (fla-core on CUDA, the PyTorch reference on CPU). The correction is a small autograd function that
keeps no fp32 copies of q.

`mode="serial"` is the older LASP scheme, kept as the benchmark baseline: the state travels chunk by chunk
through a serial chain of point-to-point messages and every rank waits for it before computing its chunk
(forward), or for the gradient of its outgoing state before its backward, so the chunks' work is serialised
across ranks (2*cp chunk computations in a row instead of one local computation per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.lightning import lightning_attention
from .collectives import all_gather_stacked, group_size, recv_state, send_state
from .cp_shard import CPShardInfo

_CORR_ROWS = 16384  # rows per fp32 temporary in the prefix correction


def chunk_decays(info: CPShardInfo, slopes: torch.Tensor, dtype) -> torch.Tensor:
    """A [rows, 2*cp, H]: gamma^n for chunks without a document start, 0 for the others."""
    full = torch.exp(-slopes.to(dtype) * info.chunk)  # [H]
    keep = (~info.chunk_has_start).to(device=slopes.device, dtype=dtype)  # [rows, 2cp]
    return keep[..., None] * full


def _global_grid(m_all: torch.Tensor, info: CPShardInfo) -> torch.Tensor:
    """[cp, 2*rows, ...] gathered local states -> [rows, 2*cp, ...] in global chunk order."""
    cp, rows = info.size, info.rows
    per = m_all.view(cp, rows, 2, *m_all.shape[2:]).transpose(0, 1)  # [rows, cp, 2, ...]
    chunks = torch.arange(2 * cp, device=m_all.device)
    owner = torch.where(chunks < cp, chunks, 2 * cp - 1 - chunks)
    slot = (chunks >= cp).long()
    return per[:, owner, slot]


def _prefix_states_allgather(m_loc: torch.Tensor, a_grid: torch.Tensor, info: CPShardInfo, group) -> torch.Tensor:
    """LASP+: incoming state [2*rows, H, dk, dv] of every local segment from one all-gather of M."""
    m_grid = _global_grid(all_gather_stacked(m_loc, group), info)  # [rows, 2cp, H, dk, dv]
    wanted = sorted(set(info.seg_chunk))
    state = torch.zeros_like(m_grid[:, 0])
    s_in = {}
    for c in range(wanted[-1] + 1):
        if c in wanted:
            s_in[c] = state
        if c < wanted[-1]:
            state = a_grid[:, c, :, None, None] * state + m_grid[:, c]
    # local segment j = (row j // 2, chunk seg_chunk[j])
    return torch.stack([s_in[c][j // 2] for j, c in enumerate(info.seg_chunk)])


def _serial_lasp(q, k, v, slopes, seq, group, block_size, backend):
    """LASP (the baseline, as OpenNLPLab/LASP's LaspNaive on the zigzag layout): each rank WAITS for the
    state of the preceding chunk before computing its own chunk, in global chunk order, and in backward
    waits for the gradient of its outgoing state before back-propagating its chunk. Chunk c lives on rank
    c (c < cp) or 2cp-1-c: rank r receives S_in(r) from r-1, computes chunk r from it (the received state
    is the initial state of the chunk's first piece), sends S_out(r) to r+1, later receives S_in(2cp-1-r)
    from r+1 (rank cp-1 keeps its own), computes that chunk and sends its S_out to r-1. Plain autograd
    (checkpointing-safe); the p2p nodes' backward sends/receives the state gradients in reverse order."""
    info: CPShardInfo = seq.cp
    r, cp, rows, n = info.rank, info.size, info.rows, info.chunk
    peer = lambda i: dist.get_global_rank(group, i)  # noqa: E731
    bounds = seq.cu_seqlens.tolist()
    H, dk, dv = q.shape[1], q.shape[2], v.shape[2]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    like = torch.empty(rows, H, dk, dv, dtype=cd, device=q.device)
    outs, tokens = [], []
    s_out = token0 = None
    for slot in (0, 1):
        segs = [2 * b + slot for b in range(rows)]
        if slot == 0:
            # `after` hangs the receive on q, k, v (a zero), so that its backward - sending the state's gradient
            # to r-1 - runs whenever any of them is differentiated, also by autograd.grad(..., inputs=...)
            anchor = (
                sum(x.reshape(-1)[:1].sum() for x in (q, k, v) if x.requires_grad) * 0.0
                if torch.is_grad_enabled()
                else None
            )
            s_in = like.new_zeros(like.shape) if r == 0 else recv_state(anchor, like, peer(r - 1), group)
        else:
            # after slot 0's send: orders the backward (slot 1's gradient goes out before slot 0 waits)
            s_in = s_out if r == cp - 1 else recv_state(token0, like, peer(r + 1), group)
        qs, ks, vs = (torch.cat([x[j * n : (j + 1) * n] for j in segs]) for x in (q, k, v))
        cu, first_piece, last_piece = [0], [], []
        for i, j in enumerate(segs):
            first_piece.append(len(cu) - 1)
            cu.extend(b - j * n + i * n for b in bounds if j * n < b <= (j + 1) * n)
            last_piece.append(len(cu) - 2)
        carries = torch.tensor([float(info.seg_first_start[j] > 0) for j in segs], dtype=cd, device=q.device)
        init = torch.zeros(len(cu) - 1, H, dk, dv, dtype=cd, device=q.device).index_add(
            0, torch.tensor(first_piece, device=q.device), s_in * carries[:, None, None, None]
        )
        o_s, finals = lightning_attention(
            qs[None],
            ks[None],
            vs[None],
            slopes,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=q.device),
            cu_seqlens_host=torch.tensor(cu, dtype=torch.long),
            initial_state=init,
            output_final_state=True,
            block_size=block_size,
            backend=backend,
        )
        s_out = finals[torch.tensor(last_piece, device=q.device)]
        if slot == 0 and r < cp - 1:
            token0 = send_state(s_out, peer(r + 1), group)
            tokens.append(token0)
        elif slot == 1 and r > 0:
            tokens.append(send_state(s_out, peer(r - 1), group))
        outs.append(o_s[0])
    pieces = [outs[j % 2][(j // 2) * n : (j // 2 + 1) * n] for j in range(2 * rows)]
    o = torch.cat(pieces)
    for t in tokens:  # keep the send nodes on the path to the loss (adds zeros)
        o = o + t.to(o.dtype)
    return o


class _PrefixCorrection(torch.autograd.Function):
    """o_out = o, plus gamma^(t+1) q_t S_j on rows [s_j, s_j + f_j) for each span (j, s_j, f_j)."""

    @staticmethod
    def forward(ctx, o, q, states, slopes, spans):
        cd = states.dtype
        lam = slopes.to(device=q.device, dtype=cd)
        out = o.clone()
        with torch.autocast(device_type=q.device.type, enabled=False):  # keep the state products in fp32
            _PrefixCorrection._forward(out, q, states, lam, spans)
        ctx.save_for_backward(q, states, lam)
        ctx.spans = spans
        return out

    @staticmethod
    def _forward(out, q, states, lam, spans):
        cd = states.dtype
        for j, s0, f in spans:
            for a in range(0, f, _CORR_ROWS):
                b = min(f, a + _CORR_ROWS)
                dec = torch.exp(-lam[None, :] * torch.arange(a + 1, b + 1, device=q.device, dtype=cd)[:, None])
                c = torch.einsum("thk,hkv->thv", q[s0 + a : s0 + b].to(cd), states[j]) * dec[..., None]
                out[s0 + a : s0 + b] = (out[s0 + a : s0 + b].to(cd) + c).to(out.dtype)

    @staticmethod
    def backward(ctx, g):
        q, states, lam = ctx.saved_tensors
        dq = torch.zeros_like(q) if ctx.needs_input_grad[1] else None
        ds = torch.zeros_like(states)
        with torch.autocast(device_type=q.device.type, enabled=False):
            _PrefixCorrection._backward(g, q, states, lam, ctx.spans, dq, ds)
        return g, dq, ds, None, None

    @staticmethod
    def _backward(g, q, states, lam, spans, dq, ds):
        cd = states.dtype
        for j, s0, f in spans:
            for a in range(0, f, _CORR_ROWS):
                b = min(f, a + _CORR_ROWS)
                dec = torch.exp(-lam[None, :] * torch.arange(a + 1, b + 1, device=q.device, dtype=cd)[:, None])
                gd = g[s0 + a : s0 + b].to(cd) * dec[..., None]  # [m, H, dv]
                if dq is not None:
                    dq[s0 + a : s0 + b] = torch.einsum("thv,hkv->thk", gd, states[j]).to(q.dtype)
                ds[j] += torch.einsum("thk,thv->hkv", q[s0 + a : s0 + b].to(cd), gd)


def lasp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    seq,
    group,
    *,
    block_size: int = 256,
    mode: str = "plus",
    backend: str = "auto",
) -> torch.Tensor:
    """Lightning attention of one context-parallel shard. q, k, v [T_local, H, D] (activated), seq a
    CPPackedSequence from shard_for_context_parallel; returns [T_local, H, Dv] equal to the corresponding
    rows of the single-process result. mode: "plus" (one all-gather) or "serial" (LASP baseline)."""
    info: CPShardInfo = seq.cp
    if mode not in ("plus", "serial"):
        raise ValueError(f"lasp mode must be 'plus' or 'serial', got {mode!r}")
    world = group_size(group)
    if world != info.size:
        raise ValueError(f"context-parallel group has {world} ranks but the sequence was sharded for cp={info.size}")
    if mode == "serial" and world > 1:
        return _serial_lasp(q, k, v, slopes, seq, group, block_size, backend)
    o, finals = lightning_attention(
        q[None],
        k[None],
        v[None],
        slopes,
        cu_seqlens=seq.cu_seqlens_long,
        cu_seqlens_host=seq.cu_seqlens_host,
        output_final_state=True,
        block_size=block_size,
        backend=backend,
    )
    o = o[0]
    m_loc = finals[info.seg_last_piece.to(finals.device)]  # [2*rows, H, dk, dv] fp32 (fp64 for fp64 inputs)
    a_grid = chunk_decays(info, slopes.to(m_loc.device), m_loc.dtype)
    s_loc = _prefix_states_allgather(m_loc, a_grid, info, group)
    spans = [(j, j * info.chunk, f) for j, f in enumerate(info.seg_first_start) if f > 0 and info.seg_chunk[j] > 0]
    if not spans:
        return o
    return _PrefixCorrection.apply(o, q, s_loc, slopes, spans)


class LaspCore:
    """The lightning attention core under context parallelism (model/parts.py's LightningCore): `decays` are
    the layer's per-head decay rates (parts.DecayRates, this rank's heads). A sequence without CP metadata
    (a plain PackedSequence: the whole row on this rank, e.g. evaluation) runs locally."""

    def __init__(self, decays, group, *, block_size: int, mode: str = "plus", backend: str = "auto"):
        if mode not in ("plus", "serial"):
            raise ValueError(f"lasp mode must be 'plus' or 'serial', got {mode!r}")
        self.decays, self.group, self.block_size, self.mode, self.backend = decays, group, block_size, mode, backend

    def __call__(self, q, k, v, seq):
        slopes = self.decays.on(q.device)
        if getattr(seq, "cp", None) is None:
            o, _ = lightning_attention(q[None], k[None], v[None], slopes, cu_seqlens=seq.cu_seqlens_long,
                                       block_size=self.block_size, backend=self.backend)  # fmt: skip
            return o[0]
        return lasp_attention(
            q, k, v, slopes, seq, self.group, block_size=self.block_size, mode=self.mode, backend=self.backend
        )

    def __repr__(self) -> str:
        return f"LaspCore({self.decays}, mode={self.mode!r}, backend={self.backend!r})"


__all__ = ["LaspCore", "lasp_attention", "chunk_decays"]
