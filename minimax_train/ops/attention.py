"""Document-masked causal softmax attention on packed tokens, returning the log-sum-exp.

One entry point, ``varlen_attention``, with two backends:
- "torch": plain PyTorch (the CPU reference and fallback). A custom autograd function that
  chunks over queries and recomputes the probabilities in backward (flash-attention style), so
  memory stays O(chunk * Tk) in forward and backward; it differentiates w.r.t. q, k, v and lse.
- "flex": torch.nn.attention.flex_attention with a block mask built directly from the block-level
  ranges of (doc, pos), so the dense Tq x Tk mask is never materialised. CUDA only for training
  (FlexAttention has no backward on CPU).

The mask is given by (doc, pos) pairs rather than cu_seqlens so that ring attention (context
parallelism) can call the same op with a local query chunk against a visiting K/V chunk and merge
the partial results with ``merge_partial_attention``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["varlen_attention", "packed_causal_attention", "resolve_packed_backend", "merge_partial_attention"]

# Scores held per query chunk in the torch backend: Hq * chunk * Tk elements (fp32: 128 MiB);
# backward keeps about four such buffers alive.
TORCH_CHUNK_ELEMS = 1 << 25
# FlexAttention's sparse block size (its default); the block mask is built at this granularity.
_FLEX_BLOCK = 128


def _check_inputs(q, k, v, q_doc, q_pos, k_doc, k_pos, sliding_window):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"expected q [Tq, Hq, D], k/v [Tk, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    Tq, Hq, D = q.shape
    Tk, Hkv, Dk = k.shape
    if Dk != D or v.shape[0] != Tk or v.shape[1] != Hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    for name, t, n in (("q_doc", q_doc, Tq), ("q_pos", q_pos, Tq), ("k_doc", k_doc, Tk), ("k_pos", k_pos, Tk)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if t.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window <= 0):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")


def _visible(q_doc, q_pos, k_doc, k_pos, sliding_window):
    """[len(q), len(k)] bool: query i sees key j."""
    dq, pq = q_doc[:, None], q_pos[:, None]
    ok = (dq == k_doc[None, :]) & (k_pos[None, :] <= pq)
    if sliding_window is not None:
        # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window.
        ok &= (pq - k_pos[None, :]) < sliding_window
    return ok


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------


def _chunk_plan(q_doc, q_pos, k_doc, k_pos, sliding_window, chunk):
    """Per query chunk: (start, end, mask restricted to the key columns [lo, hi), lo, hi).

    Restricting to the span of visible key columns skips the causal future and other documents
    for packed (sorted) layouts; a chunk that sees no key at all gets lo == hi.
    """
    Tq = q_doc.shape[0]
    for s in range(0, Tq, chunk):
        e = min(s + chunk, Tq)
        vis = _visible(q_doc[s:e], q_pos[s:e], k_doc, k_pos, sliding_window)
        cols = vis.any(0).nonzero()
        if cols.numel() == 0:
            yield s, e, None, 0, 0
            continue
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        yield s, e, vis[:, lo:hi], lo, hi


class _TorchVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_doc, q_pos, k_doc, k_pos, scale, sliding_window, chunk):
        cd = torch.float64 if q.dtype == torch.float64 else torch.float32
        Tq, Hq, D = q.shape
        Tk, Hkv, Dv = v.shape
        G = Hq // Hkv
        # [Hkv, 1, Tk, D]: the group dim broadcasts, so K/V are never repeated per query head.
        kc = k.to(cd).permute(1, 0, 2).unsqueeze(1)
        vc = v.to(cd).permute(1, 0, 2).unsqueeze(1)
        o = torch.zeros(Tq, Hq, Dv, dtype=q.dtype, device=q.device)
        lse = torch.full((Hq, Tq), float("-inf"), dtype=cd, device=q.device)
        # Autocast off: under bf16 autocast the fp32 score and value matmuls would run in bf16, and the
        # backward (not under autocast) would differentiate another softmax than the forward computed.
        with torch.autocast(device_type=q.device.type, enabled=False):
            for s, e, vis, lo, hi in _chunk_plan(q_doc, q_pos, k_doc, k_pos, sliding_window, chunk):
                if vis is None:
                    continue  # rows that see nothing: o = 0, lse = -inf
                n = e - s
                qc = q[s:e].to(cd).view(n, Hkv, G, D).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
                scores = torch.matmul(qc, kc[:, :, lo:hi].transpose(-1, -2)) * scale  # [Hkv, G, n, Tc]
                scores = scores.masked_fill(~vis, float("-inf"))
                m = scores.amax(-1, keepdim=True)
                m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # fully masked rows
                p = torch.exp(scores - m)
                denom = p.sum(-1, keepdim=True)
                lse_c = m + torch.log(denom)  # log(0) = -inf for rows that see nothing
                oc = torch.matmul(p, vc[:, :, lo:hi]) / torch.where(denom == 0, torch.ones_like(denom), denom)
                o[s:e] = oc.permute(2, 0, 1, 3).reshape(n, Hq, Dv).to(q.dtype)
                lse[:, s:e] = lse_c.reshape(Hq, n)  # head index h = kv_head * G + g
        ctx.save_for_backward(q, k, v, o, lse, q_doc, q_pos, k_doc, k_pos)
        ctx.scale, ctx.sliding_window, ctx.chunk = scale, sliding_window, chunk
        return o, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dlse):
        q, k, v, o, lse, q_doc, q_pos, k_doc, k_pos = ctx.saved_tensors
        cd = lse.dtype
        # dL/dscore_j = p_j * (dO . v_j + row), row = dlse - dO . o  (per query row and head)
        row = torch.zeros_like(lse) if do is None else -(do.to(cd) * o.to(cd)).sum(-1).transpose(0, 1)
        if dlse is not None:
            row = row + dlse.to(cd).nan_to_num(0.0, 0.0, 0.0)
        dq, dk, dv = attention_backward(
            q, k, v, lse, do, row, q_doc, q_pos, k_doc, k_pos, ctx.scale, ctx.sliding_window, ctx.chunk
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def attention_backward(q, k, v, lse, do, row, q_doc, q_pos, k_doc, k_pos, scale, sliding_window, chunk):
    """Flash-attention-style gradients without recomputing the forward: p = exp(s - lse) from the FINAL
    log-sum-exp, dS = p * (dO . v + row). lse, row [Hq, Tq]; do [Tq, Hq, Dv] or None. Shared by the
    op's backward (row = dlse - dO . o) and ring attention's per-block backward (row = -dO . O_final,
    lse of the merged result). Returns dq [Tq, Hq, D], dk [Tk, Hkv, D], dv [Tk, Hkv, Dv] in lse's dtype."""
    cd = lse.dtype
    Tq, Hq, D = q.shape
    Tk, Hkv, Dv = v.shape
    G = Hq // Hkv
    kc = k.to(cd).permute(1, 0, 2).unsqueeze(1)
    vc = v.to(cd).permute(1, 0, 2).unsqueeze(1)
    dq = torch.zeros(Tq, Hq, D, dtype=cd, device=q.device)
    dk = torch.zeros(Hkv, Tk, D, dtype=cd, device=q.device)
    dv = torch.zeros(Hkv, Tk, Dv, dtype=cd, device=q.device)
    for s, e, vis, lo, hi in _chunk_plan(q_doc, q_pos, k_doc, k_pos, sliding_window, chunk):
        if vis is None:
            continue  # no key seen: nothing flows (whatever dlse is for these rows)
        n = e - s
        qc = q[s:e].to(cd).view(n, Hkv, G, D).permute(1, 2, 0, 3)
        scores = torch.matmul(qc, kc[:, :, lo:hi].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~vis, float("-inf"))
        lse_c = lse[:, s:e].reshape(Hkv, G, n, 1)
        lse_c = torch.where(torch.isneginf(lse_c), torch.zeros_like(lse_c), lse_c)
        p = torch.exp(scores - lse_c)  # masked entries and rows that see nothing: exactly 0
        doc_ = (
            torch.zeros(Hkv, G, n, Dv, dtype=cd, device=q.device)
            if do is None
            else (do[s:e].to(cd).view(n, Hkv, G, Dv).permute(1, 2, 0, 3))
        )
        row_c = row[:, s:e].reshape(Hkv, G, n, 1)
        dv[:, lo:hi] += torch.matmul(p.transpose(-1, -2), doc_).sum(1)
        ds = p * (torch.matmul(doc_, vc[:, :, lo:hi].transpose(-1, -2)) + row_c)
        dq[s:e] = (torch.matmul(ds, kc[:, :, lo:hi]) * scale).permute(2, 0, 1, 3).reshape(n, Hq, D)
        dk[:, lo:hi] += torch.matmul(ds.transpose(-1, -2), qc).sum(1) * scale
    return dq, dk.permute(1, 0, 2), dv.permute(1, 0, 2)


