"""Parameter and FLOP counting for the hybrid architecture: one function shared by the trainer's
MFU metric, the benchmarks and the layout planner, so all three report the same numbers."""

from __future__ import annotations

from dataclasses import dataclass

from .config import FULL, ModelConfig

# Lightning attention is counted as the chunked algorithm the kernels run (fla's chunk size 64):
# per head and token, intra-chunk QK^T and (.)V over the causal half of a chunk, plus q@S and the state update.
LIGHTNING_CHUNK = 64


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # per token, excluding embedding and lm_head (MiniMax's convention)
    embedding: int
    experts: int


def count_params(cfg: ModelConfig) -> ParamCount:
    h, n, d, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    e, k, i = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    total, active, experts = embed + head + h, 0, 0  # + final norm
    for t in cfg.resolved_layer_types():
        attn = h * n * d * 2 + h * kv * d * 2 if t == FULL else h * n * d * 5 + n * d
        expert = 3 * h * i
        dense = attn + 2 * h + e * h  # norms and router
        total += dense + e * expert
        experts += e * expert
        active += dense + k * expert
    return ParamCount(total=total, active=active, embedding=embed + head, experts=experts)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass per token for rows of `seq_len` tokens holding one document
    (causal: a token attends to (seq_len + 1) / 2 keys on average)."""
    h, n, d, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    k, i, e = cfg.num_experts_per_tok, cfg.intermediate_size, cfg.num_local_experts
    avg_ctx = (seq_len + 1) / 2
    if cfg.sliding_window:
        avg_ctx = min(avg_ctx, cfg.sliding_window)
    flops = 2.0 * h * cfg.vocab_size  # lm_head
    for t in cfg.resolved_layer_types():
        if t == FULL:
            flops += 2.0 * h * (2 * n * d + 2 * kv * d)  # q, k, v, o projections
            flops += 2.0 * 2 * n * d * avg_ctx  # QK^T and PV
        else:
            flops += 2.0 * h * 5 * n * d  # fused qkv, output gate, out_proj
            chunk = min(LIGHTNING_CHUNK, seq_len)
            flops += n * (2.0 * 2 * d * (chunk + 1) / 2 + 2.0 * 2 * d * d)  # intra-chunk + (q@S, S update)
        flops += 2.0 * h * e + k * 2.0 * 3 * h * i  # router, top-k SwiGLU experts
    return flops


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward (backward = 2x forward); activation recomputation is not counted (model FLOPs)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
