"""The two token mixers of the hybrid model: softmax attention (GQA + RoPE) and lightning attention.

Both work on packed tokens [T, hidden] with document boundaries from PackedSequence. Their projections,
output norm, entry/exit and attention core come from the ModelParts given at construction (model/parts.py):
one process by default; a parallel layout computes with this rank's heads inside the same forward."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.fused import rope, sigmoid_gate
from ..ops.rope import rope_cos_sin
from .config import ModelConfig
from .layers import ACTIVATIONS, PackedSequence
from .parts import ModelParts

LIGHTNING_NORM_EPS = 1e-6  # transformers hard-codes this for the lightning output norm


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, parts: ModelParts):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.rotary_dim, self.rope_theta = cfg.effective_rotary_dim, cfg.rope_theta
        self.sliding_window = cfg.sliding_window
        h, n, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = parts.linear(h, n * d, "column")
        self.k_proj = parts.linear(h, kv * d, "kv")
        self.v_proj = parts.linear(h, kv * d, "kv")
        self.o_proj = parts.linear(n * d, h, "row")
        self.region = parts.region()
        self.core = parts.softmax_core(cfg, layer_idx)

    def forward(self, x: torch.Tensor, seq: PackedSequence) -> torch.Tensor:
        x = self.region.enter(x)
        t = x.shape[0]
        q = self.q_proj(x).view(t, -1, self.head_dim)  # this rank's heads
        k = self.k_proj(x).view(t, -1, self.head_dim)
        v = self.v_proj(x).view(t, -1, self.head_dim)
        # RoPE in at least fp32, the result in q's dtype: under bf16 autocast q and k stay bf16 for the
        # attention kernel. One table per sequence.
        rdt = torch.promote_types(q.dtype, torch.float32)
        cos, sin = seq.cached(
            ("rope", self.rotary_dim, self.rope_theta, rdt),
            lambda: rope_cos_sin(
                seq.rope_pos, head_dim=self.head_dim, rotary_dim=self.rotary_dim, theta=self.rope_theta, dtype=rdt
            ),
        )
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # [T, H, D] with cos/sin [T, rotary_dim]
        o = self.core(q, k, v, seq, scale=self.head_dim**-0.5, sliding_window=self.sliding_window)
        return self.region.exit(self.o_proj(o.reshape(t, -1)))


class LightningAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, parts: ModelParts):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.act = ACTIVATIONS[cfg.hidden_act]
        # Rows are head-major interleaved: head i owns rows [3*d*i, 3*d*(i+1)) = (q_i, k_i, v_i).
        self.qkv_proj = parts.linear(h, 3 * n * d, "column")
        self.output_gate = parts.linear(h, n * d, "column")
        self.out_proj = parts.linear(n * d, h, "row")
        self.norm = parts.head_norm(n * d, LIGHTNING_NORM_EPS)
        self.region = parts.region()
        # the decayed recurrence over packed documents (it owns this layer's per-head decays)
        self.core = parts.lightning_core(cfg, layer_idx)

    def mix(self, x: torch.Tensor, seq: PackedSequence) -> torch.Tensor:
        """The attention core: activated qkv -> decayed linear recurrence per document -> [T, heads*d]."""
        t = x.shape[0]
        qkv = self.act(self.qkv_proj(x)).view(t, -1, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        return self.core(q, k, v, seq).reshape(t, -1)

    def forward(self, x: torch.Tensor, seq: PackedSequence) -> torch.Tensor:
        x = self.region.enter(x)
        y = self.norm(self.mix(x, seq))
        y = sigmoid_gate(self.output_gate(x), y)
        return self.region.exit(self.out_proj(y))
