"""model/flops.py on packed rows: softmax layers pay for each document's causal pairs (counted here by
brute force over a document mask), lightning layers for each document's own chunks."""

import pytest
import torch

from minimax_train.model.config import FULL, LINEAR, ModelConfig
from minimax_train.model.flops import (
    attended_pairs,
    forward_flops,
    forward_flops_per_token,
    train_flops,
    train_flops_per_token,
)


def _mask_pairs(doc_lens, window):
    """Pairs of the document-causal (sliding-window) mask, counted element by element."""
    doc = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(doc_lens))
    q, k = torch.arange(len(doc))[:, None], torch.arange(len(doc))[None, :]
    m = (doc[:, None] == doc[None, :]) & (k <= q)
    if window:
        m &= q - k < window
    return int(m.sum())


@pytest.mark.parametrize("window", [None, 5, 40])
def test_attended_pairs_equal_the_mask(window):
    for lens in ([64], [1, 7, 30, 26], [3, 3, 3], [50, 14]):
        assert attended_pairs(lens, window) == _mask_pairs(lens, window)


def _cfg(kind, window=None):
    return ModelConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=1,
        layer_types=[kind],
        sliding_window=window,
    )


def test_one_document_is_the_per_token_count():
    for kind in (LINEAR, FULL):
        cfg = _cfg(kind)
        assert forward_flops(cfg, [4096]) == pytest.approx(4096 * forward_flops_per_token(cfg, 4096), rel=1e-12)
        assert train_flops(cfg, [4096]) == pytest.approx(4096 * train_flops_per_token(cfg, 4096), rel=1e-12)


@pytest.mark.parametrize("window", [None, 100])
def test_softmax_layers_count_only_pairs_inside_documents(window):
    cfg = _cfg(FULL, window)
    n, d = cfg.num_attention_heads, cfg.head_dim
    whole, packed = [1024], [500, 24, 300, 200]
    saved = forward_flops(cfg, whole) - forward_flops(cfg, packed)
    # everything but QK^T and PV is per token and cancels; those are 4 n d FLOPs per (query, key) pair
    assert saved == pytest.approx(4 * n * d * (_mask_pairs(whole, window) - _mask_pairs(packed, window)), rel=1e-12)
    assert saved > 0


def test_lightning_layers_count_each_documents_chunks():
    cfg = _cfg(LINEAR)
    n, d = cfg.num_attention_heads, cfg.head_dim
    # a 10-token document is one chunk of 10 (5.5 keys per token on average), not part of a 64-token chunk
    saved = forward_flops(cfg, [640]) - forward_flops(cfg, [630, 10])
    assert saved == pytest.approx(n * 4 * d * 10 * ((64 + 1) / 2 - (10 + 1) / 2), rel=1e-12)
