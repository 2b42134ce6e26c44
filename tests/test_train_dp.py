"""Data parallelism is exact: 2 gloo processes (FSDP2) give the losses and gradient norms of one process
with the same global batch (fp32 tolerance)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from util_train import (
    REPO,
    TINY,
    assert_grads_match,
    by_step,
    cli_env,
    compare_metrics,
    grads_rank,
    read_metrics,
    train_rank,
)

from minimax_train.conf_tree import compose_job
from minimax_train.tools.spawn import free_port, run_distributed


def test_dp2_fsdp_matches_single_process(reference_run, tmp_path):
    run_dir = tmp_path / "dp2"
    steps = run_distributed(train_rank, 2, TINY, str(run_dir), timeout=240)
    assert steps == [8, 8]
    compare_metrics(by_step(read_metrics(reference_run)), by_step(read_metrics(run_dir)))
    # checkpoints of the sharded run are complete and loadable in one process (export path)
    from minimax_train.export import load_checkpoint_model

    model, job, path = load_checkpoint_model(run_dir / "checkpoints")
    assert path.name == "step_00000008"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (REPO / ".venv/bin/torchrun").exists(), reason="torchrun not installed"
)
def test_torchrun_cli_dp2_matches_single_process(reference_run, tmp_path):
    """The real entry point under torchrun: rank 0 owns the Hydra run dir; the losses match dp=1."""
    run_dir = tmp_path / "tr"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "minimax_train.train",
        f"hydra.run.dir={run_dir}",
        *TINY,
    ]
    p = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=cli_env(OMP_NUM_THREADS=1, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    compare_metrics(by_step(read_metrics(reference_run)), by_step(read_metrics(run_dir)))
    assert (run_dir / "config_resolved.yaml").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    assert not (tmp_path / ".hydra").exists() and not (tmp_path / "outputs").exists()  # rank 1 wrote nothing


@pytest.mark.parametrize("mbs_dp1,mbs_dp2,coef", [(1, 1, 0.001), (4, 2, 0.0), (4, 1, 0.0)])
def test_dp2_gradients_match_single_process(mbs_dp1, mbs_dp2, coef):
    """The accumulated gradient of one global batch agrees to 1e-5 (relative, per tensor) between one process
    and 2 FSDP2 ranks. With the aux loss on, micro-batches must hold the same rows (mbs 1); without it any
    micro-batch size gives the same gradient."""
    base = [o for o in TINY if "micro_batch_size" not in o] + [f"model.router_aux_loss_coef={coef}"]
    ref, ntok = grads_rank(base + [f"train.micro_batch_size={mbs_dp1}"])
    got = run_distributed(grads_rank, 2, base + [f"train.micro_batch_size={mbs_dp2}"], timeout=240)
    assert got[0][1] == ntok
    assert_grads_match(ref, [g for g, _ in got], "dp=2")


def test_resume_single_process_checkpoint_on_two_ranks(reference_run, tmp_path):
    """DCP reshards the dp=1 checkpoint of step 6 onto 2 FSDP ranks and the data position carries over:
    steps 7 and 8 match the uninterrupted single-process run."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(reference_run / "checkpoints" / "step_00000006", ckpt / "step_00000006")
    run_dir = tmp_path / "dp2"
    run_distributed(train_rank, 2, [*TINY, f"checkpoint.dir={ckpt}"], str(run_dir), timeout=240)
    ref = by_step(read_metrics(reference_run))
    compare_metrics({s: ref[s] for s in (7, 8)}, by_step(read_metrics(run_dir)))


def _packed_batch(vocab_size):
    """Two rows of 32 tokens: one document across the first 20 tokens, one of 12, one of 32."""
    import torch

    return torch.arange(64).reshape(2, 32) % vocab_size, torch.tensor([0, 20, 32, 64], dtype=torch.int32)


def _bf16_fsdp_rank(overrides):
    """Logits of packed two-document rows under FSDP2 with bf16 parameters (what the trainer uses on GPU),
    and how often the RoPE tables were built."""
    import torch

    import minimax_train.model.attention as attention
    from minimax_train.model import MiniMaxForCausalLM
    from minimax_train.parallel.data_parallel import apply_fsdp
    from minimax_train.parallel.mesh import ParallelMesh

    job = compose_job(*overrides)
    mesh = ParallelMesh.from_env(job.parallel, device="cpu", model_cfg=job.model)
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(job.model)
    reference = {k: v.to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16)
    built = []
    make = attention.rope_cos_sin
    attention.rope_cos_sin = lambda *a, **k: built.append(1) or make(*a, **k)
    try:
        ids, cu = _packed_batch(job.model.vocab_size)
        logits = model(ids, cu_seqlens=cu).logits
        logits.float().sum().backward()
    finally:
        attention.rope_cos_sin = make
    return logits.detach().float(), len(built), reference


def test_fsdp2_bf16_parameters_packed_input():
    """FSDP2 with bf16 parameters casts each layer's inputs by rebuilding dataclasses field by field
    (torch.distributed.utils._apply_to_tensors): the PackedSequence must survive that (it once raised
    'field cache is declared with init=False' on the first GPU dp=2 run), keep one RoPE table shared by
    all softmax layers, and give the logits of the same bf16 weights without FSDP."""
    import torch

    from minimax_train.model import MiniMaxForCausalLM

    got = run_distributed(_bf16_fsdp_rank, 2, TINY, timeout=240)
    logits, built, weights = got[0]
    assert built == 1, f"RoPE tables built {built} times for one sequence (the per-sequence cache was lost)"
    job = compose_job(*TINY)
    ref = MiniMaxForCausalLM(job.model).to(torch.bfloat16)
    ref.load_state_dict(weights)
    ids, cu = _packed_batch(job.model.vocab_size)
    want = ref(ids, cu_seqlens=cu).logits.float()
    torch.testing.assert_close(logits, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1][0], logits, rtol=0, atol=0)
