"""The trainer under model parallelism: tensor (+ sequence), context and expert parallel layouts of the
same job give the single-process run's losses and gradient norms (fp32, gloo), step by step."""

from __future__ import annotations

import pytest
from util_train import TINY, by_step, compare_metrics, read_metrics, train_rank

from minimax_train.tools.spawn import run_distributed

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "cp2": (2, ["parallel.cp=2"]),
    "cp2_lasp_serial": (2, ["parallel.cp=2", "parallel.lasp=serial"]),
    "dp2_grad_sync_micro": (2, ["parallel.grad_sync=micro"]),  # accumulation 2: a reduce-scatter per micro-batch
    "ep2_over_dp2": (2, ["parallel.ep=2"]),
    "ep2_overlap4": (2, ["parallel.ep=2", "parallel.moe_overlap_chunks=4"]),
    # the MoE sublayer over checkpointed token chunks, where tokens cross ranks (TP+SP gather, EP all-to-all)
    "tp2_sp_moe_chunks": (2, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.moe_chunk_tokens=16"]),
    "ep2_moe_chunks": (2, ["parallel.ep=2", "train.moe_chunk_tokens=16", "train.activation_checkpointing=full"]),
}
SLOW_LAYOUTS = {
    # tp2 x dp2 runs in test_resume_tp2_dp2_checkpoint_at_dp4 (its checkpoint then resumes at dp=4)
    "cp4": (4, ["parallel.cp=4"]),
    "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
    "ep2_etp2_tp2_sp": (4, ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2", "parallel.sequence_parallel=true"]),
    # an 8-GPU composition of every dimension, on 8 gloo processes: tp=2 x cp=2 x dp=2, experts ep=4 folded over dp x cp
    "tp2_cp2_ep4_overlap_8proc": (
        8,
        [
            "parallel.tp=2",
            "parallel.cp=2",
            "parallel.ep=4",
            "parallel.sequence_parallel=true",
            "parallel.moe_overlap_chunks=2",
        ],
    ),
}


def _run(name, world, extra, reference_run, tmp_path):
    run_dir = tmp_path / name
    steps = run_distributed(train_rank, world, TINY + extra, str(run_dir), timeout=600)
    assert steps == [8] * world
    compare_metrics(by_step(read_metrics(reference_run)), by_step(read_metrics(run_dir)))
    return run_dir


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parallel_layout_matches_single_process(name, reference_run, tmp_path):
    world, extra = LAYOUTS[name]
    run_dir = _run(name, world, extra, reference_run, tmp_path)
    # the checkpoint of the sharded run loads into one process (the export path) with every tensor
    from minimax_train.export import load_checkpoint_model

    model, job, path = load_checkpoint_model(run_dir / "checkpoints")
    ref_model, _, _ = load_checkpoint_model(reference_run / "checkpoints")
    assert path.name == "step_00000008"
    ref_params = dict(ref_model.named_parameters())
    for pname, p in model.named_parameters():  # the consolidated weights equal the single-process run's
        r = ref_params[pname]
        assert float((p - r).detach().norm() / r.detach().norm()) < 1e-5, pname


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_LAYOUTS))
def test_four_process_layouts_match_single_process(name, reference_run, tmp_path):
    world, extra = SLOW_LAYOUTS[name]
    _run(name, world, extra, reference_run, tmp_path)


def test_resume_tp2_checkpoint_at_dp2(reference_run, tmp_path):
    """A checkpoint written at tp=2 resumes at dp=2 (FSDP2) and continues with the uninterrupted losses."""
    run_dir = tmp_path / "reshard"
    ckpt = tmp_path / "ckpt"
    # the full 8-step run at tp=2 (same schedule), then all but its step-3 checkpoint are removed
    first = TINY + ["parallel.tp=2", f"checkpoint.dir={ckpt}"]
    run_distributed(train_rank, 2, first, str(run_dir / "a"), timeout=600)
    import shutil

    for step_dir in sorted(ckpt.glob("step_*")):
        if step_dir.name != "step_00000003":
            shutil.rmtree(step_dir)
    run_distributed(train_rank, 2, TINY + [f"checkpoint.dir={ckpt}"], str(run_dir / "b"), timeout=600)
    ref = by_step(read_metrics(reference_run))
    got = by_step(read_metrics(run_dir / "b"))
    assert sorted(got) == list(range(4, 9))
    compare_metrics({s: ref[s] for s in got}, got)


@pytest.mark.slow
def test_resume_tp2_dp2_checkpoint_at_dp4(reference_run, tmp_path):
    """tp=2 x dp=2 on 4 ranks matches the single-process run; its step-3 checkpoint (weights and AdamW state
    sharded over both dimensions, data position, RNG) resumes at tp=1 x dp=4 with the uninterrupted losses of
    steps 4..8."""
    first = _run("tp2_dp2", 4, ["parallel.tp=2"], reference_run, tmp_path)
    import shutil

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(first / "checkpoints" / "step_00000003", ckpt / "step_00000003")
    second = tmp_path / "dp4"
    assert run_distributed(train_rank, 4, TINY + [f"checkpoint.dir={ckpt}"], str(second), timeout=600) == [8] * 4
    ref = by_step(read_metrics(reference_run))
    got = by_step(read_metrics(second))
    assert sorted(got) == list(range(4, 9))
    compare_metrics({s: ref[s] for s in got}, got)
