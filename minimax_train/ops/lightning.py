"""Lightning attention (MiniMax linear attention with a scalar decay per head).

Recurrence per head, with lambda > 0 and gamma = exp(-lambda):
    S_t = gamma * S_{t-1} + k_t^T v_t        (S is d_k x d_v, S_0 = initial state or 0)
    o_t = q_t S_t
No softmax, no 1/sqrt(d) scale, no normaliser: q, k, v arrive already activated.

Backends behind `lightning_attention`:
- "torch": blockwise PyTorch (the CPU path and the oracle for GPU kernels).
- "fla":   fla-core's Triton `chunk_simple_gla` with g_gamma = -lambda, scale = 1.
`lightning_attention_naive` is a token-by-token float64 loop, for tests only.
"""

from __future__ import annotations

import torch

__all__ = ["lightning_slopes", "lightning_attention", "lightning_attention_naive"]

_BACKENDS = ("auto", "torch", "fla")


def lightning_slopes(
    num_heads: int, layer_idx: int, num_layers: int, *, legacy: bool = False, device=None
) -> torch.Tensor:
    """Per-head decay rates lambda_h (fp32 [H]) of lightning layer `layer_idx`.

    lambda_h = 2^(-8(h+1)/H) * factor, with factor
      transformers:      1 - l/(L - 1 + 1e-5) + 1e-5
      legacy (original): 1 - l/(L - 1) + 1e-5
    Evaluated with the same float ops as transformers' get_slope_rate (Python-float base raised to a
    float32 exponent tensor, then times the Python-float factor) so exported models reproduce its
    buffers bit for bit.
    """
    if num_heads < 1 or num_layers < 1 or not 0 <= layer_idx < num_layers:
        raise ValueError(
            f"lightning_slopes: need num_heads >= 1 and 0 <= layer_idx < num_layers, "
            f"got num_heads={num_heads}, layer_idx={layer_idx}, num_layers={num_layers}"
        )
    base = 1 / (2 ** (8 / num_heads))
    exponent = torch.arange(num_heads, device=device, dtype=torch.float32) + 1
    if legacy:
        # The original release divides by L-1; a one-layer model would divide 0 by 0.
        factor = 1 - (layer_idx / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
    else:
        factor = 1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5
    return (base**exponent) * factor


def _check_inputs(q, k, v, slopes, cu_seqlens, initial_state, block_size) -> int:
    """Validate shapes; return N, the number of sequences."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"lightning_attention: q, k must be [B, T, H, D] of one shape and v [B, T, H, Dv]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"lightning_attention: q, k, v need one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, T, H, Dk = q.shape
    if slopes.shape != (H,):
        raise ValueError(f"lightning_attention: slopes must be [H]=[{H}], got {tuple(slopes.shape)}")
    if block_size < 1:
        raise ValueError(f"lightning_attention: block_size must be >= 1, got {block_size}")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(
                f"lightning_attention: cu_seqlens must be an integer [N+1] tensor, "
                f"got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
            )
        if B != 1:
            raise ValueError(f"lightning_attention: cu_seqlens (packed varlen) requires B == 1, got B={B}")
        N = cu_seqlens.numel() - 1
    else:
        N = B
    if initial_state is not None and initial_state.shape != (N, H, Dk, v.shape[-1]):
        raise ValueError(
            f"lightning_attention: initial_state must be [N, H, Dk, Dv]={[N, H, Dk, v.shape[-1]]}, "
            f"got {list(initial_state.shape)}"
        )
    return N


def fla_chunk_simple_gla():
    """fla-core's kernel, or None when it cannot be imported (CPU machines do not install it)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        return None
    return chunk_simple_gla


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    block_size: int = 256,
    backend: str = "auto",
    cu_seqlens_host: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning attention over [B, T, H, D] inputs.

    q, k, v: [B, T, H, D] (v may have its own Dv), already activated, not scaled.
    slopes: [H] decay rates lambda > 0 (see lightning_slopes); per-step decay exp(-lambda).
    cu_seqlens: int [N+1] document boundaries over T (0 ... T) of a packed row; requires B == 1.
        No state crosses a boundary. Without it each of the B rows is one sequence (N = B).
    initial_state: [N, H, D, Dv] state before each sequence's first token (fp32 expected).
    block_size: torch backend's block length; only shapes buffers, never the result.
    backend: "torch", "fla" or "auto" (fla when q is on CUDA and fla imports, else torch).
    cu_seqlens_host: the same boundaries on the host (optional): fla then sizes its grids without reading
        the device copy (no host-device sync); pass one tensor object per sequence, fla caches by identity.

    Returns (o [B, T, H, Dv] in q.dtype, final states [N, H, D, Dv] or None). The state is held
    in fp32 (fp64 when the inputs are fp64, so the op can be checked against a float64 oracle).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"lightning_attention: backend must be one of {_BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, slopes, cu_seqlens, initial_state, block_size)
    if backend == "auto":
        backend = "fla" if q.is_cuda and fla_chunk_simple_gla() is not None else "torch"
    if backend == "fla":
        return _lightning_fla(q, k, v, slopes, cu_seqlens, initial_state, output_final_state, cu_seqlens_host)
    if cu_seqlens_host is not None:
        cu_seqlens = cu_seqlens_host
    return _lightning_torch(q, k, v, slopes, cu_seqlens, initial_state, output_final_state, block_size)


def _lightning_fla(q, k, v, slopes, cu_seqlens, initial_state, output_final_state, cu_seqlens_host=None):
    chunk_simple_gla = fla_chunk_simple_gla()
    if chunk_simple_gla is None:
        raise ImportError(
            "lightning_attention(backend='fla') needs fla-core (pip extra 'cuda'); use backend='torch' on CPU"
        )
    if not q.is_cuda:
        raise ValueError("lightning_attention(backend='fla') needs CUDA tensors; use backend='torch' on CPU")
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.long)
        if cu_seqlens_host is not None:
            from .fla_varlen import remember_host_cu_seqlens

            remember_host_cu_seqlens(cu_seqlens, cu_seqlens_host)
    else:
        cu_seqlens_host = None
    if initial_state is not None:
        initial_state = initial_state.float()  # the kernel's state is fp32; keep the contract on both backends
    # g_gamma is a per-head log-decay; scale=1.0 because MiniMax does not scale q.
    o, final = chunk_simple_gla(
        q,
        k,
        v,
        g_gamma=-slopes.to(device=q.device, dtype=torch.float32),
        scale=1.0,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_host,
    )
    return o.to(q.dtype), (final if output_final_state else None)


