"""Model configuration: every MiniMaxConfig field, the legacy names of the original release, and
the translation to and from transformers' config.json."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

FULL = "full_attention"  # softmax attention layer (transformers' name)
LINEAR = "linear_attention"  # lightning attention layer
LAYER_TYPES = (FULL, LINEAR)


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 64
    intermediate_size: int = 128  # per expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # softmax layers only
    head_dim: int = 16
    hidden_act: str = "silu"
    max_position_embeddings: int = 1048576
    initializer_range: float = 0.02
    # "normal": N(0, initializer_range) as transformers; "deepnorm": Xavier with DeepNorm gain beta=(8N)^(-1/4)
    init: str = "normal"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_local_experts: int = 4
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    # "dropless" (transformers) or "capacity" (token drop above capacity_factor * fair share)
    moe_routing: str = "dropless"
    capacity_factor: float = 1.25
    rope_theta: float = 1e7
    # None: rotate the whole head (transformers 5.23); e.g. 64: only the first 64 dims (original release)
    rotary_dim: Optional[int] = None
    # Explicit per-layer kinds; None derives them from softmax_every.
    layer_types: Optional[list[str]] = None
    # Layer i is softmax attention iff (i + 1) % softmax_every == 0 (MiniMax-Text-01: 8, i.e. 7 lightning : 1 softmax).
    softmax_every: int = 8
    block_size: int = 256  # lightning block; shapes buffers only, never results
    # Original release decay factor 1 - l/(L-1) instead of transformers' 1 - l/(L-1+1e-5).
    legacy_slopes: bool = False
    full_attn_alpha_factor: float = 1.0
    full_attn_beta_factor: float = 1.0
    linear_attn_alpha_factor: float = 1.0
    linear_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 1.0
    mlp_beta_factor: float = 1.0
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        self.validate()

    # ---- derived -----------------------------------------------------------------------------
    def resolved_layer_types(self) -> list[str]:
        if self.layer_types is not None:
            return list(self.layer_types)
        return [FULL if (i + 1) % self.softmax_every == 0 else LINEAR for i in range(self.num_hidden_layers)]

    @property
    def effective_rotary_dim(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def validate(self) -> None:
        def bad(key, msg):
            raise ValueError(f"model.{key}: {msg}")

        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "block_size",
            "softmax_every",
        ):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be a positive integer, got {getattr(self, key)}")
        for key, lo, lo_ok, hi in (
            ("initializer_range", 0.0, False, None),
            ("rms_norm_eps", 0.0, False, None),
            ("rope_theta", 0.0, False, None),
            ("router_aux_loss_coef", 0.0, True, None),
            ("router_jitter_noise", 0.0, True, 1.0),
            ("capacity_factor", 0.0, False, None),
            ("attention_dropout", 0.0, True, 1.0),
        ):
            v = float(getattr(self, key))
            if not math.isfinite(v) or v < lo or (v == lo and not lo_ok) or (hi is not None and v >= hi):
                rng = f"{'>=' if lo_ok else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
                bad(key, f"must be a finite number {rng}, got {v}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(
                "num_key_value_heads",
                f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}",
            )
        if self.num_experts_per_tok > self.num_local_experts:
            bad("num_experts_per_tok", f"{self.num_experts_per_tok} exceeds num_local_experts={self.num_local_experts}")
        if self.hidden_act not in ("silu", "gelu", "relu", "gelu_pytorch_tanh"):
            bad("hidden_act", f"unsupported '{self.hidden_act}'; use silu, gelu, gelu_pytorch_tanh or relu")
        if self.init not in ("normal", "deepnorm"):
            bad("init", f"unknown '{self.init}'; use normal or deepnorm")
        if self.moe_routing not in ("dropless", "capacity"):
            bad("moe_routing", f"unknown '{self.moe_routing}'; use dropless or capacity")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            bad("rotary_dim", f"{self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                bad("layer_types", f"has {len(self.layer_types)} entries, num_hidden_layers={self.num_hidden_layers}")
            for t in self.layer_types:
                if t not in LAYER_TYPES:
                    bad("layer_types", f"unknown layer type '{t}'; use {FULL} or {LINEAR}")

    # ---- transformers config.json ------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["MiniMaxForCausalLM"],
            "model_type": "minimax",
            "layer_types": self.resolved_layer_types(),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta)},
            "output_router_logits": False,
            "use_cache": True,
        }
        for f in dataclasses.fields(self):
            if f.name in _NOT_IN_HF or f.name in d:
                continue
            d[f.name] = getattr(self, f.name)
        if self.rotary_dim is not None:
            # Read by the original release / vLLM; transformers 5.23 ignores it and rotates all dims.
            d["rotary_dim"] = self.rotary_dim
            d["rope_parameters"]["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        else:
            d.pop("rotary_dim")
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Accepts transformers 5.x configs and the original release's legacy names."""
        d = dict(d)
        mt = d.get("model_type")
        if mt not in ("minimax", "minimax_text_01", None):
            raise ValueError(f"config.json has model_type '{mt}', not a MiniMax checkpoint (expected 'minimax')")
        out: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        if "attn_type_list" in d and d.get("layer_types") is None:
            out["layer_types"] = [FULL if int(t) == 1 else LINEAR for t in d.pop("attn_type_list")]
        else:
            d.pop("attn_type_list", None)
        for legacy, new in _LEGACY_FACTORS.items():
            if legacy in d:
                out[new] = float(d.pop(legacy))
        if d.pop("postnorm", True) is not True:
            raise ValueError(
                "config.json: postnorm=false is not the MiniMax architecture (only post-norm is supported)"
            )
        if int(d.pop("shared_intermediate_size", 0) or 0) != 0:
            raise ValueError("config.json: shared_intermediate_size != 0 (shared experts) is not supported")
        rope = d.pop("rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_type '{rope.get('rope_type')}' unsupported (only 'default')")
        theta = rope.get("rope_theta", d.pop("rope_theta", None))
        if theta is not None:
            out["rope_theta"] = float(theta)
        if d.get("rotary_dim") is None and rope.get("partial_rotary_factor") not in (None, 1, 1.0):
            hd = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
            out["rotary_dim"] = int(hd * rope["partial_rotary_factor"])
        if d.get("head_dim") is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        if d.get("layer_types") is None and "layer_types" not in out:
            # transformers' default: alternate, starting with softmax
            n = d["num_hidden_layers"]
            out["layer_types"] = [FULL if (i + 1) % 2 else LINEAR for i in range(n)]
        for k, v in d.items():
            if k in known and k not in out:
                out[k] = v
        if isinstance(out.get("eos_token_id"), list):
            out["eos_token_id"] = out["eos_token_id"][0]
        if out.get("rotary_dim") == out.get("head_dim"):
            out["rotary_dim"] = None
        return cls(**out)


