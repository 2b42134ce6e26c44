"""MiniMax-Text-01: embedding -> hybrid decoder layers -> norm -> lm_head, on packed documents.

Parameter names equal transformers v5's in-memory names, so HF conversion is a pure re-layout. The pieces a
parallel layout changes come from the ModelParts given at construction (model/parts.py); build on the meta
device (`with torch.device("meta")`, seed=None) to materialise only a layout's shards later."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.cross_entropy import LOSS_KERNELS, require_liger
from ..ops.fused import scaled_sum
from .attention import LightningAttention, SoftmaxAttention
from .config import FULL, ModelConfig
from .init import InitSource, fill_parameters
from .layers import PackedSequence
from .moe import MoE, RouterOutput, load_balancing_loss, load_balancing_stats
from .parts import ModelParts, ModelShare

AC_MODES = ("none", "selective", "full")


class DecoderLayer(nn.Module):
    """Post-norm residual with the NORMED input as residual: h = a*N(x) + b*Attn(N(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, parts: ModelParts):
        super().__init__()
        self.layer_type = cfg.resolved_layer_types()[layer_idx]
        if self.layer_type == FULL:
            self.self_attn = SoftmaxAttention(cfg, layer_idx, parts)
            self.attn_alpha, self.attn_beta = cfg.full_attn_alpha_factor, cfg.full_attn_beta_factor
        else:
            self.self_attn = LightningAttention(cfg, layer_idx, parts)
            self.attn_alpha, self.attn_beta = cfg.linear_attn_alpha_factor, cfg.linear_attn_beta_factor
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha_factor, cfg.mlp_beta_factor
        self.input_layernorm = parts.residual_norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = parts.residual_norm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, parts)
        self.checkpoint_mode = "none"  # set by MiniMaxForCausalLM.set_memory_options
        self.moe_chunk_tokens = 0  # > 0: the MoE sublayer runs over token chunks, each checkpointed

    def _moe_sublayer(self, h):
        b = self.post_attention_layernorm(h)
        moe, route, stats = self.mlp(b)
        return scaled_sum(b, self.mlp_alpha, moe, self.mlp_beta), route, stats

    def forward(self, x: torch.Tensor, seq: PackedSequence):
        a = self.input_layernorm(x)
        if self.checkpoint_mode == "selective":  # recompute the attention sublayer, keep the rest
            attn = checkpoint(self.self_attn, a, seq, use_reentrant=False)
        else:
            attn = self.self_attn(a, seq)
        h = scaled_sum(a, self.attn_alpha, attn, self.attn_beta)
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
    """share (default: all of it) says which pieces this rank builds: a pipeline stage's rank holds only its
    layers, in a ModuleDict keyed by the layer index, so parameter names stay model.layers.<i>.*."""

    def __init__(self, cfg: ModelConfig, parts: ModelParts, share: ModelShare | None = None):
        super().__init__()
        self.config = cfg
        share = share if share is not None else ModelShare()
        n = cfg.num_hidden_layers
        self.embed_tokens = parts.embedding(cfg.vocab_size, cfg.hidden_size) if share.embedding else None
        if share.is_whole(n) or share.layers is None:
            self.layers = nn.ModuleList(DecoderLayer(cfg, i, parts) for i in range(n))
        else:
            self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, parts) for i in share.layers})
        self.norm = parts.residual_norm(cfg.hidden_size, cfg.rms_norm_eps) if share.head else None
        # sums the load-balancing statistics over the ranks that split one micro-batch's tokens (context
        # parallelism), differentiably, so the aux loss equals the unsplit one
        self.aux_stats = parts.aux_stats()

    def decoder_layers(self) -> dict[int, DecoderLayer]:
        """The decoder layers this rank holds, by layer index."""
        if isinstance(self.layers, nn.ModuleDict):
            return {int(k): m for k, m in self.layers.items()}
        return dict(enumerate(self.layers))

    def run_layers(self, x, seq: PackedSequence, layers, counts, prob_sum, rows):
        """x through `layers` in order, adding each layer's load-balancing statistics to (counts, prob_sum,
        rows). Returns (x, counts, prob_sum, rows, [per-layer expert loads], dropped)."""
        e = self.config.num_local_experts
        loads, dropped = [], 0
        for layer in layers:
            if layer.checkpoint_mode == "full" and torch.is_grad_enabled():
                x, route, stats = checkpoint(layer, x, seq, use_reentrant=False)
            else:
                x, route, stats = layer(x, seq)
            c, p, r = load_balancing_stats(route, e)
            counts, prob_sum, rows = counts + c, prob_sum + p, rows + r
            loads.append(stats["tokens_per_expert"])
            dropped = dropped + stats["dropped"]
        return x, counts, prob_sum, rows, loads, dropped

    def forward(self, input_ids: torch.Tensor, seq: PackedSequence):
        x = self.embed_tokens(input_ids.reshape(-1))
        e = self.config.num_local_experts
        counts = x.new_zeros(e, dtype=torch.float32)
        prob_sum = x.new_zeros(e, dtype=torch.float32)
        x, counts, prob_sum, rows, loads, dropped = self.run_layers(x, seq, self.layers, counts, prob_sum, 0)
        counts, prob_sum, rows = self.aux_stats(counts, prob_sum, rows)
        aux = load_balancing_loss(counts, prob_sum, rows, e)
        return self.norm(x), aux, torch.stack(loads).detach(), dropped


