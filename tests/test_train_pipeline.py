"""Pipeline parallelism in the trainer: every schedule and its compositions (dp, tp + SP, ep, cp) give the
single-process run's losses, aux losses and gradient norms (fp32, gloo), step by step; checkpoints keep the
model's names, so they resume at another pp and export unchanged; layout errors are one line, before any
process group starts."""

from __future__ import annotations

import shutil

import pytest
from util_train import TINY, by_step, compare_metrics, read_metrics, run_train, train_rank

from minimax_train.tools.spawn import run_distributed

# TINY: 4 rows of 64 tokens per step, one row per micro-batch: 4 micro-batches at dp=1 (2 at dp=2, hence
# BATCH8 there: 8 rows, again 4 micro-batches per rank), packed documents crossing row boundaries
BATCH8 = ["train.global_batch_size=8"]

LAYOUTS = {
    "pp2_1f1b": (2, ["parallel.pp=2"], []),
    "pp2_interleaved_1f1b_v2": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], []),
    "pp2_zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv"], []),
}
SLOW_LAYOUTS = {
    "pp2_interleaved_zb": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_zb"], []),
    "pp2_dualpipev_full_ac": (
        2,
        ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "train.activation_checkpointing=full"],
        [],
    ),
    "pp2_dp2": (4, ["parallel.pp=2"], BATCH8),
    "pp2_tp2_sp": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"], []),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"], BATCH8),
    "pp2_cp2": (4, ["parallel.pp=2", "parallel.cp=2", "train.loss_chunk_tokens=16"], []),
}


@pytest.fixture(scope="module")
def reference_batch8(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference8")
    run_train(run_dir, *TINY, *BATCH8)
    return run_dir


def _run(name, spec, reference_run, request, tmp_path):
    world, extra, batch = spec
    ref = request.getfixturevalue("reference_batch8") if batch else reference_run
    run_dir = tmp_path / name
    assert run_distributed(train_rank, world, TINY + batch + extra, str(run_dir), timeout=900) == [8] * world
    compare_metrics(by_step(read_metrics(ref)), by_step(read_metrics(run_dir)))
    return run_dir, ref


def _same_weights(run_dir, ref_dir):
    """The pipelined run's last checkpoint loads into one process (the export path) with the reference's
    weights: the same names and shapes as a one-process checkpoint."""
    from minimax_train.export import load_checkpoint_model

    model, _, path = load_checkpoint_model(run_dir / "checkpoints")
    ref_model, _, _ = load_checkpoint_model(ref_dir / "checkpoints")
    assert path.name == "step_00000008"
    ref_params = dict(ref_model.named_parameters())
    assert set(dict(model.named_parameters())) == set(ref_params)
    for pname, p in model.named_parameters():
        r = ref_params[pname]
        assert float((p - r).detach().norm() / r.detach().norm()) < 1e-5, pname


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_pipeline_matches_single_process(name, reference_run, request, tmp_path):
    run_dir, ref = _run(name, LAYOUTS[name], reference_run, request, tmp_path)
    _same_weights(run_dir, ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_LAYOUTS))
def test_pipeline_compositions_match_single_process(name, reference_run, request, tmp_path):
    _run(name, SLOW_LAYOUTS[name], reference_run, request, tmp_path)


def test_resume_across_pp_changes(reference_run, tmp_path):
    """pp=2 (1F1B) runs the 8 steps (saving every 3); pp=1 resumes its step 3 and saves step 6; pp=2
    (interleaved, 2 chunks per rank) resumes that: every step has the uninterrupted run's losses."""
    ref = by_step(read_metrics(reference_run))
    first, second, third = tmp_path / "pp2", tmp_path / "pp1", tmp_path / "pp2b"
    ckpt_a, ckpt_b, ckpt_c = tmp_path / "ck_a", tmp_path / "ck_b", tmp_path / "ck_c"
    run_distributed(train_rank, 2, TINY + ["parallel.pp=2", f"checkpoint.dir={ckpt_a}"], str(first), timeout=600)
    ckpt_b.mkdir()
    shutil.copytree(ckpt_a / "step_00000003", ckpt_b / "step_00000003")
    assert run_distributed(train_rank, 1, TINY + [f"checkpoint.dir={ckpt_b}"], str(second), timeout=600) == [8]
    ckpt_c.mkdir()
    shutil.copytree(ckpt_b / "step_00000006", ckpt_c / "step_00000006")
    c = TINY + ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", f"checkpoint.dir={ckpt_c}"]
    assert run_distributed(train_rank, 2, c, str(third), timeout=600) == [8, 8]
    compare_metrics(ref, by_step(read_metrics(first)))
    for run, steps in ((second, range(4, 9)), (third, range(7, 9))):
        got = by_step(read_metrics(run))
        assert sorted(got) == list(steps)
        compare_metrics({s: ref[s] for s in steps}, got)


def test_layout_errors_are_one_line_before_any_process_group():
    from minimax_train.conf_tree import compose_job
    from minimax_train.parallel.layout import ParallelConfig, ParallelConfigError, resolve_layout

    job = compose_job(*TINY)
    model, train = job.model, job.train
    train2 = compose_job(*TINY, "train.micro_batch_size=2").train

    def err(world, train=train, **kw):
        with pytest.raises(ParallelConfigError) as e:
            resolve_layout(ParallelConfig(**kw), world, model, train)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "exceeds the model's 4 layers" in err(8, pp=8)
    assert "does not divide the world size 3" in err(3, pp=2)
    assert "without layers" in err(2, pp=2, pp_schedule="interleaved_1f1b", pp_split=[1, 1, 3])
    assert "needs 3 layer indices" in err(2, pp=2, pp_schedule="interleaved_1f1b", pp_split=[2])
    assert "needs at least 2 micro-batches" in err(4, train2, pp=2)  # 4 rows over dp=2, 2 rows per micro-batch
    assert "needs at least 4 micro-batches" in err(2, train2, pp=2, pp_schedule="dualpipev")  # 2 of 2 rows
    assert "exactly 2 model chunks" in err(2, pp=2, pp_schedule="zbv", pp_virtual_stages=3)
    assert "parallel.engine=deepspeed supports data parallelism only" in err(2, pp=2, engine="deepspeed")


def test_too_few_micro_batches_is_refused_before_the_process_group(tmp_path):
    """Through the CLI as torchrun starts a rank: the layout is checked before init_process_group."""
    p = run_train(
        tmp_path / "r",
        *TINY,
        "parallel.pp=2",
        "train.micro_batch_size=2",
        "parallel.pp_schedule=dualpipev",
        check=False,
        timeout=120,
        env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
    )
    assert p.returncode == 2, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("minimax_train: error:")]
    assert len(line) == 1 and "needs at least 4 micro-batches per step, train.global_batch_size gives 2" in line[0]


def test_pipeline_evaluation_matches_single_process(tmp_path):
    """Held-out loss through the schedule (forward only, 3 micro-batches in runs of 2: the last run padded)."""
    keep = [x for x in TINY if not x.startswith(("train.eval_interval", "train.steps", "checkpoint.interval"))]
    job = keep + ["train.eval_interval=4", "train.eval_iters=3", "train.steps=4", "checkpoint.interval=0"]
    run_train(tmp_path / "ref", *job)
    pp = job + ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"]
    run_distributed(train_rank, 2, pp, str(tmp_path / "pp"), timeout=600)
    ref, got = read_metrics(tmp_path / "ref")[-1], read_metrics(tmp_path / "pp")[-1]
    assert got["val_tokens"] == ref["val_tokens"] > 0
    assert got["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
