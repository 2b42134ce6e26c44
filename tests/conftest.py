"""Shared helpers for the trainer tests: run the CLI in a subprocess, read metrics, a cached reference run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # util_dist for spawned children too

# A run that takes a few seconds on CPU: 8 steps of 4 rows x 64 tokens, one row per micro-batch (so the
# per-micro-batch aux loss is layout-independent and dp=1 / dp=2 must agree exactly), checkpoints every 3.
TINY = [
    "train.steps=8",
    "train.seq_len=64",
    "train.global_batch_size=4",
    "train.micro_batch_size=1",
    "train.eval_interval=0",
    "optim.warmup_steps=2",
    "checkpoint.interval=3",
    "checkpoint.keep_last=0",
    "logging.interval=1",
]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("MINIMAX_TRAIN_FAULTS", "WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID"):
        env.pop(k, None)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update({"HYDRA_FULL_ERROR": "0", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_train(
    run_dir: Path,
    *overrides: str,
    faults: str | None = None,
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`python -m minimax_train.train` with hydra.run.dir=run_dir; returns the completed process."""
    e = cli_env(**(env or {}))
    if faults:
        e["MINIMAX_TRAIN_FAULTS"] = faults
    cmd = [sys.executable, "-m", "minimax_train.train", f"hydra.run.dir={run_dir}", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"exit {p.returncode}: {' '.join(cmd)}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
        )
    return p


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = Path(run_dir) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(records: list[dict]) -> dict[int, dict]:
    """Last record of every step (a crashed run may have logged a step that the resumed run redoes)."""
    return {r["step"]: r for r in records}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run of TINY (checkpoint dir inside its run dir), shared by the resume tests."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_train(run_dir, *TINY)
    return run_dir


def compose_job(*overrides: str):
    """The JobConfig that `python -m minimax_train.train *overrides` would run (Hydra compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from minimax_train.config import register_configs, to_job_config
    from minimax_train.train.cli import conf_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_job_config(cfg)
