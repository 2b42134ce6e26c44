"""The real trainer under launch/slurm.sbatch on a local two-node Slurm cluster (tests/slurm/cluster.py):
a 2-node data-parallel job gives the single-process losses, and a job preempted mid-run (SIGUSR1 to the
batch shell, as --signal=B:USR1@T does) checkpoints, is requeued, resumes and ends at the loss of an
uninterrupted run."""

from __future__ import annotations

import re
import time

import pytest
from util_train import TINY, by_step, compare_metrics, read_metrics, run_train

try:
    from tests.slurm.cluster import slurm_cluster  # noqa: F401  (pytest fixture)
except ImportError:  # pytest put tests/ (not the repo root) on sys.path
    from slurm.cluster import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slow

LONG = [o for o in TINY if not o.startswith(("train.steps", "checkpoint.interval"))] + [
    "train.steps=30",
    "checkpoint.interval=4",
]


@pytest.mark.timeout(400)
def test_two_node_job_matches_single_process(slurm_cluster, reference_run):
    job = slurm_cluster.launch(TINY, nodes=2, job_name="train2", wait=True, timeout=300)
    assert job.returncode == 0 and job.state == "COMPLETED", slurm_cluster.diagnose(job)
    compare_metrics(by_step(read_metrics(reference_run)), by_step(read_metrics(job.run_dir)))
    assert "world 2 = dp 2" in job.output(), slurm_cluster.diagnose(job)


@pytest.mark.timeout(600)
def test_preempted_job_requeues_and_ends_at_the_uninterrupted_loss(slurm_cluster, tmp_path):
    reference = tmp_path / "reference"
    run_train(reference, *LONG)
    job = slurm_cluster.launch(LONG, nodes=2, job_name="preempted", wait=False)
    metrics = job.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while len(read_metrics(job.run_dir)) < 6:  # preempt mid-run, past the first checkpoint
        assert time.monotonic() < deadline, slurm_cluster.diagnose(job)
        time.sleep(0.2)
    seen_at_signal = max(r["step"] for r in read_metrics(job.run_dir))
    slurm_cluster.preempt(job)
    info = slurm_cluster.wait_job(job, timeout=400)
    diag = lambda: slurm_cluster.diagnose(job)  # noqa: E731
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", diag()
    assert job.restarts == 1, diag()
    log = job.output()
    resumed = [int(m) for m in re.findall(r"resumed from \S+ \(step (\d+)", log)]
    assert len(resumed) == 1, diag()
    assert resumed[0] >= seen_at_signal - 4, f"lost more than one checkpoint interval\n{diag()}"  # interval 4
    ref = by_step(read_metrics(reference))
    got = by_step(read_metrics(job.run_dir))
    assert max(got) == 30 and metrics.exists()
    # every step (the resumed ones included) equals the uninterrupted single-process run
    compare_metrics(ref, got)
