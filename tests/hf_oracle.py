"""transformers as the external oracle: build its MiniMax with random weights and copy them into ours."""

from __future__ import annotations

import torch
from transformers import MiniMaxConfig
from transformers import MiniMaxForCausalLM as HFMiniMax

from minimax_train.hf.convert import hf_to_ours
from minimax_train.model import MiniMaxForCausalLM, ModelConfig


def tiny_hf_config(**over) -> MiniMaxConfig:
    kw = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        hidden_act="silu",
        num_local_experts=4,
        num_experts_per_tok=2,
        block_size=3,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        full_attn_alpha_factor=1.3,
        full_attn_beta_factor=0.9,
        linear_attn_alpha_factor=1.7,
        linear_attn_beta_factor=1.1,
        mlp_alpha_factor=1.5,
        mlp_beta_factor=0.8,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    kw.update(over)
    return MiniMaxConfig(**kw)


def random_hf_model(hf_cfg: MiniMaxConfig, seed: int = 0) -> HFMiniMax:
    torch.manual_seed(seed)
    hf_cfg._attn_implementation = "eager"
    hf_cfg._experts_implementation = "eager"  # its grouped_mm default fails in fp32 on CPU
    model = HFMiniMax(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not ones, so a norm that is skipped or misplaced shows
            else:
                p.normal_(0.0, 0.2)
    return model


def ours_from_hf(model: HFMiniMax) -> MiniMaxForCausalLM:
    cfg = ModelConfig.from_hf_dict(model.config.to_dict())
    ours = MiniMaxForCausalLM(cfg).float().eval()
    sd = hf_to_ours(dict(model.state_dict()), cfg)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    ours.load_state_dict(sd, strict=True)
    return ours
