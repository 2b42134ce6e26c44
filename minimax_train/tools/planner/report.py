"""A plan result as text (the CLI's printout) or as a JSON-ready dict."""

from __future__ import annotations

import dataclasses

from minimax_train.model.flops import count_params, train_flops_per_token
from minimax_train.tools.planner.inputs import Assumptions, Workload
from minimax_train.tools.planner.memory import GiB, capacity_bytes
from minimax_train.tools.planner.search import Plan, PlanResult


def _g(x: float) -> str:
    return f"{x / GiB:.1f}"


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_header(w: Workload, a: Assumptions) -> str:
    pc = count_params(w.model)
    g = w.gpu
    lines = [
        f"model {w.model_name or 'custom'}: {_human(pc.total)} parameters ({_human(pc.active)} active per token), "
        f"{w.model.num_hidden_layers} layers, {w.model.num_local_experts} experts top-{w.model.num_experts_per_tok}",
        f"seq_len {w.seq_len:,} tokens, global batch {w.global_batch_tokens:,} tokens ({w.rows} rows); "
        f"train FLOPs/token {train_flops_per_token(w.model, w.seq_len):.3e} (minimax_train.model.flops)",
        f"{w.num_gpus} x {g.name}: {g.memory_gib:g} GiB, {g.peak_tflops:g} TFLOP/s, intra-node {g.intra_gbps:g} GB/s, "
        f"inter-node {g.inter_gbps:g} GB/s per GPU, {g.gpus_per_node} GPUs/node; precision {w.precision}, "
        f"kernels {w.kernels}",
        f"assumed: compute efficiency {a.compute_efficiency:.0%}, usable memory ({g.memory_gib:g} - "
        f"{a.reserve_gib:g} reserve) x {1 - a.margin:.0%} = {capacity_bytes(w, a) / GiB:.1f} GiB, "
        f"MoE imbalance {a.moe_imbalance:g}, EP overlap {a.ep_overlap:.0%}",
    ]
    return "\n".join(lines)


def format_plan(i: int, p: Plan) -> str:
    L, m, t = p.layout, p.memory, p.time
    sync = (
        f", grad sync per {'step' if L.grad_sync == 'step' else 'micro-batch'}"
        if L.accum > 1 and L.zero_stage == 3
        else ""
    )
    engine = (
        "fsdp2 (ZeRO-3 style)"
        if L.engine == "fsdp2"
        else f"deepspeed ZeRO-{L.zero_stage}" + (" + optimizer offload" if L.offload else "")
    )
    x = t.exposed
    pp = ""
    if L.pp > 1:
        chunks = f", {L.vpp} chunks per rank" if L.vpp > 1 else ""
        pp = f"pp {L.pp} ({L.pp_schedule}{chunks}, bubble {t.bubble:.1%}, worst stage rank {m.detail.get('pp_rank', 0)}) x "
    lines = [
        f"#{i} {pp}tp {L.tp} (SP {'on' if L.tp > 1 else 'off'}) x cp {L.cp} x dp {L.dp} | experts: ep {L.ep} x etp {L.etp} "
        f"x edp {L.edp} | {engine}{sync} | activation checkpointing {L.ac} | micro-batch {L.micro_batch_rows} "
        f"row(s) x {L.accum} accumulation",
        f"   memory/GPU GiB: parameters {_g(m.parameters)} + gradients {_g(m.gradients)} + optimizer {_g(m.optimizer)} "
        f"+ activations {_g(m.activations)} (saved {_g(m.detail['activations_saved'])}, working "
        f"{_g(m.detail['activations_working'])}) + comm buffers {_g(m.comm_buffers)}"
        + (f" [step temp {_g(m.optimizer_step_temp)}]" if m.optimizer_step_temp else "")
        + f" = {_g(m.total)} of {_g(p.capacity)}"
        + ("" if p.fits else "  DOES NOT FIT"),
        f"   step {t.step:.2f} s = compute {t.compute:.2f} + exposed comm: tp {x['tp']:.2f}, cp {x['cp']:.2f}, "
        f"ep {x['ep']:.2f}, dp {x['dp']:.2f}"
        + (f", offload {x['offload']:.2f}" if L.offload else "")
        + (f", pp p2p {x['pp']:.2f}, pp bubble {x['pp_bubble']:.2f}" if L.pp > 1 else "")
        + f" (totals tp {t.tp:.2f}, cp {t.cp:.2f}, ep {t.ep:.2f}, dp {t.dp:.2f}); "
        f"MFU {t.mfu:.1%}, {t.tokens_per_s:,.0f} tokens/s, {t.model_tflops_per_gpu:.0f} model TFLOP/s per GPU",
        f"   overrides: {L.overrides()}",
    ]
    return "\n".join(lines)


def format_result(r: PlanResult) -> str:
    out = [
        format_header(r.workload, r.assumptions),
        f"layouts: {r.enumerated:,} valid (tp <= node size unless fixed), {r.fitting:,} fit",
        "",
    ]
    if r.plans:
        out.append(f"best {len(r.plans)} by estimated step time:")
        out += [format_plan(i + 1, p) for i, p in enumerate(r.plans)]
    else:
        out.append("NO LAYOUT FITS. Smallest memory needs:")
        out += [format_plan(i + 1, p) for i, p in enumerate(r.closest)]
    notes = []
    shown = r.plans or r.closest
    if any(p.layout.offload for p in shown):
        notes.append(
            "optimizer offload keeps fp32 master weights and Adam moments in host memory: "
            + ", ".join(
                f"#{i + 1} {p.memory.detail['host_optimizer_bytes'] / GiB:.1f} GiB per GPU"
                for i, p in enumerate(shown)
                if p.layout.offload
            )
        )
    if notes:
        out.append("")
        out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def result_to_dict(r: PlanResult) -> dict:
    def p2d(p: Plan) -> dict:
        return {
            "layout": dataclasses.asdict(p.layout),
            "fits": p.fits,
            "capacity_bytes": p.capacity,
            "memory": {
                **{
                    k: getattr(p.memory, k)
                    for k in (
                        "parameters",
                        "gradients",
                        "optimizer",
                        "activations",
                        "comm_buffers",
                        "optimizer_step_temp",
                    )
                },
                "total": p.memory.total,
                **p.memory.detail,
            },
            "time": dataclasses.asdict(p.time),
        }

    return {
        "enumerated": r.enumerated,
        "fitting": r.fitting,
        "plans": [p2d(p) for p in r.plans],
        "closest": [p2d(p) for p in r.closest],
    }
