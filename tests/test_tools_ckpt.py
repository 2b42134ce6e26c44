"""Checkpoint tools on a real (CPU) training checkpoint: inspect reports step, tokens, layout, config and
the tensor shapes; convert validates a target layout and writes a lossless consolidated copy (the same keys and
shapes for every layout) that resumes in the trainer exactly like the original; export-hf is
minimax_train.export; import-hf gives
a step-0 checkpoint holding the HF weights that the trainer resumes; bad input ends with a one-line error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from util_train import REPO, TINY, run_train

from minimax_train.conf_tree import compose_job
from minimax_train.tools import ckpt as C


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """TINY: 8 steps of 4 rows x 64 tokens, checkpoints at steps 3, 6 and 8."""
    d = tmp_path_factory.mktemp("ckpt_run")
    run_train(d, *TINY)
    return d


def _train_in_process(run_dir: Path, ckpt_dir: Path, steps: int):
    from minimax_train.train.loop import train

    job = compose_job(*TINY, f"train.steps={steps}", f"checkpoint.dir={ckpt_dir}", "checkpoint.interval=0")
    return train(job, run_dir)


def test_inspect_reports_step_tokens_layout_and_shapes(run, capsys):
    from minimax_train.model import MiniMaxForCausalLM
    from minimax_train.model.config import ModelConfig

    info = C.inspect_checkpoint(run / "checkpoints")
    assert info["path"].endswith("step_00000008") and info["step"] == 8 and info["tokens"] == 8 * 4 * 64
    assert info["siblings"] == ["step_00000003", "step_00000006", "step_00000008"]
    assert info["layout"]["world_size"] == 1 and info["layout"]["tp"] == 1
    assert info["data"]["global_rows"] == 32 and info["train"]["seq_len"] == 64
    model = MiniMaxForCausalLM(ModelConfig(**info["model_config"]))
    shapes = {f"model.{k}": list(v.shape) for k, v in model.state_dict().items()}
    assert {k: v["shape"] for k, v in info["tensors"].items() if k.startswith("model.")} == shapes
    assert info["parameters"]["total"] == sum(v.numel() for v in model.parameters())
    assert C.main(["inspect", str(run / "checkpoints" / "step_00000006"), "--match", "gate_up"]) == 0
    out = capsys.readouterr().out
    assert "step 6, tokens seen 1,536" in out and "mlp.experts.gate_up_proj" in out and "LEGACY" not in out


def test_convert_is_lossless_for_any_target_layout_and_resumes_like_the_original(run, tmp_path):
    src = run / "checkpoints"
    rep = C.convert(src, tmp_path / "etp2", world=4, tp=2, ep=2, etp=2)
    assert rep["target_layout"] == {"world": 4, "dp": 2, "cp": 1, "tp": 2, "ep": 2, "etp": 2, "edp": 1}
    t4 = C.tensor_metadata(tmp_path / "etp2" / "step_00000008")
    assert t4["model.model.layers.0.mlp.experts.gate_up_proj"]["shape"] == [4, 256, 64]  # the same for every layout
    assert t4["optim.state.model.layers.0.mlp.experts.gate_up_proj.exp_avg"]["shape"] == [4, 256, 64]
    _assert_same_state(src / "step_00000008", tmp_path / "etp2" / "step_00000008")
    # resuming the consolidated copy = resuming the original (same step-9 loss, bit for bit)
    orig = tmp_path / "orig"
    shutil.copytree(src, orig)
    r1 = _train_in_process(tmp_path / "r1", orig, 9)
    r2 = _train_in_process(tmp_path / "r2", tmp_path / "etp2", 9)
    assert r1.step == r2.step == 9 and r1.last_loss == r2.last_loss


def _assert_same_state(a_dir: Path, b_dir: Path) -> None:
    flat_a = dict(_flatten(C.load_full_state(a_dir)))
    flat_b = dict(_flatten(C.load_full_state(b_dir)))
    assert flat_a.keys() == flat_b.keys()
    for k, v in flat_a.items():
        assert torch.equal(v, flat_b[k]) if isinstance(v, torch.Tensor) else v == flat_b[k], k


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix, d


def test_convert_torch_file(run, tmp_path):
    rep = C.convert(run / "checkpoints", tmp_path / "full.pt", fmt="torch")
    blob = torch.load(rep["output"], weights_only=False)
    assert {"model", "optim", "meta", "config"} <= set(blob) and blob["meta"]["step"] == 8
    assert blob["model"]["model.embed_tokens.weight"].shape == (4096, 64)


def test_export_hf_is_the_export_command_and_import_hf_resumes(run, tmp_path):
    from safetensors.torch import load_file

    from minimax_train.export import load_checkpoint_model
    from minimax_train.export import main as export_main
    from minimax_train.hf import load_hf

    assert C.main(["export-hf", str(run / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0
    assert export_main(["--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "hf_ref")]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf_ref" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # import: step 0 with the HF weights, resumed by the trainer
    argv = ["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"), "--", *TINY]
    assert C.main(argv) == 0
    model, _, path = load_checkpoint_model(tmp_path / "imported")
    assert path.name == "step_00000000"
    ref = load_hf(tmp_path / "hf")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    res = _train_in_process(tmp_path / "r", tmp_path / "imported", 2)
    assert res.step == 2 and res.last_loss is not None
    assert C.main(argv) == 2  # refuses to overwrite without --overwrite


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["inspect", "/no/such/ckpt"], "does not exist"),
        (
            ["convert", "CKPT", "--out", "OUT", "--world", "4", "--tp", "3"],
            "parallel.tp=3 does not divide the world size 4",
        ),
        (["convert", "CKPT", "--out", "OUT", "--tp", "2"], "give its --world"),
        (["convert", "CKPT", "--out", "OUT", "--world", "8", "--tp", "1"], "not divisible by dp=8"),
        (["convert", "CKPT", "--out", "OUT", "--world", "3", "--cp", "3"], "divisible by 2*parallel.cp=6"),
        (["export-hf", "/no/such/ckpt", "--out", "OUT"], "does not exist"),
        (["import-hf", "CKPT", "--out", "OUT"], "not a MiniMax checkpoint"),
    ],
)
def test_bad_input_is_one_clear_line(run, tmp_path, capsys, argv, needle):
    argv = [a.replace("CKPT", str(run / "checkpoints")).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert C.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("ckpt: error:") and "Traceback" not in err


def test_script_help_and_missing_checkpoint():
    ok = subprocess.run(
        [sys.executable, "tools/ckpt.py", "convert", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0 and "reshard" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "tools/ckpt.py", "inspect", "/no/such"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr
