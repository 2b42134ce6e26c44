"""Initialisation that does not depend on the parallel layout, and filling parameters shard by shard.

Every initial value is a pure function of (seed, parameter name, the element's index in the logical,
transformers-shaped tensor): the flattened logical tensor is cut into blocks of BLOCK elements and block b
draws standard normals from its own CPU generator, seeded by a hash of (seed, name, b); the rule of the
parameter (ones, or a normal whose std may depend on the row) scales them. A rank that holds any box of a
parameter -- a tensor-parallel slice, an FSDP2 row shard, a few experts, a DeepSpeed flat partition --
generates only the blocks that cover it, so every layout and engine gets bit-identical values without
broadcasting anything, and a model built on the meta device is materialised with O(local shard) memory.
Values are drawn on the CPU so they are the same on every device type too.

`fill_parameters(model, source)` writes every parameter's local part from any `WeightSource` (this init,
a transformers checkpoint read by slices, a full state dict): the one mechanism for initialisation, HF
import and loading a reference model into a layout.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .config import ModelConfig

BLOCK = 1 << 16  # elements per generator; part of the definition of the init (changing it changes values)
_MAX_SPAN = 1 << 22  # logical elements generated at a time when filling a box (bounds its buffers: ~50 MB)


class WeightSource(Protocol):
    def read(self, name: str, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The values of the box [offsets, offsets + sizes) of parameter `name`, whose full (in-memory) shape
        is `shape`, as a tensor of shape `sizes` (any float dtype, on the CPU)."""
        ...


@dataclass(frozen=True)
class InitRule:
    ones: bool = False
    std: float = 0.0
    # std per logical row (the flattened leading dims): rows [N] int64 -> std [N]; None: `std` everywhere
    row_std: Callable[[torch.Tensor], torch.Tensor] | None = None


