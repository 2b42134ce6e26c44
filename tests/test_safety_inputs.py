"""Bad inputs end with one clear line (or a warning and a sensible fallback), never a traceback: lone
surrogates in JSONL, Megatron data outside the vocabulary or truncated, foreign init_from_hf dirs,
missing optional dependencies, W&B without a key, and a bare torchrun killed by SIGUSR1. Driven through
the CLIs as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_safety_checkpoints import refused
from util_train import REPO, TINY, cli_env, read_metrics, run_train

# 2 steps, nothing saved: these tests are about inputs
QUICK = [*TINY, "train.steps=2", "optim.warmup_steps=1", "checkpoint.interval=0", "checkpoint.save_final=false"]


def _docs(n: int) -> list[str]:
    return [
        json.dumps({"text": f"document {i}: " + " ".join(f"w{j % 40}" for j in range(i, i + 150))}) for i in range(n)
    ]


@pytest.fixture(scope="module")
def surrogate_jsonl(tmp_path_factory) -> Path:
    """40 good documents and, on line 6, one whose text holds a lone surrogate (valid JSON, not Unicode)."""
    lines = _docs(40)
    lines.insert(5, '{"text": "broken \\ud800 text"}')
    path = tmp_path_factory.mktemp("surrogate") / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- 5. lone surrogates: skipped and counted, in the trainer and in prepare_data -----------------------------
def test_trainer_skips_and_counts_a_lone_surrogate(surrogate_jsonl, tmp_path):
    data = ["data=jsonl", f"data.sources.0.path={surrogate_jsonl}", "data.tokenizer=embedded"]
    p = run_train(tmp_path / "r", *QUICK, *data)
    out = p.stdout + p.stderr
    assert f"{surrogate_jsonl}:6: 'text' holds a lone surrogate" in out and "1 malformed records skipped" in out


def test_prepare_data_skips_and_counts_a_lone_surrogate(surrogate_jsonl, tmp_path):
    cmd = [sys.executable, "tools/prepare_data.py", "--input", str(surrogate_jsonl), "--out", str(tmp_path / "c")]
    p = subprocess.run([*cmd, "--workers", "1", "--quiet", "--json"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    info = json.loads(p.stdout)
    assert info["skipped_malformed"] == 1 and info["documents"] == 40, info


# ---- 6. Megatron data: ids outside the vocabulary, truncated files ----------------------------------------
@pytest.fixture(scope="module")
def megatron_data(tmp_path_factory) -> Path:
    from minimax_train.data.megatron import write_megatron_dataset

    d = tmp_path_factory.mktemp("megatron")
    docs = [list(range(i, i + 300)) for i in range(20)]
    write_megatron_dataset(str(d / "ok"), docs, dtype="uint16")
    write_megatron_dataset(str(d / "big_ids"), [*docs, [5, 5000, 6]], dtype="uint16")  # vocab_size is 4096
    for name in ("short_bin", "short_idx"):
        write_megatron_dataset(str(d / name), docs, dtype="uint16")
    b, i = d / "short_bin.bin", d / "short_idx.idx"
    b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    i.write_bytes(i.read_bytes()[:20])
    return d


def test_megatron_ids_outside_the_vocabulary_are_one_clear_line(megatron_data, tmp_path):
    data = ["data.sources.0.kind=megatron", f"data.sources.0.path={megatron_data / 'big_ids'}", "data.valid_fraction=0"]
    p = run_train(tmp_path / "r", *QUICK, *data, check=False)
    refused(p, "holds token id 5000", "model.vocab_size=4096")


@pytest.mark.parametrize(
    "name,needle",
    [("short_bin", "short_bin.bin is truncated"), ("short_idx", "short_idx.idx is truncated")],
)
def test_truncated_megatron_files_are_named_when_opened(megatron_data, name, needle):
    from minimax_train.data import DataError
    from minimax_train.data.megatron import MegatronSource

    with pytest.raises(DataError, match=needle + ".*prepare_data.py"):
        MegatronSource(str(megatron_data / name), "data.sources[0]")


# ---- 9. checkpoint.init_from_hf errors -------------------------------------------------------------------
def test_init_from_hf_errors_are_one_line(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    p = run_train(tmp_path / "r", *QUICK, f"checkpoint.init_from_hf={hf}", check=False)
    refused(p, str(hf), "not a MiniMax checkpoint")


def test_hf_and_trainer_errors_are_one_user_error_type():
    from minimax_train.config import ConfigError
    from minimax_train.data import DataError
    from minimax_train.errors import MinimaxError
    from minimax_train.hf import CheckpointError as HFCheckpointError
    from minimax_train.parallel.layout import ParallelConfigError
    from minimax_train.tools.ckpt.errors import CkptToolError
    from minimax_train.tools.planner.inputs import PlanError
    from minimax_train.tools.prepare import PrepareError
    from minimax_train.train.checkpoint import CheckpointError
    from minimax_train.train.loop import NonFiniteError

    assert HFCheckpointError is CheckpointError
    for cls in (ConfigError, DataError, CheckpointError, ParallelConfigError, CkptToolError, PlanError, PrepareError):
        assert issubclass(cls, MinimaxError) and cls.exit_code == 2
    assert issubclass(NonFiniteError, MinimaxError) and NonFiniteError.exit_code == 3


# ---- 10. missing optional dependencies -------------------------------------------------------------------
@pytest.mark.parametrize(
    "module,extra,overrides",
    [
        ("deepspeed", "deepspeed", ["parallel=deepspeed"]),
        ("wandb", "wandb", ["logging.wandb.mode=offline"]),
        ("liger_kernel", "cuda", ["train.loss_kernel=liger"]),
    ],
)
def test_missing_extra_names_its_pip_install(tmp_path, module, extra, overrides):
    shadow = tmp_path / "shadow"  # hides the installed package, as an environment without the extra
    shadow.mkdir()
    (shadow / f"{module}.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name='{module}')\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    p = run_train(tmp_path / "r", *QUICK, *overrides, env=env, check=False)
    refused(p, f'pip install -e ".[{extra}]"')


def test_missing_megatron_core_names_its_pip_install(megatron_data, monkeypatch):
    from minimax_train.data.megatron import MegatronSource
    from minimax_train.errors import MissingExtraError

    for name in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")] + ["megatron"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: the import raises ImportError
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[megatron\]"'):
        MegatronSource(str(megatron_data / "ok"), "data.sources[0]")


# ---- 11. W&B online without a key: offline with a warning, at once ------------------------------------------
def test_wandb_online_without_a_key_falls_back_to_offline(tmp_path):
    home = tmp_path / "home"  # no ~/.netrc, no WANDB_API_KEY (cli_env drops it)
    home.mkdir()
    t0 = time.monotonic()
    p = run_train(
        tmp_path / "r", *QUICK, "logging.wandb.mode=online", env={"HOME": str(home), "NETRC": str(home / ".netrc")}
    )
    assert time.monotonic() - t0 < 60
    assert "W&B online logging unavailable: UsageError: No API key" in p.stdout + p.stderr
    assert list((tmp_path / "r" / "wandb").glob("offline-run-*"))


# ---- 12. bare torchrun and SIGUSR1 ------------------------------------------------------------------------
def test_bare_torchrun_killed_by_sigusr1_does_not_orphan_its_worker(tmp_path):
    """torchrun dies of SIGUSR1 (only launch/torchrun.sh makes it immune); its worker must not train on."""
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    cmd += ["-m", "minimax_train.train", f"hydra.run.dir={run}", *TINY, "train.steps=2000", "checkpoint.interval=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not read_metrics(run) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert read_metrics(run), "the worker never trained"
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)  # EOF once the worker, which holds the pipe, has exited
    finally:
        proc.kill()
    steps = [r["step"] for r in read_metrics(run)]
    assert max(steps) < 2000 and "received SIGTERM" in out, out[-3000:]
    assert (run / "checkpoints" / f"step_{max(steps):08d}").is_dir()
