"""Crash, preemption and resume: a resumed run's losses equal an uninterrupted run's, step by step
(exactly, on CPU)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from util_train import REPO, TINY, by_step, cli_env, read_metrics, run_train

KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr")


def assert_same_steps(ref: dict[int, dict], got: dict[int, dict], steps) -> None:
    for s in steps:
        for k in KEYS:
            assert got[s][k] == ref[s][k], f"step {s} {k}: resumed {got[s][k]!r} != uninterrupted {ref[s][k]!r}"


def complete_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpt.iterdir() if p.name.startswith("step_") and (p / "COMPLETE").exists())


def test_kill9_then_resume_matches_uninterrupted(reference_run, tmp_path):
    ref = by_step(read_metrics(reference_run))
    assert sorted(ref) == list(range(1, 9))
    ckpt = tmp_path / "ckpt"
    # SIGKILL right after step 7 (checkpoints at 3 and 6 exist; step 7's work is lost)
    p = run_train(tmp_path / "a", *TINY, f"checkpoint.dir={ckpt}", faults="kill@7", check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert complete_steps(ckpt) == [3, 6]
    first = by_step(read_metrics(tmp_path / "a"))
    assert sorted(first) == list(range(1, 8))
    assert_same_steps(ref, first, range(1, 8))
    # same command again: resumes from step 6
    p = run_train(tmp_path / "b", *TINY, f"checkpoint.dir={ckpt}")
    assert "resumed from" in p.stdout + p.stderr
    second = by_step(read_metrics(tmp_path / "b"))
    assert sorted(second) == [7, 8]
    assert_same_steps(ref, second, [7, 8])
    assert complete_steps(ckpt) == [3, 6, 8]


def test_crash_during_save_resumes_from_last_complete(reference_run, tmp_path):
    ref = by_step(read_metrics(reference_run))
    ckpt = tmp_path / "ckpt"
    p = run_train(tmp_path / "a", *TINY, f"checkpoint.dir={ckpt}", faults="save_crash@6", check=False)
    assert p.returncode == -signal.SIGKILL
    # the interrupted save left its data in step_00000006.tmp, which does not count as a checkpoint
    assert (ckpt / "step_00000006.tmp").is_dir() and (ckpt / "step_00000006.tmp" / "meta.pt").exists()
    assert complete_steps(ckpt) == [3]
    p = run_train(tmp_path / "b", *TINY, f"checkpoint.dir={ckpt}")
    out = p.stdout + p.stderr
    assert "step_00000003" in out and "removing incomplete checkpoint" in out
    assert not (ckpt / "step_00000006.tmp").exists()
    second = by_step(read_metrics(tmp_path / "b"))
    assert sorted(second) == [4, 5, 6, 7, 8]
    assert_same_steps(ref, second, range(4, 9))
    assert complete_steps(ckpt) == [3, 6, 8]


def test_preemption_signal_saves_and_exits_cleanly(tmp_path):
    """An external SIGUSR1 (slurm's warning before preemption / time limit) mid-run: checkpoint at the current
    step, exit 0; the same command then continues from there."""
    ckpt = tmp_path / "ckpt"
    overrides = [o for o in TINY if not o.startswith("train.steps")] + [
        f"checkpoint.dir={ckpt}",
        "checkpoint.interval=0",
    ]
    cmd = [
        sys.executable,
        "-m",
        "minimax_train.train",
        f"hydra.run.dir={tmp_path / 'a'}",
        *overrides,
        "train.steps=400",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(read_metrics(tmp_path / "a")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be signalled"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGUSR1" in out and "stopping after step" in out
    done = max(r["step"] for r in read_metrics(tmp_path / "a"))
    assert done < 400 and complete_steps(ckpt) == [done]
    run_train(tmp_path / "b", *overrides, f"train.steps={done + 2}")
    assert sorted(by_step(read_metrics(tmp_path / "b"))) == [done + 1, done + 2]


def test_sigterm_fault_hook_saves_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    p = run_train(tmp_path / "a", *TINY, f"checkpoint.dir={ckpt}", "checkpoint.interval=0", faults="sigterm@2")
    # the signal arrives after step 2's flag exchange: step 3 notices it, saves and stops
    assert "received SIGTERM" in p.stdout + p.stderr
    assert complete_steps(ckpt) == [3]
    assert max(r["step"] for r in read_metrics(tmp_path / "a")) == 3


def test_sigterm_on_one_tp_rank_stops_every_rank(tmp_path):
    """A signal reaching only rank 0 of a tp=2 job: the flag goes round the tp group too, so both ranks
    save the same step and exit cleanly (no rank left waiting in a collective)."""
    from util_train import train_rank

    from minimax_train.tools.spawn import run_distributed

    ckpt = tmp_path / "ckpt"
    steps = run_distributed(
        train_rank,
        2,
        [*TINY, "parallel.tp=2", f"checkpoint.dir={ckpt}", "checkpoint.interval=0"],
        str(tmp_path / "a"),
        timeout=120,
        env={"MINIMAX_TRAIN_FAULTS": "sigterm@2"},
    )
    assert steps == [3, 3]
    assert complete_steps(ckpt) == [3]
