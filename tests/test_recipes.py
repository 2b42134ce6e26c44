"""conf/recipe: the MiniMax-01 stages compose with the real model, carry the paper's numbers (arXiv
2501.08313 sections 4.2 / 4.4, written out here by hand), refuse to start a continuation stage without
checkpoint.init_from, and take a layout from the planner that the trainer accepts for every batch size."""

from __future__ import annotations

import subprocess
import sys

import pytest
from util_train import REPO, cli_env

from minimax_train.conf_tree import compose_job
from minimax_train.config import ConfigError, check_batch_layout
from minimax_train.parallel.mesh import resolve_layout
from minimax_train.tools import planner as P

M = 1 << 20
# stage -> (seq_len, rope_theta, tokens, length mix) from the paper
STAGES = {
    "minimax01_128k": (131072, 5e6, 300_000_000_000, [[8192, 0.3], [131072, 0.7], [None, 0.0]]),
    "minimax01_512k": (524288, 1e7, 32_000_000_000, [[8192, 0.35], [131072, 0.35], [None, 0.3]]),
    "minimax01_1m": (1048576, 1e7, 26_000_000_000, [[8192, 0.3], [131072, 0.3], [None, 0.4]]),
}
INIT = "checkpoint.init_from=/ckpt/previous_stage"  # checked only when the run starts


def test_cfg_job_prints_the_1m_stage():
    p = subprocess.run(
        [sys.executable, "-m", "minimax_train.train", "recipe=minimax01_1m", "--cfg", "job"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "seq_len: 1048576" in p.stdout and "rope_theta: 10000000.0" in p.stdout


def test_pretrain_recipe_has_the_papers_numbers():
    job = compose_job("recipe=minimax01_pretrain", "model=minimax_text_01")
    t, o = job.train, job.optim
    assert job.model.num_hidden_layers == 80 and job.model.router_aux_loss_coef == 0.01
    assert (o.beta1, o.beta2, o.weight_decay, o.schedule) == (0.9, 0.95, 0.1, "piecewise")
    # 16M tokens per step, 32M from 69B, 64M from 790B, 128M from 4.7T
    ramp = t.ramp()
    assert [r * t.seq_len for r in ramp.rows] == [16 * M, 32 * M, 64 * M, 128 * M]
    assert ramp.thresholds == (0, 69 * 10**9, 790 * 10**9, 4_700 * 10**9)
    from minimax_train.train.schedule import LRSchedule

    s = LRSchedule(o, t.steps, ramp)
    assert s.lr(0) == pytest.approx(2e-4 / 500) and s.lr(499) == pytest.approx(2e-4)
    after_warmup = ramp.tokens_after(500)
    lr_at_tokens = lambda tok: s.lr(ramp.steps_for_tokens(after_warmup + tok))  # noqa: E731
    assert lr_at_tokens(7_000 * 10**9) == 2e-4 and lr_at_tokens(7_300 * 10**9) == 1.3e-4
    assert s.lr(t.steps - 1) == pytest.approx(3e-5)
    # train.tokens: the fewest steps that reach it, past the whole schedule (warmup + 11.4T tokens)
    assert ramp.tokens_after(t.steps) >= t.tokens > ramp.tokens_after(t.steps - 1)
    assert t.tokens >= after_warmup + 11_400 * 10**9


@pytest.mark.parametrize("stage", list(STAGES))
def test_long_context_stages(stage):
    seq, theta, tokens, mix = STAGES[stage]
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        compose_job(f"recipe={stage}", "model=minimax_text_01")
    job = compose_job(f"recipe={stage}", "model=minimax_text_01", INIT)
    assert (job.train.seq_len, job.model.rope_theta, job.train.tokens) == (seq, theta, tokens)
    assert job.data.length_buckets == mix
    assert job.train.global_batch_size * seq == 128 * M and job.train.batch_ramp is None
    assert job.checkpoint.init_from == "/ckpt/previous_stage" and job.checkpoint.init_load == "model"
    assert job.model.router_aux_loss_coef == 0.01 and (job.optim.beta1, job.optim.beta2) == (0.9, 0.95)


@pytest.mark.parametrize("stage", ["minimax01_pretrain", *STAGES])
def test_recipes_take_a_planner_layout(stage):
    extra = [INIT] if stage in STAGES else []
    job = compose_job(f"recipe={stage}", "model=minimax_text_01", *extra)
    gpus = 1024
    rows = job.train.ramp().rows[0]  # memory does not depend on the batch; the smallest must split over dp
    w = P.Workload(
        job.model,
        seq_len=job.train.seq_len,
        global_batch_tokens=rows * job.train.seq_len,
        num_gpus=gpus,
        gpu=P.gpu_spec("h100"),
        model_name="minimax_text_01",
    )
    best = P.plan(w, top=1).plans[0]
    assert best.fits
    lay = best.layout
    overrides = [*lay.overrides().split(), f"train.micro_batch_size={lay.micro_batch_rows}"]
    planned = compose_job(f"recipe={stage}", "model=minimax_text_01", *extra, *overrides)
    got = resolve_layout(planned.parallel, gpus, planned.model, planned.train)
    assert got.dp == lay.dp
    for _, g in planned.train.batch_sizes():  # every ramp row splits over dp x micro-batch
        assert check_batch_layout(planned.train, got.dp, g) * lay.micro_batch_rows * got.dp == g
