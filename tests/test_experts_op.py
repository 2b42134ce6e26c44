"""ops.experts: the grouped expert FFN against a float64 per-expert reference, and its autocast casting
(torch._grouped_mm is not on autocast's cast list, so grouped_linear casts like F.linear would)."""

import torch
import torch.nn.functional as F

from minimax_train.ops.experts import grouped_swiglu, to_autocast


def _reference(x, counts, gu, dn):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        g, u = (xe @ gu[e].T).chunk(2, dim=-1)
        out.append((F.silu(g) * u) @ dn[e].T)
        start += n
    return torch.cat(out)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 7])
    x = torch.randn(int(counts.sum()), 16, generator=g, dtype=dtype)
    gu = torch.randn(5, 2 * 24, 16, generator=g, dtype=dtype) * 0.3
    dn = torch.randn(5, 16, 24, generator=g, dtype=dtype) * 0.3
    return x, counts, gu, dn


def test_grouped_swiglu_matches_per_expert_reference_in_float64():
    x, counts, gu, dn = _inputs(torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, gu, dn)]
    got = grouped_swiglu(leaves[0], counts, leaves[1], leaves[2])
    ref_leaves = [t.clone().requires_grad_() for t in (x, gu, dn)]
    ref = _reference(ref_leaves[0], counts, ref_leaves[1], ref_leaves[2])
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_autocast_runs_the_experts_in_the_autocast_dtype_with_fp32_weight_gradients():
    x, counts, gu, dn = _inputs()
    leaves = [t.clone().requires_grad_() for t in (x, gu, dn)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in to_autocast(*leaves)] == [torch.bfloat16] * 3
        y = grouped_swiglu(leaves[0], counts, leaves[1], leaves[2])
    assert y.dtype == torch.bfloat16
    ref = _reference(x.double(), counts, gu.double(), dn.double())
    assert ((y.double() - ref).norm() / ref.norm()) < 2e-2  # bf16 rounding, not a different function
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves)
    assert [t.dtype for t in to_autocast(*leaves)] == [torch.float32] * 3  # outside autocast: untouched
