"""The two token mixers of the hybrid model: softmax attention (GQA + RoPE) and lightning attention.

Both work on packed tokens [T, hidden] with document boundaries from PackedSequence; the compute lives
in minimax_train.ops so that the parallel wrappers (context parallelism) reuse the same kernels."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import varlen_attention
from ..ops.lightning import lightning_attention, lightning_slopes
from ..ops.rope import apply_rope, rope_cos_sin
from .config import ModelConfig
from .layers import ACTIVATIONS, PackedSequence, RMSNorm

LIGHTNING_NORM_EPS = 1e-6  # transformers hard-codes this for the lightning output norm


def local_softmax_core(q, k, v, seq: PackedSequence, *, scale: float, sliding_window):
    """q [T, Hq, D], k/v [T, Hkv, D], all tokens of the packed row on this rank -> [T, Hq, D]."""
    return varlen_attention(
        q,
        k,
        v,
        q_doc=seq.doc_ids,
        q_pos=seq.causal_pos,
        k_doc=seq.doc_ids,
        k_pos=seq.causal_pos,
        scale=scale,
        sliding_window=sliding_window,
        mask_cache=seq.cache,
    )


def local_lightning_core(q, k, v, slopes, seq: PackedSequence, *, block_size: int):
    """q/k/v [T, H, D] activated, all tokens of the packed row on this rank -> [T, H, D]."""
    o, _ = lightning_attention(q[None], k[None], v[None], slopes, cu_seqlens=seq.cu_seqlens_long, block_size=block_size)
    return o[0]


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.rotary_dim, self.rope_theta = cfg.effective_rotary_dim, cfg.rope_theta
        self.sliding_window = cfg.sliding_window
        h, n, kv, d = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(h, n * d, bias=False)
        self.k_proj = nn.Linear(h, kv * d, bias=False)
        self.v_proj = nn.Linear(h, kv * d, bias=False)
        self.o_proj = nn.Linear(n * d, h, bias=False)
        # The attention core over packed documents; context parallelism swaps in ring attention.
        self.core = local_softmax_core

    def forward(self, x: torch.Tensor, seq: PackedSequence) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, -1, self.head_dim)
        k = self.k_proj(x).view(t, -1, self.head_dim)
        v = self.v_proj(x).view(t, -1, self.head_dim)
        # RoPE in at least fp32, the result in q's dtype: under bf16 autocast q and k stay bf16 for the
        # attention kernel (x, the fp32 norm output, must not set the dtype). One table per sequence.
        rdt = torch.promote_types(q.dtype, torch.float32)
        cos, sin = seq.cached(
            ("rope", self.rotary_dim, self.rope_theta, rdt),
            lambda: rope_cos_sin(
                seq.rope_pos, head_dim=self.head_dim, rotary_dim=self.rotary_dim, theta=self.rope_theta, dtype=rdt
            ),
        )
        # apply_rope expects [..., T, H, D] with cos/sin [..., T, rotary_dim]
        q, k = apply_rope(q, cos, sin).to(q.dtype), apply_rope(k, cos, sin).to(k.dtype)
        o = self.core(q, k, v, seq, scale=self.head_dim**-0.5, sliding_window=self.sliding_window)
        return self.o_proj(o.reshape(t, -1))


class LightningAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim, self.block_size = cfg.num_attention_heads, cfg.head_dim, cfg.block_size
        h, n, d = cfg.hidden_size, self.num_heads, self.head_dim
        self.act = ACTIVATIONS[cfg.hidden_act]
        # Rows are head-major interleaved: head i owns rows [3*d*i, 3*d*(i+1)) = (q_i, k_i, v_i).
        self.qkv_proj = nn.Linear(h, 3 * n * d, bias=False)
        self.output_gate = nn.Linear(h, n * d, bias=False)
        self.out_proj = nn.Linear(n * d, h, bias=False)
        self.norm = RMSNorm(n * d, eps=LIGHTNING_NORM_EPS)
        slopes = lightning_slopes(n, layer_idx, cfg.num_hidden_layers, legacy=cfg.legacy_slopes)
        self.register_buffer("slopes", slopes, persistent=False)
        # The decayed recurrence over packed documents; context parallelism swaps in LASP+.
        self.core = local_lightning_core

    def mix(self, x: torch.Tensor, seq: PackedSequence) -> torch.Tensor:
        """The attention core: activated qkv -> decayed linear recurrence per document -> [T, n*d]."""
        t = x.shape[0]
        qkv = self.act(self.qkv_proj(x)).view(t, -1, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        return self.core(q, k, v, self.slopes, seq, block_size=self.block_size).reshape(t, -1)

    def forward(self, x: torch.Tensor, seq: PackedSequence) -> torch.Tensor:
        y = self.norm(self.mix(x, seq))
        y = torch.sigmoid(self.output_gate(x)) * y
        return self.out_proj(y)
