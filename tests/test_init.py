"""model.init=deepnorm: Xavier normal per unfused projection with DeepNet gains (beta = (8N)^-1/4 on value,
output and FFN projections, 1 on q, k, router, lm_head); fused tensors are initialised block by block."""

import math

import pytest

from minimax_train.model import MiniMaxForCausalLM, ModelConfig


def test_deepnorm_stds_per_projection():
    h, n, d, inter, layers = 256, 4, 64, 512, 2
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=n,
        num_key_value_heads=2,
        head_dim=d,
        num_local_experts=4,
        softmax_every=2,
        block_size=32,
        init="deepnorm",
    )
    m = MiniMaxForCausalLM(cfg)
    beta = (8 * layers) ** -0.25

    def xavier(fan_in, fan_out, gain=1.0):
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    lin, full = m.model.layers[0], m.model.layers[1]
    qkv = lin.self_attn.qkv_proj.weight.view(n, 3, d, h)
    assert qkv[:, 0].std().item() == pytest.approx(xavier(h, n * d), rel=0.05)  # q: gain 1
    assert qkv[:, 1].std().item() == pytest.approx(xavier(h, n * d), rel=0.05)  # k: gain 1
    assert qkv[:, 2].std().item() == pytest.approx(xavier(h, n * d, beta), rel=0.05)  # v: beta
    gate, up = lin.mlp.experts.gate_up_proj.chunk(2, dim=1)
    for w in (gate, up):
        assert w.std().item() == pytest.approx(xavier(h, inter, beta), rel=0.05)
    assert full.self_attn.q_proj.weight.std().item() == pytest.approx(xavier(h, n * d), rel=0.05)
    assert full.self_attn.v_proj.weight.std().item() == pytest.approx(xavier(h, 2 * d, beta), rel=0.05)
    assert full.self_attn.o_proj.weight.std().item() == pytest.approx(xavier(n * d, h, beta), rel=0.05)
    assert m.lm_head.weight.std().item() == pytest.approx(xavier(h, 64), rel=0.05)
