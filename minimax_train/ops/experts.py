"""Expert FFN over tokens already grouped by expert: one call for all local experts.

CUDA + bf16 uses torch's grouped GEMM; elsewhere a loop over experts (torch's CPU grouped_mm
fails in float32, see design.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   act=F.silu, counts_cpu: list[int] | None = None) -> torch.Tensor:
    """x [N, H] rows sorted by expert, counts [E] rows per expert (sum N); gate_up [E, 2I, H] (rows
    0..I-1 gate, I..2I-1 up), down [E, H, I]. Returns down_e(act(gate_e x) * up_e x) per row, [N, H]."""
    if x.shape[0] == 0:
        return x.new_zeros(0, down.shape[1]) + 0 * (gate_up.sum() + down.sum())  # keep grads defined
    if _grouped_mm_ok(x):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(act(g) * u, down.transpose(-2, -1), offs=offs)
    sizes = counts_cpu if counts_cpu is not None else counts.tolist()
    outs = []
    for e, part in enumerate(x.split(sizes)):
        if part.shape[0] == 0:
            continue
        g, u = F.linear(part, gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(act(g) * u, down[e]))
    return torch.cat(outs) if outs else x.new_zeros(0, down.shape[1])
