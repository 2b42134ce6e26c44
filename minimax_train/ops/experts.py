"""Expert FFN over tokens already grouped by expert: one call for all local experts.

CUDA + bf16 uses torch's grouped GEMM (no host sync); elsewhere a loop over experts (torch's CPU
grouped_mm fails in float32, see design.md). Shared by the local MoE, tensor-parallel experts and
(its `use_grouped_mm` check) the expert-parallel explicit backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import swiglu


def use_grouped_mm(*tensors: torch.Tensor) -> bool:
    """CUDA bf16 operands that torch._grouped_mm takes: it needs 16-byte-aligned strides, i.e. the feature
    dims (the last of [N, K] rows, the last two of [E, K, M] weights) multiples of 8; else the loop."""

    def aligned(t):
        return all(n % 8 == 0 for n in (t.shape[-2:] if t.dim() == 3 else t.shape[-1:]))

    return hasattr(torch, "_grouped_mm") and all(
        t.is_cuda and t.dtype == torch.bfloat16 and aligned(t) for t in tensors
    )


def to_autocast(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast as autocast casts F.linear's operands. torch._grouped_mm is not on autocast's cast list, and
    fp32 master weights would otherwise reach it uncast (and an fp32 input, e.g. a caller outside the
    model), and the grouped GEMM would fall back to the per-expert loop."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return (x, *weights)
    dt = torch.get_autocast_dtype(kind)
    return tuple(t.to(dt) for t in (x, *weights))


def grouped_linear(
    x: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, sizes: list[int] | None = None
) -> torch.Tensor:
    """x [N, in] rows grouped by expert (counts [E] per expert), w [E, out, in] -> [N, out], differentiable.
    `sizes` (counts on the host) spares the loop path a device sync when the caller has them."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[1]) + 0 * w.sum()  # keeps the weight's gradient defined
    x, w = to_autocast(x, w)
    if use_grouped_mm(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.cumsum(counts, 0).to(torch.int32))
    sizes = counts.tolist() if sizes is None else sizes
    return torch.cat([F.linear(part, w[e]) for e, part in enumerate(x.split(sizes)) if part.shape[0]])


def grouped_swiglu(
    x: torch.Tensor,
    counts: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act=F.silu,
    counts_cpu: list[int] | None = None,
) -> torch.Tensor:
    """x [N, H] rows sorted by expert, counts [E] rows per expert (sum N); gate_up [E, 2I, H] (rows
    0..I-1 gate, I..2I-1 up), down [E, H, I]. Returns down_e(act(gate_e x) * up_e x) per row, [N, H]."""
    x, gate_up, down = to_autocast(x, gate_up, down)  # once for both GEMMs
    if counts_cpu is None and not use_grouped_mm(x, gate_up):
        counts_cpu = counts.tolist()  # one host sync for both GEMMs
    return grouped_linear(swiglu(grouped_linear(x, counts, gate_up, counts_cpu), act), counts, down, counts_cpu)
