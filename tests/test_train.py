"""End to end on CPU: a fresh run learns and writes its outputs; HF export loads in transformers and
generates; init_from_hf; NaN steps are skipped and counted; W&B offline keeps its run id across resumes;
data problems give clear errors or counted skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from util_train import TINY, by_step, read_metrics, run_train

from minimax_train.conf_tree import compose_job

METRIC_KEYS = {
    "step",
    "loss",
    "lm_loss",
    "aux_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "tflops_per_device",
    "mfu",
    "max_memory_gb",
    "expert_load_imbalance",
}


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory) -> Path:
    """The default config (tiny model, embedded data, seq 128, gbs 8), shortened to 60 steps."""
    run_dir = tmp_path_factory.mktemp("fresh")
    run_train(run_dir, "train.steps=60", "train.eval_interval=30", "checkpoint.interval=50")
    return run_dir


def test_fresh_run_learns_and_writes_outputs(fresh_run):
    recs = read_metrics(fresh_run)
    assert [r["step"] for r in recs] == list(range(1, 61))
    for r in recs:
        assert METRIC_KEYS <= set(r)
        assert r["tokens"] == r["step"] * 8 * 128 and r["tokens_per_s"] > 0 and r["expert_load_imbalance"] >= 1
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-10:]) / 10
    assert first > 8.0 and last < first - 1.5, (first, last)  # ln(4096) = 8.3 at init
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0] < 8.0
    assert recs[0]["lr"] < recs[9]["lr"] and recs[-1]["lr"] == pytest.approx(3e-4)
    assert (fresh_run / "config_resolved.yaml").is_file() and (fresh_run / ".hydra" / "config.yaml").is_file()
    assert (fresh_run / "train.log").read_text().count("step 60/60") == 1
    ck = sorted(p.name for p in (fresh_run / "checkpoints").iterdir())
    assert ck == ["step_00000050", "step_00000060"]


def test_model_flops_count_the_packed_documents(fresh_run):
    """metrics.jsonl's model FLOPs are those of the rows as packed: below the one-document-per-row count
    (the embedded corpus packs several documents into a row), above the attention-free part."""
    from minimax_train.model.flops import train_flops, train_flops_per_token

    cfg = compose_job("train.steps=60").model
    tokens = 8 * 128
    one_doc = train_flops_per_token(cfg, 128) * tokens
    no_attention = train_flops(cfg, [1] * tokens)  # every token its own document: attention ~ nothing
    recs = read_metrics(fresh_run)
    for r in recs:
        assert no_attention < r["model_flops"] <= one_doc
        assert r["tflops_per_device"] == pytest.approx(r["model_flops"] / r["step_time_s"] / 1e12, rel=1e-9)
    assert min(r["model_flops"] for r in recs) < one_doc  # some row held more than one document


def test_export_loads_in_transformers_and_generates(fresh_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minimax_train.export import load_checkpoint_model, main

    out = tmp_path / "hf"
    assert main(["--checkpoint", str(fresh_run / "checkpoints"), "--out", str(out)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def main(", return_tensors="pt").input_ids
    gen = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 12
    # transformers' logits equal ours on the exported weights
    ours, _, path = load_checkpoint_model(fresh_run / "checkpoints")
    assert path.name == "step_00000060"
    with torch.no_grad():
        a = hf(ids).logits
        b = ours(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert main(["--checkpoint", str(fresh_run / "checkpoints"), "--out", str(out)]) == 2  # exists: refuse


def test_init_from_hf_starts_from_the_exported_weights(fresh_run, tmp_path):
    from minimax_train.export import export

    hf_dir = export(fresh_run / "checkpoints", tmp_path / "hf")
    run_train(
        tmp_path / "r",
        "train.steps=2",
        "train.eval_interval=0",
        "optim.warmup_steps=1",
        f"checkpoint.init_from_hf={hf_dir}",
    )
    recs = read_metrics(tmp_path / "r")
    fresh = read_metrics(fresh_run)
    assert recs[0]["loss"] < fresh[0]["loss"] - 1.0  # starts where the exported model was, not at ln(V)


def test_nan_step_is_skipped_and_counted(tmp_path):
    p = run_train(tmp_path, *TINY, "checkpoint.interval=0", faults="nan@3")
    recs = by_step(read_metrics(tmp_path))
    assert recs[3]["skipped"] is True and recs[3]["loss"] is None and recs[3]["skipped_steps"] == 1
    assert recs[8]["skipped_steps"] == 1 and recs[8]["loss"] is not None
    assert "update skipped" in p.stdout + p.stderr


def test_consecutive_nan_steps_stop_with_a_clear_message(tmp_path):
    p = run_train(tmp_path, *TINY, "train.max_nonfinite_steps=3", faults="nan@2+3+4", check=False)
    assert p.returncode == 3
    assert "3 consecutive optimiser steps (2..4)" in p.stderr and "train.max_nonfinite_steps=3" in p.stderr
    assert max(r["step"] for r in read_metrics(tmp_path)) == 4


def test_wandb_offline_writes_a_run_and_keeps_its_id_on_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    short = [o for o in TINY if not o.startswith("train.steps")]
    common = [
        *short,
        "logging.wandb.mode=offline",
        "logging.wandb.project=test",
        "logging.wandb.tags=[a,b]",
        f"checkpoint.dir={ckpt}",
    ]
    run_train(tmp_path / "a", *common, "train.steps=3")
    runs = list((tmp_path / "a" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    from minimax_train.train.checkpoint import latest_checkpoint, read_meta

    run_id = read_meta(latest_checkpoint(ckpt))["meta"]["wandb_run_id"]
    assert run_id and runs[0].name.endswith(run_id)
    run_train(tmp_path / "b", *common, "train.steps=5")
    runs_b = list((tmp_path / "b" / "wandb").glob("offline-run-*"))
    assert len(runs_b) == 1 and runs_b[0].name.endswith(run_id)
    assert read_meta(latest_checkpoint(ckpt))["meta"]["wandb_run_id"] == run_id


# ---- data problems -------------------------------------------------------------------------------------
def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _docs(n: int) -> list[str]:
    return [
        json.dumps({"text": f"document {i}: " + " ".join(f"word{j % 50}" for j in range(i, i + 200))}) for i in range(n)
    ]


def _train_inproc(tmp_path, *overrides):
    from minimax_train.train import train

    job = compose_job(*TINY, "train.steps=2", "checkpoint.interval=0", "checkpoint.save_final=false", *overrides)
    return train(job, tmp_path / "run")


def test_malformed_lines_are_counted_and_skipped(tmp_path, caplog):
    f = _jsonl(tmp_path / "d.jsonl", _docs(40) + ["{not json", json.dumps({"txt": "no text key"}), "[1, 2]"])
    with caplog.at_level("INFO", logger="minimax_train"):
        res = _train_inproc(tmp_path, "data=jsonl", f"data.sources.0.path={f}", "data.tokenizer=embedded")
    assert res.step == 2
    assert any("3 malformed records skipped" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("too_many_bad", "max_bad_lines"),
        ("empty", "empty"),
        ("missing", "does not exist"),
        ("tokenizer", "unknown tokenizer"),
        ("no_valid", "train.eval_interval=0"),
    ],
)
def test_data_errors_are_clear(tmp_path, case, needle):
    from minimax_train.data import DataError

    good = _jsonl(tmp_path / "good.jsonl", _docs(40))
    ov = {
        "too_many_bad": [
            f"data.sources.0.path={_jsonl(tmp_path / 'b.jsonl', _docs(5) + ['{bad'] * 4)}",
            "data.max_bad_lines=2",
        ],
        "empty": [f"data.sources.0.path={_jsonl(tmp_path / 'e.jsonl', [''])}"],
        "missing": [f"data.sources.0.path={tmp_path / 'nope.jsonl'}"],
        "tokenizer": [f"data.sources.0.path={good}", f"data.tokenizer={tmp_path / 'no_tokenizer'}"],
        "no_valid": [f"data.sources.0.path={good}", "data.valid_fraction=0", "train.eval_interval=1"],
    }[case]
    base = ["data=jsonl", "data.tokenizer=embedded"]
    with pytest.raises((DataError, FileNotFoundError)) as e:
        _train_inproc(tmp_path, *base, *ov)
    assert needle in str(e.value)


def test_cli_data_error_exit_code(tmp_path):
    p = run_train(
        tmp_path / "r",
        "data=jsonl",
        "data.tokenizer=embedded",
        f"data.sources.0.path={tmp_path / 'missing.jsonl'}",
        check=False,
    )
    assert p.returncode == 2 and "missing.jsonl" in p.stderr and "Traceback" not in p.stderr


def test_profile_window_writes_a_trace_and_an_op_table(tmp_path):
    """logging.profile_start/profile_steps: the op table holds the model's ops, the trace is gzipped JSON."""
    import gzip

    _train_inproc(tmp_path, "train.steps=3", "logging.profile_start=2", "logging.profile_steps=1")
    prof = tmp_path / "run" / "profile"
    ops = (prof / "rank0_ops.txt").read_text()
    assert "aten::mm" in ops or "aten::addmm" in ops
    trace = json.loads(gzip.decompress((prof / "rank0_trace.json.gz").read_bytes()))
    assert trace["traceEvents"]
