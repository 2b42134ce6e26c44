"""Checkpoint manager: atomic layout, keep-last-k, latest-complete resolution, weights-only meta, exact reload."""

from __future__ import annotations

import pytest
import torch

from minimax_train.parallel.mesh import ParallelConfig, ParallelMesh
from minimax_train.train.checkpoint import (
    COMPLETE,
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)


def _mesh():
    return ParallelMesh(ParallelConfig(), world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))


def _model_opt(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    return m, opt


def _train_step(m, opt):
    loss = m(torch.randn(5, 8)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_save_load_roundtrip_exact_and_meta_is_weights_only(tmp_path):
    m, opt = _model_opt()
    _train_step(m, opt)
    mgr = CheckpointManager(tmp_path, _mesh(), keep_last=0)
    mgr.prepare()
    meta = {"step": 1, "tokens": 10, "data": {"rows": 4, "sources": [{"pos": 3}]}, "wandb_run_id": None}
    path = mgr.save(1, m, opt, meta, {"rng": rng_state()}, "train:\n  steps: 1\n")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [".metadata", "__0_0.distcp", "meta.pt", "config.yaml", COMPLETE]
    )
    blob = read_meta(path)  # torch.load(weights_only=True)
    assert blob["meta"]["data"] == meta["data"] and blob["world_size"] == 1
    m2, opt2 = _model_opt(seed=1)
    got, mine, _ = mgr.load(path, m2, opt2)
    assert got["step"] == 1 and "rng" in mine
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name])
    # one more identical step on both stays identical
    torch.manual_seed(5)
    _train_step(m, opt)
    torch.manual_seed(5)
    _train_step(m2, opt2)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    st = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(st)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


def test_keep_last_and_incomplete_dirs(tmp_path):
    m, opt = _model_opt()
    mgr = CheckpointManager(tmp_path, _mesh(), keep_last=2)
    mgr.prepare()
    for s in range(1, 6):
        _train_step(m, opt)
        mgr.save(s, m, opt, {"step": s}, {}, "")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    # a crashed save (tmp) and a dir without the marker are not checkpoints; prepare() removes the tmp
    (tmp_path / "step_00000006.tmp").mkdir()
    (tmp_path / "step_00000007").mkdir()
    assert mgr.latest().name == "step_00000005"
    assert resolve_checkpoint(tmp_path).name == "step_00000005"
    assert resolve_checkpoint(tmp_path / "step_00000004").name == "step_00000004"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(tmp_path / "step_00000007")
    mgr.prepare()
    assert not (tmp_path / "step_00000006.tmp").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        (tmp_path / "empty").mkdir()
        resolve_checkpoint(tmp_path / "empty")