@dataclass
class StageOutput:
    """What one pipeline stage computed for one micro-batch. Not the last stage: the residual stream and the
    running load-balancing statistics [counts (E), summed probs (E), rows (1)] for the next stage. The last
    stage: this rank's summed token cross-entropy, loss tokens and the aux loss. Both: the expert loads of
    its layers ([layers, E], detached, or None without layers) and the dropped assignments."""

    hidden: torch.Tensor | None = None
    stats: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None
    num_loss_tokens: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    dropped_tokens: torch.Tensor | int = 0


class MiniMaxForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, parts: ModelParts | None = None, *, seed: int | None = 0):
        """seed: initialise with model/init.py's layout-independent values of this seed; None leaves the
        parameters as constructed (a model built on the meta device, to be materialised by its layout)."""
        super().__init__()
        parts = parts if parts is not None else ModelParts()
        self.config = cfg
        self.share = parts.share(cfg)
        self.model = MiniMaxModel(cfg, parts, self.share)
        self.lm_head = parts.lm_head(cfg.hidden_size, cfg.vocab_size) if self.share.head else None
        if cfg.tie_word_embeddings and self.share.embedding and self.share.head:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.loss_chunk_tokens = 0  # see set_memory_options
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """Every parameter (this rank's part of it) from model/init.py's rules: transformers' init or
        Xavier with DeepNorm gains (config.init), the same values in every layout for one seed."""
        fill_parameters(self, InitSource(self.config, seed))

    def set_memory_options(
        self,
        activation_checkpointing: str = "none",
        moe_chunk_tokens: int = 0,
        loss_chunk_tokens: int = 0,
        loss_kernel: str = "chunked",
    ) -> None:
        """activation_checkpointing none | selective (attention sublayers) | full (whole layers);
        moe_chunk_tokens > 0 checkpoints the norm + MoE sublayer per chunk of that many tokens (dropless
        routing only); loss_chunk_tokens > 0 runs lm_head + cross-entropy per checkpointed chunk of that many
        tokens (ops/cross_entropy.py); loss_kernel auto | liger runs them through Liger-Kernel's fused linear
        cross-entropy on CUDA instead (auto: where it is installed; the vocabulary-parallel head keeps its
        own). None of them changes the result beyond bf16 rounding."""
        if loss_kernel not in LOSS_KERNELS:
            raise ValueError(f"loss kernel '{loss_kernel}' unknown; use one of {', '.join(LOSS_KERNELS)}")
        if loss_kernel == "liger":
            require_liger("train.loss_kernel=liger (auto falls back to the chunked loss)")
        if activation_checkpointing not in AC_MODES:
            raise ValueError(
                f"activation checkpointing mode '{activation_checkpointing}' unknown; use none, selective or full"
            )
        if moe_chunk_tokens > 0 and self.config.moe_routing != "dropless":
            raise ValueError(
                "moe_chunk_tokens needs moe_routing=dropless: capacity routing ranks every token of "
                "the micro-batch together"
            )
        for layer in self.model.decoder_layers().values():
            layer.checkpoint_mode = activation_checkpointing
            layer.moe_chunk_tokens = moe_chunk_tokens
        self.loss_chunk_tokens = loss_chunk_tokens
        if self.lm_head is not None:
            self.lm_head.loss_kernel = loss_kernel

    # ---- forward ---------------------------------------------------------------------------------
    def forward_stage(self, layer_ids, inputs, seq: PackedSequence, *, first: bool, last: bool, labels=None):
        """One pipeline stage over one micro-batch: `inputs` is the input_ids [B, T] (first stage) or the
        previous stage's (hidden, stats); then layers `layer_ids` (held by this rank) in order; the last stage
        ends with the load-balancing loss, the final norm and the summed token cross-entropy of `labels`.
        Chained over all stages it computes exactly what forward computes (same operations, same order)."""
        inner = self.model
        e = self.config.num_local_experts
        if first:
            x = inner.embed_tokens(inputs.reshape(-1))
            counts = x.new_zeros(e, dtype=torch.float32)
            prob_sum = x.new_zeros(e, dtype=torch.float32)
            rows = x.new_zeros((), dtype=torch.float32)
        else:
            x, stats = inputs
            counts, prob_sum, rows = stats[:e], stats[e : 2 * e], stats[2 * e]
        held = inner.decoder_layers()
        layers = [held[i] for i in layer_ids]
        x, counts, prob_sum, rows, loads, dropped = inner.run_layers(x, seq, layers, counts, prob_sum, rows)
        out = StageOutput(expert_load=torch.stack(loads).detach() if loads else None, dropped_tokens=dropped)
        if not last:
            out.hidden, out.stats = x, torch.cat([counts, prob_sum, rows.reshape(1)])
            return out
        counts, prob_sum, rows = inner.aux_stats(counts, prob_sum, rows)
        out.aux_loss = load_balancing_loss(counts, prob_sum, rows, e)
        flat = labels.reshape(-1)
        out.lm_loss_sum = self.lm_head.loss_sum(inner.norm(x), flat, self.loss_chunk_tokens)
        out.num_loss_tokens = (flat != -100).sum()
        return out

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
            if out.logits is not None:  # the full logits were asked for anyway
                out.lm_loss_sum = F.cross_entropy(
                    out.logits.reshape(flat.numel(), -1).float(), flat, ignore_index=-100, reduction="sum"
                )
            else:
                out.lm_loss_sum = self.lm_head.loss_sum(hidden, flat, self.loss_chunk_tokens)
            out.num_loss_tokens = (flat != -100).sum()
            out.lm_loss = out.lm_loss_sum / out.num_loss_tokens.clamp(min=1)
            out.loss = out.lm_loss + self.config.router_aux_loss_coef * aux
        return out
