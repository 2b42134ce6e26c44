"""The shipped model presets build valid configs; the full-size one has MiniMax-Text-01's parameter count."""

from pathlib import Path

import pytest
import yaml

from minimax_train.conf_tree import conf_dir
from minimax_train.model import FULL, ModelConfig
from minimax_train.model.flops import count_params, train_flops_per_token

CONF = Path(conf_dir()) / "model"


def preset(name):
    return ModelConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))


def test_minimax_text_01_matches_the_paper():
    cfg = preset("minimax_text_01")
    p = count_params(cfg)
    assert abs(p.total - 456.09e9) / 456.09e9 < 1e-4
    assert abs(p.active - 45.94e9) / 45.94e9 < 1e-3
    types = cfg.resolved_layer_types()
    assert [i for i, t in enumerate(types) if t == FULL] == list(range(7, 80, 8))
    assert cfg.full_attn_alpha_factor == pytest.approx((2 * 80) ** 0.25)


def test_1b_preset_is_1b_class():
    p = count_params(preset("minimax_1b"))
    assert 0.9e9 < p.total < 1.6e9


def test_tiny_mixes_both_attention_kinds():
    cfg = preset("tiny")
    assert len(set(cfg.resolved_layer_types())) == 2 and cfg.num_key_value_heads < cfg.num_attention_heads


def test_flops_follow_6n_for_dense_parts():
    cfg = preset("minimax_text_01")
    # at short sequence the attention core is negligible: ~6 * (active + lm_head) FLOPs per token
    f = train_flops_per_token(cfg, 8)
    approx = 6 * (count_params(cfg).active + cfg.vocab_size * cfg.hidden_size)
    assert abs(f - approx) / approx < 0.02


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("num_key_value_heads", 3, "must divide num_attention_heads"),
        ("layer_types", ["full_attention"], "has 1 entries"),
        ("hidden_act", "swish2", "unsupported"),
        ("rotary_dim", 7, "must be even"),
        ("moe_routing", "random", "dropless or capacity"),
    ],
)
def test_invalid_model_config_names_the_key(key, value, match):
    with pytest.raises(ValueError, match=rf"model\.{key}: .*{match}"):
        ModelConfig(**{key: value})
