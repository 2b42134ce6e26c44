"""Our model equals transformers' MiniMaxForCausalLM on the same weights (float32, CPU)."""

import pytest
import torch
from hf_oracle import ours_from_hf, random_hf_model, tiny_hf_config

from minimax_train.hf.convert import hf_to_ours

CONFIGS = {
    "base": {},
    "block_divides": dict(block_size=4),  # T=16 divisible by 4, not by 3
    "gqa4_top1": dict(num_attention_heads=4, num_key_value_heads=1, num_experts_per_tok=1),
    "mha_gelu": dict(num_key_value_heads=4, hidden_act="gelu"),
    "linear_first_6": dict(
        num_hidden_layers=6,
        layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention", "full_attention"],
    ),
    "sliding": dict(sliding_window=5),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    hf = random_hf_model(tiny_hf_config(**CONFIGS[name]), seed=1)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5


def test_partial_rotary_matches_transformers_modules_with_the_original_rotary(monkeypatch):
    """rotary_dim < head_dim (the original release): transformers' minimax ignores partial_rotary_factor, so the
    oracle is its modules with the original rotary: frequencies over rotary_dim, and minimax_m2's
    apply_rotary_pos_emb (rotates the first cos.shape[-1] dims, passes the rest through)."""
    import transformers.models.minimax.modeling_minimax as hf_minimax
    from transformers.models.minimax_m2.modeling_minimax_m2 import apply_rotary_pos_emb as partial_rope

    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    hf = random_hf_model(tiny_hf_config(rope_parameters=rope), seed=5)
    ours = ours_from_hf(hf)
    assert ours.config.effective_rotary_dim == 4  # head_dim 8
    ids = torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = hf(input_ids=ids).logits  # what transformers computes: all 8 dims rotated
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 4, 2, dtype=torch.float) / 4))
        hf.model.rotary_emb.inv_freq = inv_freq
        hf.model.rotary_emb.original_inv_freq = inv_freq
        monkeypatch.setattr(hf_minimax, "apply_rotary_pos_emb", partial_rope)
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
    assert (got - ref).abs().max().item() < 1e-5
    assert (full - ref).abs().max().item() > 1e-2  # the oracle does rotate differently from full-head mode


def test_packed_documents_match_transformers_per_document():
    hf = random_hf_model(tiny_hf_config(), seed=3)
    ours = ours_from_hf(hf)
    g = torch.Generator().manual_seed(4)
    lengths = [5, 1, 9, 7]  # a single-token document, documents crossing lightning blocks of 3
    docs = [torch.randint(0, 99, (n,), generator=g) for n in lengths]
    packed = torch.cat(docs)[None]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        got = ours(packed, cu_seqlens=cu).logits[0]
        ref = torch.cat([hf(input_ids=d[None]).logits[0] for d in docs])
    assert (got - ref).abs().max().item() < 1e-5


def test_gradients_match_transformers():
    hf = random_hf_model(tiny_hf_config(), seed=5)
    ours = ours_from_hf(hf)
    hf.train(), ours.train()
    ids = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(6))
    # transformers shifts labels internally; ours takes next-token targets aligned with inputs
    ref_loss = hf(input_ids=ids, labels=ids).loss
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    out = ours(ids, labels=targets)
    assert abs(out.lm_loss.item() - ref_loss.item()) < 1e-5
    ref_loss.backward()
    out.lm_loss.backward()
    # compare through the same re-layout used for weights
    hf_grad = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf.named_parameters()}
    hf_grad = hf_to_ours(hf_grad, ours.config)
    for name, p in ours.named_parameters():
        g_ref = hf_grad[name]
        rel = (p.grad - g_ref).norm() / g_ref.norm().clamp(min=1e-12)
        assert rel.item() < 1e-5, (name, rel.item())


def test_aux_loss_matches_transformers():
    hf = random_hf_model(tiny_hf_config(), seed=7)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_router_logits=True).aux_loss
        got = ours(ids).aux_loss
    assert abs(got.item() - ref.item()) < 1e-5
    assert got.item() > 0


def test_loss_ignores_document_boundaries():
    """Changing a token of document 2 never changes document 1's loss terms or logits."""
    hf = random_hf_model(tiny_hf_config(), seed=9)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, 99, (1, 14), generator=torch.Generator().manual_seed(10))
    cu = torch.tensor([0, 6, 14], dtype=torch.int32)
    ids2 = ids.clone()
    ids2[0, 10] = (ids2[0, 10] + 1) % 99
    with torch.no_grad():
        a = ours(ids, cu_seqlens=cu).logits[0, :6]
        b = ours(ids2, cu_seqlens=cu).logits[0, :6]
    # equal up to float summation order (the MoE batches tokens differently); a leak would be O(1)
    assert (a - b).abs().max().item() < 1e-6
    assert not torch.allclose(ours(ids2, cu_seqlens=cu).logits[0, 6:], ours(ids, cu_seqlens=cu).logits[0, 6:])
