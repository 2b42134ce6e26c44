"""Grouped-GEMM pieces of the expert FFN with an explicit backward, for the pipelined exchange.

The exchange (moe_dispatch.ExpertExchange) runs each chunk's activation gradient as soon as that chunk's
gradients arrive (its all-to-all back is on the critical path) and the weight gradients ONCE for all chunks
at the end, on the rows of every chunk regrouped by expert: per-chunk weight gradients would write and
add a full expert-weight-sized tensor per chunk, which on GPU costs more than the overlap saves.

Rows are grouped by expert (counts `sizes`, offsets `offs` = cumsum(sizes) as int32 on the device).
CUDA + bf16 uses torch._grouped_mm; elsewhere a loop of torch.mm (CPU float32 grouped_mm fails)."""

from __future__ import annotations

import torch

from ..ops.experts import use_grouped_mm


def rows_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """x [N, K] grouped by expert, w [E, K, M] (any strides): rows of group e times w[e] -> [N, M]."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[-1])
    if use_grouped_mm(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(x[start : start + n], w[e], out=out[start : start + n])
            start += n
    return out


def weight_grad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """a [N, P], b [N, Q] grouped by expert -> [E, P, Q] with out[e] = a_e^T b_e (zeros for empty groups)."""
    if a.shape[0] > 0 and use_grouped_mm(a, b):
        return torch._grouped_mm(a.t(), b, offs=offs)
    out = a.new_zeros(len(sizes), a.shape[1], b.shape[1])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(a[start : start + n].t(), b[start : start + n], out=out[e])
            start += n
    return out


def swiglu_forward(xs, gate_up, down, act, offs, sizes):
    """xs [N, H] grouped by expert; gate_up [E, 2I, H] (gate rows then up rows); down [E, H, I].
    Returns (y [N, H], h [N, 2I] to save for backward)."""
    h = rows_mm(xs, gate_up.transpose(-2, -1), offs, sizes)
    g, u = h.chunk(2, dim=-1)
    return rows_mm(act(g) * u, down.transpose(-2, -1), offs, sizes), h


def swiglu_backward_input(dy, h, gate_up, down, act, offs, sizes):
    """Activation gradient only: returns (dxs [N, H], dh [N, 2I], a [N, I]); dh and a feed weight_grad."""
    with torch.enable_grad():
        hh = h.detach().requires_grad_()
        g, u = hh.chunk(2, dim=-1)
        a = act(g) * u
    da = rows_mm(dy, down, offs, sizes)
    (dh,) = torch.autograd.grad(a, hh, da)
    return rows_mm(dh, gate_up, offs, sizes), dh, a.detach()