def _lightning_torch(q, k, v, slopes, cu_seqlens, initial_state, output_final_state, block_size):
    # State math in fp32 whatever the input dtype (fp64 passes through so tests can hit 1e-10).
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = slopes.to(device=q.device, dtype=cdt)
    s0 = None if initial_state is None else initial_state.to(cdt)
    # Autocast would push the block matmuls back to bf16 and defeat the fp32 state.
    with torch.autocast(device_type=q.device.type, enabled=False):
        # [B, T, H, D] -> [B, H, T, D]: blocks become contiguous slices along T for the matmuls.
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        if cu_seqlens is None:
            o, final = _blockwise(qh, kh, vh, lam, s0, block_size)
        else:
            # One document at a time, blocks aligned to each document's start: no state can leak
            # across a boundary, and short or mid-block documents need no masking.
            bounds = cu_seqlens.tolist()
            if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(a > b for a, b in zip(bounds, bounds[1:])):
                raise ValueError(f"lightning_attention: cu_seqlens must rise from 0 to T={q.shape[1]}, got {bounds}")
            outs, finals = [], []
            for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                s0_n = None if s0 is None else s0[n : n + 1]
                o_n, f_n = _blockwise(qh[:, :, s:e], kh[:, :, s:e], vh[:, :, s:e], lam, s0_n, block_size)
                outs.append(o_n)
                finals.append(f_n)
            o = torch.cat(outs, dim=2)
            final = torch.cat(finals, dim=0)
    return o.transpose(1, 2).to(q.dtype), (final if output_final_state else None)


