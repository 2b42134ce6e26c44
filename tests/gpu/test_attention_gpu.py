"""FlexAttention backend of varlen_attention vs the torch backend in float64 on the same GPU.

Relative errors ||got - ref|| / ||ref|| against the float64 result of the same (rounded) inputs:
float32 allows TF32-level 2e-3, bf16 2e-2 (flex keeps P in bf16 for the PV product); lse is
compared in absolute terms. Rows that see no key must give o = 0, lse = -inf and finite grads.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from minimax_train.ops.attention import merge_partial_attention, varlen_attention  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def _enough_recompiles():
    # Each dtype / window / GQA variant is its own compiled graph; past dynamo's default limit
    # flex would fall back to the unfused dense path. The option's name changed across releases.
    for name in ("recompile_limit", "cache_size_limit"):
        try:
            setattr(torch._dynamo.config, name, 64)
        except (AttributeError, KeyError):
            pass


def _docs(lengths, dev):
    return torch.cat([torch.full((n,), i, dtype=torch.int32, device=dev) for i, n in enumerate(lengths)])


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _run(backend, q, k, v, kw, seed):
    """Forward with lse, then backward of a random functional of (o, lse): (o, lse, dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o, lse = varlen_attention(q, k, v, **kw, return_lse=True, backend=backend)
    g = torch.Generator(device=q.device).manual_seed(seed)
    go = torch.randn(o.shape, generator=g, device=q.device, dtype=torch.float32).to(o.dtype)
    gl = torch.randn(lse.shape, generator=g, device=q.device, dtype=torch.float32).to(lse.dtype)
    finite = torch.isfinite(lse)
    loss = (o * go).float().sum() + torch.where(finite, lse * gl, torch.zeros_like(lse)).float().sum()
    loss.backward()
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def _compare(q, k, v, kw, dtype, seed=0):
    got = _run("flex", q.to(dtype), k.to(dtype), v.to(dtype), kw, seed)
    ref = _run("torch", q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), kw, seed)
    o, lse = got[0], got[1]
    assert o.dtype == dtype and lse.dtype == torch.float32
    dead = torch.isneginf(ref[1])
    assert torch.equal(torch.isneginf(lse), dead), "rows that see no key must have lse = -inf"
    assert (o.permute(1, 0, 2)[dead] == 0).all()
    for t in got:
        assert not torch.isnan(t).any()
    for name, a, b in zip(("o", "dq", "dk", "dv"), (got[0], *got[2:]), (ref[0], *ref[2:])):
        err = _rel(a, b)
        assert err < TOL[dtype], f"{name}: rel err {err:.2e}"
    fin = ~dead
    lse_err = (lse.double()[fin] - ref[1][fin]).abs().max().item() if fin.any() else 0.0
    assert lse_err < LSE_TOL[dtype], f"lse: abs err {lse_err:.2e}"


