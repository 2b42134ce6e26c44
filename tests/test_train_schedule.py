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


# ---- schedules in tokens, and optim.schedule=piecewise ------------------------------------------------
# arXiv 2501.08313 section 4.2 scaled by 1e-6 in tokens: 16 tokens per step (seq_len 16, 1 row), doubling at
# 69K, 790K and 4.7M tokens; warmup 500 steps to 2e-4, constant 7.2M tokens, 1.3e-4 for 3.2M, exponential
# decay to 3e-5 over 1M.
PAPER_RAMP = [[0, 1], [69_000, 2], [790_000, 4], [4_700_000, 8]]
PAPER_SEGMENTS = [
    {"shape": "linear", "lr": 2e-4, "steps": 500},
    {"shape": "constant", "lr": 2e-4, "tokens": 7_200_000},
    {"shape": "constant", "lr": 1.3e-4, "tokens": 3_200_000},
    {"shape": "exponential", "lr": 3e-5, "tokens": 1_000_000},
]


def _paper_reference(n_steps):
    """The schedule as the paper states it, simulated step by step (no code shared with the trainer): a
    phase ends once the tokens consumed since it began reach its length; the next begins at that step."""
    out, tokens, phase, start = [], 0, 0, 0
    lengths = [None, 7_200_000, 3_200_000, 1_000_000]
    for step in range(n_steps):
        rows = 1 if tokens < 69_000 else 2 if tokens < 790_000 else 4 if tokens < 4_700_000 else 8
        after = tokens + 16 * rows
        if phase == 0 and step == 500:
            phase, start = 1, tokens
        while 1 <= phase <= 3 and tokens - start >= lengths[phase]:
            phase, start = phase + 1, tokens
        if phase == 0:
            lr = 2e-4 * (step + 1) / 500
        elif phase == 1:
            lr = 2e-4
        elif phase == 2:
            lr = 1.3e-4
        elif phase == 3:
            p = min(1.0, (after - start) / 1_000_000)
            lr = 1.3e-4 * math.exp(p * math.log(3e-5 / 1.3e-4))
        else:
            lr = 3e-5
        out.append(lr)
        tokens = after
    return out


def _paper_job(steps):
    from minimax_train.conf_tree import compose_job

    segs = ",".join("{" + ",".join(f"{k}:{v}" for k, v in s.items()) + "}" for s in PAPER_SEGMENTS)
    ramp = ",".join(f"[{t},{r}]" for t, r in PAPER_RAMP)
    return compose_job(
        f"train.steps={steps}",
        "train.seq_len=16",
        "train.micro_batch_size=1",
        f"train.batch_ramp=[{ramp}]",
        "optim.schedule=piecewise",
        "optim.warmup_steps=0",
        f"optim.segments=[{segs}]",
    )


def test_piecewise_reproduces_the_paper_schedule_point_by_point():
    from minimax_train.train.schedule import LRSchedule

    job = _paper_job(100)
    ramp = job.train.ramp()
    n = ramp.steps_for_tokens(ramp.tokens_after(500) + 11_400_000) + 50  # the whole curve and a tail
    sched = LRSchedule(job.optim, n, ramp)
    got = [sched.lr(s) for s in range(n)]
    ref = _paper_reference(n)
    for s in range(n):
        assert got[s] == pytest.approx(ref[s], rel=1e-12, abs=0), f"step {s}: {got[s]} != {ref[s]}"
    # landmarks by hand
    assert got[0] == pytest.approx(2e-4 / 500) and got[499] == pytest.approx(2e-4)
    t500 = ramp.tokens_after(500)
    first_low = ramp.steps_for_tokens(t500 + 7_200_000)  # first step after 7.2M tokens at 2e-4
    assert got[first_low - 1] == 2e-4 and got[first_low] == 1.3e-4
    assert got[-1] == pytest.approx(3e-5) and min(got[500:]) == pytest.approx(3e-5)
    decay = [x for x in got[500:] if 3e-5 < x < 1.3e-4]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing while it decays
    mid = ramp.steps_for_tokens(ramp.tokens_after(ramp.steps_for_tokens(t500 + 10_400_000)) + 500_000) - 1
    assert got[mid] == pytest.approx(math.sqrt(1.3e-4 * 3e-5), rel=1e-3)  # half way, in tokens: geometric mean


def test_piecewise_segment_shapes_in_steps():
    from minimax_train.config import SegmentConfig
    from minimax_train.train.batch_ramp import BatchRamp
    from minimax_train.train.schedule import LRSchedule

    cfg = OptimConfig(
        schedule="piecewise",
        warmup_steps=0,
        segments=[
            SegmentConfig(shape="linear", lr=1.0, steps=4),
            SegmentConfig(shape="cosine", lr=0.2, steps=4),
            SegmentConfig(shape="exponential", lr=0.1, steps=2, start_lr=0.4),
        ],
    )
    s = LRSchedule(cfg, 12, BatchRamp.from_spec([[0, 1]], 8))
    cos = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4)]
    expect = [0.25, 0.5, 0.75, 1.0, *cos, 0.4 * 0.25**0.5, 0.1, 0.1, 0.1]
    assert [s.lr(k) for k in range(12)] == pytest.approx(expect, rel=1e-12)


def test_token_warmup_and_decay_equal_their_step_forms_under_a_ramp():
    from minimax_train.train.batch_ramp import BatchRamp
    from minimax_train.train.schedule import LRSchedule

    ramp = BatchRamp.from_spec([[0, 2], [64, 4]], 8)  # 16 tokens per step until 64, then 32
    # 80 tokens of warmup: 4 steps of 16 then one of 32 -> 5 steps; 96 tokens of decay at 32 per step -> 3
    by_tokens = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0, warmup_tokens=80, schedule="wsd", decay_tokens=96)
    by_steps = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=5, schedule="wsd", decay_steps=3)
    a, b = LRSchedule(by_tokens, 20, ramp), LRSchedule(by_steps, 20, ramp)
    assert [a.lr(k) for k in range(20)] == [b.lr(k) for k in range(20)]
    assert [b.lr(k) for k in range(20)] == [lr_at(k, by_steps, 20) for k in range(20)]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(segments=[]), "needs optim.segments"),
        (dict(segments=[{"shape": "linear", "lr": 1e-3}]), r"segments\[0\]: give exactly one of steps or tokens"),
        (dict(segments=[{"shape": "exponential", "lr": 1e-3, "steps": 3}]), r"segments\[0\]: an exponential"),
        (dict(segments=[{"shape": "wavy", "lr": 1e-3, "steps": 3}]), r"segments\[0\].shape: unknown value"),
        (dict(warmup_steps=5, segments=[{"lr": 1e-3, "steps": 3}]), "the warmup is a segment"),
    ],
)
def test_piecewise_config_errors(kw, match):
    from minimax_train.config import ConfigError, SegmentConfig

    kw = {"warmup_steps": 0, **kw}
    kw["segments"] = [SegmentConfig(**s) for s in kw["segments"]]
    with pytest.raises(ConfigError, match=match):
        OptimConfig(schedule="piecewise", **kw)
