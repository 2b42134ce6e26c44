"""Training throughput benchmark: tokens/s, TFLOP/s per GPU, MFU and peak memory of
  (a) ours      -- the real trainer (`python -m minimax_train.train ...`) as a subprocess, read from its metrics.jsonl;
  (b) hf        -- transformers' MiniMaxForCausalLM trained eagerly on random tokens [1, seq_len]: fp32 params,
                   bf16 autocast, torch.optim.AdamW(fused=True), sdpa attention (how a user trains it);
  (c) megatron  -- megatron-core GPTModel with the same widths, experts and top-k but softmax attention in every
                   layer (it has no lightning attention), local (non-Transformer-Engine) layer spec,
side by side on the same card, one process per implementation (clean memory, one failure does not stop the
others), all with AdamW at a constant lr 1e-4. Every implementation runs --warmup untimed steps, then
--steps - --warmup timed steps; numbers are medians over the timed steps.

    python tools/bench_train.py --preset minimax_1b --seq-len 8192 --out bt_1b_8k.json
    python tools/bench_train.py --preset minimax_slice --seq-len 8192            # MiniMax widths, 2 layers
    python tools/bench_train.py --device cpu --preset tiny --seq-len 128 --steps 3 --warmup 1 --peak-tflops 1

FLOPs: minimax_train.model.flops.train_flops_per_token(cfg, seq_len) -- the function the trainer's own metric
uses -- for ours and transformers (the same hybrid model), and for megatron the same function on the config with
every layer softmax ("full_attention"), i.e. the FLOPs of the model megatron actually trains. Model FLOPs:
activation recomputation is not counted. MFU = TFLOP/s per GPU / peak (bf16 dense: H100 SXM and H200 989,
from minimax_train/hardware.py; --peak-tflops overrides). Peak memory: torch.cuda.max_memory_allocated (peak RSS on
CPU). The ratio column is ours' tokens/s over the implementation's tokens/s.

Presets: the conf/model names (tiny, minimax_1b, minimax_text_01) and minimax_slice = minimax_text_01's widths
(hidden 6144, 64 heads x 128, 8 kv heads, experts of 9216, top-2) with --slice-layers layers (default 2: one
lightning, one softmax), vocab 32768 and --slice-experts local experts (default 4: MiniMax's 32 experts under
EP=8; each expert then sees tokens*2/4 rows, as an EP=8 rank does; 32 experts of 9216 are 5.4B parameters
per layer and do not fit one GPU with AdamW). --override key=value changes any ModelConfig field for all
three implementations (and is passed to the trainer as model.key=value).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402
    REPO,
    cleanup,
    fmt,
    fmt_pct,
    guarded,
    markdown_table,
    median,
    one_line,
    reproduce_command,
    write_json,
)

from minimax_train.tools.spawn import free_port  # noqa: E402

IMPLS = ("ours", "hf", "megatron")
SLICE_BASE = "minimax_text_01"


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="minimax_1b", help="conf/model name or minimax_slice")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ModelConfig field override (repeatable), e.g. --override num_hidden_layers=4",
    )
    p.add_argument("--slice-layers", type=int, default=2, help="minimax_slice: layers (the last one softmax)")
    p.add_argument("--slice-experts", type=int, default=4, help="minimax_slice: local experts")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=None, help="total steps per implementation (default 10; CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; CPU 1)")
    p.add_argument("--impls", default="ours,hf,megatron")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device bf16 peak for MFU")
    p.add_argument(
        "--ac",
        default="none",
        choices=("none", "selective", "full"),
        help="ours: train.activation_checkpointing (none = the same work as the baselines)",
    )
    p.add_argument(
        "--ours-data",
        default="single",
        choices=("single", "embedded"),
        help="single: one long document, so every row is one causal document like the baselines' "
        "random rows; embedded: the packed multi-document corpus (less softmax work)",
    )
    p.add_argument(
        "--ours-arg",
        action="append",
        default=[],
        metavar="HYDRA_OVERRIDE",
        help="extra override for the trainer, e.g. --ours-arg optim.impl=foreach",
    )
    p.add_argument(
        "--hf-experts",
        default=None,
        help="transformers experts_implementation (default: its own default, grouped_mm in 5.x)",
    )
    p.add_argument(
        "--megatron-attn",
        default="sdpa",
        choices=("sdpa", "local"),
        help="sdpa: torch SDPA (flash) as megatron's core attention, standing in for TE's fused "
        "attention; local: megatron's unfused DotProductAttention (s x s scores)",
    )
    p.add_argument(
        "--megatron-optimizer",
        default="auto",
        choices=("auto", "megatron", "torch"),
        help="megatron: DDP + get_megatron_optimizer (bf16 params, fp32 main params and grads); "
        "torch: torch AdamW over fp32 master copies of the bf16 params; auto: megatron, else torch",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=None, help="seconds per implementation (default 420; CPU 300)")
    p.add_argument("--workdir", default=None, help="run dirs and logs (default outputs/bench_train/<time>)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if _cuda_visible() else "cpu"
    cpu = a.device == "cpu"
    a.steps = a.steps if a.steps is not None else (3 if cpu else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if cpu else 3)
    a.timeout = a.timeout if a.timeout is not None else (300.0 if cpu else 420.0)
    if a.steps <= a.warmup:
        p.error(f"--steps ({a.steps}) must exceed --warmup ({a.warmup})")
    a.impl_list = [s.strip() for s in a.impls.split(",") if s.strip()]
    for s in a.impl_list:
        if s not in IMPLS:
            p.error(f"--impls: unknown {s!r}; use {', '.join(IMPLS)}")
    return a


def _cuda_visible() -> bool:
    """Whether a GPU is visible, without creating a CUDA context in this (orchestrating) process."""
    import torch

    try:
        return torch.cuda.device_count() > 0
    except Exception:
        return False


def _parse_value(s: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(s)
    except Exception:
        return s


def model_overrides(a) -> tuple[str, dict[str, Any], list[str]]:
    """(base conf/model name, field overrides, the same as Hydra strings)."""
    if a.preset == "minimax_slice":
        base = SLICE_BASE
        over = {
            "num_hidden_layers": a.slice_layers,
            "softmax_every": a.slice_layers,
            "vocab_size": 32768,
            "num_local_experts": a.slice_experts,
        }
        hydra = [f"model.{k}={v}" for k, v in over.items()]
    else:
        base, over, hydra = a.preset, {}, []
    for kv in a.override:
        if "=" not in kv:
            raise SystemExit(f"--override {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        k = k.strip().removeprefix("model.")
        over[k] = _parse_value(v)
        hydra.append(f"model.{k}={v}")
    return base, over, hydra


def build_model_config(base: str, over: dict[str, Any]):
    """ModelConfig of conf/model/<base>.yaml with `over` applied (what the trainer's Hydra merge produces)."""
    import yaml

    from minimax_train.model.config import ModelConfig

    path = REPO / "conf" / "model" / f"{base}.yaml"
    if not path.is_file():
        names = sorted(q.stem for q in (REPO / "conf" / "model").glob("*.yaml"))
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


# ---------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------


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


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
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
        code, reason = _run(cmd, log, timeout)
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


def run_ours(a, base: str, hydra_model: list[str], cfg, work: Path) -> dict[str, Any]:
    from minimax_train.model.flops import train_flops_per_token

    run_dir = work / "ours"
    cmd = [
        sys.executable,
        "-m",
        "minimax_train.train",
        f"model={base}",
        *hydra_model,
        *bench_overrides(a.device, a.seq_len, a.steps),
        "train.global_batch_size=1",
        "train.micro_batch_size=1",
        f"train.activation_checkpointing={a.ac}",
        f"train.seed={a.seed}",
        f"hydra.run.dir={run_dir}",
    ]
    if a.peak_tflops is not None:
        cmd.append(f"logging.peak_tflops={a.peak_tflops}")
    if a.ours_data == "single":
        cmd += corpus_overrides(single_document_corpus((a.steps + 1) * a.seq_len))
    cmd += list(a.ours_arg)
    res: dict[str, Any] = {
        "impl": "ours",
        "command": " ".join(shlex.quote(c) for c in cmd),
        "notes": [f"real trainer, data={a.ours_data}, activation_checkpointing={a.ac}"],
    }
    recs, timed = run_trainer(cmd, run_dir, work / "logs" / "ours.log", a.timeout, a.warmup, res)
    if res.get("status") == "failed":
        return res
    fpt = train_flops_per_token(cfg, a.seq_len)
    tps = median([r["tokens_per_s"] for r in timed])
    trainer_tflops = median([r["tflops_per_device"] for r in timed])
    mfu = median([r["mfu"] for r in timed if r.get("mfu") is not None])
    peak = (trainer_tflops / mfu) if mfu else a.peak_tflops
    tflops = fpt * tps / 1e12
    if trainer_tflops and abs(trainer_tflops / tflops - 1) > 0.01:
        res["notes"].append(f"trainer's TFLOP/s {trainer_tflops:.4g} differs from the shared counter's {tflops:.4g}")
    res.update(
        status="ok",
        tokens_per_s=tps,
        tflops_per_gpu=tflops,
        mfu=(tflops / peak) if peak else None,
        peak_tflops=peak,
        peak_mem_gb=max(r["max_memory_gb"] for r in recs),
        flops_per_token=fpt,
        step_ms=[r["step_time_s"] * 1e3 for r in timed],
        timed_steps=len(timed),
        loss_first=recs[0]["loss"],
        loss_last=recs[-1]["loss"],
    )
    return res


def run_worker(a, impl: str, cfg, work: Path) -> dict[str, Any]:
    spec = {
        "impl": impl,
        "cfg": dataclasses.asdict(cfg),
        "seq_len": a.seq_len,
        "steps": a.steps,
        "warmup": a.warmup,
        "device": a.device,
        "peak_tflops": a.peak_tflops,
        "seed": a.seed,
        "hf_experts": a.hf_experts,
        "megatron_attn": a.megatron_attn,
        "megatron_optimizer": a.megatron_optimizer,
        "result": str(work / f"{impl}.result.json"),
    }
    spec_path = work / f"{impl}.spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    Path(spec["result"]).unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--spec", str(spec_path)]
    t0 = time.time()
    code, reason = _run(cmd, work / "logs" / f"{impl}.log", a.timeout)
    res = {"impl": impl}
    rp = Path(spec["result"])
    if rp.exists():
        res.update(json.loads(rp.read_text()))
    if code != 0 and res.get("status") != "failed":
        res.update(status="failed", reason=reason)
    elif res.get("status") is None:
        res.update(status="failed", reason=f"worker wrote no result ({reason or 'exit 0'})")
    res["wall_s"] = time.time() - t0
    return res


