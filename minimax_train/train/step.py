"""One optimiser step's forward and backward on this rank, and evaluation: the micro-batches' model inputs
(this cp rank's share of every row under context parallelism), the loss scaling that makes any split of
the global batch over ranks and micro-batches give the same update, and the held-out loss."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from minimax_train.parallel.mesh import ParallelMesh
from minimax_train.train.engine import TorchEngine


def local_eval(model, loader, iters: int, device, autocast, mesh: ParallelMesh, pipeline=None) -> torch.Tensor:
    """[lm_loss_sum, loss tokens] over up to `iters` held-out micro-batches of this rank (of its dp x cp
    share; with a pipeline, the same on every pp rank)."""
    if pipeline is not None:
        return _pipeline_eval(pipeline, loader, iters, device, autocast, mesh)
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    it = iter(loader)
    model.eval()
    with torch.no_grad():
        for _ in range(iters):
            try:
                b = next(it).to(device, non_blocking=True)
            except StopIteration:
                break
            with autocast():
                out = model(**model_inputs(b, mesh))
            acc[0] += out.lm_loss_sum.double()
            acc[1] += out.num_loss_tokens.double()
    model.train()
    return acc


def model_inputs(b, mesh: ParallelMesh) -> dict:
    """Keyword arguments of the model for one micro-batch on this rank: with context parallelism, this
    cp rank's zigzag share of every row (lm_loss_sum / num_loss_tokens then cover that share only)."""
    if mesh.cp_size > 1:
        from minimax_train.parallel.context_parallel import shard_batch

        ids, labels, seq = shard_batch(b, mesh.cp_rank, mesh.cp_size)
        return {"input_ids": ids, "labels": labels, "seq": seq}
    return {"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids, "cu_seqlens": b.cu_seqlens}


def local_loss_tokens(b, mesh: ParallelMesh) -> int:
    """Loss tokens this rank computes for micro-batch b (its cp share under context parallelism), so that
    the sum over the dp x cp group is the global count."""
    if mesh.cp_size > 1:
        from minimax_train.parallel.cp_shard import zigzag_token_index

        idx = zigzag_token_index(b.labels.shape[0], b.labels.shape[1], mesh.cp_rank, mesh.cp_size)
        return int((b.labels.reshape(-1)[idx] != -100).sum())
    return b.num_loss_tokens()


@dataclass
class ForwardBackward:
    global_tokens: float  # loss tokens of the whole global batch (all dp ranks)
    lm_sum: torch.Tensor  # this rank's summed token cross-entropy (fp64 scalar)
    aux_sum: torch.Tensor  # this rank's summed per-micro-batch aux losses (fp64 scalar)
    expert_load: torch.Tensor  # this rank's [layers, experts] token counts (fp64)


def forward_backward(
    model,
    batches,
    *,
    mesh: ParallelMesh,
    autocast=contextlib.nullcontext,
    coef: float,
    inject_nan: bool = False,
    engine=None,
) -> ForwardBackward:
    """Accumulate the gradient of one optimiser step's share of this rank: `batches` are its micro-batches.

    The gradient (after FSDP's average over the dp group) is that of
        sum(token CE over the global batch) / global loss tokens + coef * mean(aux loss over all micro-batches)
    so any split of the same global rows over ranks and micro-batches gives the same update. `engine`
    (TorchEngine by default) owns the gradient-sync switch and backward (DeepSpeed: engine.backward)."""
    if engine is None:
        engine = TorchEngine(model, None)
    device = mesh.device
    accum = len(batches)
    ntok = torch.tensor([sum(local_loss_tokens(b, mesh) for b in batches)], dtype=torch.float64, device=device)
    mesh.all_reduce(ntok, group=mesh.dp_cp_group)
    global_tokens = max(float(ntok.item()), 1.0)
    scale = float(mesh.grad_reduce_size)  # FSDP / DeepSpeed average gradients over this many ranks
    if getattr(engine, "pipeline", None) is not None:
        return _pipeline_forward_backward(engine.pipeline, batches, mesh, autocast, scale / global_tokens,
                                          coef / accum, inject_nan, global_tokens)  # fmt: skip
    lm_sum = torch.zeros((), dtype=torch.float64, device=device)
    aux_sum = torch.zeros((), dtype=torch.float64, device=device)
    load = None
    for i, b in enumerate(batches):
        b = b.to(device, non_blocking=True)
        engine.micro_batch(i, i == accum - 1)
        with autocast():
            out = model(**model_inputs(b, mesh))
        loss_mb = out.lm_loss_sum.float() * (scale / global_tokens) + (coef / accum) * out.aux_loss.float()
        if inject_nan:
            loss_mb = loss_mb * float("nan")
        engine.backward(loss_mb)
        lm_sum += out.lm_loss_sum.detach().double()
        aux_sum += out.aux_loss.detach().double()
        el = out.expert_load.detach().double()
        load = el if load is None else load + el
    if inject_nan:
        lm_sum += float("nan")
    return ForwardBackward(global_tokens, lm_sum, aux_sum, load)


def _pipeline_results(pipeline, step, mesh: ParallelMesh) -> torch.Tensor:
    """[lm_sum, aux_sum, loss tokens, expert loads...] of the step, summed over the pp group: the last stage
    holds the losses, every stage its layers' loads; afterwards every pp rank holds all of them."""
    cfg = pipeline.owner.config
    load = pipeline.expert_load(cfg.num_hidden_layers, cfg.num_local_experts, step)
    head = torch.tensor([float(step.lm_sum), float(step.aux_sum), float(step.loss_tokens)], dtype=torch.float64)
    out = torch.cat([head.to(load.device), load.flatten()])
    mesh.all_reduce(out, group=mesh.pp_group)
    return out


def _pipeline_forward_backward(pipeline, batches, mesh, autocast, loss_scale, aux_scale, inject_nan, global_tokens):
    """forward_backward through the pipeline schedule: all micro-batches in one run, the last stage
    back-propagating lm_loss_sum * loss_scale + aux_scale * aux_loss of each (the same loss as above)."""
    from minimax_train.parallel.pipeline import PipelineStep

    inputs = [model_inputs(b.to(mesh.device, non_blocking=True), mesh) for b in batches]
    step = PipelineStep(inputs, loss_scale=loss_scale, aux_scale=aux_scale, inject_nan=inject_nan, autocast=autocast)
    out = _pipeline_results(pipeline, pipeline.run(step), mesh)
    lm_sum = out[0] + (float("nan") if inject_nan else 0.0)
    cfg = pipeline.owner.config
    return ForwardBackward(global_tokens, lm_sum, out[1], out[3:].view(cfg.num_hidden_layers, -1))


def _pipeline_eval(pipeline, loader, iters: int, device, autocast, mesh: ParallelMesh) -> torch.Tensor:
    """local_eval through the schedule (forward only), in runs of the schedule's micro-batch count; the last
    run is padded with its last micro-batch, whose results are not counted."""
    batches, it = [], iter(loader)
    for _ in range(iters):
        try:
            batches.append(next(it).to(device, non_blocking=True))
        except StopIteration:
            break
    acc = torch.zeros(2, dtype=torch.float64, device=device)
    if not batches:
        return acc
    from minimax_train.parallel.pipeline import PipelineStep
    from minimax_train.parallel.pipeline_layout import min_microbatches

    m = max(min_microbatches(mesh.cfg), 1)
    pipeline.owner.eval()
    with torch.no_grad():
        for start in range(0, len(batches), m):
            chunk = [model_inputs(b, mesh) for b in batches[start : start + m]]
            real = len(chunk)
            chunk += [chunk[-1]] * (m - real)
            step = PipelineStep(chunk, autocast=autocast, keep=set(range(real)))
            out = _pipeline_results(pipeline, pipeline.run(step, train=False), mesh)
            acc[0] += out[0]
            acc[1] += out[2]
    pipeline.owner.train()
    return acc


__all__ = ["ForwardBackward", "forward_backward", "local_eval", "local_loss_tokens", "model_inputs"]
