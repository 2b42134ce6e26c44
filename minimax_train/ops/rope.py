"""Rotary position embedding (neox / rotate-half style) for the softmax-attention layers.

Two conventions exist for MiniMax-Text-01 (see shared/spec/minimax-architecture.md):
- transformers 5.23 ``minimax`` rotates all ``head_dim`` dims: rotary_dim == head_dim,
  inv_freq_i = theta^(-2i/head_dim), pairs (i, i + head_dim/2);
- the original release (and vLLM) rotates only the first ``rotary_dim`` (64 of 128) dims:
  inv_freq_i = theta^(-2i/rotary_dim), pairs (i, i + rotary_dim/2); the other dims pass through.
Both are the same formula with the frequencies built over ``rotary_dim``.
"""

from __future__ import annotations

import torch

__all__ = ["rope_cos_sin", "apply_rope", "rotate_half"]


def rope_cos_sin(
    position_ids: torch.Tensor,
    *,
    head_dim: int,
    rotary_dim: int,
    theta: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*position_ids.shape, rotary_dim], computed in fp32 and cast to ``dtype``.

    The op sequence is exactly transformers' MiniMaxRotaryEmbedding (same fp32 inv_freq, same
    elementwise product, cat(freqs, freqs), cos/sin, then cast), so the result is bitwise equal
    for rotary_dim == head_dim.
    """
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
    device = position_ids.device
    # Autocast off: the angles must stay fp32 even inside a bf16 autocast region.
    # inv_freq is built on CPU and then moved, as transformers does (its buffer is made at init on
    # CPU): a GPU pow could differ from the CPU one in the last bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    inv_freq = inv_freq.to(device)
    with torch.autocast(device_type=device.type, enabled=False):
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()
        sin = emb.sin()
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, H, D] with cos/sin [..., T, rotary_dim] (broadcast over the head dim H).

    Rotate-half on the first rotary_dim dims of D; the remaining D - rotary_dim dims pass through.
    Same op order as transformers' apply_rotary_pos_emb, so the full-rotary case matches it exactly.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"cos/sin have {rotary_dim} dims but x has head_dim {x.shape[-1]}")
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    if rotary_dim == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = (x_rot * cos) + (rotate_half(x_rot) * sin)
    return torch.cat((x_rot, x_pass.to(x_rot.dtype)), dim=-1)
