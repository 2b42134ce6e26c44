"""Lightning attention op: torch backend vs a float64 token-by-token oracle, and vs transformers."""

import pytest
import torch

from minimax_train.ops.lightning import lightning_attention, lightning_attention_naive, lightning_slopes

F64 = torch.float64


def _inputs(B, T, H, D, *, Dv=None, dtype=F64, seed=0, n_states=None, layer=(1, 4)):
    """Random non-zero q, k, v (silu-like, mostly positive as in the model), slopes, initial states."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, T, H, D, generator=g, dtype=F64).mul(0.5).add(0.2).to(dtype)
    k = torch.randn(B, T, H, D, generator=g, dtype=F64).mul(0.5).add(0.2).to(dtype)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=F64).to(dtype)
    slopes = lightning_slopes(H, *layer)
    s0 = (
        None
        if n_states is None
        else torch.randn(n_states, H, D, Dv, generator=g, dtype=F64).to(F64 if dtype == F64 else torch.float32)
    )
    return q, k, v, slopes, s0


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


# (B, T, H, D, block_size, doc lengths or None); block sizes both divide and do not divide T.
CASES = [
    (1, 16, 2, 4, 4, None),
    (3, 23, 2, 8, 5, None),  # B > 1, T not a multiple of the block
    (2, 7, 3, 4, 256, None),  # sequence shorter than one block
    (1, 40, 2, 8, 8, [1, 9, 13, 2, 15]),  # length-1 doc, docs crossing and starting mid-block
    (1, 37, 2, 4, 6, [6, 1, 30]),
    (1, 12, 1, 4, 3, [12]),
]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,T,H,D,bs,docs", CASES)
def test_forward_matches_naive(B, T, H, D, bs, docs, with_state):
    cu = None if docs is None else _cu(docs)
    N = B if docs is None else len(docs)
    q, k, v, slopes, s0 = _inputs(B, T, H, D, n_states=N if with_state else None, seed=T + bs)
    o, st = lightning_attention(
        q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True, block_size=bs, backend="torch"
    )
    o_ref, st_ref = lightning_attention_naive(q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    assert o.dtype == F64 and st.shape == (N, H, D, D)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st, st_ref, rtol=1e-10, atol=1e-10)
    o2, none = lightning_attention(q, k, v, slopes, cu_seqlens=cu, initial_state=s0, block_size=bs, backend="torch")
    assert none is None and torch.equal(o2, o)


def test_varlen_equals_separate_sequences_and_dv():
    # Packed documents must give exactly what each document gives alone (no state across a boundary),
    # also with Dv != Dk and strong decay (layer 0) and weak decay (last layer).
    docs = [5, 1, 11, 7]
    for layer in [(0, 4), (3, 4)]:
        q, k, v, slopes, s0 = _inputs(1, sum(docs), 2, 4, Dv=6, n_states=len(docs), layer=layer)
        o, st = lightning_attention(
            q,
            k,
            v,
            slopes,
            cu_seqlens=_cu(docs),
            initial_state=s0,
            output_final_state=True,
            block_size=4,
            backend="torch",
        )
        start = 0
        for n, L in enumerate(docs):
            sl = slice(start, start + L)
            o_n, st_n = lightning_attention(
                q[:, sl],
                k[:, sl],
                v[:, sl],
                slopes,
                initial_state=s0[n : n + 1],
                output_final_state=True,
                block_size=4,
                backend="torch",
            )
            torch.testing.assert_close(o[:, sl], o_n, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(st[n : n + 1], st_n, rtol=1e-12, atol=1e-12)
            start += L


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,T,docs", [(2, 13, None), (1, 29, [1, 9, 4, 15])])
def test_gradients_match_naive(B, T, docs, with_state):
    H, D = 2, 4
    cu = None if docs is None else _cu(docs)
    N = B if docs is None else len(docs)
    q, k, v, slopes, s0 = _inputs(B, T, H, D, n_states=N, seed=7)
    leaves = [q, k, v] + ([s0] if with_state else [])
    for x in leaves:
        x.requires_grad_(True)
    g = torch.Generator().manual_seed(11)
    do = torch.randn(B, T, H, D, generator=g, dtype=F64)
    dst = torch.randn(N, H, D, D, generator=g, dtype=F64)  # upstream gradient on the final state too

    def grads(fn, **kw):
        o, st = fn(
            q, k, v, slopes, cu_seqlens=cu, initial_state=s0 if with_state else None, output_final_state=True, **kw
        )
        return torch.autograd.grad((o * do).sum() + (st * dst).sum(), leaves)

    got = grads(lightning_attention, block_size=4, backend="torch")
    ref = grads(lightning_attention_naive)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_block_size_independence():
    docs = [3, 17, 1, 30, 13]
    q, k, v, slopes, s0 = _inputs(1, sum(docs), 3, 8, n_states=len(docs), seed=3)
    outs = [
        lightning_attention(
            q,
            k,
            v,
            slopes,
            cu_seqlens=_cu(docs),
            initial_state=s0,
            output_final_state=True,
            block_size=bs,
            backend="torch",
        )
        for bs in (1, 2, 5, 16, 64, 256)
    ]
    for o, st in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st, outs[0][1], rtol=1e-12, atol=1e-12)


def test_bf16_input_keeps_fp32_state():
    B, T, H, D = 2, 70, 2, 16
    q, k, v, slopes, s0 = _inputs(B, T, H, D, dtype=torch.bfloat16, n_states=B, layer=(3, 4), seed=5)
    o, st = lightning_attention(
        q, k, v, slopes, initial_state=s0, output_final_state=True, block_size=16, backend="torch"
    )
    assert o.dtype == torch.bfloat16 and st.dtype == torch.float32
    # Same bf16 values upcast: the computation is the same fp32 one, only the output is rounded.
    o32, st32 = lightning_attention(
        q.float(),
        k.float(),
        v.float(),
        slopes,
        initial_state=s0,
        output_final_state=True,
        block_size=16,
        backend="torch",
    )
    torch.testing.assert_close(st, st32, rtol=0, atol=0)
    torch.testing.assert_close(o.float(), o32, rtol=1e-2, atol=1e-2 * o32.abs().max().item())
    o64, st64 = lightning_attention_naive(q, k, v, slopes, initial_state=s0, output_final_state=True)
    assert ((st.double() - st64).abs().max() / st64.abs().max()).item() < 1e-5
    # Under autocast the op still keeps its state in fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, st_ac = lightning_attention(
            q, k, v, slopes, initial_state=s0, output_final_state=True, block_size=16, backend="torch"
        )
    torch.testing.assert_close(st_ac, st32, rtol=0, atol=0)


def test_zero_length_document_and_errors():
    q, k, v, slopes, s0 = _inputs(1, 6, 2, 4, n_states=3)
    cu = torch.tensor([0, 2, 2, 6])
    o, st = lightning_attention(
        q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True, backend="torch"
    )
    o_ref, st_ref = lightning_attention_naive(q, k, v, slopes, cu_seqlens=cu, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st, st_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st[1], s0[1], rtol=0, atol=0)  # an empty document passes its state through
    with pytest.raises(ValueError, match="B == 1"):
        lightning_attention(
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            v.expand(2, -1, -1, -1),
            slopes,
            cu_seqlens=cu,
            backend="torch",
        )
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, slopes, cu_seqlens=cu, initial_state=s0[:2], backend="torch")
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attention(q, k, v, slopes, cu_seqlens=torch.tensor([0, 4]), backend="torch")
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, k, v, slopes, backend="triton")


def test_auto_backend_on_cpu_is_torch():
    q, k, v, slopes, _ = _inputs(1, 9, 2, 4)
    o_auto, _ = lightning_attention(q, k, v, slopes)
    o_torch, _ = lightning_attention(q, k, v, slopes, backend="torch")
    assert torch.equal(o_auto, o_torch)
    with pytest.raises((ImportError, ValueError)):
        lightning_attention(q, k, v, slopes, backend="fla")


# ---------------------------------------------------------------- transformers parity


def _hf_config(H=2, head_dim=16, L=4):
    from transformers import MiniMaxConfig

    return MiniMaxConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=L,
        num_attention_heads=H,
        num_key_value_heads=H,
        head_dim=head_dim,
        block_size=3,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["linear_attention"] * L,
    )


@pytest.mark.parametrize("H,L", [(2, 4), (8, 4), (64, 80), (3, 1)])
def test_slopes_match_transformers(H, L):
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    cfg = _hf_config(H=H, head_dim=2, L=L)
    for layer_idx in sorted({0, 1, L // 2, L - 1} & set(range(L))):
        ref = MiniMaxLightningAttention(cfg, layer_idx).slope_rate.reshape(-1)
        got = lightning_slopes(H, layer_idx, L)
        assert got.dtype == torch.float32 and ref.dtype == torch.float32
        assert torch.equal(got, ref), (layer_idx, got, ref)


def test_legacy_slopes():
    s = lightning_slopes(4, 2, 5, legacy=True).double()
    expect = torch.tensor([2 ** (-8 * (h + 1) / 4) * (1 - 2 / 4 + 1e-5) for h in range(4)], dtype=F64)
    torch.testing.assert_close(s, expect, rtol=1e-6, atol=0)
    # last layer: the legacy factor is exactly 1e-5, transformers' is slightly larger
    assert torch.allclose(
        lightning_slopes(2, 3, 4, legacy=True).double(), torch.tensor([2.0**-4, 2.0**-8], dtype=F64) * 1e-5, rtol=1e-6
    )
    assert torch.equal(lightning_slopes(2, 0, 1, legacy=True), lightning_slopes(2, 0, 1))  # one-layer guard


@pytest.mark.parametrize("layer_idx", [0, 2, 3])
def test_layer_matches_transformers(layer_idx):
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    torch.manual_seed(0)
    cfg = _hf_config()
    layer = MiniMaxLightningAttention(cfg, layer_idx).eval()
    H, d = cfg.num_attention_heads, cfg.head_dim
    x = torch.randn(2, 11, cfg.hidden_size)  # 11 tokens: blocks of 3 leave a short last block
    with torch.no_grad():
        ref, ref_state = layer(x, position_embeddings=None, attention_mask=None)
        # The layer around the op, as MiniMax-Text-01 has it (silu on q, k, v; head-major interleave).
        u = torch.nn.functional.silu(layer.qkv_proj(x)).reshape(2, 11, H, 3 * d)
        q, k, v = u.split(d, dim=-1)
        o, state = lightning_attention(
            q,
            k,
            v,
            lightning_slopes(H, layer_idx, cfg.num_hidden_layers),
            output_final_state=True,
            block_size=4,
            backend="torch",
        )
        y = layer.norm(o.reshape(2, 11, H * d))
        out = layer.out_proj(torch.sigmoid(layer.output_gate(x)) * y)
    assert (out - ref).abs().max().item() < 1e-5
    assert (state - ref_state).abs().max().item() < 1e-5
