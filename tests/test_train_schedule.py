"""Learning-rate schedules, parameter groups and the float64 gradient norm."""

from __future__ import annotations

import math

import pytest
import torch

from minimax_train.config import OptimConfig
from minimax_train.train.optim import build_optimizer, clip_grad_norm, lr_at, param_groups


def lrs(cfg, total):
    return [lr_at(s, cfg, total) for s in range(total)]


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    x = lrs(cfg, 110)
    assert x[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert all(a >= b for a, b in zip(x[9:], x[10:]))  # non-increasing after warmup
    assert x[-1] == pytest.approx(0.1)
    assert x[59] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way


def test_linear_and_constant():
    x = lrs(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear"), 10)
    assert x == pytest.approx([1 - (i + 1) / 10 for i in range(10)])
    assert set(lrs(OptimConfig(lr=0.5, min_lr=0.0, warmup_steps=0, schedule="constant"), 5)) == {0.5}


@pytest.mark.parametrize("style", ["linear", "cosine", "sqrt"])
def test_wsd_warmup_stable_decay(style):
    cfg = OptimConfig(lr=1.0, min_lr=0.01, warmup_steps=5, schedule="wsd", decay_fraction=0.2, decay_style=style)
    x = lrs(cfg, 100)
    assert x[4] == pytest.approx(1.0) and x[0] == pytest.approx(0.2)
    assert x[5:80] == pytest.approx([1.0] * 75)  # stable
    assert all(a > b for a, b in zip(x[79:], x[80:]))  # strictly decaying over the last 20
    assert x[-1] == pytest.approx(0.01)
    cfg.decay_steps = 10
    assert lrs(cfg, 100)[89] == pytest.approx(1.0) and lrs(cfg, 100)[90] < 1.0


def test_param_groups_exclude_1d_from_weight_decay():
    from minimax_train.model import MiniMaxForCausalLM, ModelConfig

    model = MiniMaxForCausalLM(ModelConfig())
    g = param_groups(model, 0.1)
    assert g[0]["weight_decay"] == 0.1 and g[1]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in g[0]["params"]) and all(p.dim() == 1 for p in g[1]["params"])
    assert sum(len(x["params"]) for x in g) == len(list(model.parameters()))
    opt, impl = build_optimizer(model, OptimConfig(), device=torch.device("cpu"), sharded=False)
    assert impl == "torch-foreach" and isinstance(opt, torch.optim.AdamW)


def test_clip_grad_norm_fp64_and_clipping():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(1000, 100)), torch.nn.Parameter(torch.randn(7))]
    for p in ps:
        p.grad = torch.randn_like(p)
    exact = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ps))
    n = clip_grad_norm(ps, float("inf"))
    assert n.dtype == torch.float64 and float(n) == pytest.approx(exact, rel=1e-12)
    n = clip_grad_norm(ps, 1.0)
    assert float(n) == pytest.approx(exact, rel=1e-12)
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ps))
    assert after == pytest.approx(1.0, rel=1e-5)
