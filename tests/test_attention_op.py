"""Softmax attention op (varlen, lse, merge) and RoPE: vs float64 dense references and transformers."""

import math
import shutil

import pytest
import torch

from minimax_train.ops.attention import (
    _flex_block_mask,
    _torch_varlen_attention,
    _visible,
    merge_partial_attention,
    varlen_attention,
)
from minimax_train.ops.rope import apply_rope, rope_cos_sin

F64 = torch.float64
NEG_INF = float("-inf")


def _docs(lengths, ids=None):
    ids = range(len(lengths)) if ids is None else ids
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in zip(ids, lengths)])


def _qkv(Tq, Tk, Hq, Hkv, D, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(Tq, Hq, D, generator=g, dtype=F64).to(dtype).requires_grad_()
    k = torch.randn(Tk, Hkv, D, generator=g, dtype=F64).to(dtype).requires_grad_()
    v = torch.randn(Tk, Hkv, D, generator=g, dtype=F64).to(dtype).requires_grad_()
    return q, k, v


def _reference(q, k, v, q_doc, q_pos, k_doc, k_pos, scale, window=None):
    """Dense float64 attention with an explicit [Tq, Tk] mask (independent of the op's code)."""
    G = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    mask = torch.zeros(len(q_doc), len(k_doc), dtype=torch.bool)
    for i in range(len(q_doc)):
        for j in range(len(k_doc)):
            d = int(q_pos[i]) - int(k_pos[j])
            mask[i, j] = q_doc[i] == k_doc[j] and d >= 0 and (window is None or d < window)
    s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see nothing: 0
    return torch.einsum("hqk,khd->qhd", p, vv), lse


def _grads(o, lse, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g, dtype=F64)
    gl = torch.randn(lse.shape, generator=g, dtype=F64)
    # the lse cotangent is only meaningful where lse is finite (no key: no dependence)
    loss = (o.double() * go).sum() + (torch.where(torch.isinf(lse), 0.0, lse.double()) * gl).sum()
    return torch.autograd.grad(loss, inputs)


def _check(q, k, v, q_doc, q_pos, k_doc, k_pos, window, chunk=None, tol=1e-10):
    scale = q.shape[-1] ** -0.5
    if chunk is None:
        o, lse = varlen_attention(
            q,
            k,
            v,
            q_doc=q_doc,
            q_pos=q_pos,
            k_doc=k_doc,
            k_pos=k_pos,
            scale=scale,
            sliding_window=window,
            return_lse=True,
            backend="torch",
        )
    else:
        o, lse = _torch_varlen_attention(q, k, v, q_doc, q_pos, k_doc, k_pos, scale, window, chunk=chunk)
    ro, rlse = _reference(q, k, v, q_doc, q_pos, k_doc, k_pos, scale, window)
    assert o.dtype == q.dtype and lse.shape == (q.shape[1], q.shape[0])
    torch.testing.assert_close(o.double(), ro, atol=tol, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    fin = torch.isfinite(rlse)
    torch.testing.assert_close(lse.double()[fin], rlse[fin], atol=tol, rtol=0)
    got, ref = _grads(o, lse, (q, k, v), 1), _grads(ro, rlse, (q, k, v), 1)
    for a, b in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=0)
    return o, lse


LAYOUTS = {
    "one_doc": [40],
    "many_docs": [7, 1, 13, 2, 9, 8],  # a length-1 doc included
    "ids_not_sorted": ([10, 1, 15, 14], [5, 2, 9, 0]),  # arbitrary integer ids
}


@pytest.mark.parametrize("window", [None, 1, 5], ids=["nowin", "win1", "win5"])
@pytest.mark.parametrize("Hkv", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_backend_vs_reference(layout, Hkv, window):
    spec = LAYOUTS[layout]
    doc = _docs(*spec) if isinstance(spec, tuple) else _docs(spec)
    T = len(doc)
    pos = torch.arange(T)
    q, k, v = _qkv(T, T, 4, Hkv, 8, seed=T + Hkv)
    _check(q, k, v, doc, pos, doc, pos, window)


@pytest.mark.parametrize("window", [None, 3])
def test_chunked_queries_match(window):
    """Small query chunks (the bounded-memory path) give the same result as one chunk."""
    doc = _docs([5, 1, 11, 6])
    pos = torch.arange(len(doc))
    q, k, v = _qkv(len(doc), len(doc), 4, 2, 8, seed=3)
    _check(q, k, v, doc, pos, doc, pos, window, chunk=3)


def test_default_chunking_with_many_chunks():
    """The automatic chunk size splits when Hq * Tk is large (8 * 2200 keys -> ~1900-row chunks)."""
    T = 2200
    doc = _docs([1000, 1, 1199])
    pos = torch.arange(T)
    q, k, v = _qkv(T, T, 8, 2, 16, seed=11, dtype=torch.float32)
    with torch.no_grad():
        o, lse = varlen_attention(
            q, k, v, q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=0.25, return_lse=True, backend="torch"
        )
        o1, lse1 = _torch_varlen_attention(q, k, v, doc, pos, doc, pos, 0.25, None, chunk=T)
    torch.testing.assert_close(o, o1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lse1, atol=1e-6, rtol=1e-6)


RING = {
    # (q positions, k positions, doc lengths of the whole packed row)
    "q_after_k": (range(8, 16), range(0, 8), [16]),
    "q_before_k": (range(0, 8), range(8, 16), [16]),  # every row sees nothing
    "doc_starts_in_q": (range(8, 16), range(0, 8), [5, 6, 5]),  # rows 11..15 see nothing
    "zigzag": ([0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11], [3, 9, 4]),
}


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("case", list(RING))
def test_ring_chunks(case, window):
    """q and k are different chunks of one packed sequence, as ring attention calls it."""
    qp, kp, lengths = RING[case]
    doc = _docs(lengths)
    q_pos, k_pos = torch.tensor(list(qp)), torch.tensor(list(kp))
    q, k, v = _qkv(len(q_pos), len(k_pos), 4, 2, 8, seed=len(lengths))
    o, lse = _check(q, k, v, doc[q_pos], q_pos, doc[k_pos], k_pos, window)
    dead = torch.isneginf(lse).all(0)
    assert (o[dead] == 0).all()
    if case == "q_before_k":
        assert dead.all()


def test_no_key_rows_have_zero_finite_grads():
    q, k, v = _qkv(4, 4, 2, 1, 8, seed=0)
    kw = dict(
        q_doc=torch.zeros(4, dtype=torch.long),
        q_pos=torch.arange(4),
        k_doc=torch.zeros(4, dtype=torch.long),
        k_pos=torch.arange(4) + 4,
        scale=0.3,
    )
    o, lse = varlen_attention(q, k, v, **kw, return_lse=True, backend="torch")
    assert torch.isneginf(lse).all() and (o == 0).all()
    (o.sum() + lse.clamp_min(-1e9).sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_gradcheck_including_lse():
    doc = _docs([3, 1, 4])
    pos = torch.arange(8)
    q, k, v = _qkv(8, 8, 2, 1, 4, seed=5)

    def fn(q, k, v):
        o, lse = varlen_attention(
            q,
            k,
            v,
            q_doc=doc,
            q_pos=pos,
            k_doc=doc,
            k_pos=pos,
            scale=0.7,
            sliding_window=3,
            return_lse=True,
            backend="torch",
        )
        return o, lse

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_low_precision_inputs_compute_in_fp32():
    doc = _docs([9, 1, 14])
    pos = torch.arange(24)
    q, k, v = _qkv(24, 24, 4, 2, 16, seed=9, dtype=torch.bfloat16)
    o, lse = varlen_attention(
        q, k, v, q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=0.25, return_lse=True
    )  # auto -> torch on CPU
    ro, rlse = _reference(q, k, v, doc, pos, doc, pos, 0.25)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), ro, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse.double(), rlse, atol=1e-5, rtol=1e-5)
    o.float().square().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16


def test_input_validation():
    q, k, v = _qkv(4, 4, 3, 2, 8, seed=0)
    z, p = torch.zeros(4, dtype=torch.long), torch.arange(4)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, v, q_doc=z, q_pos=p, k_doc=z, k_pos=p, scale=1.0)
    q, k, v = _qkv(4, 4, 4, 2, 8, seed=0)
    with pytest.raises(ValueError, match="sliding_window"):
        varlen_attention(q, k, v, q_doc=z, q_pos=p, k_doc=z, k_pos=p, scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="q_doc"):
        varlen_attention(q, k, v, q_doc=z[:3], q_pos=p, k_doc=z, k_pos=p, scale=1.0)
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, q_doc=z, q_pos=p, k_doc=z, k_pos=p, scale=1.0, backend="sdpa")


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("split", ["random", "ring_halves"])
def test_merge_equals_full(split, window):
    doc = _docs([6, 1, 9, 8])
    T = len(doc)
    pos = torch.arange(T)
    q, k, v = _qkv(T, T, 4, 2, 8, seed=21)
    if split == "random":
        sel = torch.randperm(T, generator=torch.Generator().manual_seed(0)) < T // 2
    else:  # first half / second half of the keys: late rows see only part 2, early rows only part 1
        sel = pos < T // 2
    i1, i2 = sel.nonzero()[:, 0], (~sel).nonzero()[:, 0]
    kw = dict(q_doc=doc, q_pos=pos, scale=0.35, sliding_window=window, return_lse=True, backend="torch")
    o1, l1 = varlen_attention(q, k[i1], v[i1], k_doc=doc[i1], k_pos=pos[i1], **kw)
    o2, l2 = varlen_attention(q, k[i2], v[i2], k_doc=doc[i2], k_pos=pos[i2], **kw)
    assert (torch.isneginf(l1) | torch.isneginf(l2)).any()  # one-sided rows are exercised
    o, lse = merge_partial_attention(o1, l1, o2, l2)
    ro, rlse = _reference(q, k, v, doc, pos, doc, pos, 0.35, window)
    torch.testing.assert_close(o, ro, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=1e-12, rtol=0)
    got, ref = _grads(o, lse, (q, k, v), 2), _grads(ro, rlse, (q, k, v), 2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_merge_both_empty_rows_no_nan():
    g = torch.Generator().manual_seed(0)
    o1 = torch.randn(3, 2, 4, generator=g, dtype=F64, requires_grad=True)
    o2 = torch.randn(3, 2, 4, generator=g, dtype=F64, requires_grad=True)
    l1 = torch.tensor([[NEG_INF, 0.5, NEG_INF], [NEG_INF, NEG_INF, 1.0]], dtype=F64, requires_grad=True)
    l2 = torch.tensor([[NEG_INF, NEG_INF, 2.0], [NEG_INF, 0.1, -3.0]], dtype=F64, requires_grad=True)
    o, lse = merge_partial_attention(o1, l1, o2, l2)
    assert torch.isneginf(lse[:, 0]).all() and (o[0] == 0).all()
    assert lse[0, 1] == 0.5 and torch.equal(o[1, 0], o1[1, 0])  # one side empty: the other side as is
    (o.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum() + lse.clamp_min(-5).sum()).backward()
    for t in (o1, o2, l1, l2):
        assert torch.isfinite(t.grad).all()
    assert (o1.grad[0] == 0).all() and (l1.grad[:, 0] == 0).all()


def test_merge_dtypes():
    g = torch.Generator().manual_seed(0)
    o1 = torch.randn(5, 2, 4, generator=g).bfloat16()
    o2 = torch.randn(5, 2, 4, generator=g).bfloat16()
    l1, l2 = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    o, lse = merge_partial_attention(o1, l1, o2, l2)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    acc, _ = merge_partial_attention(o1.float(), l1, o2, l2)  # fp32 accumulator stays fp32
    assert acc.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logaddexp(l1, l2))