# The fields that decide the parameters' shapes (and which exist): a checkpoint's weights load into a
# model only when these agree (checkpoint.init_from). layer_types is compared resolved, so softmax_every=2
# equals the explicit list it spells.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "tie_word_embeddings",
    "layer_types",
)
# ... and those that change what the network computes with the same tensors: a resume must also agree on
# these (a new run from a checkpoint, e.g. a long-context stage with another rope_theta, may change them).
# Layout, initialisation, dropout/jitter, position limit and token ids may change on resume.
COMPUTE_FIELDS = (
    "hidden_act",
    "rms_norm_eps",
    "sliding_window",
    "num_experts_per_tok",
    "moe_routing",
    "capacity_factor",
    "rope_theta",
    "rotary_dim",
    "legacy_slopes",
    "full_attn_alpha_factor",
    "full_attn_beta_factor",
    "linear_attn_alpha_factor",
    "linear_attn_beta_factor",
    "mlp_alpha_factor",
    "mlp_beta_factor",
)
RESUME_FIELDS = SHAPE_FIELDS + COMPUTE_FIELDS


def _field_value(cfg: ModelConfig, name: str):
    if name == "layer_types":  # one letter a layer: L lightning, F full softmax
        return "".join("F" if t == FULL else "L" for t in cfg.resolved_layer_types())
    return getattr(cfg, name)


def shape_mismatches(saved: ModelConfig, current: ModelConfig, fields: tuple[str, ...] = SHAPE_FIELDS) -> list[str]:
    """'model.FIELD: saved -> current' for every entry of `fields` on which the two configs differ."""
    out = []
    for name in fields:
        a, b = _field_value(saved, name), _field_value(current, name)
        if a != b:
            out.append(f"model.{name}: {a!r} -> {b!r}")
    return out


_NOT_IN_HF = {"layer_types", "init", "softmax_every", "moe_routing", "capacity_factor", "legacy_slopes", "rope_theta"}
_LEGACY_FACTORS = {
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}
