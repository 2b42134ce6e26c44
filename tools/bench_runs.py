"""Running the trainer for the benchmarks (tools/bench_train.py, tools/bench_layouts.py): model configs of the
conf/model presets with overrides, the trainer overrides every run shares, a one-document corpus, and
subprocesses with a time limit that end their whole process group (torchrun's workers included)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from bench_common import REPO

from minimax_train.conf_tree import conf_dir


def _parse_value(s: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(s)
    except Exception:
        return s


def parse_model_overrides(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """--override KEY=VALUE items -> (ModelConfig field values, the same as Hydra model.KEY=VALUE strings)."""
    over, hydra = {}, []
    for kv in items:
        if "=" not in kv:
            raise SystemExit(f"--override {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        k = k.strip().removeprefix("model.")
        over[k] = _parse_value(v)
        hydra.append(f"model.{k}={v}")
    return over, hydra


def build_model_config(base: str, over: dict[str, Any]):
    """ModelConfig of conf/model/<base>.yaml with `over` applied (what the trainer's Hydra merge produces)."""
    import yaml

    from minimax_train.model.config import ModelConfig

    presets = Path(conf_dir()) / "model"
    path = presets / f"{base}.yaml"
    if not path.is_file():
        names = sorted(q.stem for q in presets.glob("*.yaml"))
        raise SystemExit(
            f"--preset {base!r}: no conf/model/{base}.yaml; use one of {', '.join(names)} or minimax_slice"
        )
    d = yaml.safe_load(path.read_text()) or {}
    d.update(over)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise SystemExit(f"unknown ModelConfig field(s) {unknown}; known: {', '.join(sorted(fields))}")
    return ModelConfig(**d)


def all_softmax(cfg):
    from minimax_train.model.config import FULL

    return dataclasses.replace(cfg, layer_types=[FULL] * cfg.num_hidden_layers)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for k in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "MINIMAX_TRAIN_FAULTS",
    ):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["HYDRA_FULL_ERROR"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run cmd with stdout+stderr to `log`; (exit code, one-line reason if it failed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        # own session: on timeout the whole process group this call started (compile workers included) is ended
        p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(p)
            return 124, f"timed out after {timeout:.0f} s (log {log})"
        except BaseException:
            _kill_group(p)
            raise
    if code == 0:
        return 0, ""
    return code, f"exit {code}: {_last_error(log)} (log {log})"


def _kill_group(p: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)  # the group of the child started above (its pgid is its pid)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def _last_error(log: Path) -> str:
    """The most telling line of a failed run's log: the last exception line, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    keys = ("Error", "error:", "Exception", "out of memory", "Killed", "minimax_train:")
    for ln in reversed(lines):
        if any(k in ln for k in keys) and not ln.startswith(("File ", "warnings.warn", "[rank0]:   File")):
            return ln.removeprefix("[rank0]: ")[:300]
    return lines[-1][:300] if lines else "empty log"


def single_document_corpus(tokens_needed: int) -> Path:
    """A jsonl holding ONE long document (the embedded corpus joined, repeated or cut to about tokens_needed), so
    the trainer's packed rows are each one causal document: the same attention work as the baselines' rows.
    Cached under outputs/bench_train/cache (it is data, not a result)."""
    from minimax_train.data.embedded import embedded_corpus_path

    chars = int(tokens_needed * 5)  # the embedded BPE averages ~3.6 bytes per token: 5 leaves a margin
    path = REPO / "outputs" / "bench_train" / "cache" / f"single_doc_{chars}.jsonl"
    if path.exists():
        return path
    texts = [json.loads(ln)["text"] for ln in embedded_corpus_path().read_text().splitlines() if ln.strip()]
    one = "\n\n".join(texts)
    text = (one * max(1, math.ceil(chars / len(one))))[:chars]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return path


def run_trainer(
    cmd: list[str], run_dir: Path, log: Path, timeout: float, warmup: int, res: dict[str, Any]
) -> tuple[list[dict], list[dict]]:
    """Run a trainer command (writing run_dir/metrics.jsonl); returns (all step records, those after `warmup`).
    Sets res["wall_s"], and res["status"] = "failed" with a reason when it failed or timed no step."""
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # the trainer appends: never mix in an older run
    t0 = time.time()
    try:
        code, reason = run_logged(cmd, log, timeout)
    except BaseException:  # interrupted (SIGINT, pytest-timeout): _run ended torchrun's group, not its workers
        subprocess.run(["pkill", "-9", "-f", f"hydra.run.dir={run_dir}"], check=False)
        raise
    if code == 124:  # torchrun's workers run in sessions of their own: end them too, or they hold the GPUs
        subprocess.run(["pkill", "-9", "-f", f"hydra.run.dir={run_dir}"], check=False)
    res["wall_s"] = time.time() - t0
    metrics = run_dir / "metrics.jsonl"
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.exists() else []
    timed = [r for r in recs if r["step"] > warmup]
    if code != 0 or not timed:
        res.update(status="failed", reason=reason or f"no timed steps in {metrics}")
    return recs, timed


def bench_overrides(device: str, seq_len: int, steps: int) -> list[str]:
    """Trainer overrides every benchmark run shares: device and precision, row length and steps, AdamW at the
    baselines' constant lr 1e-4, no evaluation, checkpoints or W&B, a metrics line per step."""
    gpu = device == "cuda"
    return [
        "train=gpu" if gpu else "train=default",
        f"train.device={device}",
        f"train.precision={'bf16' if gpu else 'fp32'}",
        f"train.seq_len={seq_len}",
        f"train.steps={steps}",
        "train.eval_interval=0",
        "optim.warmup_steps=0",
        "optim.lr=1e-4",
        "optim.min_lr=1e-5",
        "optim.schedule=constant",
        "checkpoint.interval=0",
        "checkpoint.save_final=false",
        "checkpoint.resume=false",
        "logging.wandb.mode=disabled",
        "logging.interval=1",
    ]


def corpus_overrides(corpus: Path) -> list[str]:
    """Train on `corpus` (a jsonl, e.g. single_document_corpus) with the embedded tokenizer, no held-out split."""
    return ["data=jsonl", f"data.sources.0.path={corpus}", "data.tokenizer=embedded", "data.valid_fraction=0"]