# ---------------------------------------------------------------------------------------------------
# workers (one process each)
# ---------------------------------------------------------------------------------------------------


def _timed_loop(step, steps: int, warmup: int, device, seq_len: int) -> dict[str, Any]:
    """Run step() `steps` times; median over the steps after `warmup` (each step synchronised)."""
    import torch

    times, losses = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite loss {losses[-1]} at step {i + 1}")
        if i >= warmup:
            times.append(dt)
        print(
            f"step {i + 1}/{steps} loss {losses[-1]:.4f} {dt * 1e3:.1f} ms{' (warm-up)' if i < warmup else ''}",
            flush=True,
        )
    med = median(times)
    return {
        "tokens_per_s": seq_len / med,
        "step_ms": [t * 1e3 for t in times],
        "timed_steps": len(times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def _finish(spec, device, fpt: float, out: dict[str, Any]) -> dict[str, Any]:
    from bench_common import detect_peak_tflops, device_name, peak_memory_gb

    peak = detect_peak_tflops(device, spec["peak_tflops"])
    tflops = fpt * out["tokens_per_s"] / 1e12
    out.update(
        status="ok",
        tflops_per_gpu=tflops,
        mfu=(tflops / peak) if peak else None,
        peak_tflops=peak,
        peak_mem_gb=peak_memory_gb(device),
        flops_per_token=fpt,
        device=device_name(device),
    )
    return out


def worker_hf(spec) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    from minimax_train.model.config import ModelConfig
    from minimax_train.model.flops import train_flops_per_token

    cfg = ModelConfig(**spec["cfg"])
    T, dev = spec["seq_len"], torch.device(spec["device"])
    gpu = dev.type == "cuda"
    notes = [f"transformers {transformers.__version__}"]
    torch.manual_seed(spec["seed"])
    d = cfg.to_hf_dict()
    d["output_router_logits"] = True  # train with the router aux loss, as ours and megatron do
    d["use_cache"] = False
    kw = {"attn_implementation": "sdpa"}
    experts = spec.get("hf_experts")
    if experts:
        kw["experts_implementation"] = experts

    def build(kw):
        hf_cfg = MiniMaxConfig(**d, **kw)
        with torch.device(dev):
            model = MiniMaxForCausalLM(hf_cfg)
        model.float().train()
        return model

    def run(kw):
        model = build(kw)
        impl_attn = getattr(model.config, "_attn_implementation", "?")
        impl_exp = getattr(model.config, "_experts_implementation", None)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            opt_name = "torch AdamW fused"
        except (RuntimeError, TypeError) as e:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
            opt_name = f"torch AdamW foreach (fused unavailable: {one_line(e, 80)})"
        gen = torch.Generator(device=dev).manual_seed(spec["seed"])

        def step(i):
            ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev, generator=gen)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=gpu):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.detach()

        res = _timed_loop(step, spec["steps"], spec["warmup"], dev, T)
        res["notes"] = [
            f"attn_implementation={impl_attn}",
            f"experts_implementation={impl_exp}",
            f"fp32 params{' + bf16 autocast' if gpu else ''}",
            opt_name,
            "random tokens, one document per row",
        ]
        return res

    try:
        res = run(kw)
    except Exception as e:  # noqa: BLE001
        err = one_line(e)
        if "experts_implementation" in kw or err.startswith("OOM"):
            raise
        del e
        cleanup(dev)
        # transformers' default experts path (grouped_mm) failed: what a user then does is pick eager
        notes.append(f"default experts implementation failed ({err}); retried with experts_implementation=eager")
        kw["experts_implementation"] = "eager"
        if gpu:
            torch.cuda.reset_peak_memory_stats(dev)
        res = run(kw)
    notes += res.pop("notes")
    res["notes"] = notes
    return _finish(spec, dev, train_flops_per_token(cfg, T), res)


