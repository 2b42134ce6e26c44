"""The full-size dry run (tools/dryrun.py): minimax_text_01 built on the meta device for single ranks of the
README's worked 256-GPU layout under torch's fake process group; each rank's parameter, gradient and
optimiser bytes are within 5% of the planner's (tools/plan_layout.py) estimate for that layout."""

from __future__ import annotations

import pytest

from minimax_train.tools.dryrun import dry_run, format_report, main

# README, "Worked plan": 256 GPUs, tp 4 (SP) x cp 16 x dp 4; experts ep 4 x etp 1 x edp 64; grad_sync=micro
README_256 = [
    "model=minimax_text_01",
    "parallel.tp=4",
    "parallel.sequence_parallel=true",
    "parallel.cp=16",
    "parallel.ep=4",
    "parallel.etp=1",
    "parallel.grad_sync=micro",
    "train.seq_len=1048576",
    "train.micro_batch_size=1",
    "train.global_batch_size=16",
]


@pytest.mark.parametrize("rank", [0, 7, 8, 129, 255])  # edp shards: the first ranks, the later, the last
def test_dry_run_456b_matches_the_planner_at_256_gpus(rank):
    got, plan = dry_run(README_256, 256, rank)
    print(format_report(got, plan))
    assert got.local_elements > 1.5e9  # 456B / 256 ranks ~ 1.78B elements (sanity: the real model)
    for key in ("parameters", "gradients", "optimizer"):
        assert getattr(got, key) == pytest.approx(getattr(plan, key), rel=0.05), key


def test_dry_run_sees_an_unsharded_layout():
    """The comparison can fail: without FSDP sharding (the deepspeed engine at stage 1 keeps bf16 parameters
    whole on every rank), the measured parameter bytes are those of the whole 456B model per rank."""
    got, plan = dry_run(["model=minimax_text_01", "parallel=deepspeed", "parallel.zero_stage=1"], 256, 0)
    assert got.parameters == pytest.approx(plan.parameters, rel=0.05)
    assert got.local_elements > 4e11


def test_dry_run_command_prints_both_columns(capsys):
    assert main(["--world", "256", "--rank", "3", *README_256]) == 0
    out = capsys.readouterr().out
    assert "this rank" in out and "planner" in out and "optimizer" in out
