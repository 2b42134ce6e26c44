"""Plots: one or several runs' metrics.jsonl -> PNG charts (loss, lr, tokens/s, MFU, expert load, ...), the
last record of a re-logged step wins, unreadable lines are skipped and counted, bad input is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from util_train import REPO

from minimax_train.tools import plots as PL

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(d: Path, n: int, *, mfu: bool, resumed: bool = False, bad: bool = False) -> Path:
    d.mkdir(parents=True)
    lines = []
    for s in range(1, n + 1):
        rec = {
            "step": s,
            "loss": 8.0 - 0.1 * s,
            "lm_loss": 8.0 - 0.1 * s,
            "lr": 1e-3 * min(1, s / 3),
            "tokens": 512 * s,
            "tokens_per_s": 1000.0 + s,
            "grad_norm": 1.0 / s,
            "tflops_per_device": 0.5,
            "mfu": 0.3 if mfu else None,
            "max_memory_gb": 1.5,
            "expert_load_imbalance": 1.0 + 0.01 * s,
        }
        if s % 5 == 0:
            rec["val_loss"] = 7.9 - 0.1 * s
        lines.append(json.dumps(rec))
    if resumed:  # a crash after step 6, resumed from the step-4 checkpoint: steps 5, 6 logged twice
        lines[4:4] = [json.dumps({"step": 5, "loss": 99.0}), json.dumps({"step": 6, "loss": 99.0})]
    if bad:
        lines.insert(2, "{truncated")
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_two_runs_give_every_chart(tmp_path, capsys):
    a = _write_run(tmp_path / "run_a", 12, mfu=True, resumed=True, bad=True)
    b = _write_run(tmp_path / "run_b", 8, mfu=False)
    out = tmp_path / "plots"
    assert (
        PL.main(
            [str(a), str(b / "metrics.jsonl"), "--out", str(out), "--labels", "A,B", "--smooth", "3", "--x", "tokens"]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    assert names == {
        "loss.png",
        "lr.png",
        "tokens_per_s.png",
        "mfu.png",
        "expert_load.png",
        "grad_norm.png",
        "memory.png",
        "overview.png",
    }
    for p in out.iterdir():
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    text = capsys.readouterr().out
    assert "A: 12 steps (last 12), loss 6.8000" in text and "1 unreadable lines skipped" in text
    run = PL.load_run(a)
    assert [r["step"] for r in run.records] == list(range(1, 13)) and run.records[4]["loss"] == pytest.approx(7.5)


def test_series_and_smoothing():
    run = PL.Run(
        "x",
        Path("x"),
        [{"step": 1, "loss": 2.0, "mfu": None}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 4.0}],
    )
    assert PL.series(run, "loss") == ([1.0, 3.0], [2.0, 4.0])
    assert PL.series(run, "mfu") == ([], [])
    assert PL.smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]


@pytest.mark.parametrize(
    "setup, needle",
    [
        ("missing", "no such run directory"),
        ("empty", "no metric records"),
        ("nodir", "has no metrics.jsonl"),
        ("labels", "--labels has 1 labels for 2 runs"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, setup, needle):
    argv = {
        "missing": [str(tmp_path / "nope")],
        "empty": [str(tmp_path / "e.jsonl")],
        "nodir": [str(tmp_path)],
        "labels": [str(tmp_path / "r1"), str(tmp_path / "r2"), "--labels", "one"],
    }[setup]
    (tmp_path / "e.jsonl").write_text("\n{bad\n")
    if setup == "labels":
        _write_run(tmp_path / "r1", 2, mfu=True)
        _write_run(tmp_path / "r2", 2, mfu=True)
    assert PL.main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("plot_metrics: error:") and "Traceback" not in err


def test_script_exit_codes(tmp_path):
    run = _write_run(tmp_path / "r", 3, mfu=False)
    ok = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(run), "--out", str(tmp_path / "p")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and (tmp_path / "p" / "overview.png").is_file()
    bad = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
