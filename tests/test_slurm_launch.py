"""launch/slurm.sbatch and launch/torchrun.sh against a real local Slurm cluster.

The cluster (tests/slurm/cluster.py) is two slurmd "nodes" n1, n2 on this
machine, 1 CPU each. The trainer is replaced by tests/slurm/dist_probe.py
(MINIMAX_ENTRY), which all-reduces over gloo and writes JSON into the
checkpoint.dir the launch script passes as a Hydra override.

For a real training job use ``slurm_cluster.launch([...overrides], entry=None)``
(the default entry is ``-m minimax_train.train``) and read ``job.run_dir``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.slurm.cluster import LAUNCH_ENV_VARS, PROBE_SCRIPT, TORCHRUN_SCRIPT, slurm_cluster, wait_for_files  # noqa: F401
except ImportError:  # pytest put tests/ (not the repo root) on sys.path
    from slurm.cluster import LAUNCH_ENV_VARS, PROBE_SCRIPT, TORCHRUN_SCRIPT, slurm_cluster, wait_for_files  # noqa: F401

pytestmark = pytest.mark.slow


def _ranks(ckpt_dir: Path, suffix: str = "", world: int = 2) -> list[dict]:
    return [json.loads((ckpt_dir / f"rank{r}{suffix}.json").read_text()) for r in range(world)]


@pytest.mark.timeout(240)
def test_two_node_allreduce(slurm_cluster):
    job = slurm_cluster.launch(
        ["probe.flag=1"], nodes=2, entry=PROBE_SCRIPT, job_name="allreduce", wait=True, timeout=180
    )
    diag = lambda: slurm_cluster.diagnose(job)  # noqa: E731
    assert job.returncode == 0, diag()
    assert job.state == "COMPLETED", diag()
    ckpt = job.run_dir / "checkpoints"
    ranks = _ranks(ckpt)
    assert [r["sum"] for r in ranks] == [3.0, 3.0], diag()  # 1 + 2
    assert {r["world_size"] for r in ranks} == {2}
    assert {r["node"] for r in ranks} == {"n1", "n2"}, diag()  # one rank per node
    assert {r["local_rank"] for r in ranks} == {0}
    assert {r["job_id"] for r in ranks} == {str(job.job_id)}
    for r in ranks:  # user override kept, run dir + checkpoint dir added
        assert r["argv"] == ["probe.flag=1", f"hydra.run.dir={job.run_dir}", f"checkpoint.dir={ckpt}"], r
    # rendezvous on the first node's NodeAddr, port derived from the job id
    assert f"rdzv=127.0.0.1:{10000 + job.job_id % 20000}" in job.output(), diag()


@pytest.mark.timeout(240)
def test_exit_code_propagates(slurm_cluster):
    # the real `sbatch --wait` (polls slowly: up to ~30 s after the job ends)
    job = slurm_cluster.launch(
        [],
        nodes=2,
        entry=PROBE_SCRIPT,
        job_name="fails",
        sbatch_wait=True,
        timeout=180,
        env={"PROBE_MODE": "fail", "PROBE_EXIT_CODE": "3"},
    )
    diag = lambda: slurm_cluster.diagnose(job)  # noqa: E731
    # torchrun turns a worker failure into 1; srun --kill-on-bad-exit then stops the
    # other node (143 if its torchrun gets SIGTERM first). The worker's code is in the log.
    assert job.returncode != 0, diag()
    assert job.returncode == job.exit_code, diag()
    assert job.state == "FAILED", diag()
    assert "exitcode  : 3" in job.output(), diag()
    assert (job.run_dir / "checkpoints" / "rank0.fail.json").exists(), diag()


@pytest.mark.timeout(300)
def test_preempt_requeue_resume(slurm_cluster):
    job = slurm_cluster.launch(
        [], nodes=2, entry=PROBE_SCRIPT, job_name="preempt", env={"PROBE_MODE": "preempt", "PROBE_WAIT_S": "200"}
    )
    ckpt = job.run_dir / "checkpoints"
    wait_for_files([ckpt / "rank0.started.json", ckpt / "rank1.started.json"], 120, slurm_cluster, job)
    slurm_cluster.preempt(job)  # scancel --signal=USR1 --batch, like --signal=B:USR1@120
    info = slurm_cluster.wait_job(job, timeout=180)
    diag = lambda: slurm_cluster.diagnose(job)  # noqa: E731
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", diag()
    assert job.restarts == 1, diag()
    signalled = _ranks(ckpt, ".signalled")
    assert {r["signal"] for r in signalled} == {"SIGUSR1"}, diag()
    assert {r["restart_count"] for r in signalled} == {0}
    final = _ranks(ckpt)
    assert {r["restart_count"] for r in final} == {1}, diag()  # the requeued run finished
    assert [r["sum"] for r in final] == [3.0, 3.0]
    log = job.output()  # --open-mode=append: both runs in one log
    assert "restart=0" in log and "restart=1" in log and "requeueing job" in log, diag()


def _run_torchrun_sh(tmp_path, env, **kw):
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_VARS and not k.startswith("SLURM_")}
    full_env.update(NPROC_PER_NODE="2", MINIMAX_ENTRY=str(PROBE_SCRIPT), **env)
    return subprocess.Popen(
        ["bash", str(TORCHRUN_SCRIPT), f"checkpoint.dir={tmp_path}"],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.timeout(120)
def test_torchrun_sh_standalone(tmp_path):
    p = _run_torchrun_sh(tmp_path, {})
    out, _ = p.communicate(timeout=100)
    assert p.returncode == 0, out
    ranks = _ranks(tmp_path)
    assert [r["sum"] for r in ranks] == [3.0, 3.0], out
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]


@pytest.mark.timeout(120)
def test_torchrun_sh_forwards_usr1_to_workers(tmp_path):
    p = _run_torchrun_sh(tmp_path, {"PROBE_MODE": "preempt", "PROBE_WAIT_S": "90"})
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"rank{r}.started.json").exists() for r in range(2)):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate(timeout=30)[0]
            time.sleep(0.2)
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out  # torchrun survived SIGUSR1, workers exited 0
    assert {r["signal"] for r in _ranks(tmp_path, ".signalled")} == {"SIGUSR1"}, out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
