"""The model's shapes, and its parameters per rank before data-parallel sharding."""

from __future__ import annotations

from dataclasses import dataclass

from minimax_train.model.config import FULL, ModelConfig


@dataclass(frozen=True)
class ModelShapes:
    h: int
    n: int
    d: int
    kv: int
    E: int
    k: int
    I: int
    V: int
    rot: int
    m: int  # lightning block
    n_lin: int
    n_full: int
    L: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> ModelShapes:
        types = cfg.resolved_layer_types()
        return cls(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.num_key_value_heads,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.effective_rotary_dim,
            cfg.block_size,
            sum(t != FULL for t in types),
            sum(t == FULL for t in types),
            len(types),
        )


def parameter_split(cfg: ModelConfig, tp: int, ep: int, etp: int) -> dict[str, float]:
    """Parameters per rank before data-parallel sharding: dense (tp-sharded + replicated) and experts, plus the
    pieces FSDP gathers together (root = embedding, lm_head, final norm; the largest decoder layer)."""
    s = ModelShapes.of(cfg)
    h, n, d, kv, E, I, V = s.h, s.n, s.d, s.kv, s.E, s.I, s.V
    kv_sharded = kv % tp == 0
    head = 0 if cfg.tie_word_embeddings else V * h
    root_tp, root_rep = V * h + head, h
    lin_tp, lin_rep = 5 * h * n * d + n * d, 2 * h + E * h
    full_tp = 2 * h * n * d + (2 * h * kv * d if kv_sharded else 0)
    full_rep = 2 * h + E * h + (0 if kv_sharded else 2 * h * kv * d)
    expert_layer = E * 3 * h * I
    dense_tp = root_tp + s.n_lin * lin_tp + s.n_full * full_tp
    dense_rep = root_rep + s.n_lin * lin_rep + s.n_full * full_rep
    experts = s.L * expert_layer
    layer_dense = max(lin_tp / tp + lin_rep if s.n_lin else 0, full_tp / tp + full_rep if s.n_full else 0)
    return {
        "total": dense_tp + dense_rep + experts,
        "dense_local": dense_tp / tp + dense_rep,
        "experts_local": experts / (ep * etp),
        "root_local": root_tp / tp + root_rep,
        "layer_dense_local": layer_dense,
        "layer_experts_local": expert_layer / (ep * etp),
    }
