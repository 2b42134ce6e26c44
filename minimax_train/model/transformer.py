"""MiniMax-Text-01: embedding -> hybrid decoder layers -> norm -> lm_head, on packed documents.

Parameter names equal transformers v5's in-memory names, so HF conversion is a pure re-layout."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.cross_entropy import chunked_loss_sum
from .attention import LightningAttention, SoftmaxAttention
from .config import FULL, ModelConfig
from .layers import PackedSequence, RMSNorm
from .moe import MoE, RouterOutput, load_balancing_loss, load_balancing_stats


class DecoderLayer(nn.Module):
    """Post-norm residual with the NORMED input as residual: h = a*N(x) + b*Attn(N(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_type = cfg.resolved_layer_types()[layer_idx]
        if self.layer_type == FULL:
            self.self_attn = SoftmaxAttention(cfg, layer_idx)
            self.attn_alpha, self.attn_beta = cfg.full_attn_alpha_factor, cfg.full_attn_beta_factor
        else:
            self.self_attn = LightningAttention(cfg, layer_idx)
            self.attn_alpha, self.attn_beta = cfg.linear_attn_alpha_factor, cfg.linear_attn_beta_factor
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha_factor, cfg.mlp_beta_factor
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)
        self.checkpoint_mode = "none"
        self.moe_chunk_tokens = 0  # > 0: the MoE sublayer runs over token chunks, each checkpointed

    def _attn(self, x, seq):
        return self.self_attn(x, seq)

    def _moe_sublayer(self, h):
        b = self.post_attention_layernorm(h)
        moe, route, stats = self.mlp(b)
        return self.mlp_alpha * b + self.mlp_beta * moe, route, stats

    def forward(self, x: torch.Tensor, seq: PackedSequence):
        a = self.input_layernorm(x)
        if self.checkpoint_mode == "selective":  # recompute the attention sublayer, keep the rest
            attn = checkpoint(self._attn, a, seq, use_reentrant=False)
        else:
            attn = self.self_attn(a, seq)
        h = self.attn_alpha * a + self.attn_beta * attn
        n = self.moe_chunk_tokens
        if n > 0 and h.shape[0] > n and torch.is_grad_enabled():
            return _chunked_moe_sublayer(self._moe_sublayer, h, n)
        return self._moe_sublayer(h)


def _chunked_moe_sublayer(fn, h: torch.Tensor, chunk: int):
    """The norm + MoE sublayer is token-wise (dropless routing), so it can run over chunks of tokens, each
    under a non-reentrant checkpoint: at long context only one chunk's expert activations exist at a time
    (also inside a fully checkpointed layer's recomputation), for one more MoE forward per token. Ranks
    that exchange tokens (tensor / expert parallel) hold equal token counts, so they run the same chunks."""
    outs, routes, loads, dropped = [], [], 0, 0
    for piece in h.split(chunk):
        out, route, stats = checkpoint(fn, piece, use_reentrant=False)
        outs.append(out)
        routes.append(route)
        loads = loads + stats["tokens_per_expert"]
        dropped = dropped + stats["dropped"]
    return torch.cat(outs), RouterOutput.cat(routes), {"tokens_per_expert": loads, "dropped": dropped}


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    num_loss_tokens: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None  # [layers, experts] token assignments (detached)
    dropped_tokens: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


class MiniMaxModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Context parallelism splits one micro-batch's tokens over ranks: the load-balancing statistics
        # are then summed over that group (differentiably) so the aux loss equals the unsplit one.
        self.aux_stats_group = None

    def forward(self, input_ids: torch.Tensor, seq: PackedSequence):
        x = self.embed_tokens(input_ids.reshape(-1))
        e = self.config.num_local_experts
        counts = x.new_zeros(e, dtype=torch.float32)
        prob_sum = x.new_zeros(e, dtype=torch.float32)
        rows, loads, dropped = 0, [], 0
        for layer in self.layers:
            if layer.checkpoint_mode == "full" and torch.is_grad_enabled():
                x, route, stats = checkpoint(layer, x, seq, use_reentrant=False)
            else:
                x, route, stats = layer(x, seq)
            c, p, r = load_balancing_stats(route, e)
            counts, prob_sum, rows = counts + c, prob_sum + p, rows + r
            loads.append(stats["tokens_per_expert"])
            dropped = dropped + stats["dropped"]
        if self.aux_stats_group is not None:
            from ..parallel.tp_ops import all_reduce_sum  # forward and backward both sum over the group

            counts = all_reduce_sum(counts, self.aux_stats_group)
            prob_sum = all_reduce_sum(prob_sum, self.aux_stats_group)
            rows = all_reduce_sum(torch.tensor(float(rows), device=counts.device), self.aux_stats_group)
        aux = load_balancing_loss(counts, prob_sum, rows, e)
        return self.norm(x), aux, torch.stack(loads).detach(), dropped


class MiniMaxForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = MiniMaxModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # tokens per lm_head + cross-entropy chunk in training (ops/cross_entropy.py); 0: all at once.
        # The trainer sets train.loss_chunk_tokens here.
        self.loss_chunk_tokens = 0
        self.init_weights()

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' init (normal(0, initializer_range), norms = 1) or Xavier with DeepNorm gains."""
        cfg = self.config
        deep_beta = (8 * cfg.num_hidden_layers) ** -0.25
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif cfg.init == "normal" or p.dim() < 2 or "embed_tokens" in name:
                p.normal_(0.0, cfg.initializer_range)
            else:
                self._deepnorm_init(name, p, deep_beta)

    def _deepnorm_init(self, name: str, p: torch.Tensor, beta: float) -> None:
        """Xavier normal per unfused projection: gain beta on value, output and FFN projections, 1 on q, k,
        router and lm_head (DeepNet). Fused tensors are initialised block by block with the fan of the
        projection each block stands for: qkv_proj's rows are head-major (q_i, k_i, v_i), gate_up_proj's
        gate then up."""

        def xavier(t, gain):
            fan_out, fan_in = t.shape[-2], t.shape[-1]
            t.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))

        if "qkv_proj" in name:  # [n*3*d, h] -> [n, 3, d, h]; q, k and v are each an [n*d, h] projection
            d = self.config.head_dim
            blocks = p.view(-1, 3, d, p.shape[-1])
            std = math.sqrt(2.0 / (p.shape[-1] + p.shape[0] // 3))
            blocks[:, :2].normal_(0.0, std)
            blocks[:, 2].normal_(0.0, beta * std)
        elif "gate_up_proj" in name:  # [E, 2I, H]: gate [E, I, H] and up [E, I, H], FFN input projections
            for half in p.chunk(2, dim=-2):
                xavier(half, beta)
        else:
            scaled = any(s in name for s in ("v_proj", "o_proj", "out_proj", "output_gate", "experts"))
            xavier(p, beta if scaled else 1.0)

    def set_activation_checkpointing(self, mode: str, moe_chunk_tokens: int = 0) -> None:
        """mode none | selective (attention sublayers) | full (whole layers); moe_chunk_tokens > 0 also
        checkpoints the norm + MoE sublayer per chunk of that many tokens (dropless routing only)."""
        if mode not in ("none", "selective", "full"):
            raise ValueError(f"activation checkpointing mode '{mode}' unknown; use none, selective or full")
        if moe_chunk_tokens > 0 and self.config.moe_routing != "dropless":
            raise ValueError(
                "moe_chunk_tokens needs moe_routing=dropless: capacity routing ranks every token of "
                "the micro-batch together"
            )
        for layer in self.model.layers:
            layer.checkpoint_mode = mode
            layer.moe_chunk_tokens = moe_chunk_tokens

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool | None = None,
        seq: PackedSequence | None = None,
    ) -> CausalLMOutput:
        """input_ids [B, T]; labels [B, T] next-token targets already aligned (-100 = no loss);
        cu_seqlens document boundaries over the flattened B*T tokens (default: one document per row).
        `seq` (instead of cu_seqlens/position_ids) passes prebuilt metadata, e.g. a context-parallel shard's."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        if seq is None:
            seq = PackedSequence.build(b, t, input_ids.device, cu_seqlens, position_ids)
        hidden, aux, loads, dropped = self.model(input_ids, seq)
        out = CausalLMOutput(aux_loss=aux, expert_load=loads, dropped_tokens=dropped)
        want_logits = labels is None if return_logits is None else return_logits
        if want_logits:
            out.logits = self.lm_head(hidden).view(b, t, -1)
        if labels is not None:
            flat = labels.reshape(-1)
            out.lm_loss_sum = self.lm_loss_sum(hidden, flat, out.logits)
            out.num_loss_tokens = (flat != -100).sum()
            out.lm_loss = out.lm_loss_sum / out.num_loss_tokens.clamp(min=1)
            out.loss = out.lm_loss + self.config.router_aux_loss_coef * aux
        return out

    def lm_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """Sum of token cross-entropies in fp32 (-100 ignored). Without precomputed logits, the tokens go
        through lm_head + cross-entropy in chunks of self.loss_chunk_tokens (recomputed in backward), so the
        full [tokens, vocab] logits never exist. Tensor parallelism overrides this with a vocabulary-parallel
        version (chunked the same way)."""
        if logits is not None:
            return F.cross_entropy(
                logits.reshape(labels.numel(), -1).float(), labels, ignore_index=-100, reduction="sum"
            )
        return chunked_loss_sum(hidden.reshape(labels.numel(), -1), labels, self._lm_loss_chunk, self.loss_chunk_tokens)

    def _lm_loss_chunk(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(hidden).float(), labels, ignore_index=-100, reduction="sum")
