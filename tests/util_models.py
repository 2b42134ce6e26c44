"""Tiny models and packed rows shared by the parallel-equivalence tests (tensor, context, expert parallel,
the vocabulary-parallel loss), on CPU and on GPU."""

from __future__ import annotations

import torch

SEED = 1234

# the tensor-parallel tests' model: 4 layers (2 lightning, 2 softmax), GQA, 4 experts top-2
TP_MODEL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    softmax_every=2,
    block_size=16,
    rope_theta=10000.0,
    router_aux_loss_coef=0.01,
)


def make_config(**overrides):
    from minimax_train.model.config import ModelConfig

    return ModelConfig(**{**TP_MODEL, **overrides})


def make_model(cfg):
    """The one-process reference: the layout-independent init of SEED, as every parallel layout builds it."""
    from minimax_train.model.transformer import MiniMaxForCausalLM

    return MiniMaxForCausalLM(cfg, seed=SEED)


def make_rows(seed: int = 7, rows: int = 2, t: int = 32):
    """Packed rows of several documents each (cu_seqlens over the flattened tokens), a few ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TP_MODEL["vocab_size"], (rows, t), generator=g)
    labels = torch.randint(0, TP_MODEL["vocab_size"], (rows, t), generator=g)
    labels[:, -1] = -100
    labels[0, :2] = -100
    bounds = [0]
    for r in range(rows):  # documents of 5, 11 and the rest per row; one crosses a lightning block of 16
        bounds += [r * t + 5, r * t + 16, (r + 1) * t]
    return ids, labels, torch.tensor(bounds, dtype=torch.int32)


def tiny_model_config(**kw):
    """The context-parallel tests' model: 4 layers alternating lightning / softmax, lightning blocks of 4."""
    from minimax_train.model.config import FULL, LINEAR, ModelConfig

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=[LINEAR, FULL, LINEAR, FULL],
        block_size=4,
        router_aux_loss_coef=0.02,
    )
    base.update(kw)
    return ModelConfig(**base)


def parallel_mesh(cfg, device=None, **parallel):
    """A ParallelMesh of the current process group (every rank calls it) for ParallelConfig(**parallel), on
    `device` (default CPU)."""
    import torch.distributed as dist

    from minimax_train.parallel.mesh import ParallelConfig, ParallelMesh

    return ParallelMesh(
        ParallelConfig(**parallel),
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        local_rank=(device.index or 0) if device is not None else 0,
        device=device if device is not None else torch.device("cpu"),
        model_cfg=cfg,
    )


def build_parallel(
    cfg,
    *,
    seed: int = SEED,
    source=None,
    memory: dict | None = None,
    fsdp: bool = True,
    parts=None,
    device=None,
    **parallel,
):
    """(model, mesh): the layout's model with the init of `seed` (or the values of `source`). parts: a
    callable mesh -> ModelParts replacing the layout's default parts."""
    from minimax_train.model.init import InitSource
    from minimax_train.parallel.parallelize import build_model

    mesh = parallel_mesh(cfg, device, **parallel)
    model = build_model(
        cfg, mesh, source or InitSource(cfg, seed), memory=memory, fsdp=fsdp, parts=parts(mesh) if parts else None
    )
    return model, mesh


def one_process_lightning(q, k, v, slopes, seq, *, block_size: int):
    """The single-process lightning core over all tokens of a PackedSequence (q/k/v [T, H, D] activated)."""
    from minimax_train.ops.lightning import lightning_attention

    o, _ = lightning_attention(q[None], k[None], v[None], slopes, cu_seqlens=seq.cu_seqlens_long, block_size=block_size)
    return o[0]


def one_process_softmax(q, k, v, seq, *, scale: float, sliding_window=None):
    """The single-process softmax core (the exact torch backend) over all tokens of a PackedSequence."""
    from minimax_train.model.parts import LocalSoftmaxCore

    return LocalSoftmaxCore("torch")(q, k, v, seq, scale=scale, sliding_window=sliding_window)