def _torch_varlen_attention(q, k, v, q_doc, q_pos, k_doc, k_pos, scale, sliding_window, chunk=None):
    if chunk is None:
        chunk = max(1, TORCH_CHUNK_ELEMS // max(1, q.shape[1] * k.shape[0]))
    return _TorchVarlenAttention.apply(q, k, v, q_doc, q_pos, k_doc, k_pos, float(scale), sliding_window, int(chunk))


# ----------------------------------------------------------------------------------------------
# flex backend
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex_attention materialises the full score matrix; compiled it is a fused kernel.
    return torch.compile(flex_attention)


def _pad_int(x, n, value):
    """x (integer) padded at the end to length n with `value` (F.pad would round it through float)."""
    x = x.long()
    return torch.cat([x, torch.full((n - x.shape[0],), value, dtype=torch.long, device=x.device)])


def _block_ranges(doc, pos, block):
    """Per block of `block` tokens: min/max of doc and pos over the real tokens, and whether full."""
    T = doc.shape[0]
    nb = -(-T // block)
    pad = nb * block - T
    big = torch.iinfo(torch.int64).max

    def rng(x):
        lo = _pad_int(x, nb * block, big).view(nb, block).amin(1)
        hi = _pad_int(x, nb * block, -big).view(nb, block).amax(1)
        return lo, hi

    complete = torch.ones(nb, dtype=torch.bool, device=doc.device)
    if pad:
        complete[-1] = False
    return (*rng(doc), *rng(pos), complete)


def _flex_block_mask(q_doc, q_pos, k_doc, k_pos, sliding_window, block=_FLEX_BLOCK):
    """BlockMask for the (doc, pos) mask, built from block-level ranges (O(nQb * nKb) work).

    A block pair is skipped when no pair can be visible (disjoint doc ranges, keys all in the
    future, or all beyond the window), "full" (mask_mod not evaluated) when every pair is visible
    (one common doc, all keys at or before every query, all within the window, no padding), and
    "partial" otherwise. The classification is conservative: a partial block may turn out empty.
    """
    from torch.nn.attention.flex_attention import BlockMask

    Tq, Tk = q_doc.shape[0], k_doc.shape[0]
    qd_lo, qd_hi, qp_lo, qp_hi, q_full = _block_ranges(q_doc, q_pos, block)
    kd_lo, kd_hi, kp_lo, kp_hi, k_full = _block_ranges(k_doc, k_pos, block)
    qd_lo, qd_hi, qp_lo, qp_hi, q_full = (x[:, None] for x in (qd_lo, qd_hi, qp_lo, qp_hi, q_full))
    kd_lo, kd_hi, kp_lo, kp_hi, k_full = (x[None, :] for x in (kd_lo, kd_hi, kp_lo, kp_hi, k_full))

    empty = (qd_hi < kd_lo) | (kd_hi < qd_lo) | (kp_lo > qp_hi)
    full = (qd_lo == qd_hi) & (kd_lo == kd_hi) & (qd_lo == kd_lo) & (kp_hi <= qp_lo) & q_full & k_full
    if sliding_window is not None:
        empty |= (qp_lo - kp_hi) >= sliding_window
        full &= (qp_hi - kp_lo) < sliding_window
    partial = ~empty & ~full

    def ordered(dense):
        dense = dense.to(torch.int32)[None, None]  # [B=1, H=1, nQb, nKb]
        num = dense.sum(-1).to(torch.int32)
        idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
        return num.contiguous(), idx.contiguous()

    # Lookup tables padded to whole blocks so mask_mod never reads out of range. Padded queries get
    # pos -2^62 and padded keys pos +2^62 (int64: no overflow in the difference), so they never
    # see or are seen. No Python ints other than the window go into the closure: dynamo guards
    # on their values and would recompile for every new length.
    far = 1 << 62
    nq, nk = qd_lo.shape[0] * block, kd_lo.shape[1] * block
    qd_t, kd_t = _pad_int(q_doc, nq, 0), _pad_int(k_doc, nk, 0)
    qp_t, kp_t = _pad_int(q_pos, nq, -far), _pad_int(k_pos, nk, far)

    if sliding_window is None:

        def mask_mod(b, h, qi, ki):
            return (qd_t[qi] == kd_t[ki]) & (kp_t[ki] <= qp_t[qi])
    else:
        w = int(sliding_window)

        def mask_mod(b, h, qi, ki):
            dp = qp_t[qi] - kp_t[ki]
            return (qd_t[qi] == kd_t[ki]) & (dp >= 0) & (dp < w)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(Tq, Tk)
    )


def _flex_varlen_attention(q, k, v, q_doc, q_pos, k_doc, k_pos, scale, sliding_window, return_lse, mask_cache):
    from torch.nn.attention.flex_attention import AuxRequest

    key = ("flex_block_mask", sliding_window)
    if mask_cache is not None and key in mask_cache:
        block_mask = mask_cache[key]
    else:
        block_mask = _flex_block_mask(q_doc, q_pos, k_doc, k_pos, sliding_window)
        if mask_cache is not None:
            mask_cache[key] = block_mask
    flex = _compiled_flex_attention()
    Hq, Hkv = q.shape[1], k.shape[1]
    # [T, H, D] -> [1, H, T, D] views; flex accepts strided inputs (last dim contiguous).
    qf, kf, vf = (x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v))
    if return_lse:
        out, aux = flex(
            qf, kf, vf, block_mask=block_mask, scale=float(scale), enable_gqa=Hq != Hkv, return_aux=AuxRequest(lse=True)
        )
        return out[0].permute(1, 0, 2), aux.lse[0]
    out = flex(qf, kf, vf, block_mask=block_mask, scale=float(scale), enable_gqa=Hq != Hkv)
    return out[0].permute(1, 0, 2), None


