"""Training throughput benchmark: tokens/s, TFLOP/s per GPU, MFU and peak memory of
  (a) ours      -- the real trainer (`python -m minimax_train.train ...`) as a subprocess, read from its metrics.jsonl;
  (b) hf        -- transformers' MiniMaxForCausalLM trained eagerly on random tokens [1, seq_len]: fp32 params,
                   bf16 autocast, torch.optim.AdamW(fused=True), sdpa attention (how a user trains it);
  (c) megatron  -- megatron-core GPTModel with the same widths, experts and top-k but softmax attention in every
                   layer (it has no lightning attention), local (non-Transformer-Engine) layer spec;
  (d) titan     -- TorchTitan 0.3.0's Qwen3 MoE model (torchtitan.models.qwen3) at the same widths, experts and
                   top-k, softmax attention in every layer as megatron, built as its trainer does on one GPU: on meta,
                   parallelize_qwen3 (FSDP2 over one rank: fp32 params, bf16 compute by its MixedPrecisionPolicy),
                   init_weights; its grouped-GEMM experts (torch._grouped_mm) and aux-loss-free load balancing
                   (expert bias, optimizer pre-hook); no activation checkpointing, no torch.compile of the model;
                   --titan-attn: flex (its default, compiled FlexAttention, causal block mask), varlen (FlashAttention
                   varlen, torch >= 2.12) or sdpa (causal SDPA); without Qwen3's QK norm, embeddings tied as ours.
                   It is built against torch >= 2.12; on older torch the worker supplies the one name it imports
                   that is missing (fsdp.DataParallelMeshDims, used only with several ranks) and says so. Install
                   (its other declared deps are ours or unused here):  pip install --no-deps torchtitan==0.3.0
                   spmd_types==0.2.3 torch_checkpointing torchdata tyro docstring-parser typeguard tomli-w
side by side on the same card, one process per implementation (clean memory, one failure does not stop the
others), all with AdamW at a constant lr 1e-4. Every implementation runs --warmup untimed steps, then
--steps - --warmup timed steps; numbers are medians over the timed steps.

    python tools/bench_train.py --preset minimax_1b --seq-len 8192 --out bt_1b_8k.json
    python tools/bench_train.py --preset minimax_slice --seq-len 8192            # MiniMax widths, 2 layers
    python tools/bench_train.py --device cpu --preset tiny --seq-len 128 --steps 3 --warmup 1 --peak-tflops 1

FLOPs: minimax_train.model.flops.train_flops_per_token(cfg, seq_len) -- the function the trainer's own metric
uses -- for ours and transformers (the same hybrid model), and for megatron and titan the same function on the
config with every layer softmax ("full_attention"), i.e. the FLOPs of the model they actually train. Model FLOPs:
activation recomputation is not counted. MFU = TFLOP/s per GPU / peak (bf16 dense: H100 SXM and H200 989,
from minimax_train/hardware.py; --peak-tflops overrides). Peak memory: torch.cuda.max_memory_allocated (peak RSS on
CPU). The ratio column is ours' tokens/s over the implementation's tokens/s.

Presets: the conf/model names (tiny, minimax_1b, minimax_text_01) and minimax_slice = minimax_text_01's widths
(hidden 6144, 64 heads x 128, 8 kv heads, experts of 9216, top-2) with --slice-layers layers (default 2: one
lightning, one softmax), vocab 32768 and --slice-experts local experts (default 4: MiniMax's 32 experts under
EP=8; each expert then sees tokens*2/4 rows, as an EP=8 rank does; 32 experts of 9216 are 5.4B parameters
per layer and do not fit one GPU with AdamW). --override key=value changes any ModelConfig field for all
implementations (and is passed to the trainer as model.key=value).

The baselines run in tools/bench_train_workers.py, the trainer through tools/bench_runs.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, fmt, fmt_pct, guarded, markdown_table, median, reproduce_command, write_json  # noqa: E402
from bench_runs import (  # noqa: E402
    all_softmax,
    bench_overrides,
    build_model_config,
    corpus_overrides,
    parse_model_overrides,
    run_logged,
    run_trainer,
    single_document_corpus,
)

IMPLS = ("ours", "hf", "megatron", "titan")
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
    p.add_argument(
        "--rows",
        type=int,
        default=1,
        help="rows of --seq-len tokens per optimiser step, one per micro-batch (accumulation)",
    )
    p.add_argument("--steps", type=int, default=None, help="total steps per implementation (default 10; CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; CPU 1)")
    p.add_argument("--impls", default="ours,hf,megatron", help=f"comma-separated, of {','.join(IMPLS)}")
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
    p.add_argument(
        "--titan-attn",
        default="auto",
        choices=("auto", "flex", "varlen", "sdpa"),
        help="titan's attention: flex (TorchTitan's default for its language models: compiled FlexAttention with "
        "a causal document block mask), varlen (torch varlen_attn, FlashAttention; needs torch >= 2.12), sdpa "
        "(its ScaledDotProductAttention, causal; its language-model configs refuse it); auto: flex on GPU, sdpa on "
        "CPU (flex has no backward there)",
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
    extra, extra_hydra = parse_model_overrides(a.override)
    return base, {**over, **extra}, hydra + extra_hydra


# ---------------------------------------------------------------------------------------------------
# runs (one process each)
# ---------------------------------------------------------------------------------------------------


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
        f"train.global_batch_size={a.rows}",
        "train.micro_batch_size=1",
        f"train.activation_checkpointing={a.ac}",
        f"train.seed={a.seed}",
        f"hydra.run.dir={run_dir}",
    ]
    if a.peak_tflops is not None:
        cmd.append(f"logging.peak_tflops={a.peak_tflops}")
    if a.ours_data == "single":
        cmd += corpus_overrides(single_document_corpus((a.steps + 1) * a.rows * a.seq_len))
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
        "titan_attn": a.titan_attn,
        "result": str(work / f"{impl}.result.json"),
    }
    spec_path = work / f"{impl}.spec.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2))
    Path(spec["result"]).unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--spec", str(spec_path)]
    t0 = time.time()
    code, reason = run_logged(cmd, work / "logs" / f"{impl}.log", a.timeout)
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
            "titan": "torchtitan Qwen3-MoE (all softmax)",
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
        "- ratio ours/impl = tokens/s of ours / tokens/s of impl (same tokens per step; megatron and titan "
        "train an all-softmax model, so their FLOPs differ: compare MFU there)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        from bench_train_workers import worker_main

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
