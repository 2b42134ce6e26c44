"""The planner's time model: seconds per optimiser step of a layout, and its MFU.

Time per optimiser step (per GPU)
---------------------------------
compute = (model FLOPs + recomputation) / (peak FLOP/s * compute_efficiency); model FLOPs =
train_flops_per_token(model, seq_len) * global tokens / GPUs (the trainer's MFU numerator); recomputation
adds the forward of every layer (full) or of the attention sublayers (selective).
Communication time = bytes sent per GPU / bandwidth, the bandwidth being intra-node (NVLink) when the
group fits in one node of gpus_per_node GPUs (tp ranks are adjacent, cp ranks stride tp, ep ranks stride
etp), else inter-node (InfiniBand per GPU); all-gather / reduce-scatter / ring send (n-1)/n of the data,
all-to-all sends (n-1)/n of its rows, split between the two link kinds by where the peers are.
- TP (SP): per layer and micro-batch, all-gather of the attention input and reduce-scatter of its
  output (and the same for the MoE block when etp = tp and ep = 1), forward and backward, again when
  recomputed; the expert gate/up pairing exchange for tp=etp experts. Exposed (not overlapped).
- CP: ring attention sends K/V chunks (cp - 1) times forward, K/V + dK/dV backward, overlapped with the
  attention compute (only the excess is exposed); LASP+ all-gathers the chunk states (exposed).
- EP: dispatch + combine all-to-all of k * tokens * h * a, forward and backward (again when
  recomputed); (1 - ep_overlap) of it exposed.
- DP: fsdp2 / ZeRO-3 all-gather parameters twice per micro-batch (forward, backward) and reduce-scatter
  fp32 gradients once per step (grad_sync step) or per micro-batch; ZeRO 1/2 reduce gradients and
  all-gather updated bf16 parameters once per step (ZeRO-2 reduce-scatters per micro-batch). Overlapped
  with compute: only the excess over the compute time is exposed.
- PP (pp > 1): the schedule's bubble (planner/pipeline.py) idles bubble / (1 - bubble) of the compute; the
  stage-boundary sends (activations forward, gradients backward) are exposed; each pp rank holds 1/pp of
  the layers, so its data-parallel volume is 1/pp of the above.
step = compute + exposed communication; MFU = model FLOPs / (step * peak); ranking: step time among the
layouts that fit, then memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from minimax_train.model.config import ModelConfig
from minimax_train.model.flops import forward_flops_per_token, train_flops_per_token
from minimax_train.tools.planner.hardware import GPUSpec
from minimax_train.tools.planner.inputs import Assumptions, Layout, Workload
from minimax_train.tools.planner.shapes import ModelShapes, parameter_split


@dataclass
class StepTime:
    compute: float
    tp: float
    cp: float
    ep: float
    dp: float
    exposed: dict
    step: float
    mfu: float
    tokens_per_s: float
    model_tflops_per_gpu: float
    pp: float = 0.0  # stage-boundary p2p seconds
    bubble: float = 0.0  # the schedule's idle fraction


def _coll_time(bytes_per_gpu: float, size: int, stride: int, gpu: GPUSpec, kind: str = "ring") -> float:
    """Seconds for a collective over `size` ranks spaced `stride` apart (ranks are numbered node-major)."""
    if size <= 1 or bytes_per_gpu <= 0:
        return 0.0
    span = size * stride
    intra, inter = gpu.intra_gbps * 1e9, gpu.inter_gbps * 1e9
    if span <= gpu.gpus_per_node:
        return bytes_per_gpu / intra
    if kind == "ring":  # every ring crosses nodes: the slowest link carries all of it
        return bytes_per_gpu / inter
    local_peers = max(1, gpu.gpus_per_node // stride) if stride < gpu.gpus_per_node else 1
    frac_local = (local_peers - 1) / (size - 1)
    return max(bytes_per_gpu * frac_local / intra, bytes_per_gpu * (1 - frac_local) / inter)


def _attention_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the attention sublayers only (for selective recomputation)."""
    total = forward_flops_per_token(cfg, seq_len)
    s = ModelShapes.of(cfg)
    moe = s.L * (2.0 * s.h * s.E + s.k * 2.0 * 3 * s.h * s.I)
    head = 2.0 * s.h * s.V
    return total - moe - head