# ----------------------------------------------------------------------------------------------
# flash kernels over cu_seqlens (CUDA): FA2 and cuDNN through PyTorch's own aten ops
# ----------------------------------------------------------------------------------------------


def _lse_heads_first(lse: torch.Tensor, t: int, h: int) -> torch.Tensor:
    """The kernels' log-sum-exp as [H, T] fp32 (FA2 varlen gives [H, T]; cuDNN [T, H, 1] or [1, H, T, 1])."""
    if lse.shape == (h, t):
        return lse
    flat = lse.reshape(-1)
    if lse.dim() >= 2 and lse.shape[-1] == 1 and flat.numel() == t * h:
        lead = [d for d in lse.shape if d != 1]
        if lead == [t, h]:
            return flat.view(t, h).t()
        if lead == [h, t]:
            return flat.view(h, t)
    raise RuntimeError(f"unexpected log-sum-exp shape {tuple(lse.shape)} for T={t}, H={h}")


def _windows(sliding_window):
    # transformers' window: key j visible from query i iff i - j < w, i.e. FA's window_size_left = w - 1
    return (-1, -1) if sliding_window is None else (int(sliding_window) - 1, 0)


class _FlashVarlen(torch.autograd.Function):
    """FA2 (aten._flash_attention_forward/_backward) over packed documents: causal per document, GQA native."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale, sliding_window):
        left, right = _windows(sliding_window)
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale,
            window_size_left=left, window_size_right=right,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, cu, rng, unused)
        ctx.max_len, ctx.scale, ctx.window = max_len, scale, (left, right)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        left, right = ctx.window
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused,
            scale=ctx.scale, window_size_left=left, window_size_right=right,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


class _CudnnVarlen(torch.autograd.Function):
    """cuDNN's fused attention (aten._cudnn_attention_forward/_backward) over packed documents, causal per
    document. K/V come with as many heads as q (the caller repeats them when cuDNN lacks GQA)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):
        res = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale
        )
        out, lse, seed, offset = res[0], res[1], res[6], res[7]
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len, ctx.scale = max_len, scale
        lse_ht = _lse_heads_first(lse, q.shape[0], q.shape[1])
        ctx.mark_non_differentiable(lse_ht)
        return out, lse_ht

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            do.contiguous(), q, k, v, out, lse, seed, offset, None, cu, cu, ctx.max_len, ctx.max_len, 0.0, True,
            scale=ctx.scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


