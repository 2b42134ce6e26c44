"""checkpoint.init_from: a new run (own step 0, data and schedule) from another run's weights (and AdamW
state), into any layout; rope_theta may change, shapes may not (the differing fields are listed); init_load=model+optim
restores the optimiser state exactly while the new run's hyperparameters stay its own."""

from __future__ import annotations

import torch
from util_train import TINY, by_step, read_metrics, run_train

from minimax_train.conf_tree import compose_job
from minimax_train.model.config import ModelConfig, shape_mismatches

NEW_RUN = ["train.steps=2", "checkpoint.interval=0", "optim.warmup_steps=1"]


def _base():
    return [o for o in TINY if not o.startswith(("train.steps", "checkpoint.interval", "optim.warmup_steps"))]


def test_init_from_with_rope_theta_changed_trains_from_the_weights(reference_run, tmp_path):
    ckpt = reference_run / "checkpoints"
    args = [*_base(), *NEW_RUN, "model.rope_theta=5000000.0"]
    p = run_train(tmp_path / "new", *args, f"checkpoint.init_from={ckpt}")
    out = p.stdout + p.stderr
    assert "initialised model from" in out and "step_00000008" in out  # the latest of the dir
    assert "rope_theta: 10000.0 -> 5000000.0" in out  # logged: a change that keeps the shapes
    got = by_step(read_metrics(tmp_path / "new"))
    assert sorted(got) == [1, 2] and got[1]["tokens"] == 4 * 64  # its own step 0 and token count
    assert sorted(q.name for q in (tmp_path / "new" / "checkpoints").iterdir()) == ["step_00000002"]
    # the same run without init_from (same seed, data, model) starts from the random init: other losses
    run_train(tmp_path / "fresh", *args)
    fresh = by_step(read_metrics(tmp_path / "fresh"))
    ref = by_step(read_metrics(reference_run))
    assert got[1]["loss"] != fresh[1]["loss"]
    assert got[1]["loss"] < fresh[1]["loss"] and got[1]["loss"] < ref[1]["loss"]

    # another layout on the new side (tp=2 shards every matrix; DCP reshards the one-process checkpoint)
    from util_train import compare_metrics, train_rank

    from minimax_train.tools.spawn import run_distributed

    tp_args = [*args, "parallel.tp=2", f"checkpoint.init_from={ckpt}"]
    assert run_distributed(train_rank, 2, tp_args, str(tmp_path / "tp2"), timeout=300) == [2, 2]
    compare_metrics(got, by_step(read_metrics(tmp_path / "tp2")))


def test_init_from_with_a_shape_change_is_refused(reference_run, tmp_path):
    ckpt = reference_run / "checkpoints"
    p = run_train(
        tmp_path / "new", *_base(), *NEW_RUN, "model.num_hidden_layers=2", f"checkpoint.init_from={ckpt}", check=False
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "model shapes differ" in p.stderr and "num_hidden_layers: 4 -> 2" in p.stderr
    assert not read_metrics(tmp_path / "new")


def test_shape_mismatches_lists_shape_fields_only():
    a = ModelConfig()
    assert (
        shape_mismatches(a, ModelConfig(rope_theta=5e6, max_position_embeddings=4096, router_aux_loss_coef=0.01)) == []
    )
    got = shape_mismatches(a, ModelConfig(num_hidden_layers=8, num_local_experts=8, head_dim=32))
    assert got[:3] == ["model.num_hidden_layers: 4 -> 8", "model.head_dim: 16 -> 32", "model.num_local_experts: 4 -> 8"]
    assert got[3].startswith("model.layer_types: ")  # 8 layers derive other kinds
    assert len(got) == 4


def _engine(job, mesh):
    from minimax_train.train.engine import build_engine

    engine, _ = build_engine(job, mesh, accum=job.train.global_batch_size // job.train.micro_batch_size)
    return engine


def test_init_load_model_and_optim_restores_adamw_state_exactly(tmp_path):
    from minimax_train.config import job_to_yaml
    from minimax_train.data import build_loader, load_tokenizer
    from minimax_train.parallel.mesh import ParallelMesh
    from minimax_train.train.checkpoint import CheckpointManager
    from minimax_train.train.resume import check_init_checkpoint, load_init_checkpoint
    from minimax_train.train.step import forward_backward

    job = compose_job(*TINY)
    mesh = ParallelMesh.from_env(job.parallel, device="cpu", model_cfg=job.model)
    a = _engine(job, mesh)
    loader = build_loader(
        job.data, load_tokenizer(job.data), seq_len=64, micro_batch_size=1, dp_rank=0, dp_size=1, seed=1
    )
    for _ in range(2):  # two real updates: non-zero moments and step counts
        forward_backward(a.model, [next(loader) for _ in range(4)], mesh=mesh, coef=0.001, engine=a)
        a.step()
        a.zero_grad()
    manager = CheckpointManager(tmp_path / "src", mesh)
    manager.prepare()
    manager.save(2, a.model, a.optimizer, {"step": 2}, {}, job_to_yaml(job))

    names = {id(p): n for n, p in a.model.named_parameters()}
    want = {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in a.optimizer.state.items()}
    assert want and all(float(st["step"]) == 2 for st in want.values())
    weights = {n: p.detach().clone() for n, p in a.model.named_parameters()}

    new = compose_job(*TINY, "model.rope_theta=5000000.0", "optim.beta2=0.99", "optim.weight_decay=0.05")
    path = check_init_checkpoint(str(tmp_path / "src"), new.model)
    b = _engine(new, mesh)
    load_init_checkpoint(path, "model+optim", b.model, b.optimizer, new.optim, mesh)
    got_names = {id(p): n for n, p in b.model.named_parameters()}
    got = {got_names[id(p)]: st for p, st in b.optimizer.state.items()}
    assert set(got) == set(want)
    for n, st in want.items():
        for k, v in st.items():
            assert torch.equal(got[n][k], v), f"{n} {k}"
    for n, p in b.model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    # the new run's hyperparameters, not the checkpoint's
    assert [g["betas"] for g in b.optimizer.param_groups] == [(0.9, 0.99)] * 2
    assert [g["weight_decay"] for g in b.optimizer.param_groups] == [0.05, 0.0]

    c = _engine(new, mesh)  # init_load=model: the weights, a fresh optimiser
    load_init_checkpoint(path, "model", c.model, c.optimizer, new.optim, mesh)
    assert all(not st for st in c.optimizer.state.values())
    for n, p in c.model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
