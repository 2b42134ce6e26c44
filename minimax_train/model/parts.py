"""The model's extension points: the places where a parallel layout changes what a layer computes.

TorchTitan keeps parallelism out of its model files entirely. MiniMax layers need a few collectives inside
them (the lightning output norm sums squares over all heads, the loss is vocabulary-parallel, experts are
dispatched by all-to-all), so instead the model asks one `ModelParts` object, given at construction, for
each such piece; every default here is the one-process computation. minimax_train.parallel builds the
parts of a layout from its mesh (parallel/model_parts.py); nothing is patched after construction, and
model/ never imports parallel/.

Parameters keep the single-process (transformers) names and logical shapes in every layout: a part may
hold a DTensor whose local shard is what it computes with, which is how checkpoints reshard between
layouts and how weights are materialised shard by shard.

The slots:
    embedding(vocab, hidden)        token ids -> residual stream
    lm_head(hidden, vocab)          LMHead: full logits, and the summed token cross-entropy
    residual_norm(dim, eps)         RMSNorm on the residual stream (input/post-attention/final norms)
    head_norm(dim, eps)             the lightning output RMSNorm over all heads' features
    linear(in, out, role)           projections; role is one of LINEAR_ROLES
    region()                        Region: enter/exit of an attention or MoE sublayer
    softmax_core(cfg, layer)        attention over packed documents of one softmax layer
    lightning_core(cfg, layer)      the decayed linear recurrence of one lightning layer (owns its decays)
    router(cfg), experts(cfg), dispatcher(cfg)   the MoE block's pieces
    aux_stats()                     reduces the load-balancing statistics over ranks sharing a row
    share(cfg)                      ModelShare: which pieces of the network this rank builds (pipeline
                                    parallelism builds only its stages' layers; default: all of it)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import packed_causal_attention, resolve_packed_backend
from ..ops.cross_entropy import chunked_loss_sum, fused_linear_cross_entropy_sum, liger_linear_cross_entropy
from ..ops.fused import rms_norm
from ..ops.lightning import lightning_attention, lightning_slopes
from .config import ModelConfig

# Projection roles a layout may place differently: "column" splits the output features by heads, "row"
# splits the input features (partial sums leave the sublayer through Region.exit), "kv" is a softmax
# k/v projection (split by KV heads, or replicated when there are fewer KV heads than ranks).
LINEAR_ROLES = ("column", "row", "kv")

WeightView = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Linear(nn.Module):
    """y = x @ view(weight)^T without bias; `view` maps the stored parameter (e.g. a DTensor shard) to the
    tensor this rank computes with."""

    def __init__(self, in_features: int, out_features: int, weight: nn.Parameter | None = None, view=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(out_features, in_features))
        self.view: WeightView = view or _identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.view(self.weight))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in fp32, cast back, then times the weight (transformers' order).

    `reduce_sum` (a layout's collective) sums the per-token sum of squares over the ranks that hold the
    other features (the lightning norm under tensor parallelism); the mean is then over the weight's
    logical length. `view` maps the stored weight to the local tensor used."""

    def __init__(self, dim: int, eps: float, *, weight: nn.Parameter | None = None, view=None, reduce_sum=None):
        super().__init__()
        self.weight = weight if weight is not None else nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.view: WeightView = view or _identity
        self.reduce_sum = reduce_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.view(self.weight)
        # under autocast the output is in the matmul dtype, as a bf16 transformers model's: the residual
        # stream and every projection's input then need no cast
        kind = x.device.type
        out_dtype = (
            torch.get_autocast_dtype(kind)
            if torch.is_autocast_enabled(kind)
            else torch.promote_types(x.dtype, weight.dtype)
        )
        if self.reduce_sum is None:
            return rms_norm(x, weight, self.eps, out_dtype)
        x32 = x.float()
        ms = self.reduce_sum(x32.pow(2).sum(-1, keepdim=True)) / self.weight.shape[0]
        return weight.to(out_dtype) * (x32 * torch.rsqrt(ms + self.eps)).to(x.dtype).to(out_dtype)


class LMHead(nn.Module):
    """The output projection and the training loss. `forward` gives full logits (evaluation, export);
    `loss_sum` the fp32 token cross-entropy summed over labels != -100, the lm_head + loss run in chunks of
    `chunk_tokens` under activation checkpoints (ops/cross_entropy.py) so the full logits never exist."""

    loss_kernel = "chunked"  # CausalLM.set_memory_options: "auto" / "liger" take Liger's fused kernel on CUDA

    def __init__(self, hidden: int, vocab: int, weight: nn.Parameter | None = None):
        super().__init__()
        self.weight = weight if weight is not None else nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with labels the summed cross-entropy through the fused kernel (inside the module
        call, so that sharding hooks gather the weight)."""
        if labels is None:
            return F.linear(hidden, self.weight)
        return fused_linear_cross_entropy_sum(hidden, self.weight, labels)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        if self.loss_kernel != "chunked" and hidden.is_cuda and liger_linear_cross_entropy() is not None:
            return self(hidden.reshape(labels.numel(), -1), labels)

        def loss_fn(h, y):  # through the module call: ZeRO-3 gathers the weight in its hooks, recompute too
            return F.cross_entropy(self(h).float(), y, ignore_index=-100, reduction="sum")

        return chunked_loss_sum(hidden.reshape(labels.numel(), -1), labels, loss_fn, chunk_tokens)


class Region:
    """Where a sublayer's computation starts and ends. One process: the identity. Tensor parallelism
    enters with all tokens replicated (all-gather under sequence parallelism) and exits by summing the
    ranks' partial outputs (reduce-scatter under sequence parallelism)."""

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SoftmaxCore(Protocol):
    def __call__(self, q, k, v, seq, *, scale: float, sliding_window) -> torch.Tensor: ...


