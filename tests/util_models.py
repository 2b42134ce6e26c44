"""Tiny models and packed rows shared by the parallel-equivalence tests (tensor, context, expert parallel,
the vocabulary-parallel loss), on CPU and on GPU."""

from __future__ import annotations

import torch

# the tensor-parallel tests' model: 4 layers (2 lightning, 2 softmax), GQA, 4 experts top-2
TP_MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    softmax_every=2,
    block_size=16,
    rope_theta=10000.0,
    router_aux_loss_coef=0.01,
)


def make_config(**overrides):
    from minimax_train.model.config import ModelConfig

    return ModelConfig(**{**TP_MODEL, **overrides})


def make_model(cfg):
    from minimax_train.model.transformer import MiniMaxForCausalLM

    torch.manual_seed(1234)
    return MiniMaxForCausalLM(cfg)


def make_rows(seed: int = 7, rows: int = 2, t: int = 32):
    """Packed rows of several documents each (cu_seqlens over the flattened tokens), a few ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TP_MODEL["vocab_size"], (rows, t), generator=g)
    labels = torch.randint(0, TP_MODEL["vocab_size"], (rows, t), generator=g)
    labels[:, -1] = -100
    labels[0, :2] = -100
    bounds = [0]
    for r in range(rows):  # documents of 5, 11 and the rest per row; one crosses a lightning block of 16
        bounds += [r * t + 5, r * t + 16, (r + 1) * t]
    return ids, labels, torch.tensor(bounds, dtype=torch.int32)


def tiny_model_config(**kw):
    """The context-parallel tests' model: 4 layers alternating lightning / softmax, lightning blocks of 4."""
    from minimax_train.model.config import FULL, LINEAR, ModelConfig

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=[LINEAR, FULL, LINEAR, FULL],
        block_size=4,
        router_aux_loss_coef=0.02,
    )
    base.update(kw)
    return ModelConfig(**base)