# (T, Hq, Hkv, D, doc lengths, sliding window)
SHAPES = [
    (256, 4, 4, 64, [256], None),
    (1000, 8, 2, 128, [1, 250, 511, 238], None),  # not a multiple of 128, length-1 doc
    (2048, 8, 8, 128, [700, 1, 1347], 300),
    (8192, 8, 2, 128, [1537, 4096, 2000, 559], None),  # GQA 4 as in the real model (64 / 8)
    (8192, 16, 2, 128, [8192], 1024),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,Hq,Hkv,D,docs,window", SHAPES)
def test_flex_matches_torch(T, Hq, Hkv, D, docs, window, dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(T + Hq)
    q = torch.randn(T, Hq, D, generator=g, device=dev)
    k = torch.randn(T, Hkv, D, generator=g, device=dev)
    v = torch.randn(T, Hkv, D, generator=g, device=dev)
    doc, pos = _docs(docs, dev), torch.arange(T, device=dev)
    kw = dict(q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=D**-0.5, sliding_window=window)
    _compare(q, k, v, kw, dtype)


# ring-attention calls: (packed length, doc lengths, q chunk, k chunk)
RING = [
    (4096, [4096], (2048, 4096), (0, 2048)),  # q after k: full visibility of the visiting chunk
    (4096, [4096], (0, 2048), (2048, 4096)),  # q before k: every row sees nothing
    (4096, [1000, 3000, 96], (2000, 3000), (500, 1700)),  # partial rows, some dead; uneven chunk sizes
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,docs,qc,kc", RING)
def test_flex_ring_chunks(T, docs, qc, kc, dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(7)
    doc, pos = _docs(docs, dev), torch.arange(T, device=dev)
    qs, ks = slice(*qc), slice(*kc)
    q = torch.randn(qc[1] - qc[0], 8, 128, generator=g, device=dev)
    k = torch.randn(kc[1] - kc[0], 2, 128, generator=g, device=dev)
    v = torch.randn(kc[1] - kc[0], 2, 128, generator=g, device=dev)
    kw = dict(q_doc=doc[qs], q_pos=pos[qs], k_doc=doc[ks], k_pos=pos[ks], scale=128**-0.5)
    _compare(q, k, v, kw, dtype)


def test_flex_ring_merge_equals_full():
    """Two flex calls over halves of the keys, merged by lse, equal one call over all keys (fwd + grads)."""
    dev = torch.device("cuda")
    T, g = 3000, torch.Generator(device=dev).manual_seed(3)
    doc, pos = _docs([900, 1, 1200, 899], dev), torch.arange(T, device=dev)
    q0 = torch.randn(T, 8, 128, generator=g, device=dev)
    k0 = torch.randn(T, 2, 128, generator=g, device=dev)
    v0 = torch.randn(T, 2, 128, generator=g, device=dev)
    go = torch.randn(T, 8, 128, generator=g, device=dev)

    def run(split):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        kw = dict(q_doc=doc, q_pos=pos, scale=128**-0.5, return_lse=True, backend="flex")
        if split:
            h = 1400
            o1, l1 = varlen_attention(q, k[:h], v[:h], k_doc=doc[:h], k_pos=pos[:h], **kw)
            o2, l2 = varlen_attention(q, k[h:], v[h:], k_doc=doc[h:], k_pos=pos[h:], **kw)
            o, _ = merge_partial_attention(o1.float(), l1, o2, l2)
        else:
            o, _ = varlen_attention(q, k, v, k_doc=doc, k_pos=pos, **kw)
        (o * go).sum().backward()
        return o.detach(), q.grad, k.grad, v.grad

    for a, b in zip(run(True), run(False)):
        assert _rel(a, b.double()) < 2e-3


def test_auto_is_flex_on_cuda(monkeypatch):
    import minimax_train.ops.attention as attention

    called = []
    real = attention._flex_varlen_attention
    monkeypatch.setattr(attention, "_flex_varlen_attention", lambda *a: called.append(1) or real(*a))
    dev = torch.device("cuda")
    x = torch.randn(128, 2, 64, device=dev, dtype=torch.bfloat16)
    z, p = torch.zeros(128, dtype=torch.int32, device=dev), torch.arange(128, device=dev)
    varlen_attention(x, x, x, q_doc=z, q_pos=p, k_doc=z, k_pos=p, scale=0.125)
    assert called


# packed_causal_attention's flash kernels (one stream, documents from cu_seqlens) vs the float64 reference
PACKED = [
    (1000, 8, 2, 128, [1, 250, 511, 238], None),
    (4096, 16, 2, 128, [1537, 2000, 559], None),  # GQA 8, uneven documents
    (4096, 8, 8, 128, [4096], 1024),
]


@pytest.mark.parametrize("backend", ["fa2", "cudnn"])
@pytest.mark.parametrize("T,Hq,Hkv,D,docs,window", PACKED)
def test_packed_flash_kernels_match_float64(backend, T, Hq, Hkv, D, docs, window):
    from minimax_train.ops.attention import packed_causal_attention

    if backend == "cudnn" and window is not None:
        pytest.skip("cuDNN path has no sliding window")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(T + Hq + Hkv)
    q, k, v = (torch.randn(T, h, D, generator=g, device=dev).bfloat16() for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    go = torch.randn(T, Hq, D, generator=g, device=dev).bfloat16()
    doc, pos = _docs(docs, dev), torch.arange(T, device=dev)

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = packed_causal_attention(
        qg, kg, vg, cu, max(docs), scale=D**-0.5, sliding_window=window, return_lse=True, backend=backend
    )
    (o.float() * go.float()).sum().backward()
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    kw = dict(q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=D**-0.5, sliding_window=window)
    o_ref, lse_ref = varlen_attention(qr, kr, vr, **kw, return_lse=True, backend="torch")
    (o_ref * go.double()).sum().backward()
    assert o.dtype == torch.bfloat16 and lse.shape == (Hq, T)
    for name, a, b in (("o", o, o_ref), ("dq", qg.grad, qr.grad), ("dk", kg.grad, kr.grad), ("dv", vg.grad, vr.grad)):
        err = _rel(a, b.detach())
        assert err < 2e-2, f"{backend} {name}: rel err {err:.2e}"
    lse_err = (lse.double() - lse_ref.detach()).abs().max().item()
    assert lse_err < 2e-2, f"{backend} lse: abs err {lse_err:.2e}"