def _megatron_cpu_shims():
    """CPU smoke only: megatron-core's RoPE and MoE code call torch.cuda.current_device() unconditionally."""
    import torch

    torch.cuda.current_device = lambda: torch.device("cpu")


def _megatron_shims() -> list[str]:
    """megatron-core 0.16.x without Transformer Engine references an undefined te_general_gemm in the router."""
    notes = []
    try:
        import megatron.core.transformer.moe.moe_utils as mu

        if not hasattr(mu, "te_general_gemm"):
            mu.te_general_gemm = None
            notes.append("shim: moe_utils.te_general_gemm = None (megatron-core 0.16 bug without TE)")
    except Exception:
        pass
    return notes


def _sdpa_core_attention():
    """megatron's DotProductAttention with the score/softmax/context computed by torch SDPA (flash on GPU).

    Same inputs and output layout: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn]; causal."""
    import torch.nn.functional as F
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPADotProductAttention(DotProductAttention):
        def forward(
            self,
            query,
            key,
            value,
            attention_mask=None,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
            **kwargs,
        ):
            assert packed_seq_params is None and attention_bias is None
            sq, b, nq, hn = query.shape
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            if k.shape[1] != nq:
                try:
                    o = F.scaled_dot_product_attention(
                        q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=True
                    )
                except (RuntimeError, TypeError):
                    rep = nq // k.shape[1]
                    o = F.scaled_dot_product_attention(
                        q,
                        k.repeat_interleave(rep, 1),
                        v.repeat_interleave(rep, 1),
                        is_causal=True,
                        scale=self.softmax_scale,
                    )
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            return o.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)

    return SDPADotProductAttention


