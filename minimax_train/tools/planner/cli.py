"""tools/plan_layout.py: the planner's command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from minimax_train.parallel.pipeline_layout import SCHEDULES
from minimax_train.tools.planner.hardware import GPU_KINDS, gpu_spec
from minimax_train.tools.planner.inputs import Assumptions, PlanError, Workload
from minimax_train.tools.planner.memory import GiB, capacity_bytes
from minimax_train.tools.planner.presets import load_model_config
from minimax_train.tools.planner.report import format_result, result_to_dict
from minimax_train.tools.planner.search import AC_MODES, GRAD_SYNCS, Constraints, plan

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_count(text: str, what: str) -> int:
    """'4096', '1M' (= 1048576), '16m', '2K', '1.5M' -> int (binary suffixes, as context lengths are quoted)."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    try:
        if s and s[-1] in _SUFFIX:
            v = float(s[:-1]) * _SUFFIX[s[-1]]
        else:
            v = float(s)
    except ValueError:
        raise PlanError(f"{what}: {text!r} is not a number (e.g. 4096, 128K, 1M)") from None
    if v != int(v) or v < 1:
        raise PlanError(f"{what}: {text!r} must be a positive whole number")
    return int(v)


def _csv(text: Optional[str], allowed, what: str) -> Optional[tuple]:
    if text is None:
        return None
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise PlanError(f"{what}: unknown {', '.join(bad) or repr(text)}; use one or more of {', '.join(allowed)}")
    return vals


def build_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="tools/plan_layout.py",
        description="Enumerate the parallel layouts (tp, cp, ep, etp, dp, engine/stage, gradient sync, activation "
        "checkpointing, micro-batch) that can train a model on N GPUs, and print for the best few the "
        "memory per GPU (parameters, gradients, optimizer state, activations, communication buffers) and "
        "the estimated step time and MFU (FLOPs from minimax_train.model.flops, as the trainer's MFU). "
        "The accounting is documented in minimax_train/tools/planner/memory.py and step_time.py.",
        epilog="examples:\n"
        "  tools/plan_layout.py --model minimax_text_01 --seq-len 1M --global-batch 16M --gpus 256 --gpu h100\n"
        "  tools/plan_layout.py --model minimax_1b --seq-len 8K --global-batch 1M --gpus 8 --tp 1 --ac none\n"
        "  tools/plan_layout.py --validate-cpu     # estimate vs measured peak memory of CPU training steps\n"
        "Counts accept K/M/G suffixes in powers of two (1M = 1048576).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model",
        default="minimax_text_01",
        help="preset in conf/model (%(default)s; also tiny, minimax_1b), a model .yaml or a config.json",
    )
    ap.add_argument("--seq-len", default="1M", help="tokens per packed row (default %(default)s)")
    ap.add_argument("--global-batch", default="16M", help="tokens per optimizer step (default %(default)s)")
    ap.add_argument("--gpus", default="256", help="number of GPUs (default %(default)s)")
    g = ap.add_argument_group("hardware")
    g.add_argument("--gpu", default="h100", help=f"{', '.join(GPU_KINDS)} or custom (default %(default)s)")
    g.add_argument("--gpu-mem-gib", type=float, help="memory per GPU in GiB")
    g.add_argument("--peak-tflops", type=float, help="dense bf16 peak TFLOP/s per GPU")
    g.add_argument("--intra-gbps", type=float, help="intra-node bandwidth per GPU and direction, GB/s (NVLink)")
    g.add_argument("--inter-gbps", type=float, help="inter-node bandwidth per GPU and direction, GB/s (IB)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 8)")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    g.add_argument(
        "--kernels",
        default="gpu",
        choices=("gpu", "reference"),
        help="gpu: fla/flash/grouped GEMM; reference: the CPU torch kernels",
    )
    g.add_argument("--optimizer", default="fused", choices=("fused", "foreach"))
    g.add_argument("--loss-chunk-tokens", type=int, default=8192, help="the trainer's train.loss_chunk_tokens")
    g.add_argument("--moe-chunk-tokens", type=int, default=0, help="the trainer's train.moe_chunk_tokens")
    c = ap.add_argument_group("fix part of the layout (default: enumerate)")
    for k in ("tp", "cp", "ep", "etp"):
        c.add_argument(f"--{k}", type=int)
    c.add_argument("--engine", default="all", help="fsdp2, deepspeed or all (default %(default)s)")
    c.add_argument("--zero-stage", help="deepspeed stages to consider, e.g. 1,2,3")
    c.add_argument("--ac", help="activation checkpointing modes, e.g. full or none,selective")
    c.add_argument(
        "--grad-sync",
        default="step,micro",
        help="fsdp2 gradient sync with accumulation (the trainer's parallel.grad_sync): step (unsharded fp32 "
        "gradients accumulate, one reduce-scatter), micro (a reduce-scatter after every micro-batch) "
        "or both (default)",
    )
    c.add_argument("--no-offload", action="store_true", help="skip deepspeed optimizer-offload layouts")
    c.add_argument(
        "--pp",
        default="1",
        help="pipeline stages: a number, or auto to enumerate every divisor of the GPUs up to the layers "
        "(default %(default)s)",
    )
    c.add_argument(
        "--pp-schedule",
        default="1f1b",
        help="pipeline schedules to consider when pp > 1, e.g. 1f1b,interleaved_1f1b,zbv (default %(default)s)",
    )
    c.add_argument("--micro-batch", type=int, help="rows per micro-batch")
    c.add_argument("--max-tp", type=int, help="largest tp to enumerate (default: GPUs per node)")
    s = ap.add_argument_group("assumptions")
    d = Assumptions()
    s.add_argument(
        "--efficiency", type=float, default=d.compute_efficiency, help="achieved / peak FLOP/s (%(default)s)"
    )
    s.add_argument("--margin", type=float, default=d.margin, help="memory kept free (%(default)s)")
    s.add_argument("--reserve-gib", type=float, default=d.reserve_gib, help="CUDA context + NCCL (%(default)s GiB)")
    s.add_argument(
        "--moe-imbalance", type=float, default=d.moe_imbalance, help="busiest / mean expert rows (%(default)s)"
    )
    s.add_argument("--ep-overlap", type=float, default=d.ep_overlap, help="hidden share of all-to-all (%(default)s)")
    ap.add_argument("--top", type=int, default=5, help="plans to print (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument(
        "--validate-cpu",
        action="store_true",
        help="measure peak memory of CPU training steps in 3 layouts and compare with the estimate",
    )
    return ap


