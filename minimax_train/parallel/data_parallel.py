"""Data parallelism with FSDP2: `fully_shard` on every decoder layer, then on the root.

Parameters are sharded over the dense data-parallel dimension (dp, or dp x cp once context parallelism
is on: cp ranks hold the same weights). On GPU the sharded fp32 parameters are the master weights; they
are all-gathered in bf16 and gradients are reduce-scattered in fp32 (MixedPrecisionPolicy). On CPU /
gloo everything stays fp32. FSDP averages gradients over the group: the trainer scales its loss by the
group size so that the step's gradient is that of (token-summed loss) / (global loss tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .mesh import ParallelMesh


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one (model.model.layers for the transformers layout)."""
    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return list(model.layers)
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, nn.ModuleList):
            return list(mod)
    raise ValueError(f"cannot find the decoder layers (a ModuleList named 'layers') in {type(model).__name__}")


def apply_fsdp(
    model: nn.Module,
    mesh: ParallelMesh,
    *,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = torch.float32,
    reshard_after_forward: bool = True,
    ignored_params: Optional[set] = None,
) -> nn.Module:
    """Shard `model` in place over mesh.dp_cp_mesh. A no-op when that dimension has size 1.
    `ignored_params` stay as they are (expert parameters whose gradients another mechanism reduces)."""
    if mesh.grad_reduce_size == 1 or mesh.dp_cp_mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed right away by backward: keep them gathered
        fully_shard(
            layer,
            mesh=mesh.dp_cp_mesh,
            mp_policy=mp,
            ignored_params=ignored_params,
            reshard_after_forward=reshard_after_forward and i < len(layers) - 1,
        )
    # The root keeps FSDP's automatic choice (no reshard after forward): its parameters (embedding, final
    # norm, lm_head) are needed right away by backward, and the model's output is a dataclass that FSDP
    # cannot search for tensors to hang a pre-backward unshard on.
    fully_shard(model, mesh=mesh.dp_cp_mesh, mp_policy=mp, ignored_params=ignored_params)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step (gradients accumulate locally)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


__all__ = ["apply_fsdp", "decoder_layers", "is_sharded", "set_gradient_sync"]