PACKED_BACKENDS = ("auto", "fa2", "cudnn", "flex", "torch")


def _half_on_cuda(q) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def resolve_packed_backend(q, backend: str) -> str:
    """The packed backend "auto" stands for: flex on CUDA, torch elsewhere."""
    if backend not in PACKED_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(PACKED_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "flex" if q.is_cuda else "torch"
    return backend


def packed_causal_attention(
    q, k, v, cu_seqlens, max_seqlen, *, scale, sliding_window=None, return_lse=False, backend="auto", seq_meta=None
):
    """Causal softmax attention within the documents of ONE packed token stream (the local, non-ring case).

    q [T, Hq, D], k/v [T, Hkv, D] over the same T tokens; cu_seqlens [N+1] int32 document boundaries;
    max_seqlen the longest document. Same result as varlen_attention with doc ids and positions from
    cu_seqlens. backend: "fa2" / "cudnn" (CUDA bf16/fp16 flash kernels, the log-sum-exp is not
    differentiable; they need max_seqlen), "flex" / "torch" (through varlen_attention, which needs
    seq_meta = (doc_ids, positions, mask_cache)), or "auto" (resolve_packed_backend)."""
    backend = resolve_packed_backend(q, backend)
    if backend in ("fa2", "cudnn"):
        if not _half_on_cuda(q):
            raise ValueError(f"backend {backend!r} needs CUDA fp16/bf16 inputs, got {q.dtype} on {q.device}")
        cu = cu_seqlens.to(torch.int32)
        if backend == "fa2":
            o, lse = _FlashVarlen.apply(q, k, v, cu, int(max_seqlen), float(scale), sliding_window)
        else:
            if sliding_window is not None:
                raise ValueError("backend 'cudnn' has no sliding window; use fa2 or flex")
            rep = q.shape[1] // k.shape[1]
            if rep > 1:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            o, lse = _CudnnVarlen.apply(q, k, v, cu, int(max_seqlen), float(scale))
        return (o, lse) if return_lse else o
    if seq_meta is None:
        raise ValueError(f"backend {backend!r} needs seq_meta=(doc_ids, positions, mask_cache)")
    doc, pos, cache = seq_meta
    return varlen_attention(
        q, k, v, q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=scale, sliding_window=sliding_window,
        return_lse=return_lse, backend=backend, mask_cache=cache,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def varlen_attention(
    q,
    k,
    v,
    *,
    q_doc,
    q_pos,
    k_doc,
    k_pos,
    scale,
    sliding_window=None,
    return_lse=False,
    backend="auto",
    mask_cache=None,
):
    """Causal, document-masked softmax attention over packed tokens (no batch dim).

    q [Tq, Hq, D]; k, v [Tk, Hkv, D], Hq % Hkv == 0 (query head h uses kv head h // (Hq // Hkv)).
    Query i sees key j iff q_doc[i] == k_doc[j] and k_pos[j] <= q_pos[i] and (sliding_window is
    None or q_pos[i] - k_pos[j] < sliding_window), the transformers sliding-window convention.
    pos are indices in the packed sequence (not RoPE positions).

    Softmax in fp32 (fp64 for fp64 inputs); o [Tq, Hq, D] in q.dtype. With return_lse also
    lse [Hq, Tq] (fp32, fp64 for fp64 inputs on the torch backend): natural-log log-sum-exp of the
    scaled masked scores, -inf for a row that sees no key (its o is 0; no NaN, also in backward).
    Differentiable w.r.t. q, k, v and lse. backend: "torch", "flex", or "auto" (flex for CUDA
    fp16/bf16/fp32, torch otherwise). mask_cache: a dict that lives as long as these q/k positions
    (e.g. PackedSequence.cache), so the softmax layers of one sequence share one flex block mask.
    """
    _check_inputs(q, k, v, q_doc, q_pos, k_doc, k_pos, sliding_window)
    if sliding_window is not None:
        sliding_window = int(sliding_window)
    if backend == "auto":
        flex_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        backend = "flex" if flex_ok else "torch"
    if backend == "torch":
        o, lse = _torch_varlen_attention(q, k, v, q_doc, q_pos, k_doc, k_pos, scale, sliding_window)
    elif backend == "flex":
        o, lse = _flex_varlen_attention(
            q, k, v, q_doc, q_pos, k_doc, k_pos, scale, sliding_window, return_lse, mask_cache
        )
    else:
        raise ValueError(f"backend must be 'auto', 'torch' or 'flex', got {backend!r}")
    return (o, lse) if return_lse else o


def merge_partial_attention(o1, lse1, o2, lse2):
    """Merge two partial attention results over disjoint key sets by log-sum-exp.

    o [Tq, Hq, D], lse [Hq, Tq]. Returns (o, lse) as if attention had run over the union of the
    keys. Computed in fp32 (fp64 if an input is fp64); o comes back in the promoted dtype of o1
    and o2 (so a ring-attention accumulator kept in fp32 stays fp32), lse in the promoted dtype
    of lse1, lse2 and fp32 (fp64 if o is fp64). -inf safe in forward and backward: a side with lse = -inf gets weight
    0 and zero gradient, and rows with both sides -inf give o = 0, lse = -inf.
    """
    out_dtype = torch.promote_types(o1.dtype, o2.dtype)
    cd = torch.promote_types(torch.promote_types(lse1.dtype, lse2.dtype), torch.float32)
    cd = torch.promote_types(cd, out_dtype)
    a, b = lse1.to(cd), lse2.to(cd)
    m = torch.maximum(a, b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    s = torch.exp(a - m) + torch.exp(b - m)
    # where-guards (not logaddexp) so that rows with both sides -inf give zero, not NaN, gradients
    empty = s == 0
    lse = torch.where(
        empty, torch.full_like(s, float("-inf")), m + torch.log(torch.where(empty, torch.ones_like(s), s))
    )
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    w1 = torch.exp(a - lse_safe).transpose(0, 1).unsqueeze(-1)  # [Tq, Hq, 1]
    w2 = torch.exp(b - lse_safe).transpose(0, 1).unsqueeze(-1)
    o = w1 * o1.to(cd) + w2 * o2.to(cd)
    return o.to(out_dtype), lse
