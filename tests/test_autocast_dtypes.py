"""Which dtypes reach the kernels under bf16 autocast with fp32 weights (the one-GPU path): the matmul dtype,
not fp32 promoted by fp32 norm weights or position tables."""

import torch
from util_models import one_process_softmax


def test_softmax_attention_gets_matmul_dtype_q_and_k_under_autocast():
    """RoPE runs in fp32 but returns q's dtype: with fp32 weights under bf16 autocast (one GPU, no FSDP) the
    attention kernel must see bf16 q, k and v, not fp32 q/k promoted by an fp32 cos/sin table."""
    from minimax_train.model import MiniMaxForCausalLM, ModelConfig
    from minimax_train.model.attention import SoftmaxAttention

    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=2,
        softmax_every=2,
        block_size=16,
    )
    model = MiniMaxForCausalLM(cfg)
    seen = []

    def core(q, k, v, seq, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return one_process_softmax(q, k, v, seq, **kw)

    for m in model.modules():
        if isinstance(m, SoftmaxAttention):
            m.core = core
    ids = torch.randint(0, 64, (1, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids)
    assert seen == [(torch.bfloat16,) * 3]
    seen.clear()
    model(ids, labels=ids)  # fp32 outside autocast, as before
    assert seen == [(torch.float32,) * 3]


def test_torch_attention_softmax_stays_fp32_under_autocast():
    """The torch attention backend (CPU, and the ring-attention blocks on CPU) computes its scores and softmax
    in fp32: bf16 autocast around it must not push those matmuls to bf16 (the forward's lse would then not
    be the one the fp32 backward differentiates). Same bf16 inputs, with and without autocast: same result."""
    from minimax_train.ops.attention import varlen_attention

    g = torch.Generator().manual_seed(0)
    t, h, d = 48, 2, 16
    q, k, v = (torch.randn(t, h, d, generator=g).bfloat16() for _ in range(3))
    pos = torch.arange(t)
    doc = (pos >= 20).long()
    kw = dict(q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=d**-0.5, return_lse=True, backend="torch")
    o_ref, lse_ref = varlen_attention(q, k, v, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, lse = varlen_attention(q, k, v, **kw)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=0)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)
