"""train.batch_ramp: the global batch changes exactly at the step that starts at a token threshold, the
metrics say so, a run killed after the change and resumed gives the uninterrupted losses and ends at the
same data position, and ramps that cannot split over dp x micro-batch fail with the key named."""

from __future__ import annotations

import signal

import pytest
import torch
from test_train_resume import assert_same_steps, complete_steps
from util_train import by_step, read_metrics, run_train

from minimax_train.config import ConfigError, TrainConfig, check_batch_layout
from minimax_train.train.batch_ramp import BatchRamp

T = 128
# 4 rows (512 tokens) per step until 1536 tokens are consumed (steps 1-3), then 8 rows from step 4
RAMP = [
    "train.steps=7",
    f"train.seq_len={T}",
    "train.batch_ramp=[[0,4],[1536,8]]",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "optim.warmup_steps=2",
    "checkpoint.interval=3",
    "checkpoint.keep_last=0",
    "logging.interval=1",
]
ROWS = [4, 4, 4, 8, 8, 8, 8]  # by hand, from the thresholds above


def _data_state(step_dir):
    meta = torch.load(step_dir / "meta.pt", weights_only=True)["meta"]
    return meta["tokens"], meta["data"]


def test_ramp_changes_at_threshold_and_resumes_exactly(tmp_path):
    ref_dir = tmp_path / "ref"
    run_train(ref_dir, *RAMP)
    ref = by_step(read_metrics(ref_dir))
    assert [ref[s]["global_batch_size"] for s in range(1, 8)] == ROWS
    tokens = 0
    for s in range(1, 8):
        tokens += ROWS[s - 1] * T
        assert ref[s]["tokens"] == tokens
        # the rows really are there: every row gives T-1 loss tokens less one per extra document in it
        assert 0.9 * ROWS[s - 1] * T < ref[s]["loss_tokens"] <= ROWS[s - 1] * T
    assert ref[3]["tokens"] == 1536 and ref[4]["tokens"] == 1536 + 8 * T

    ckpt = tmp_path / "ckpt"
    p = run_train(tmp_path / "a", *RAMP, f"checkpoint.dir={ckpt}", faults="kill@5", check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert complete_steps(ckpt) == [3]  # saved at the threshold; step 5 (after the change) is lost
    first = by_step(read_metrics(tmp_path / "a"))
    assert sorted(first) == [1, 2, 3, 4, 5]
    assert_same_steps(ref, first, range(1, 6))

    p = run_train(tmp_path / "b", *RAMP, f"checkpoint.dir={ckpt}")
    assert "resumed from" in p.stdout + p.stderr
    second = by_step(read_metrics(tmp_path / "b"))
    assert sorted(second) == [4, 5, 6, 7]
    assert_same_steps(ref, second, range(4, 8))
    assert [second[s]["global_batch_size"] for s in range(4, 8)] == ROWS[3:]
    assert [second[s]["tokens"] for s in range(4, 8)] == [ref[s]["tokens"] for s in range(4, 8)]

    # the same documents seen: the final data positions (rows, per-source document positions) agree
    tok_ref, data_ref = _data_state(ref_dir / "checkpoints" / "step_00000007")
    tok_res, data_res = _data_state(ckpt / "step_00000007")
    assert tok_ref == tok_res == sum(ROWS) * T
    assert data_res == data_ref and data_ref["rows"] == sum(ROWS)


def test_ramp_map_between_steps_and_tokens():
    r = BatchRamp.from_spec([[0, 4], [1536, 8], [5000, 16]], T)
    # by hand: 3 steps of 512, then 1024 per step from 1536 until 5000 is reached (4 steps: 5632), then 2048
    expect = [0, 512, 1024, 1536, 2560, 3584, 4608, 5632, 7680]
    assert [r.tokens_after(k) for k in range(9)] == expect
    assert [r.rows_at(t) for t in expect] == [4, 4, 4, 8, 8, 8, 8, 16, 16]
    for target in (1, 512, 513, 1536, 1537, 5000, 5632, 5633, 7680):
        k = r.steps_for_tokens(target)
        assert r.tokens_after(k) >= target and (k == 0 or r.tokens_after(k - 1) < target)


@pytest.mark.parametrize(
    "spec,match",
    [
        ([[10, 4]], r"batch_ramp\[0\] starts at 10"),
        ([[0, 4], [0, 8]], r"batch_ramp\[1\]: threshold 0 is not above"),
        ([[0, 4], [100, 0]], r"batch_ramp\[1\]: global_batch_size must be > 0"),
        ([[0, 4], [100, 6]], r"batch_ramp\[1\] global_batch_size=6 is not a multiple of train.micro_batch_size=4"),
    ],
)
def test_bad_ramps_name_the_entry(spec, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(micro_batch_size=4, global_batch_size=4, batch_ramp=spec)


def test_ramp_rows_must_split_over_dp():
    t = TrainConfig(micro_batch_size=2, global_batch_size=8, batch_ramp=[[0, 8], [4096, 12]])
    assert check_batch_layout(t, 2, 8) == 2
    with pytest.raises(ConfigError, match=r"batch_ramp\[1\] global_batch_size=12 is not divisible .* 2 \* 4"):
        check_batch_layout(t, 4)  # checks every row