# ---------------------------------------------------------------------------------------------
# flex block mask (its structure is CPU-testable; the kernel is tested on the GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [None, 1, 130])
@pytest.mark.parametrize(
    "case",
    ["causal", "docs", "ring_q_after_k", "ring_q_before_k", "unsorted"],
)
def test_flex_block_mask_is_sound(case, window):
    """Every visible pair lies in a listed block; every 'full' block is entirely visible."""
    g = torch.Generator().manual_seed(0)
    if case == "causal":
        q_doc = k_doc = torch.zeros(300, dtype=torch.long)
        q_pos = k_pos = torch.arange(300)
    elif case == "docs":
        q_doc = k_doc = _docs([1, 128, 200, 1, 70])
        q_pos = k_pos = torch.arange(400)
    elif case.startswith("ring"):
        doc, pos = _docs([100, 300, 50]), torch.arange(450)
        a, b = slice(200, 450), slice(0, 200)
        if case == "ring_q_before_k":
            a, b = b, a
        q_doc, q_pos, k_doc, k_pos = doc[a], pos[a], doc[b], pos[b]
    else:  # arbitrary order and ids: only soundness is promised
        perm = torch.randperm(260, generator=g)
        q_doc = k_doc = torch.randint(0, 3, (260,), generator=g)[perm]
        q_pos = k_pos = perm
    bm = _flex_block_mask(q_doc, q_pos, k_doc, k_pos, window)
    B = 128
    vis = _visible(q_doc, q_pos, k_doc, k_pos, window)
    nqb, nkb = -(-len(q_doc) // B), -(-len(k_doc) // B)
    vis_p = torch.zeros(nqb * B, nkb * B, dtype=torch.bool)
    vis_p[: len(q_doc), : len(k_doc)] = vis
    blocks = vis_p.view(nqb, B, nkb, B)
    any_vis, all_vis = blocks.any(3).any(1), blocks.all(3).all(1)

    def dense(num, idx):
        d = torch.zeros(nqb, nkb, dtype=torch.bool)
        for i in range(nqb):
            d[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
        return d

    partial = dense(bm.kv_num_blocks, bm.kv_indices)
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any()
    assert not (any_vis & ~(partial | full)).any(), "a visible pair was skipped"
    assert not (full & ~all_vis).any(), "a 'full' block holds masked pairs"
    if case != "unsorted":  # sorted packed layouts: block ranges classify exactly
        assert not (partial & ~any_vis).any()
        assert not (partial & all_vis).any()
    # mask_mod equals the mask, also past the end (padding never visible)
    qi = torch.arange(nqb * B)[:, None]
    ki = torch.arange(nkb * B)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, qi, ki), vis_p)


