#!/usr/bin/env python
"""Layouts on one node: the real trainer under torchrun for each layout, side by side.

For each layout it prints tokens/s, tokens/s per GPU, the scaling efficiency against the first 1-GPU
layout (tokens/s per GPU over the 1-GPU run's), MFU, the measured peak memory of the busiest rank
(torch.cuda.max_memory_allocated, the trainer's max_memory_gb) and the layout planner's estimate for the
same job (minimax_train.tools.planner.estimate_memory) with its error, plus the first and last losses.

    python tools/bench_layouts.py --preset minimax_1b --seq-len 8192 \\
        --layout 1gpu:1: --layout tp2:2:tp=2 --layout tp4:4:tp=4 --layout dp4:4: --layout tp2dp2:4:tp=2

A layout is NAME:GPUS:SETTINGS with SETTINGS comma-separated planner layout fields (tp, cp, ep, etp, ac,
engine=fsdp2|deepspeed, zero=1|2|3) and lasp=plus|serial (context-parallel lightning layers); sequence
parallelism is on whenever tp > 1 (as the planner assumes)
and the Hydra overrides come from planner.Layout.overrides(), so the run and the estimate describe the
same thing. Every run uses the same global batch (--rows rows of --seq-len tokens), micro-batch
--micro rows, --steps optimiser steps, of which the first --warmup are not timed. CPU smoke mode:
--device cpu (gloo, fp32; memory is then peak RSS, not comparable with the planner's tensor bytes)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import REPO, fmt, fmt_pct, markdown_table, median, reproduce_command, write_json  # noqa: E402
from bench_runs import (  # noqa: E402
    bench_overrides,
    build_model_config,
    corpus_overrides,
    parse_model_overrides,
    run_trainer,
    single_document_corpus,
)

from minimax_train.tools.spawn import free_port  # noqa: E402

DEFAULT_LAYOUTS = ("1gpu:1:", "tp2:2:tp=2", "tp4:4:tp=4", "dp4:4:", "tp2dp2:4:tp=2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="minimax_1b", help="conf/model name")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="ModelConfig field")
    p.add_argument("--layout", action="append", default=None, metavar="NAME:GPUS:SETTINGS")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--rows", type=int, default=4, help="global batch in rows")
    p.add_argument("--micro", type=int, default=1, help="micro-batch rows")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ac", default="none", choices=("none", "selective", "full"))
    p.add_argument("--moe-chunk", type=int, default=0, help="train.moe_chunk_tokens (also in the planner's estimate)")
    p.add_argument("--loss-chunk", type=int, default=8192, help="train.loss_chunk_tokens (also in the estimate)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--gpu", default="h100", help="planner GPU kind (memory capacity only)")
    p.add_argument("--trainer-arg", action="append", default=[], metavar="HYDRA_OVERRIDE")
    p.add_argument("--timeout", type=float, default=400, help="seconds per layout")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="JSON results")
    return p.parse_args(argv)


def parse_layout(text: str, default_ac: str):
    """NAME:GPUS:SETTINGS -> (name, world, planner Layout kwargs)."""
    try:
        name, world, settings = text.split(":", 2)
        world = int(world)
    except ValueError:
        raise SystemExit(f"--layout {text!r}: expected NAME:GPUS:SETTINGS, e.g. tp2:2:tp=2") from None
    kw: dict[str, Any] = {
        "tp": 1,
        "cp": 1,
        "ep": 1,
        "etp": None,
        "ac": default_ac,
        "engine": "fsdp2",
        "zero": 3,
        "lasp": "plus",
    }
    for item in filter(None, settings.split(",")):
        k, _, v = item.partition("=")
        if k not in kw or not v:
            raise SystemExit(
                f"--layout {text!r}: unknown setting {item!r}; use tp, cp, ep, etp, ac, engine, zero, lasp"
            )
        kw[k] = v if k in ("ac", "engine", "lasp") else int(v)
    if kw["etp"] is None:
        kw["etp"] = kw["tp"] if kw["ep"] == 1 else 1  # the trainer's default: experts follow tp when ep == 1
    if world % (kw["tp"] * kw["cp"]) or world % (kw["ep"] * kw["etp"]):
        raise SystemExit(f"--layout {text!r}: {world} GPUs do not divide into tp*cp and ep*etp")
    return name, world, kw


def planner_layout(kw: dict, world: int, rows: int, micro: int):
    from minimax_train.tools.planner import Layout

    dp = world // (kw["tp"] * kw["cp"])
    if rows % (dp * micro):
        raise SystemExit(f"--rows {rows} is not a multiple of dp ({dp}) x --micro ({micro})")
    return Layout(
        tp=kw["tp"],
        cp=kw["cp"],
        dp=dp,
        ep=kw["ep"],
        etp=kw["etp"],
        edp=world // (kw["ep"] * kw["etp"]),
        engine=kw["engine"],
        zero_stage=kw["zero"] if kw["engine"] == "deepspeed" else 3,
        grad_sync="step",
        ac=kw["ac"],
        micro_batch_rows=micro,
        accum=rows // (dp * micro),
    )


def run_layout(
    a,
    name: str,
    world: int,
    lay,
    model_hydra: list[str],
    corpus: Path,
    work: Path,
    lasp: str = "plus",
    devices: str | None = None,
) -> dict[str, Any]:
    """One trainer run under torchrun; `devices` (e.g. "1") restricts it to those GPUs (CUDA_VISIBLE_DEVICES)."""
    run_dir = work / name
    cmd = ["env", f"CUDA_VISIBLE_DEVICES={devices}"] if devices else []
    cmd += [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={world}",
        f"--master-port={free_port()}",
        "-m",
        "minimax_train.train",
        f"model={a.preset}",
        *model_hydra,
        *bench_overrides(a.device, a.seq_len, a.steps),
        *corpus_overrides(corpus),
        f"train.global_batch_size={a.rows}",
        f"train.micro_batch_size={a.micro}",
        f"train.moe_chunk_tokens={a.moe_chunk}",
        f"train.loss_chunk_tokens={a.loss_chunk}",
        *lay.overrides().split(),
        f"parallel.lasp={lasp}",
        *a.trainer_arg,
        f"hydra.run.dir={run_dir}",
    ]
    res: dict[str, Any] = {
        "name": name,
        "gpus": world,
        "layout": lay.short(),
        "command": " ".join(shlex.quote(c) for c in cmd),
    }
    recs, timed = run_trainer(cmd, run_dir, work / "logs" / f"{name}.log", a.timeout, a.warmup, res)
    if res.get("status") == "failed":
        return res
    tps = median([r["tokens_per_s"] for r in timed])
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    res.update(
        status="ok",
        tokens_per_s=tps,
        tokens_per_s_per_gpu=tps / world,
        mfu=median(mfus) if mfus else None,
        peak_mem_gb=max(r["max_memory_gb"] for r in recs),
        step_s=median([r["step_time_s"] for r in timed]),
        losses=[r["loss"] for r in recs],
        grad_norms=[r["grad_norm"] for r in recs],
    )
    return res


def main(argv=None) -> int:
    a = parse_args(argv)
    from minimax_train.model.flops import count_params
    from minimax_train.tools.planner import Workload, estimate_memory, gpu_spec

    over, model_hydra = parse_model_overrides(a.override)
    cfg = build_model_config(a.preset, over)
    layouts = [parse_layout(t, a.ac) for t in (a.layout or DEFAULT_LAYOUTS)]
    work = Path(a.workdir or REPO / "outputs" / "bench_layouts" / time.strftime("%Y%m%d-%H%M%S"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = single_document_corpus((a.steps + 1) * a.rows * a.seq_len)
    n = count_params(cfg)
    print(
        f"# bench_layouts: {a.preset} ({n.total / 1e9:.2f}B params, {n.active / 1e9:.2f}B active), seq {a.seq_len}, "
        f"global batch {a.rows} rows, micro {a.micro}, steps {a.steps} (timed after {a.warmup}), ac {a.ac}",
        flush=True,
    )
    results = []
    for name, world, kw in layouts:
        lay = planner_layout(kw, world, a.rows, a.micro)
        w = Workload(
            cfg,
            seq_len=a.seq_len,
            global_batch_tokens=a.rows * a.seq_len,
            num_gpus=world,
            gpu=gpu_spec(a.gpu),
            precision="bf16" if a.device == "cuda" else "fp32",
            kernels="gpu" if a.device == "cuda" else "reference",
            optimizer="fused" if a.device == "cuda" else "foreach",
            model_name=a.preset,
            loss_chunk_tokens=a.loss_chunk,
            moe_chunk_tokens=a.moe_chunk,
        )
        res = run_layout(a, name, world, lay, model_hydra, corpus, work, kw["lasp"])
        res["estimate_gb"] = estimate_memory(w, lay).total / 1e9
        if res["status"] == "ok":
            res["estimate_error"] = res["estimate_gb"] / res["peak_mem_gb"] - 1
        print(f"{name}: {res['status']} {res.get('reason', '')} ({res['wall_s']:.0f} s)", flush=True)
        results.append(res)
    base = next((r for r in results if r["gpus"] == 1 and r["status"] == "ok"), None)
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["name"], r["gpus"], "failed: " + r["reason"][:80], "", "", "", "", "", "", "", ""])
            continue
        eff = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None
        rows.append(
            [
                r["name"],
                r["gpus"],
                fmt(r["tokens_per_s"] / 1e3),
                fmt(r["tokens_per_s_per_gpu"] / 1e3),
                fmt_pct(eff),
                fmt_pct(r["mfu"]),
                fmt(r["step_s"] * 1e3),
                fmt(r["peak_mem_gb"]),
                fmt(r["estimate_gb"]),
                f"{r['estimate_error']:+.1%}",
                f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}",
            ]
        )
    print(
        markdown_table(
            [
                "layout",
                "GPUs",
                "ktok/s",
                "ktok/s/GPU",
                "scaling eff",
                "MFU",
                "step ms",
                "peak GB (measured)",
                "planner GB",
                "planner error",
                "loss first -> last",
            ],
            rows,
        )
    )
    print("\nlayouts: " + "; ".join(f"{r['name']} = {r['layout']}" for r in results))
    print(f"reproduce: {reproduce_command()}")
    write_json(a.out, {"args": vars(a), "results": results})
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