def _workload_from_args(args) -> Workload:
    gpus = parse_count(args.gpus, "--gpus")
    gpu = gpu_spec(
        args.gpu,
        memory_gib=args.gpu_mem_gib,
        peak_tflops=args.peak_tflops,
        intra_gbps=args.intra_gbps,
        inter_gbps=args.inter_gbps,
        gpus_per_node=args.gpus_per_node,
    )
    cfg = load_model_config(args.model)
    return Workload(
        cfg,
        seq_len=parse_count(args.seq_len, "--seq-len"),
        global_batch_tokens=parse_count(args.global_batch, "--global-batch"),
        num_gpus=gpus,
        gpu=gpu,
        precision=args.precision,
        kernels=args.kernels,
        optimizer=args.optimizer,
        loss_chunk_tokens=args.loss_chunk_tokens,
        moe_chunk_tokens=args.moe_chunk_tokens,
        model_name=Path(args.model).stem if args.model.endswith((".yaml", ".yml", ".json")) else args.model,
    )


def main(argv=None) -> int:
    import sys

    from minimax_train.errors import USER_ERRORS, report

    args = build_parser().parse_args(argv)
    try:
        if args.validate_cpu:
            from minimax_train.tools.memcheck import format_validation, validate_cpu

            rows = validate_cpu()
            print(format_validation(rows))
            return 0 if all(abs(r["error"]) <= 0.15 for r in rows) else 1
        w = _workload_from_args(args)
        if (
            not 0 < args.efficiency <= 1
            or not 0 <= args.margin < 1
            or args.reserve_gib < 0
            or args.moe_imbalance < 1
            or not 0 <= args.ep_overlap <= 1
            or args.top < 1
        ):
            raise PlanError(
                "assumptions out of range: 0 < --efficiency <= 1, 0 <= --margin < 1, --reserve-gib >= 0, "
                "--moe-imbalance >= 1, 0 <= --ep-overlap <= 1, --top >= 1"
            )
        a = Assumptions(
            compute_efficiency=args.efficiency,
            margin=args.margin,
            reserve_gib=args.reserve_gib,
            moe_imbalance=args.moe_imbalance,
            ep_overlap=args.ep_overlap,
        )
        engines = (
            ("fsdp2", "deepspeed") if args.engine == "all" else _csv(args.engine, ("fsdp2", "deepspeed"), "--engine")
        )
        stages = None
        if args.zero_stage:
            stages = tuple(int(x) for x in _csv(args.zero_stage, ("1", "2", "3"), "--zero-stage"))
        c = Constraints(
            tp=args.tp,
            cp=args.cp,
            ep=args.ep,
            etp=args.etp,
            engines=engines,
            zero_stages=stages,
            ac=_csv(args.ac, AC_MODES, "--ac"),
            grad_sync=_csv(args.grad_sync, GRAD_SYNCS, "--grad-sync"),
            micro_batch_rows=args.micro_batch,
            max_tp=args.max_tp,
            offload=(False,) if args.no_offload else (False, True),
            pp=None if args.pp == "auto" else parse_count(args.pp, "--pp"),
            pp_schedules=_csv(args.pp_schedule, tuple(SCHEDULES), "--pp-schedule"),
        )
        r = plan(w, a, c, top=args.top)
    except USER_ERRORS as e:
        return report("plan_layout", e)
    if args.json:
        print(json.dumps(result_to_dict(r), indent=1))
    else:
        print(format_result(r))
    if not r.plans:
        print(
            f"plan_layout: no layout fits in {capacity_bytes(w, a) / GiB:.1f} GiB per GPU: use more GPUs, a smaller "
            f"micro-batch or sequence, or a GPU with more memory",
            file=sys.stderr,
        )
        return 1
    return 0
