"""Building at scale on CPU: a model of SCALE_MB MiB of fp32 weights (default 512; the 1.5 GB run is
`MINIMAX_SCALE_MB=1536 pytest tests/test_scale_memory.py`) is built on 4 gloo ranks for tp=2 x dp=2 and
ep=2 x dp=4 (edp=2): every rank's peak RSS growth while building is at most half the model's fp32 size
(each holds a quarter), and the losses of 3 AdamW steps equal the one-process run of the same model and
seed within 1e-5 relative.

Measured at 1471 MiB (30 layers), step-3 loss relative to a float64 one-process run: the fp32 one-process
run -9.1e-5 (also with its micro-batches summed in another order: all fp32 one-process runs agree within
1.3e-7), tp=2 x dp=2 +1.4e-6, ep=2 x dp=4 -1.1e-6. Steps 1 and 2 agree within 5e-7 everywhere. The fp32
one-process run's expert loads at step 3 differ from the float64 run's in 6 layers (one token's top-2 choice
flips on a near-tie of its router logits, and the layers after it see other inputs): a discrete decision
that fp32 rounding settles, more likely the more layers and tokens there are, not an error of the layouts.
So when a layout misses the fp32 run by more than 1e-5, the float64 run is the reference."""

from __future__ import annotations

import os

import pytest
import torch
from test_tensor_parallel import micro_batches, train
from util_models import build_parallel, make_config, make_model

from minimax_train.tools.memcheck import MALLOC_ENV
from minimax_train.tools.spawn import run_distributed
from minimax_train.train.optim import clip_grad_norm

SCALE_MB = int(os.environ.get("MINIMAX_SCALE_MB", "512"))
STEPS = 3
TOL = 1e-5
# experts dominate the size (top-2 of 16: little compute per token); 12.6M parameters (48 MiB) per layer
WIDE = dict(hidden_size=256, intermediate_size=1024, num_local_experts=16, head_dim=64, softmax_every=2)
LAYER_BYTES = 4 * (16 * 3 * 1024 * 256 + 4 * 256 * 256 * 4)


def big_config():
    layers = max(2, 2 * round(SCALE_MB * 2**20 / LAYER_BYTES / 2))
    return make_config(**WIDE, num_hidden_layers=layers)


def model_bytes(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() * 4 for p in make_model_meta(cfg).parameters())


def make_model_meta(cfg):
    from minimax_train.model.transformer import MiniMaxForCausalLM

    return MiniMaxForCausalLM(cfg, seed=None)


def _build_and_train(parallel: dict) -> dict:
    """On each rank: warm up (a tiny model of the layout, one step), then build the big one measuring the
    peak RSS growth, then train it."""
    import torch.distributed as dist
    from util_memory import rss_growth

    small, pm = build_parallel(make_config(), **parallel)
    mb = [micro_batches(1)[pm.dp_rank % 2]]
    train(small, mb, 1, dp=pm.dp_size, dp_group=pm.dp_group, n_mb_total=pm.dp_size, clip=clip_grad_norm)
    del small
    (model, pm), grew = rss_growth(lambda: build_parallel(big_config(), **parallel))
    mbs = [micro_batches(1)[pm.dp_rank % 2]]  # dp=4: ranks 2, 3 see rows 0, 1 again (as the reference)
    res, _ = train(model, mbs, STEPS, dp=pm.dp_size, dp_group=pm.dp_group, n_mb_total=pm.dp_size, clip=clip_grad_norm)
    return {"rank": dist.get_rank(), "build_rss_growth": grew, "loss": res["loss"]}


def _reference(dp: int, dtype: torch.dtype = torch.float32) -> list[float]:
    """One process, the same global batch: dp micro-batches of one row (rows 0, 1, 0, 1 for dp=4); the model
    and its AdamW in `dtype` (float64: the router softmax, the RMSNorm statistics and the cross entropy
    still run in fp32)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model(big_config()).to(dtype)
        mbs = [micro_batches(1)[i % 2] for i in range(dp)]
        res, _ = train(model, mbs, STEPS, clip=clip_grad_norm)
    finally:
        torch.set_num_threads(threads)
    return res["loss"]


@pytest.mark.slow  # ~75 s per layout at 512 MiB on 2 busy cores
@pytest.mark.parametrize("name,parallel,dp", [("tp2_dp2", dict(tp=2, etp=2), 2), ("ep2_dp4", dict(ep=2), 4)])
def test_build_memory_is_a_shard_and_losses_match_one_process(name, parallel, dp):
    cfg = big_config()
    size = model_bytes(cfg)
    got = run_distributed(_build_and_train, 4, parallel, timeout=900, env=MALLOC_ENV)
    ref = _reference(dp)
    growth = [r["build_rss_growth"] for r in got]
    print(f"{name}: model {size / 2**20:.0f} MiB fp32; build RSS growth per rank (MiB) {[g >> 20 for g in growth]}")
    for r in got:
        assert r["build_rss_growth"] <= 0.5 * size, (name, r)
    if not all(close(r["loss"], ref) for r in got):
        # at 1471 MiB (30 layers) the fp32 one-process run itself is 9.1e-5 off the float64 run at step 3
        # (a token's top-2 experts flip on a near-tie), while both layouts are within 1.4e-6 of float64:
        # then the float64 run is the reference
        ref64 = _reference(dp, torch.float64)
        print(f"{name}: fp32 reference {ref}, float64 {ref64}, layout {got[0]['loss']}")
        ref = ref64
    for r in got:
        assert close(r["loss"], ref), (name, r["rank"], r["loss"], ref)


def close(losses: list[float], ref: list[float]) -> bool:
    return all(abs(a - b) <= TOL * abs(b) for a, b in zip(losses, ref))