def _blockwise(q, k, v, lam, s0, block_size):
    """Equal-length sequences, q, k: [N, H, T, Dk], v: [N, H, T, Dv]; lam [H] and s0 [N, H, Dk, Dv] in
    the compute dtype. Returns (o [N, H, T, Dv] compute dtype, final state [N, H, Dk, Dv]).

    Per block of m tokens (i, j = 1..m) with incoming state S:
      O = [(Q K^T) * D] V + (Q * a) S,   D_ij = exp(-lam (i-j)) if i >= j else 0,  a_i = exp(-lam i)
      S <- exp(-lam m) S + (K * b)^T V,  b_j = exp(-lam (m-j))
    """
    N, H, T, Dk = q.shape
    Dv = v.shape[-1]
    cdt = lam.dtype
    if T == 0:
        final = s0 if s0 is not None else q.new_zeros(N, H, Dk, Dv, dtype=cdt)
        return q.new_zeros(N, H, 0, Dv, dtype=cdt), final
    m = min(block_size, T)
    pos = torch.arange(1, m + 1, device=q.device, dtype=cdt)
    q_decay = torch.exp(-lam[:, None] * pos)[..., None]  # [H, m, 1]  a_i
    k_decay = torch.exp(-lam[:, None] * (m - pos))[..., None]  # [H, m, 1]  b_j for a full block
    rel = pos[:, None] - pos[None, :]
    # clamp keeps exp() finite above the diagonal; where() then zeroes those entries.
    diag = torch.where(rel >= 0, torch.exp(-lam[:, None, None] * rel.clamp(min=0)), 0.0)  # [H, m, m]

    state = s0
    outs = []
    for start in range(0, T, m):
        r = min(m, T - start)  # the last block may be short
        qb, kb, vb = (x[:, :, start : start + r].to(cdt) for x in (q, k, v))
        ob = ((qb @ kb.transpose(-1, -2)) * diag[:, :r, :r]) @ vb
        if state is not None:  # skipped only while the state is exactly zero
            ob = ob + (qb * q_decay[:, :r]) @ state
        # A short block of r tokens uses the tail of b: exp(-lam (r - j)) = k_decay[m - r + j - 1].
        kv = (kb * k_decay[:, m - r :]).transpose(-1, -2) @ vb
        state = kv if state is None else state * torch.exp(-lam * r)[:, None, None] + kv
        outs.append(ob)
    return torch.cat(outs, dim=2), state


def lightning_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token float64 recurrence, the test oracle (slow; differentiable).

    Same arguments as lightning_attention; returns float64 outputs and final states.
    """
    N = _check_inputs(q, k, v, slopes, cu_seqlens, initial_state, 1)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    q, k, v = q.double(), k.double(), v.double()
    gamma = torch.exp(-slopes.to(device=q.device, dtype=torch.float64))[:, None, None]
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        seqs = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    rows = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, s, e) in enumerate(seqs):
        S = q.new_zeros(H, Dk, Dv) if initial_state is None else initial_state[n].double()
        for t in range(s, e):
            S = gamma * S + k[b, t][:, :, None] * v[b, t][:, None, :]
            rows[b][t] = torch.einsum("hd,hde->he", q[b, t], S)
        finals.append(S)
    assert len(finals) == N
    o = torch.stack([torch.stack(r) for r in rows]) if T > 0 else q.new_zeros(B, 0, H, Dv)
    return o, (torch.stack(finals) if output_final_state else None)