def init_rule(cfg: ModelConfig, name: str) -> InitRule:
    """transformers' init (normal(0, initializer_range), norms = 1) or Xavier normal with DeepNorm gains
    (cfg.init="deepnorm"): gain beta = (8N)^(-1/4) on value, output and FFN projections, 1 on q, k, router
    and lm_head, per unfused projection. Fused tensors use the fans of the projection each block stands for:
    qkv_proj's rows are head-major (q_i, k_i, v_i), gate_up_proj's gate then up."""
    if name.endswith("norm.weight") or "layernorm" in name:
        return InitRule(ones=True)
    if cfg.init == "normal" or "embed_tokens" in name:
        return InitRule(std=cfg.initializer_range)
    beta = (8 * cfg.num_hidden_layers) ** -0.25
    h, n, kv, d, i = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )

    def xavier(fan_out: int, fan_in: int, gain: float = 1.0) -> float:
        return gain * math.sqrt(2.0 / (fan_in + fan_out))

    if "qkv_proj" in name:
        std = xavier(n * d, h)
        return InitRule(std=std, row_std=lambda rows: torch.where((rows // d) % 3 == 2, beta * std, std))
    if "gate_up_proj" in name:
        return InitRule(std=xavier(i, h, beta))
    if "down_proj" in name:
        return InitRule(std=xavier(h, i, beta))
    shapes = {"q_proj": (n * d, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h), "o_proj": (h, n * d),
              "output_gate": (n * d, h), "out_proj": (h, n * d), "mlp.gate": (cfg.num_local_experts, h),
              "lm_head": (cfg.vocab_size, h)}  # fmt: skip
    scaled = ("v_proj", "o_proj", "out_proj", "output_gate")
    for key, (fo, fi) in shapes.items():
        if key in name:
            return InitRule(std=xavier(fo, fi, beta if key in scaled else 1.0))
    raise ValueError(f"no initialisation rule for parameter {name!r}")


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def standard_normal_span(seed: int, name: str, start: int, end: int) -> torch.Tensor:
    """The standard normals of flat logical indices [start, end) of parameter `name` (fp32, CPU)."""
    gen = torch.Generator()
    first, last = start // BLOCK, (end - 1) // BLOCK
    parts = []
    for b in range(first, last + 1):
        gen.manual_seed(_block_seed(seed, name, b))
        parts.append(torch.randn(BLOCK, generator=gen))
    vals = torch.cat(parts) if len(parts) > 1 else parts[0]
    return vals[start - first * BLOCK : end - first * BLOCK]


def _flat_index(shape, offsets, sizes) -> torch.Tensor:
    """Flat (row-major) indices of the box's elements in a tensor of `shape`, in the box's own order."""
    idx = torch.zeros((), dtype=torch.int64)
    stride = 1
    for dim in reversed(range(len(shape))):
        ax = torch.arange(offsets[dim], offsets[dim] + sizes[dim], dtype=torch.int64) * stride
        idx = idx + ax.view((-1,) + (1,) * (len(shape) - 1 - dim))
        stride *= shape[dim]
    return idx.reshape(tuple(sizes))


class InitSource:
    """The layout-independent initial values (see the module docstring) of a model config and seed."""

    def __init__(self, cfg: ModelConfig, seed: int):
        self.cfg, self.seed = cfg, int(seed)

    def read(self, name, shape, offsets, sizes) -> torch.Tensor:
        rule = init_rule(self.cfg, name)
        if rule.ones:
            return torch.ones(tuple(sizes))
        out = torch.empty(tuple(sizes))
        if out.numel() == 0:
            return out
        # slabs along the box's first dim keep the generated span (and the index tensor) bounded
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        per_slab = max(1, _MAX_SPAN // max(row_elems, 1))
        for s in range(0, sizes[0], per_slab):
            n = min(per_slab, sizes[0] - s)
            off = (offsets[0] + s, *offsets[1:])
            sz = (n, *sizes[1:])
            flat = _flat_index(shape, off, sz)
            lo, hi = int(flat.min()), int(flat.max()) + 1
            vals = standard_normal_span(self.seed, name, lo, hi)[flat - lo]
            if rule.row_std is not None:
                vals = vals * rule.row_std(flat // shape[-1])
            else:
                vals = vals * rule.std
            out[s : s + n] = vals
        return out


class StateDictSource:
    """Values from full (unsharded) tensors, e.g. a single-process reference model's state dict."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = state_dict

    def read(self, name, shape, offsets, sizes) -> torch.Tensor:
        t = self.sd[name]
        if tuple(t.shape) != tuple(shape):
            t = t.reshape(shape)  # e.g. the [E, 2, I, H] in-memory view of an [E, 2I, H] gate/up tensor
        return t[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]


def local_boxes(p: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]:
    """[(global offsets, sizes, local tensor view)] of the part of parameter `p` this rank holds: a DTensor's
    shard (the chunk list torch.distributed.checkpoint uses, so every placement it supports works), or the
    whole of a plain tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(p, DTensor):
        local = p.to_local()
        chunks = p.__create_chunk_list__()
        if len(chunks) != 1:
            raise ValueError(f"expected one local chunk per DTensor, got {len(chunks)}")
        (c,) = chunks
        return [(tuple(c.offsets), tuple(c.sizes), local)]
    return [((0,) * p.dim(), tuple(p.shape), p)]


@torch.no_grad()
def fill_parameters(model: nn.Module, source: WeightSource, names: Callable[[str], bool] | None = None) -> None:
    """Write the local part of every parameter of `model` (optionally only those whose name passes `names`)
    from `source`, in place, in the parameter's dtype and device."""
    for name, p in model.named_parameters():
        if names is not None and not names(name):
            continue
        for offsets, sizes, local in local_boxes(p):
            if local.numel() == 0:
                continue
            local.copy_(source.read(name, tuple(p.shape), offsets, sizes).reshape(local.shape))


__all__ = [
    "BLOCK",
    "WeightSource",
    "InitRule",
    "init_rule",
    "InitSource",
    "StateDictSource",
    "standard_normal_span",
    "local_boxes",
    "fill_parameters",
]