def estimate_time(w: Workload, lay: Layout, a: Optional[Assumptions] = None) -> StepTime:
    a = a or Assumptions()
    cfg, g = w.model, w.gpu
    s = w.cached("shapes", lambda: ModelShapes.of(w.model))
    N, T, G = w.num_gpus, w.seq_len, w.global_batch_tokens
    A = w.act_bytes
    peak = g.peak_tflops * 1e12
    model_flops = w.cached("train_flops", lambda: train_flops_per_token(cfg, T)) * G / N
    fwd = w.cached("fwd_flops", lambda: forward_flops_per_token(cfg, T))
    attn_fwd = w.cached("attn_fwd_flops", lambda: _attention_forward_flops(cfg, T))
    if lay.ac == "full":
        recompute = (fwd - 2.0 * s.h * s.V) * G / N
    elif lay.ac == "selective":
        recompute = attn_fwd * G / N
    else:
        recompute = 0.0
    passes = 3 if lay.ac == "full" else 2  # forward, backward (+ recomputed forward)
    mbs = lay.accum  # micro-batches per step on this rank
    t = lay.micro_batch_rows * T / lay.cp
    tp, cp, ep, etp = lay.tp, lay.cp, lay.ep, lay.etp
    moe_passes = passes
    if 0 < w.moe_chunk_tokens < t / tp:  # checkpointed MoE chunks: the experts' forward once more
        recompute += s.L * 6.0 * s.k * s.h * s.I * G / N
        moe_passes += 1
    compute = (model_flops + recompute) / (peak * a.compute_efficiency)
    I_l = s.I / etp
    # TP: AG + RS of [t, h] per block; MoE blocks too when the tp=etp experts run on gathered tokens
    tp_t = 0.0
    if tp > 1:
        etp_path = ep == 1 and etp == tp
        blocks = 2 if etp_path else 1
        vol = (tp - 1) / tp * t * s.h * A
        per_layer = passes * 2 * blocks * vol
        if etp_path:
            per_layer += passes * (tp - 1) / tp * s.k * t * 2 * I_l * A  # gate/up pairing exchange
        total = mbs * (s.L * per_layer + 2 * 2 * vol)  # + embedding / lm_head
        tp_t = _coll_time(total, tp, 1, g)
    # CP: ring K/V (softmax layers) + LASP+ state all-gather (lightning layers)
    cp_ring = cp_lasp = 0.0
    if cp > 1:
        kv_l = s.kv / tp if s.kv % tp == 0 else 1
        chunk = t * 2 * kv_l * s.d
        ring = mbs * s.n_full * (cp - 1) * chunk * (A * (passes - 1) + (A + 4))
        cp_ring = _coll_time(ring, cp, tp, g)
        lasp = mbs * s.n_lin * passes * (cp - 1) * 2 * lay.micro_batch_rows * (s.n / tp) * s.d * s.d * 4
        cp_lasp = _coll_time(lasp, cp, tp, g)
    # EP: dispatch + combine, forward and backward (and recomputed forward)
    # (under SP the dispatch group is the flattened ep x etp block of adjacent ranks, else ep ranks etp apart)
    ep_t = 0.0
    disp, stride = (ep * etp, 1) if tp > 1 else (ep, etp)
    if ep > 1:
        rows_sent = s.k * t / tp * (etp if tp > 1 else 1) * a.moe_imbalance
        vol = (disp - 1) / disp * rows_sent * s.h * A
        ep_t = _coll_time(mbs * s.L * 2 * moe_passes * vol, disp, stride, g, kind="a2a")
    # DP
    ps = w.cached(("split", tp, ep, etp), lambda: parameter_split(cfg, tp, ep, etp))
    dense, experts = ps["dense_local"] / lay.pp, ps["experts_local"] / lay.pp
    dpc, edp = lay.dp * lay.cp, lay.edp
    st = lay.zero_stage
    if lay.engine == "fsdp2" or st == 3:
        pbytes = A if lay.engine == "fsdp2" else 2.0
        gbytes = 4.0 if (lay.engine == "fsdp2" or w.precision == "fp32") else 2.0
        rs_times = 1 if lay.grad_sync == "step" else mbs
        d_vol = dense * (2 * mbs * pbytes + rs_times * gbytes)
        e_vol = experts * (2 * mbs * pbytes + rs_times * gbytes)
    else:
        gbytes = 2.0
        rs_times = mbs if st == 2 else 1
        grad_factor = 1 if st == 2 else 2  # ZeRO-1: all-reduce = reduce-scatter + all-gather
        d_vol = dense * (rs_times * grad_factor * gbytes + 2.0)
        e_vol = experts * (rs_times * grad_factor * gbytes + 2.0)
    dp_t = (_coll_time(d_vol * (dpc - 1) / dpc, dpc, tp, g) if dpc > 1 else 0.0) + (
        _coll_time(e_vol * (edp - 1) / edp, edp, ep * etp, g) if edp > 1 else 0.0
    )
    # exposure
    attn_compute = 0.0
    if cp > 1:
        attn_compute = (attn_fwd * 3 * G / N) / (peak * a.compute_efficiency)
    offload_t = 0.0
    if lay.offload:  # fp32 gradients to the host, bf16 parameters back, and the CPU AdamW step: exposed
        shard_elems = dense / (dpc if st >= 1 else 1) + experts / (edp if st >= 1 else 1)
        offload_t = shard_elems * (4.0 + 2.0) / (a.host_gbps * 1e9) + shard_elems / a.host_adam_elems_per_s
    exposed = {
        "offload": offload_t,
        "tp": tp_t,
        "cp": max(0.0, cp_ring - attn_compute) + cp_lasp,
        "ep": ep_t * (1 - a.ep_overlap),
        "dp": max(0.0, dp_t - compute) if a.dp_overlap else dp_t,
    }
    pp_t = bubble = 0.0
    if lay.pp > 1:
        from minimax_train.tools.planner.pipeline import bubble_fraction, p2p_bytes_per_rank

        bubble = bubble_fraction(lay.pp_schedule, lay.pp, mbs, lay.vpp)
        sent = p2p_bytes_per_rank(lay.pp, lay.vpp, mbs, t / tp, s.h, A, s.E)
        pp_t = _coll_time(sent, 2, N // lay.pp, g)
        exposed["pp"] = pp_t
        exposed["pp_bubble"] = compute * bubble / (1 - bubble)
    step = compute + sum(exposed.values())
    return StepTime(
        compute=compute,
        tp=tp_t,
        cp=cp_ring + cp_lasp,
        ep=ep_t,
        dp=dp_t,
        exposed=exposed,
        step=step,
        mfu=model_flops / (step * peak),
        tokens_per_s=G / step,
        model_tflops_per_gpu=model_flops / step / 1e12,
        pp=pp_t,
        bubble=bubble,
    )
