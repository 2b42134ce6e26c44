"""AdamW (apex FusedAdam, torch fused or foreach) and the learning-rate schedules.

The schedule is a pure function of the step, so its checkpointed state is the step number."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from minimax_train.config import OptimConfig

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of the update made at 0-based optimiser step `step` of `total_steps`.

    warmup: linear from lr/warmup_steps to lr over the first warmup_steps updates; then
    cosine / linear: from lr to min_lr, reaching min_lr at the last step;
    wsd: constant lr, then the last decay_steps (or decay_fraction * total) decay to min_lr (decay_style);
    constant: lr."""
    peak, floor, warm = cfg.lr, cfg.min_lr, cfg.warmup_steps
    if warm > 0 and step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule in ("cosine", "linear"):
        span = max(1, total_steps - warm)
        p = min(1.0, max(0.0, (step - warm + 1) / span))
        f = 0.5 * (1.0 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1.0 - p
        return floor + (peak - floor) * f
    # wsd
    decay = cfg.decay_steps if cfg.decay_steps is not None else int(round(cfg.decay_fraction * total_steps))
    decay = min(decay, total_steps - warm)
    start = total_steps - decay
    if decay <= 0 or step < start:
        return peak
    p = min(1.0, (step - start + 1) / decay)
    if cfg.decay_style == "linear":
        f = 1.0 - p
    elif cfg.decay_style == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    else:  # sqrt
        f = 1.0 - math.sqrt(p)
    return floor + (peak - floor) * f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and expert tensors); none on 1-D parameters (norms, biases). The rank of a
    parameter is its logical one: a DeepSpeed ZeRO-3 parameter partitioned before the optimiser is built
    (partitioned construction) is an empty 1-D tensor whose shape is in ds_shape."""
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # NVIDIA apex built from source; never the PyPI 'apex'

        return FusedAdam
    except Exception:
        return None


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, device: torch.device, sharded: bool
) -> tuple[torch.optim.Optimizer, str]:
    """Return (optimizer, implementation name). `sharded`: parameters apex cannot step (FSDP or DeepSpeed
    partitions); DTensor parameters (tensor / expert parallel, also without FSDP) count as sharded too."""
    from torch.distributed.tensor import DTensor

    sharded = sharded or any(isinstance(p, DTensor) for p in model.parameters())
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    impl = cfg.impl
    if impl == "auto":
        if device.type == "cuda" and not sharded and _apex_fused_adam() is not None:
            impl = "apex"
        else:
            impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "apex":
        FusedAdam = _apex_fused_adam()
        if FusedAdam is None:
            raise RuntimeError(
                "optim.impl=apex but apex.optimizers.FusedAdam is not importable (build NVIDIA apex "
                "from source; the PyPI package named 'apex' is unrelated)"
            )
        if device.type != "cuda" or sharded:
            raise RuntimeError("optim.impl=apex needs unsharded CUDA parameters (one GPU); use fused or auto")
        return FusedAdam(groups, adam_w_mode=True, **kw), "apex"
    if impl == "fused":
        return torch.optim.AdamW(groups, fused=True, **kw), "torch-fused"
    return torch.optim.AdamW(groups, foreach=True, **kw), "torch-foreach"


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """This run's betas, eps and weight decay on an optimiser whose state (and param groups) came from
    another run's checkpoint; the decay group is the first (param_groups), the no-decay one keeps 0."""
    for i, g in enumerate(optimizer.param_groups):
        g["betas"] = (cfg.beta1, cfg.beta2)
        g["eps"] = cfg.eps
        g["weight_decay"] = cfg.weight_decay if i == 0 else 0.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, group=None) -> torch.Tensor:
    """Global L2 norm of the gradients, accumulated in float64 (fp32 reductions over millions of elements
    are off by ~1e-5 relative on CPU), then clip to max_norm (inf: no clipping). Works for plain tensors
    and DTensors (FSDP2 shards, later TP): squares of local shards are summed per set of sharded mesh
    dimensions and all-reduced once per such set, so replicated dimensions are not double counted.
    `group` (pipeline stages): ranks holding other parameters, whose squares are summed in too.
    Returns the pre-clip norm (fp64 scalar on the gradients' device)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads and group is None:
        return torch.zeros((), dtype=torch.float64)
    device = _local(grads[0]).device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    buckets: dict[tuple, list] = {}
    for g in grads:
        sq = torch.linalg.vector_norm(_local(g), 2, dtype=torch.float64).square()
        if hasattr(g, "device_mesh"):
            # any shard kind counts (FSDP over TP uses _StridedShard, whose is_shard() is False)
            dims = tuple(i for i, pl in enumerate(g.placements) if not (pl.is_replicate() or pl.is_partial()))
            if dims:
                key = (id(g.device_mesh), dims)
                if key not in buckets:
                    buckets[key] = [g.device_mesh, dims, torch.zeros((), dtype=torch.float64, device=device)]
                buckets[key][2] += sq
                continue
        total += sq
    for mesh, dims, acc in buckets.values():
        for d in dims:
            dist.all_reduce(acc, group=mesh.get_group(d))
        total += acc
    if group is not None:
        dist.all_reduce(total, group=group)
    norm = total.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        locs = [_local(g) for g in grads]
        for dtype in {t.dtype for t in locs}:
            group = [t for t in locs if t.dtype == dtype]
            torch._foreach_mul_(group, coef.to(dtype))
    return norm
