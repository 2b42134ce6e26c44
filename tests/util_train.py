"""Trainer runs for the tests: the CLI in a subprocess as a user starts it, one rank of an in-process
distributed run (with minimax_train.tools.spawn.run_distributed), and comparisons of their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from minimax_train.conf_tree import compose_job

REPO = Path(__file__).resolve().parent.parent

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

# relative tolerance of a distributed run's metrics against the single-process run (fp32)
RTOL = 1e-5


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


def train_rank(overrides, run_dir):
    """One rank of `python -m minimax_train.train *overrides` in this process; returns its last step."""
    from minimax_train.train import train

    job = compose_job(*overrides)
    res = train(job, run_dir)
    return res.step


def compare_metrics(ref, got, keys=("loss", "lm_loss", "aux_loss", "grad_norm")):
    """Two runs' per-step metrics (by_step) agree within RTOL, and they counted the same tokens."""
    assert sorted(got) == sorted(ref)
    for s in ref:
        for k in keys:
            a, b = ref[s][k], got[s][k]
            assert abs(a - b) <= RTOL * max(abs(a), 1e-6), f"step {s} {k}: dp=2 {b!r} vs dp=1 {a!r}"
        assert got[s]["tokens"] == ref[s]["tokens"] and got[s]["loss_tokens"] == ref[s]["loss_tokens"]


def grads_rank(overrides):
    """Gradient of the first step's global batch under this process's layout and engine (FSDP2 / one process,
    or DeepSpeed ZeRO: gathered from its partitions before the step), as full fp64 tensors."""
    from minimax_train.data import build_loader, load_tokenizer
    from minimax_train.parallel.data_parallel import is_sharded
    from minimax_train.parallel.mesh import ParallelMesh
    from minimax_train.train.engine import build_engine
    from minimax_train.train.step import forward_backward

    job = compose_job(*overrides)
    mesh = ParallelMesh.from_env(job.parallel, device="cpu", model_cfg=job.model)
    accum = job.train.global_batch_size // (job.train.micro_batch_size * mesh.dp_size)
    engine, _ = build_engine(job, mesh, accum=accum)
    loader = build_loader(
        job.data,
        load_tokenizer(job.data),
        seq_len=job.train.seq_len,
        micro_batch_size=job.train.micro_batch_size,
        dp_rank=mesh.dp_rank,
        dp_size=mesh.dp_size,
        seed=job.train.seed,
    )
    fb = forward_backward(
        engine.model,
        [next(loader) for _ in range(accum)],
        mesh=mesh,
        coef=job.model.router_aux_loss_coef,
        engine=engine,
    )
    model = engine.module
    if is_sharded(model):
        # the root (embedding, norm, lm_head) must stay unsharded between forward and backward: the
        # model output is a dataclass FSDP cannot hook a pre-backward unshard on (it broke on CUDA)
        assert model._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is None
    if engine.name == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        grads = {name: safe_get_full_grad(p) for name, p in model.named_parameters()}
    else:
        grads = {
            name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            for name, p in model.named_parameters()
        }
    engine.close()
    return {name: g.detach().double().clone() for name, g in grads.items()}, fb.global_tokens


def assert_grads_match(ref: dict, per_rank: list, label: str, rtol: float = 1e-5) -> None:
    """Every rank's gradient of every parameter equals the reference within rtol (relative, per tensor)."""
    for rank, got in enumerate(per_rank):
        assert set(got) == set(ref), f"{label} rank {rank}: other parameters than the reference"
        for name, g in ref.items():
            err = float((got[name] - g).norm() / g.norm().clamp(min=1e-30))
            assert err <= rtol, f"{label} {name} rank {rank}: relative gradient error {err:.2e}"