class LightningCore(Protocol):
    def __call__(self, q, k, v, seq) -> torch.Tensor: ...


class Dispatcher(Protocol):
    """(x [T, H], route, experts) -> (out [T, H], route of the tokens the load-balancing statistics count,
    {"tokens_per_expert": [E], "dropped": scalar})."""

    def __call__(self, x, route, experts): ...


class LocalSoftmaxCore:
    """Causal attention within the documents of the packed row on this rank."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def __call__(self, q, k, v, seq, *, scale, sliding_window):
        backend = resolve_packed_backend(q, self.backend)
        longest = seq.max_doc_len if backend in ("fa2", "cudnn") else None  # the flash kernels' host-side bound
        return packed_causal_attention(
            q, k, v, seq.cu_seqlens, longest, scale=scale, sliding_window=sliding_window,
            backend=backend, seq_meta=(seq.doc_ids, seq.causal_pos, seq.cache),
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"LocalSoftmaxCore(backend={self.backend!r})"


class DecayRates:
    """The per-head decays of one lightning layer for heads [h0, h1): fp32, one copy per device, computed
    on first use (so a model built on the meta device needs no buffer re-initialisation)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, h0: int = 0, h1: int | None = None):
        self.args = (cfg.num_attention_heads, layer_idx, cfg.num_hidden_layers, cfg.legacy_slopes)
        self.h0, self.h1 = h0, cfg.num_attention_heads if h1 is None else h1
        self._by_device: dict = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._by_device:
            n, layer, layers, legacy = self.args
            self._by_device[device] = lightning_slopes(n, layer, layers, legacy=legacy)[self.h0 : self.h1].to(device)
        return self._by_device[device]

    def __repr__(self) -> str:
        return f"DecayRates(layer={self.args[1]}, heads={self.h0}..{self.h1})"


class LocalLightningCore:
    """The decayed recurrence over the documents of the packed row on this rank (q/k/v [T, H, D])."""

    def __init__(self, decays: DecayRates, block_size: int):
        self.decays, self.block_size = decays, block_size

    def __call__(self, q, k, v, seq):
        slopes = self.decays.on(q.device)
        o, _ = lightning_attention(q[None], k[None], v[None], slopes, cu_seqlens=seq.cu_seqlens_long,
                                   cu_seqlens_host=seq.cu_seqlens_host, block_size=self.block_size)  # fmt: skip
        return o[0]

    def __repr__(self) -> str:
        return f"LocalLightningCore({self.decays})"


@dataclass(frozen=True)
class ModelShare:
    """The pieces of the network a rank builds: decoder layers (None: all), the embedding, and the final
    norm + lm_head. Parameter names are the whole model's whatever the share (model.layers.<i>.*)."""

    layers: tuple[int, ...] | None = None
    embedding: bool = True
    head: bool = True

    def is_whole(self, num_layers: int) -> bool:
        full = self.layers is None or tuple(self.layers) == tuple(range(num_layers))
        return full and self.embedding and self.head


def _identity_stats(counts, prob_sum, rows):
    return counts, prob_sum, rows


class ModelParts:
    """One process: plain modules and local computations. Subclasses (parallel/model_parts.py) override
    the slots a layout changes."""

    def embedding(self, vocab: int, hidden: int) -> nn.Module:
        return nn.Embedding(vocab, hidden)

    def lm_head(self, hidden: int, vocab: int) -> LMHead:
        return LMHead(hidden, vocab)

    def residual_norm(self, dim: int, eps: float) -> nn.Module:
        return RMSNorm(dim, eps)

    def head_norm(self, dim: int, eps: float) -> nn.Module:
        return RMSNorm(dim, eps)

    def linear(self, in_features: int, out_features: int, role: str) -> nn.Module:
        if role not in LINEAR_ROLES:
            raise ValueError(f"unknown projection role {role!r}; use one of {', '.join(LINEAR_ROLES)}")
        return Linear(in_features, out_features)

    def region(self) -> Region:
        return Region()

    def softmax_core(self, cfg: ModelConfig, layer_idx: int) -> SoftmaxCore:
        return LocalSoftmaxCore()

    def lightning_core(self, cfg: ModelConfig, layer_idx: int) -> LightningCore:
        return LocalLightningCore(DecayRates(cfg, layer_idx), cfg.block_size)

    def router(self, cfg: ModelConfig) -> nn.Module:
        from .moe import Router

        return Router(cfg)

    def experts(self, cfg: ModelConfig) -> nn.Module:
        from .moe import Experts

        return Experts(cfg)

    def dispatcher(self, cfg: ModelConfig) -> Dispatcher:
        from .moe import LocalDispatcher

        return LocalDispatcher(cfg.moe_routing, cfg.capacity_factor)

    def aux_stats(self) -> Callable:
        return _identity_stats

    def share(self, cfg: ModelConfig) -> ModelShare:
        return ModelShare()


__all__ = [
    "LINEAR_ROLES",
    "Linear",
    "RMSNorm",
    "LMHead",
    "Region",
    "SoftmaxCore",
    "LightningCore",
    "Dispatcher",
    "LocalSoftmaxCore",
    "DecayRates",
    "LocalLightningCore",
    "ModelParts",
    "ModelShare",
]
