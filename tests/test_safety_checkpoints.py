"""Nothing lost, nothing silently wrong: what the trainer and export refuse to do with checkpoints (another
run's dir, a dir of checkpoints as export output, another model's checkpoint, non-finite weights, damaged
files, a full disk), driven through the CLIs as a user would. Every refusal leaves the files as they were."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from util_train import REPO, TINY, cli_env, run_train

# 4 steps, checkpoints at 2 and 4 (all kept)
SHORT = [*(o for o in TINY if not o.startswith(("train.steps", "checkpoint.interval"))), "train.steps=4"]
SHORT += ["checkpoint.interval=2"]


def tree_hash(root: Path) -> str:
    """Names and contents of every file under root."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def steps_in(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir())


def refused(p: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The command failed with `code` and a one-line message holding every needle, without a traceback."""
    err = p.stderr
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    line = next((x for x in err.splitlines() if ": error: " in x), "")
    for n in needles:
        assert n in line, f"{n!r} not in the error line {line!r}\n{err[-3000:]}"
    return line


def export_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "minimax_train.export", *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run4(tmp_path_factory) -> Path:
    """checkpoint.dir of a finished 4-step run, a checkpoint after every step. Tests that change it copy it."""
    root = tmp_path_factory.mktemp("run4")
    run_train(root / "run", *SHORT, "checkpoint.interval=1", f"checkpoint.dir={root / 'ckpt'}")
    return root / "ckpt"


def copy_of(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


# ---- 1. a fresh run never writes into another run's checkpoint.dir ------------------------------------------
def test_fresh_run_refuses_a_dir_with_another_runs_checkpoints(run4, tmp_path):
    before = tree_hash(run4)
    p = run_train(tmp_path / "r", *SHORT, f"checkpoint.dir={run4}", "checkpoint.resume=false", check=False)
    refused(p, str(run4), "checkpoint.overwrite=true", "another checkpoint.dir", "step_00000001 .. step_00000004")
    assert tree_hash(run4) == before


def test_resume_with_nothing_complete_refuses_too(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_00000005").mkdir(parents=True)  # another run's checkpoint without its COMPLETE marker
    (ckpt / "step_00000005" / "meta.pt").write_bytes(b"x")
    before = tree_hash(ckpt)
    p = run_train(tmp_path / "r", *SHORT, f"checkpoint.dir={ckpt}", check=False)
    refused(p, "none of them is complete", "checkpoint.overwrite=true")
    assert tree_hash(ckpt) == before


def test_overwrite_removes_the_old_run_only_after_the_first_new_save(run4, tmp_path):
    ckpt = copy_of(run4, tmp_path)
    before = tree_hash(ckpt)
    fresh = [*SHORT, f"checkpoint.dir={ckpt}", "checkpoint.resume=false", "checkpoint.overwrite=true"]
    # killed in the middle of its first save: the old run's checkpoints are all still there
    p = run_train(tmp_path / "a", *fresh, "train.seed=7", faults="save_crash@2", check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    shutil.rmtree(ckpt / "step_00000002.tmp")
    assert tree_hash(ckpt) == before
    p = run_train(tmp_path / "b", *fresh, "train.seed=7", "train.steps=2", "optim.warmup_steps=1")
    assert "will be removed after this run's first save" in p.stdout + p.stderr
    assert steps_in(ckpt) == ["step_00000002"]  # the old run's step_00000001..4 are gone
    assert "seed: 7" in (ckpt / "step_00000002" / "config.yaml").read_text()


# ---- 2. export never writes into a checkpoint dir ---------------------------------------------------------
@pytest.mark.parametrize("where", ["the checkpoint.dir", "inside a step dir", "around it"])
def test_export_refuses_out_in_or_around_checkpoints(run4, tmp_path, where):
    ckpt = copy_of(run4, tmp_path)  # a parent of run4 would hold the other tests' files
    out = {
        "the checkpoint.dir": ckpt,
        "inside a step dir": ckpt / "step_00000004" / "hf",
        "around it": tmp_path,
    }[where]
    before = tree_hash(tmp_path)
    p = export_cli("--checkpoint", str(ckpt / "step_00000004"), "--out", str(out), "--overwrite")
    refused(p, "--out", "a training checkpoint", "with or without --overwrite")
    assert tree_hash(tmp_path) == before


# ---- 3. resume only into the same model ---------------------------------------------------------------------
def test_resume_refuses_a_checkpoint_of_another_model(run4, tmp_path):
    before = tree_hash(run4)
    p = run_train(
        tmp_path / "r",
        *SHORT,
        f"checkpoint.dir={run4}",
        "train.steps=6",
        "model.num_hidden_layers=2",
        "model.num_local_experts=2",
        check=False,
    )
    refused(p, "step_00000004", "model.num_hidden_layers: 4 -> 2", "model.num_local_experts: 4 -> 2")
    assert tree_hash(run4) == before


def test_shape_mismatches_lists_shape_fields_only():
    from minimax_train.model.config import SHAPE_FIELDS, ModelConfig, shape_mismatches

    a = ModelConfig()
    assert shape_mismatches(a, ModelConfig(max_position_embeddings=4096, init="deepnorm")) == []
    assert shape_mismatches(a, ModelConfig(softmax_every=2)) == ["model.layer_types: 'LLLL' -> 'LFLF'"]
    assert shape_mismatches(a, ModelConfig(vocab_size=8192)) == ["model.vocab_size: 4096 -> 8192"]
    assert set(SHAPE_FIELDS) <= {f for f in ModelConfig.__dataclass_fields__}


# ---- 4. non-finite hyperparameters, weights and exports ---------------------------------------------------
def test_non_finite_learning_rate_is_a_config_error(tmp_path):
    p = run_train(tmp_path / "r", *SHORT, "optim.lr=inf", check=False)
    refused(p, "optim.lr", "finite")
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=nan", "optim.lr"),
        ("optim.min_lr=nan", "optim.min_lr"),
        ("optim.eps=nan", "optim.eps"),
        ("optim.weight_decay=nan", "optim.weight_decay"),
        ("optim.clip_grad=inf", "optim.clip_grad"),
        ("model.router_aux_loss_coef=inf", "model.router_aux_loss_coef"),
        ("model.rms_norm_eps=-1", "model.rms_norm_eps"),
        ("data.sources.0.weight=inf", "data.sources.0.weight"),
    ],
)
def test_float_hyperparameters_must_be_finite_and_in_range(override, key):
    from minimax_train.conf_tree import compose_job
    from minimax_train.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_job(override)


def test_save_refuses_non_finite_weights_and_names_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    # the weights turn NaN after step 3's update: the checkpoint of step 4 must not be written
    p = run_train(tmp_path / "r", *SHORT, f"checkpoint.dir={ckpt}", faults="poison@3", check=False)
    refused(p, "refusing to save step 4", "NaN or inf", str(ckpt / "step_00000002"))
    assert steps_in(ckpt) == ["step_00000002"]
    # the final save refuses as well, and says that nothing good was saved
    short = ["checkpoint.interval=0", "train.steps=1", "optim.warmup_steps=1"]
    p = run_train(tmp_path / "s", *SHORT, *short, faults="poison@1", check=False)
    refused(p, "refusing to save step 1", "no checkpoint of this run")
    assert steps_in(tmp_path / "s" / "checkpoints") == []


def test_export_refuses_non_finite_weights(run4, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from minimax_train.export import load_checkpoint_model
    from minimax_train.parallel.expert_parallel import standard_gate_up

    ckpt = copy_of(run4, tmp_path)
    step = ckpt / "step_00000004"
    model, _, _ = load_checkpoint_model(step)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    for f in step.glob("*.distcp"):  # as an older version (or another tool) could have written it
        f.unlink()
    (step / ".metadata").unlink()
    with standard_gate_up({"model": get_model_state_dict(model)}) as state:
        dcp.save(state, checkpoint_id=str(step), no_dist=True)
    p = export_cli("--checkpoint", str(step), "--out", str(tmp_path / "hf"))
    refused(p, str(step), "NaN or inf", "refusing to export", "step_00000002")
    assert not (tmp_path / "hf").exists()


# ---- 7. damaged checkpoints --------------------------------------------------------------------------------
def _damage(step: Path, what: str) -> str:
    """Damage one file of checkpoint `step` as a crash on another machine or a bad disk would; its name."""
    if what == "config.yaml":
        (step / "config.yaml").write_text("model: [unclosed\n  - {")
    elif what == "meta.pt":
        data = (step / "meta.pt").read_bytes()
        (step / "meta.pt").write_bytes(data[: len(data) // 2])
    elif what == ".metadata":
        (step / ".metadata").write_bytes(b"\x80\x04garbage")
    else:
        f = sorted(step.glob("*.distcp"))[0]
        f.write_bytes(f.read_bytes()[:100])
    return what


def test_damaged_checkpoints_fall_back_to_the_previous_complete_one(run4, tmp_path):
    ckpt = copy_of(run4, tmp_path)
    _damage(ckpt / "step_00000004", "meta.pt")
    _damage(ckpt / "step_00000003", ".metadata")
    # train.steps=2: the fallback checkpoint is already at the end, so the run only loads and stops
    p = run_train(tmp_path / "r", *SHORT, f"checkpoint.dir={ckpt}", "train.steps=2", "optim.warmup_steps=1")
    out = p.stdout + p.stderr
    assert f"DAMAGED CHECKPOINT {ckpt / 'step_00000004'}: meta.pt is truncated" in out, out[-3000:]
    assert f"DAMAGED CHECKPOINT {ckpt / 'step_00000003'}: its model/optimiser data" in out
    assert f"resumed from {ckpt / 'step_00000002'}" in out
    assert "Traceback" not in out and "weights_only" not in out


def test_no_readable_checkpoint_stops_with_the_list(run4, tmp_path):
    ckpt = copy_of(run4, tmp_path)
    for step, what in ((4, ".distcp"), (3, ".metadata"), (2, "meta.pt"), (1, "config.yaml")):
        _damage(ckpt / f"step_{step:08d}", what)
    before = tree_hash(ckpt)
    p = run_train(tmp_path / "r", *SHORT, f"checkpoint.dir={ckpt}", check=False)
    line = refused(p, "no checkpoint in", "step_00000004: its model/optimiser data", "step_00000002: meta.pt is trunc")
    assert "step_00000003: its model/optimiser data" in line and "step_00000001: config.yaml cannot be read" in line
    assert "move those dirs aside" in line and "weights_only" not in line
    assert tree_hash(ckpt) == before
    p = export_cli("--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"))
    refused(p, "step_00000004: its model/optimiser data", "earlier checkpoints", "step_00000003")
    assert tree_hash(ckpt) == before and not (tmp_path / "hf").exists()


# ---- 8. a full disk ---------------------------------------------------------------------------------------
def test_full_disk_during_save_fault_hook(tmp_path):
    """Simulated at the writer (faults.py disk_full: part of meta.pt lands, then ENOSPC)."""
    ckpt = tmp_path / "ckpt"
    p = run_train(tmp_path / "r", *SHORT, f"checkpoint.dir={ckpt}", faults="disk_full@4", check=False)
    refused(p, f"no space left on {ckpt}", "step 4", str(ckpt / "step_00000002"))
    assert steps_in(ckpt) == ["step_00000002"]  # no step_00000004.tmp left behind


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_full_disk_during_save_real_tmpfs(run4, tmp_path):
    """A real full file system: a tmpfs that holds one checkpoint of the run but not two (needs root)."""
    one = sum(f.stat().st_size for f in (run4 / "step_00000002").rglob("*") if f.is_file())
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, f"{int(one * 1.5) // 1024}k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the fault-hook test covers the code path")
    try:
        ckpt = mnt / "ckpt"
        p = run_train(tmp_path / "r", *SHORT, f"checkpoint.dir={ckpt}", check=False)
        refused(p, f"no space left on {ckpt}", "step 4", str(ckpt / "step_00000002"))
        assert steps_in(ckpt) == ["step_00000002"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
