"""Checkpoints are independent of the expert layout. Expert tensor parallelism through expert_parallel.py
(etp > 1 with ep > 1, or etp < tp) keeps gate_up_proj as [E, 2, I, H] in memory; checkpoints store it, like
every layout, as transformers' [E, 2I, H] (expert_parallel.standard_gate_up). So a trainer checkpoint written
under one ep/etp/tp layout resumes under another and continues with the uninterrupted single-process run's
losses (fp32, gloo), and export loads it with no special-casing."""

from __future__ import annotations

import shutil

import pytest
from util_train import TINY, by_step, compare_metrics, read_metrics, train_rank

from minimax_train.tools.spawn import run_distributed

# experts over ep=2 x etp=2 inside tp=2 with sequence parallelism (dp=2, edp=1): gate/up [E, 2, I, H]
EP2_ETP2 = ["parallel.tp=2", "parallel.ep=2", "parallel.etp=2", "parallel.sequence_parallel=true"]
# etp=2 < tp=4, no expert parallelism (edp=2): the [E, 2, I, H] experts are also FSDP2-sharded over edp
TP4_ETP2 = ["parallel.tp=4", "parallel.etp=2"]
GATE_UP = "model.model.layers.0.mlp.experts.gate_up_proj"


def _stop_after(step: int) -> dict:
    """Every rank gets SIGTERM after step-1, so the run saves a checkpoint after `step` and stops."""
    return {"MINIMAX_TRAIN_FAULTS": f"sigterm@{step - 1}:all"}


def _resumed_matches_reference(reference_run, run_dir, steps):
    ref, got = by_step(read_metrics(reference_run)), by_step(read_metrics(run_dir))
    assert sorted(got) == list(steps)
    compare_metrics({s: ref[s] for s in got}, got)


def test_ep2_etp2_checkpoint_resumes_in_one_process_and_exports(reference_run, tmp_path):
    from minimax_train.export import load_checkpoint_model
    from minimax_train.tools.ckpt import tensor_metadata

    ckpt = tmp_path / "ckpt"
    steps = run_distributed(
        train_rank,
        4,
        TINY + EP2_ETP2 + [f"checkpoint.dir={ckpt}"],
        str(tmp_path / "a"),
        timeout=600,
        env=_stop_after(3),
    )
    assert steps == [3] * 4
    _resumed_matches_reference(reference_run, tmp_path / "a", range(1, 4))
    saved = ckpt / "step_00000003"
    md = tensor_metadata(saved)
    assert md[GATE_UP]["shape"] == [4, 256, 64] and md[GATE_UP]["chunks"] == 8  # 4 ranks x (gate rows, up rows)
    assert md[f"optim.state.{GATE_UP[6:]}.exp_avg"]["shape"] == [4, 256, 64]
    # export: the consolidated weights are the single-process run's at the same step
    model, _, path = load_checkpoint_model(saved)
    ref_model, _, _ = load_checkpoint_model(reference_run / "checkpoints" / "step_00000003")
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params[name]
        assert float((p - r).detach().norm() / r.detach().norm()) < 1e-5, name
    # resume in one process: steps 4..8 as the uninterrupted run
    steps = run_distributed(train_rank, 1, TINY + [f"checkpoint.dir={ckpt}"], str(tmp_path / "b"), timeout=600)
    assert steps == [8]
    _resumed_matches_reference(reference_run, tmp_path / "b", range(4, 9))


def test_single_process_checkpoint_resumes_at_ep2_etp2_then_at_tp4_etp2(reference_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(reference_run / "checkpoints" / "step_00000003", ckpt / "step_00000003")
    # 1 process -> ep=2 x etp=2 (tp=2, SP): steps 4..6, saved at 6
    steps = run_distributed(
        train_rank,
        4,
        TINY + EP2_ETP2 + [f"checkpoint.dir={ckpt}"],
        str(tmp_path / "a"),
        timeout=600,
        env=_stop_after(6),
    )
    assert steps == [6] * 4
    _resumed_matches_reference(reference_run, tmp_path / "a", range(4, 7))
    # ep=2 x etp=2 -> etp=2 inside tp=4 with the experts FSDP-sharded over edp=2: steps 7..8
    steps = run_distributed(
        train_rank, 4, TINY + TP4_ETP2 + [f"checkpoint.dir={ckpt}"], str(tmp_path / "b"), timeout=600
    )
    assert steps == [8] * 4
    _resumed_matches_reference(reference_run, tmp_path / "b", range(7, 9))
    from minimax_train.tools.ckpt import tensor_metadata

    md = tensor_metadata(ckpt / "step_00000008")  # 4 ranks (2 experts x half of I each) x (gate rows, up rows)
    assert md[GATE_UP]["shape"] == [4, 256, 64] and md[GATE_UP]["chunks"] == 8


@pytest.mark.filterwarnings("ignore:.*assuming the intent is to")
def test_standard_gate_up_view_round_trip(tmp_path):
    """One process, plain tensors: a 4-D gate/up tensor is saved as its [E, 2I, H] flattening (two chunks), loads
    into a 3-D tensor, and a 3-D checkpoint loads back into the 4-D form in place; other entries are untouched."""
    import torch
    import torch.distributed.checkpoint as dcp

    from minimax_train.parallel.expert_parallel import standard_gate_up
    from minimax_train.tools.ckpt import tensor_metadata

    torch.manual_seed(0)
    four = torch.randn(3, 2, 5, 4)
    state = {
        "model": {"l.mlp.experts.gate_up_proj": four, "l.mlp.experts.down_proj": torch.randn(3, 4, 5)},
        "optim": {"state": {"l.mlp.experts.gate_up_proj": {"exp_avg": four * 2, "step": torch.tensor(3.0)}}},
    }
    with standard_gate_up(state) as st:
        assert st is state and state["model"]["l.mlp.experts.gate_up_proj"].shape == (3, 10, 4)
        dcp.save(state, checkpoint_id=str(tmp_path / "a"), no_dist=True)
    assert state["model"]["l.mlp.experts.gate_up_proj"] is four  # restored
    md = tensor_metadata(tmp_path / "a")
    assert md["model.l.mlp.experts.gate_up_proj"] == {"shape": [3, 10, 4], "dtype": "float32", "chunks": 2}
    gu, dn = "l.mlp.experts.gate_up_proj", "l.mlp.experts.down_proj"
    three = {"model": {gu: torch.zeros(3, 10, 4), dn: torch.zeros(3, 4, 5)}}
    dcp.load(three, checkpoint_id=str(tmp_path / "a"), no_dist=True)
    assert torch.equal(three["model"]["l.mlp.experts.gate_up_proj"], four.flatten(1, 2))
    dcp.save(three, checkpoint_id=str(tmp_path / "b"), no_dist=True)
    back = {"model": {gu: torch.zeros(3, 2, 5, 4), dn: torch.zeros(3, 4, 5)}}
    with standard_gate_up(back):
        dcp.load(back, checkpoint_id=str(tmp_path / "b"), no_dist=True)
    assert torch.equal(back["model"]["l.mlp.experts.gate_up_proj"], four)
    assert torch.equal(back["model"]["l.mlp.experts.down_proj"], state["model"]["l.mlp.experts.down_proj"])