def worker_megatron(spec) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from minimax_train.model.config import ModelConfig
    from minimax_train.model.flops import train_flops_per_token

    cfg = ModelConfig(**spec["cfg"])
    T, dev = spec["seq_len"], torch.device(spec["device"])
    if dev.type == "cuda" and dev.index is None:  # set_device and NCCL device_id need an index
        dev = torch.device("cuda", torch.cuda.current_device())
    gpu = dev.type == "cuda"
    notes = []
    if not gpu:
        _megatron_cpu_shims()
        notes.append("CPU smoke: torch.cuda.current_device mapped to cpu (megatron hard-codes CUDA in RoPE)")
    import megatron.core
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    notes.insert(0, f"megatron-core {getattr(megatron.core, '__version__', '?')}")
    notes += _megatron_shims()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if gpu:
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    torch.manual_seed(spec["seed"])
    if gpu:
        tensor_parallel.model_parallel_cuda_manual_seed(spec["seed"])

    try:
        import grouped_gemm  # noqa: F401  (nv-grouped-gemm: megatron's GroupedMLP without TE)

        grouped = True
    except ImportError:
        grouped = False
    dtype = torch.bfloat16 if gpu else torch.float32
    tc = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        moe_ffn_hidden_size=cfg.intermediate_size,
        num_moe_experts=cfg.num_local_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_aux_loss_coeff=cfg.router_aux_loss_coef,
        moe_router_load_balancing_type="aux_loss",
        moe_grouped_gemm=grouped,
        moe_token_dispatcher_type="alltoall" if gpu else "allgather",
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=gpu,
        params_dtype=dtype,
        use_cpu_initialization=not gpu,
        init_method_std=cfg.initializer_range,
    )
    config = TransformerConfig(**tc)
    spec_layer = get_gpt_layer_local_spec(
        num_experts=cfg.num_local_experts, moe_grouped_gemm=grouped, normalization="RMSNorm"
    )
    if spec["megatron_attn"] == "sdpa":
        spec_layer.submodules.self_attention.submodules.core_attention = _sdpa_core_attention()
        notes.append("core attention: torch SDPA causal (flash) in place of TE's fused attention (no TE)")
    else:
        notes.append("core attention: megatron's unfused DotProductAttention")

    def build_model():
        m = GPTModel(
            config=config,
            transformer_layer_spec=spec_layer,
            vocab_size=cfg.vocab_size,
            max_sequence_length=T,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=cfg.effective_rotary_dim / cfg.head_dim,
            rotary_base=int(cfg.rope_theta),
        )
        return m.cuda(dev) if gpu else m

    model = build_model()
    experts_cls = type(model.decoder.layers[0].mlp.experts).__name__
    notes.append(
        f"experts: {experts_cls} ({'nv-grouped-gemm' if grouped else 'no grouped_gemm package'}), "
        f"dispatcher {tc['moe_token_dispatcher_type']}, RMSNorm pre-norm, SwiGLU, no bias, RoPE, "
        f"{'bf16 params' if gpu else 'fp32'}"
    )

    step_fn, opt_note = None, None
    if spec["megatron_optimizer"] in ("auto", "megatron") and gpu:

        def build_megatron():
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

            ddp = DistributedDataParallel(
                config=config,
                module=model,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
                ),
            )
            ocfg = OptimizerConfig(
                optimizer="adam",
                lr=1e-4,
                weight_decay=0.1,
                adam_beta1=0.9,
                adam_beta2=0.95,
                bf16=True,
                use_distributed_optimizer=False,
                clip_grad=1.0,
            )
            opt = get_megatron_optimizer(ocfg, [ddp])
            return ddp, opt

        built, err = guarded(build_megatron, dev)
        if built is None:  # DDP may have hooked the parameters: start again from a fresh model
            model = None
            cleanup(dev)
            model = build_model()
        if built is not None:
            ddp, mopt = built

            def step_fn(ids, pos):
                ddp.zero_grad_buffer()
                mopt.zero_grad()
                loss = ddp(ids, pos, None, labels=ids).float().mean()
                loss.backward()
                ddp.finish_grad_sync()
                mopt.step()
                return loss.detach()

            opt_note = (
                "optimizer: megatron DDP (fp32 grad buffer) + get_megatron_optimizer "
                f"({type(mopt).__name__}: bf16 params, fp32 main params, torch Adam without apex/TE)"
            )
        elif spec["megatron_optimizer"] == "megatron":
            raise RuntimeError(f"megatron optimizer: {err}")
        else:
            notes.append(f"megatron optimizer unavailable ({err}); torch AdamW instead")
    if step_fn is None:
        params = [p for p in model.parameters() if p.requires_grad]
        master = [p.detach().float().clone().requires_grad_() for p in params] if gpu else params
        try:
            opt = torch.optim.AdamW(master, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(master, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

        def step_fn(ids, pos):
            loss = model(ids, pos, None, labels=ids).float().mean()
            loss.backward()
            if gpu:
                for p, m in zip(params, master):
                    m.grad = p.grad.float() if p.grad is not None else None
                    p.grad = None
            torch.nn.utils.clip_grad_norm_(master, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gpu:
                torch._foreach_copy_(params, [m.detach() for m in master])
            return loss.detach()

        opt_note = (
            "optimizer: torch AdamW over fp32 master copies of the bf16 params (megatron's optimizer not used)"
            if gpu
            else "optimizer: torch AdamW (fp32; megatron's optimizer needs CUDA)"
        )
    notes.append(opt_note)

    gen = torch.Generator(device=dev).manual_seed(spec["seed"])
    pos = torch.arange(T, device=dev)[None]

    def step(i):
        ids = torch.randint(0, cfg.vocab_size, (1, T), device=dev, generator=gen)
        return step_fn(ids, pos)

    res = _timed_loop(step, spec["steps"], spec["warmup"], dev, T)
    notes.append("FLOPs counted with every layer softmax (the model megatron trains)")
    res["notes"] = notes
    out = _finish(spec, dev, train_flops_per_token(all_softmax(cfg), T), res)
    try:
        dist.destroy_process_group()
    except Exception:
        pass
    return out


def worker_main(a) -> int:
    spec = json.loads(Path(a.spec).read_text())
    result_path = Path(spec["result"])
    fn = {"hf": worker_hf, "megatron": worker_megatron}[a.worker]
    res, err = guarded(lambda: fn(spec), None, verbose=True)
    if res is None:
        res = {"impl": a.worker, "status": "failed", "reason": err}
        print(f"{a.worker} failed: {err}", flush=True)
    res["impl"] = a.worker
    write_json(str(result_path), res)
    return 0 if res["status"] == "ok" else 1


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------


def _gpu_name() -> Optional[str]:
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name",
                "--format=csv,noheader",
                "-i",
                os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def report(a, cfg, results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    ours = next((r for r in results if r["impl"] == "ours" and r.get("status") == "ok"), None)
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        ratio = (ours["tokens_per_s"] / r["tokens_per_s"]) if (ok and ours and r.get("tokens_per_s")) else None
        label = {
            "ours": "ours (minimax_train)",
            "hf": "transformers eager",
            "megatron": "megatron-core GPT-MoE (all softmax)",
        }[r["impl"]]
        rows.append(
            [
                label,
                r.get("tokens_per_s") if ok else None,
                r.get("tflops_per_gpu") if ok else None,
                fmt_pct(r.get("mfu")) if ok else "-",
                r.get("peak_mem_gb") if ok else None,
                (f"{ratio:.2f}x" if ratio else "-"),
                "ok" if ok else "FAILED",
            ]
        )
    lines = [
        f"## Training throughput: {meta['preset']} at {a.seq_len} tokens/row, 1 row/step, "
        f"{a.steps - a.warmup} timed steps after {a.warmup} warm-up",
        f"device: {meta.get('device') or a.device} | peak {fmt(meta.get('peak_tflops'))} TFLOP/s bf16 | "
        f"model {meta['params_total'] / 1e9:.3g}B params ({meta['params_active'] / 1e9:.3g}B active/token "
        f"without embeddings) | FLOPs/token: hybrid {meta['flops_per_token'] / 1e9:.4g} G, all-softmax "
        f"{meta['flops_per_token_all_softmax'] / 1e9:.4g} G (train, model FLOPs)",
        f"layers {cfg.num_hidden_layers} ({meta['layer_mix']}), hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads}x{cfg.head_dim} (kv {cfg.num_key_value_heads}), experts "
        f"{cfg.num_local_experts} of {cfg.intermediate_size} top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}",
        "",
        markdown_table(["impl", "tokens/s", "TFLOP/s/GPU", "MFU", "peak mem GB", "ratio ours/impl", "status"], rows),
        "",
        "notes:",
    ]
    for r in results:
        if r.get("status") != "ok":
            lines.append(f"- {r['impl']}: FAILED: {r.get('reason')}")
        for n in r.get("notes", []):
            lines.append(f"- {r['impl']}: {n}")
        if r.get("status") == "ok":
            lines.append(
                f"- {r['impl']}: loss {r.get('loss_first', float('nan')):.3f} -> "
                f"{r.get('loss_last', float('nan')):.3f}, step ms median "
                f"{fmt(median(r.get('step_ms') or []))} over {r.get('timed_steps')} steps, "
                f"{fmt(r.get('wall_s'))} s wall incl. start-up"
            )
    if meta.get("peak_tflops") is None:
        lines.append("- MFU not computed: unknown peak for this device; pass --peak-tflops")
    lines.append(
        "- ratio ours/impl = tokens/s of ours / tokens/s of impl (same tokens per step; megatron trains "
        "an all-softmax model, so its FLOPs differ: compare MFU there)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)
    from minimax_train.model.config import FULL
    from minimax_train.model.flops import count_params, train_flops_per_token

    base, over, hydra_model = model_overrides(a)
    cfg = build_model_config(base, over)
    if cfg.max_position_embeddings < a.seq_len:
        raise SystemExit(f"--seq-len {a.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(a.workdir) if a.workdir else REPO / "outputs" / "bench_train" / f"{a.preset}-{a.seq_len}-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    pc = count_params(cfg)
    kinds = cfg.resolved_layer_types()
    meta = {
        "preset": a.preset,
        "base_conf": base,
        "overrides": over,
        "model": dataclasses.asdict(cfg),
        "seq_len": a.seq_len,
        "steps": a.steps,
        "warmup": a.warmup,
        "device_kind": a.device,
        "device": _gpu_name() if a.device == "cuda" else "cpu",
        "params_total": pc.total,
        "params_active": pc.active,
        "flops_per_token": train_flops_per_token(cfg, a.seq_len),
        "flops_per_token_all_softmax": train_flops_per_token(all_softmax(cfg), a.seq_len),
        "layer_mix": f"{kinds.count(FULL)} softmax, {len(kinds) - kinds.count(FULL)} lightning",
        "workdir": str(work),
        "command": reproduce_command(),
    }
    print(
        f"bench_train: {a.preset} ({pc.total / 1e9:.3g}B params), seq {a.seq_len}, {a.steps} steps "
        f"({a.warmup} warm-up), impls {','.join(a.impl_list)}, device {meta['device']}; logs in {work}/logs",
        flush=True,
    )
    results = []
    for impl in a.impl_list:
        print(f"[{impl}] running ...", flush=True)
        try:
            if impl == "ours":
                r, err = guarded(lambda: run_ours(a, base, hydra_model, cfg, work))
            else:
                r, err = guarded(lambda: run_worker(a, impl, cfg, work))
        except KeyboardInterrupt:  # e.g. `timeout -s INT`: the child's group is ended; report what finished
            results.append({"impl": impl, "status": "failed", "reason": "interrupted"})
            meta["interrupted"] = True
            print(f"[{impl}] interrupted", flush=True)
            break
        if r is None:
            r = {"impl": impl, "status": "failed", "reason": err}
        results.append(r)
        if r.get("status") == "ok":
            print(
                f"[{impl}] {r['tokens_per_s']:.1f} tokens/s, {fmt(r['tflops_per_gpu'])} TFLOP/s, "
                f"MFU {fmt_pct(r.get('mfu'))}, {fmt(r['peak_mem_gb'])} GB ({r.get('wall_s', 0):.0f} s)",
                flush=True,
            )
        else:
            print(f"[{impl}] FAILED: {r.get('reason')}", flush=True)
    peaks = [r.get("peak_tflops") for r in results if r.get("peak_tflops")]
    meta["peak_tflops"] = a.peak_tflops or (peaks[0] if peaks else None)
    devs = [r.get("device") for r in results if r.get("device")]
    if devs and a.device == "cuda":
        meta["device"] = devs[0]
    text = report(a, cfg, results, meta)
    print("\n" + text)
    print(f"\nreproduce: {meta['command']}")
    write_json(a.out, {"meta": meta, "results": results})
    return 0 if any(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
