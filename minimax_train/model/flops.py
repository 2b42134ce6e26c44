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


def attended_pairs(doc_lens, window: int | None = None) -> float:
    """(query, key) pairs causal attention computes over documents of these lengths: a token sees the
    earlier tokens of its own document and itself, at most `window` of them with a sliding window."""
    pairs = 0.0
    for n in doc_lens:
        n = int(n)
        if window is None or window <= 0 or window >= n:
            pairs += n * (n + 1) / 2
        else:
            pairs += window * (window + 1) / 2 + (n - window) * window
    return pairs


def forward_flops(cfg: ModelConfig, doc_lens) -> float:
    """Matmul FLOPs of one forward pass over a packed row holding documents of lengths `doc_lens`
    (e.g. the differences of a batch's cu_seqlens): softmax layers pay for the causal pairs of each
    document only, lightning layers for each document's own chunks."""
    h, n, d, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    k, i, e = cfg.num_experts_per_tok, cfg.intermediate_size, cfg.num_local_experts
    lens = [int(x) for x in doc_lens if int(x) > 0]
    tokens = float(sum(lens))
    pairs = attended_pairs(lens, cfg.sliding_window)
    # intra-chunk causal work: a token of a chunk of c tokens sees (c + 1) / 2 of them on average
    intra = sum(x * (min(LIGHTNING_CHUNK, x) + 1) / 2 for x in lens)
    per_token = 2.0 * h * cfg.vocab_size + (2.0 * h * e + k * 2.0 * 3 * h * i) * len(cfg.resolved_layer_types())
    flops = per_token * tokens  # lm_head, routers, top-k SwiGLU experts
    for t in cfg.resolved_layer_types():
        if t == FULL:
            flops += 2.0 * h * (2 * n * d + 2 * kv * d) * tokens  # q, k, v, o projections
            flops += 2.0 * 2 * n * d * pairs  # QK^T and PV
        else:
            flops += 2.0 * h * 5 * n * d * tokens  # fused qkv, output gate, out_proj
            flops += n * (2.0 * 2 * d * intra + 2.0 * 2 * d * d * tokens)  # intra-chunk + (q@S, S update)
    return flops


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token for rows of `seq_len` tokens holding one document each."""
    return forward_flops(cfg, [seq_len]) / seq_len


def train_flops(cfg: ModelConfig, doc_lens) -> float:
    """Forward + backward (backward = 2x forward) over one packed row; recomputation is not counted."""
    return 3.0 * forward_flops(cfg, doc_lens)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward (backward = 2x forward); activation recomputation is not counted (model FLOPs)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