@pytest.mark.parametrize("window", [None, 50])
def test_flex_forward_on_cpu(window):
    """Compiled flex on CPU (forward only, no lse there) with our block mask equals the reference."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler for flex_attention on CPU")
    doc = _docs([1, 150, 90, 59])
    pos = torch.arange(300)
    q, k, v = (t.detach() for t in _qkv(300, 300, 4, 2, 16, seed=4, dtype=torch.float32))
    o = varlen_attention(
        q, k, v, q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=0.25, sliding_window=window, backend="flex"
    )
    ro, _ = _reference(q, k, v, doc, pos, doc, pos, 0.25, window)
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# transformers parity (the external oracle)
# ---------------------------------------------------------------------------------------------


def _hf_attention(window, seed=0):
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxAttention, MiniMaxRotaryEmbedding

    cfg = MiniMaxConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_hidden_layers=1,
        layer_types=["full_attention"],
        sliding_window=window,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    attn = MiniMaxAttention(cfg, 0).float().eval()
    for p in attn.parameters():  # larger than default init, so attention is far from uniform
        torch.nn.init.normal_(p, std=0.4)
    return cfg, attn, MiniMaxRotaryEmbedding(cfg)


def _ours(attn, cfg, x, rope_pos, doc, window):
    T = x.shape[0]
    q = attn.q_proj(x).view(T, 4, 8)
    k = attn.k_proj(x).view(T, 2, 8)
    v = attn.v_proj(x).view(T, 2, 8)
    cos, sin = rope_cos_sin(rope_pos, head_dim=8, rotary_dim=8, theta=cfg.rope_parameters["rope_theta"], dtype=x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pos = torch.arange(T)
    o = varlen_attention(
        q, k, v, q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=attn.scaling, sliding_window=window, backend="torch"
    )
    return attn.o_proj(o.reshape(T, 32))


@pytest.mark.parametrize("window", [None, 5], ids=["full", "sliding5"])
@pytest.mark.parametrize("packed", [False, True], ids=["one_doc", "packed"])
def test_matches_transformers_attention(window, packed):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg, attn, rotary = _hf_attention(window)
    lengths = [7, 1, 12, 4] if packed else [24]
    T = sum(lengths)
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(1))
    # packed: positions restart per document; transformers then builds a document mask itself
    rope_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    make_mask = create_causal_mask if window is None else create_sliding_window_causal_mask  # as MiniMaxModel
    mask = make_mask(config=cfg, inputs_embeds=x, attention_mask=None, past_key_values=None, position_ids=rope_pos)
    with torch.no_grad():
        ref, _ = attn(x, position_embeddings=rotary(x, rope_pos), attention_mask=mask)
        got = _ours(attn, cfg, x[0], rope_pos[0], _docs(lengths), window)
    assert (got - ref[0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("theta", [10000.0, 1e7])
def test_rope_matches_transformers_exactly(theta, dtype):
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxRotaryEmbedding, apply_rotary_pos_emb

    D = 32
    cfg = MiniMaxConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 300_000, (2, 17), generator=g)
    x = torch.randn(2, 17, 3, D, generator=g).to(dtype)
    ref_cos, ref_sin = MiniMaxRotaryEmbedding(cfg)(x, pos)
    cos, sin = rope_cos_sin(pos, head_dim=D, rotary_dim=D, theta=theta, dtype=dtype)
    assert cos.dtype == dtype and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    ref_q, ref_k = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2) * 2, ref_cos, ref_sin)
    assert torch.equal(apply_rope(x, cos, sin), ref_q.transpose(1, 2))
    assert torch.equal(apply_rope(x * 2, cos, sin), ref_k.transpose(1, 2))


def test_partial_rotary_vs_float64_formula():
    """Original-release mode: rotate dims [0, r) with theta^(-2i/r), pairs (i, i + r/2); rest pass."""
    D, r, theta = 16, 8, 10000.0
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 200, (11,), generator=g)
    x = torch.randn(11, 3, D, generator=g, dtype=F64)
    cos, sin = rope_cos_sin(pos, head_dim=D, rotary_dim=r, theta=theta, dtype=F64)
    assert cos.shape == (11, r)
    got = apply_rope(x, cos, sin)
    ref = x.clone()
    for t in range(11):
        for i in range(r // 2):
            a = int(pos[t]) * theta ** (-2 * i / r)
            x1, x2 = x[t, :, i], x[t, :, i + r // 2]
            ref[t, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            ref[t, :, i + r // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    # angles are formed in fp32 (as transformers does): ~pos * 1e-7 rad of error
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert torch.equal(got[..., r:], x[..., r:])


def test_rope_rejects_bad_rotary_dim():
    with pytest.raises(ValueError):
        rope_cos_sin(torch.arange(3), head_dim=8, rotary_dim=10, theta=1e4, dtype=torch.float32)
    with pytest.raises(ValueError):
        rope_cos_sin(torch.arange(3), head_dim=8, rotary_dim=5, theta=1e4, dtype=torch.float32)


def test_flex_lse_and_gqa_plumbing_on_cpu(monkeypatch):
    """Uncompiled flex (dense math path, forward only on CPU) through our layout and lse handling."""
    from torch.nn.attention import flex_attention as fa

    import minimax_train.ops.attention as attention

    monkeypatch.setattr(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)  # no compile, no warning
    monkeypatch.setattr(attention, "_compiled_flex_attention", lambda: fa.flex_attention)
    doc = _docs([5, 6, 5])
    q_pos, k_pos = torch.arange(8, 16), torch.arange(0, 8)  # rows 11..15 see nothing
    q, k, v = (t.detach() for t in _qkv(8, 8, 4, 2, 16, seed=8, dtype=torch.float32))
    o, lse = varlen_attention(
        q,
        k,
        v,
        q_doc=doc[q_pos],
        q_pos=q_pos,
        k_doc=doc[k_pos],
        k_pos=k_pos,
        scale=0.3,
        return_lse=True,
        backend="flex",
    )
    ro, rlse = _reference(q, k, v, doc[q_pos], q_pos, doc[k_pos], k_pos, 0.3)
    assert o.shape == q.shape and lse.shape == (4, 8) and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), ro, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    torch.testing.assert_close(lse.double()[torch.isfinite(rlse)], rlse[torch.isfinite(rlse)], atol=1e-5, rtol=1e-5)
