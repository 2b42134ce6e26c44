"""The planner's memory model: bytes per GPU of a layout.

Memory per GPU (bytes; GiB = 2^30 in the printout)
--------------------------------------------------
Parameters are split into dense ones sharded by tp (attention projections; embedding and lm_head by
vocabulary rows; KV projections only when tp divides the KV heads, else replicated), dense ones
replicated over tp (RMSNorm weights, routers) and expert weights (sharded by ep * etp). The dense ones
are then sharded over the dp * cp ranks, the expert ones over edp, as far as the engine's stage says.

    engine (precision bf16)      parameters          gradients            optimiser state
    fsdp2                        4 B fp32, sharded   4 B fp32, sharded    8 B (Adam m, v fp32), sharded
                                 (the fp32 shard is the master copy; bf16 copies exist only while a
                                 layer is all-gathered: counted as communication buffers)
    deepspeed zero_stage 0/1/2/3 2 B bf16 (s3: shrd) 2 B bf16 (s>=2: shrd) 12 B (fp32 master + m + v, s>=1: shrd)
    precision fp32 (CPU runs)    4 B                 4 B                  8 B (no separate master copy)
    deepspeed + offload          as deepspeed        as deepspeed         0 on the GPU (12 B in host memory)

The deepspeed engine is data parallel only (tp = cp = ep = etp = 1, the trainer's check_deepspeed_layout);
optimiser offload (parallel.offload_optimizer) adds, exposed, the fp32 gradient copy to the host, the bf16
parameter copy back (host_gbps) and the CPU AdamW step (host_adam_elems_per_s) of the local shard.

Gradient accumulation (accum > 1) with fsdp2 / ZeRO-3: grad_sync "step" (the trainer's parallel.grad_sync=step:
FSDP2 set_requires_gradient_sync(False) on all but the last micro-batch) keeps the UNSHARDED fp32
gradients of every local parameter between micro-batches (4 B x the local unsharded parameters, counted
as gradients); grad_sync "micro" (parallel.grad_sync=micro) reduce-scatters after every micro-batch instead
(sharded gradients only, accum x the reduce-scatter traffic). With accum == 1 both are the same.

Activations (what autograd saves for backward), per layer and token, from the model code; h hidden, n
heads, d head_dim, kv KV heads, I expert width, k top-k, E experts, V vocabulary; n, kv, V per tp rank, I
per etp rank; a = 2 bytes (bf16) or 4 (fp32); t = micro-batch tokens per cp rank (rows * seq_len / cp);
the residual stream holds t / tp tokens under sequence parallelism, attention and the tp=etp experts see
all t tokens (gathered):
- residual stream (t/tp tokens): 2 RMSNorms (fp32 x, rsqrt, normed a*x: 4h + 4 + a*h each), their
  outputs (a*h each, the post-attention one kept by the router), router (fp32 probs E, top-k ids/weights,
  sort order: 4E + 36k + 4 bytes); under SP the route is all-gathered twice (2 * 4 * (2k + 2E) per token).
- lightning attention (t tokens): input a*h, qkv before and after SiLU (6 a*n*d; fla keeps q, k, v and
  recomputes its chunk states), output RMSNorm over n*d (4nd + 4 + a*nd), norm output, sigmoid gate and
  gated product (3 a*nd). The CPU reference kernel (ops.lightning blockwise torch) also keeps per block
  the masked (QK^T) [n, m, m] (4*n*m per token), the decayed q and k (8nd) and the block states
  (4*n*d*d/m), m = block_size; plus [n, m, m] decay constants per layer.
- softmax attention (t tokens): input a*h, q and k after RoPE, v, output (a*(2nd + 2*kv*d)), fp32 lse
  (4n), RoPE cos/sin (2*a*rotary_dim). Flash/flex/torch backends keep no score matrix.
- MoE experts: R = k * t/tp * etp routed rows on this rank (balanced routing x moe_imbalance), each keeping
  the gathered input row, gate_up output, act(gate), act(gate) * up, expert output and weighted output:
  a*(3h + 4I) + 20 bytes; with ep > 1 also the permuted send / combined receive rows (2 a*h per
  assignment of this rank's tokens). With train.moe_chunk_tokens = c < t/tp (Workload.moe_chunk_tokens)
  none of it is saved: one chunk's share (c / (t/tp)) of these plus their backward is a working set.
- LASP+ (cp > 1): the all-gathered chunk states, 4 * n*d*d * 2 cp * rows per lightning layer (fp32).
- loss: final RMSNorm, lm_head input (a*h per token), and the cross-entropy working set at the end of the
  forward pass: 12 bytes (fp32) or 14 (bf16: bf16 logits + fp32 copy) per token and vocabulary entry
  (logits, shifted exps / log-probs, their gradient); vocabulary-parallel under tp. Only one chunk of
  train.loss_chunk_tokens tokens has logits at a time (Workload.loss_chunk_tokens; 0: all tokens).
- packed-sequence metadata: 48 bytes per token of each of the step's micro-batches (ids, labels,
  positions) and per forward (doc ids, positions).
Activation checkpointing: full keeps only each layer's input (a*h per residual token) and, during the
backward pass, one layer's activations twice (recomputed + their gradients); selective drops the
attention sublayer's internals of every layer and recomputes one at a time. Peak activations = saved +
max(loss working set, one layer's working set) (the peak is at the end of the forward pass or in the
backward of the first recomputed layer).

Communication buffers: fsdp2 / ZeRO-3 all-gathered parameters of the root module (embedding, lm_head,
final norm) and two layers (current + prefetched) in the compute dtype plus a reduce-scatter staging of
one layer's fp32 gradients; deepspeed ZeRO 1/2 its gradient-reduction and parameter all-gather buckets
(5e8 elements each, DeepSpeed's defaults, bf16; at most the local parameters); ring attention's two
visiting K/V chunks; expert all-to-all send/receive buffers of one layer.

Pipeline parallelism (pp > 1, planner/pipeline.py): every pp rank holds its layers' share of the dense and
expert parameters, the embedding on the first stage's rank, the lm_head + final norm on the last's; its saved
activations are those of its layers times the micro-batches in flight on it (the schedule's), the loss working
set only where the head is. The reported memory is the largest over the pp ranks.

The optimiser step: torch's foreach AdamW (CPU) allocates one temporary of the local optimiser shard
(4 B per element); fused AdamW (GPU) none. The reported total is parameters + gradients + optimiser
state + max(peak activations + communication buffers, the step's temporary); it fits when it is at most
(memory - reserve) * (1 - margin).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from minimax_train.tools.planner.inputs import Assumptions, Layout, Workload
from minimax_train.tools.planner.shapes import ModelShapes, parameter_split

GiB = float(1 << 30)
DS_BUCKET_ELEMS = 5e8  # DeepSpeed's default reduce_bucket_size / allgather_bucket_size


@dataclass
class Memory:
    parameters: float
    gradients: float
    optimizer: float
    activations: float  # peak: saved + working set
    comm_buffers: float
    optimizer_step_temp: float = 0.0
    detail: dict = field(default_factory=dict)

    @property
    def static(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.static + max(self.activations + self.comm_buffers, self.optimizer_step_temp)


def _bytes_per_param(w: Workload, lay: Layout) -> tuple[float, float, float, bool, bool, bool]:
    """(param, grad, optimiser) bytes per element and whether each is sharded over the data-parallel ranks."""
    st = lay.zero_stage
    if w.precision == "fp32":
        p, g, o = 4.0, 4.0, 8.0
    elif lay.engine == "fsdp2":
        p, g, o = 4.0, 4.0, 8.0
    else:
        p, g, o = 2.0, 2.0, 12.0
    return p, g, o, st >= 3, st >= 2, st >= 1


def activation_memory(w: Workload, lay: Layout, a: Optional[Assumptions] = None) -> dict[str, float]:
    """Bytes of activations on one GPU: 'saved' (held for backward at the end of the forward pass), the
    working sets, and 'peak'. See the module docstring for every term."""
    a = a or Assumptions()
    s = w.cached("shapes", lambda: ModelShapes.of(w.model))
    A = w.act_bytes
    tp, cp, ep, etp = lay.tp, lay.cp, lay.ep, lay.etp
    rows = lay.micro_batch_rows
    t = rows * w.seq_len / cp  # tokens of the micro-batch on this cp rank
    t_res = t / tp  # residual stream tokens (sequence parallel when tp > 1)
    h, d, k, E = s.h, s.d, s.k, s.E
    n_l = s.n / tp
    nd = n_l * d
    kv_l = s.kv / tp if s.kv % tp == 0 else 1
    I_l = s.I / etp
    V_l = s.V / tp

    # residual stream: two norms (x fp32, rsqrt, normed) + their outputs; router
    norm = 4 * h + 4 + A * h
    resid = t_res * (2 * norm + A * h + (4 * E + 36 * k + 4))
    if tp > 1:
        resid += t * 2 * 4 * (2 * k + 2 * E)  # route all-gathered for dispatch and for the statistics
    # attention sublayers (t tokens, local heads): saved, and the extra working set of their backward
    lin = t * (A * h + 6 * A * nd + (4 * nd + 4 + A * nd) + 3 * A * nd)
    lin_bwd = t * 6 * A * nd  # dq, dk, dv and the gradients of the pre-activation qkv
    full = t * (A * h + A * (2 * nd + 2 * kv_l * d) + 4 * n_l + 2 * A * s.rot)
    if w.kernels == "reference":
        m = s.m
        ref = t * 4 * (n_l * min(m, t) + 2 * nd + n_l * d * d / m)
        lin += ref + 4 * n_l * m * m
        lin_bwd += ref
        if A != 4:
            lin += t * 4 * 3 * nd  # fp32 copies of q, k, v
        # ops.attention torch backend: score-sized fp32 buffers of one query chunk (at most 2^25 elements),
        # four alive at once in backward (scores, probabilities, dP, dS), plus the boolean masks
        scores = min(float(1 << 25), n_l * t * t)
        full_bwd = 4 * 4 * scores + 2 * scores / n_l
    else:
        lin_bwd += 2 * (t / 64) * n_l * d * d * 4  # fla recomputes the chunk states (and their gradient)
        full_bwd = t * 4 * (nd + 2 * kv_l * d)  # fp32 dq, dk, dv accumulators
    if cp > 1:
        lin += 4 * n_l * d * d * 2 * cp * rows  # LASP+ all-gathered chunk states
    # experts
    etp_path = ep == 1 and etp == tp  # tensor_parallel's etp=tp experts on all (gathered) tokens
    R = k * t_res * etp * a.moe_imbalance
    moe = R * (A * (3 * h + 4 * I_l) + 20)
    moe_bwd = R * A * (2 * h + 3 * I_l)
    if not etp_path or ep > 1:
        moe += k * t_res * 2 * A * h  # permuted send rows + combined receive rows
    if 0 < w.moe_chunk_tokens < t_res:  # checkpointed token chunks: one chunk's expert activations at a time
        moe_bwd = (moe + moe_bwd) * w.moe_chunk_tokens / t_res
        moe = 0.0
    layer_lin, layer_full = resid + lin + moe, resid + full + moe
    layers = s.n_lin * layer_lin + s.n_full * layer_full
    final = t_res * norm + t * A * h  # final norm + lm_head input
    loss_t = min(t, w.loss_chunk_tokens) if w.loss_chunk_tokens > 0 else t  # tokens whose logits coexist
    loss_ws = loss_t * V_l * (12 if A == 4 else 14)
    meta = 24 * rows * w.seq_len / cp * (lay.accum + 1)
    kinds = [(layer_lin, lin, lin_bwd)] * bool(s.n_lin) + [(layer_full, full, full_bwd)] * bool(s.n_full)
    if lay.ac == "none":
        saved = layers + final + meta
        working_layers = max([moe_bwd] + [bwd for _, _, bwd in kinds])
    elif lay.ac == "full":  # layer inputs kept; one layer recomputed and back-propagated at a time
        saved = s.L * t_res * A * h + final + meta
        working_layers = max(layer + max(bwd, moe_bwd) for layer, _, bwd in kinds)
    else:  # selective: attention internals dropped, recomputed one layer at a time
        dropped = s.n_lin * (lin - t * A * h) + s.n_full * (full - t * A * h)
        saved = layers - dropped + final + meta
        working_layers = max([moe_bwd] + [attn - t * A * h + bwd for _, attn, bwd in kinds])
    working = max(loss_ws, working_layers)
    return {
        "saved": saved,
        "working": working,
        "working_layers": working_layers,
        "meta": meta,
        "peak": saved + working,
        "layers": layers,
        "final": final,
        "loss_saved": t * V_l * 4,
        "per_layer_lightning": layer_lin,
        "per_layer_softmax": layer_full,
        "loss_working": loss_ws,
        "tokens_per_rank": t,
    }


def estimate_memory(w: Workload, lay: Layout, a: Optional[Assumptions] = None) -> Memory:
    """Memory of the busiest GPU (with pp > 1: of the pp rank whose total is largest)."""
    if lay.pp == 1:
        return _estimate_rank(w, lay, a)
    from minimax_train.tools.planner.pipeline import in_flight, rank_shares

    shares = w.cached(
        ("pp_shares", lay.pp, lay.pp_schedule, lay.vpp),
        lambda: rank_shares(w.model.num_hidden_layers, lay.pp, lay.pp_schedule, lay.vpp),
    )
    best = None
    for sh in shares:
        mem = _estimate_rank(w, lay, a, sh, in_flight(lay.pp_schedule, lay.pp, lay.accum, lay.vpp, sh.rank))
        mem.detail["pp_rank"] = sh.rank
        if best is None or mem.total > best.total:
            best = mem
    return best


def _estimate_rank(w: Workload, lay: Layout, a: Optional[Assumptions] = None, share=None, flight=1.0) -> Memory:
    a = a or Assumptions()
    ps = w.cached(("split", lay.tp, lay.ep, lay.etp), lambda: parameter_split(w.model, lay.tp, lay.ep, lay.etp))
    dpc, edp = lay.dp * lay.cp, lay.edp
    pb, gb, ob, p_sh, g_sh, o_sh = _bytes_per_param(w, lay)
    dense, experts = ps["dense_local"], ps["experts_local"]
    root = ps["root_local"]
    if share is not None:  # this pp rank's layers, and the embedding / head if it holds them
        frac = share.layers / w.model.num_hidden_layers
        emb = w.model.vocab_size * w.model.hidden_size / lay.tp
        dense = (dense - root) * frac + (emb if share.embedding else 0.0) + ((root - emb) if share.head else 0.0)
        experts = experts * frac
        root = (emb if share.embedding else 0.0) + ((root - emb) if share.head else 0.0)

    def shard(x_dense, x_exp, sharded):
        return x_dense / dpc + x_exp / edp if sharded else x_dense + x_exp

    params = pb * shard(dense, experts, p_sh)
    grads = gb * shard(dense, experts, g_sh)
    if lay.accum > 1 and p_sh and lay.grad_sync == "step":
        grads = 4.0 * (dense + experts)  # unsharded fp32 accumulation between micro-batches
    optim = ob * shard(dense, experts, o_sh)
    host = 0.0
    if lay.offload:  # fp32 master + Adam moments (and the step) live on the host
        host, optim = optim, 0.0
    act = activation_memory(w, lay, a)
    peak_act = act["peak"]
    if share is not None:
        layers_saved = act["saved"] - act["final"] - act["meta"]
        frac = share.layers / w.model.num_hidden_layers
        saved = layers_saved * frac * flight + act["meta"] + (act["final"] * flight if share.head else 0.0)
        working = max(act["working_layers"] if share.layers else 0.0, act["loss_working"] if share.head else 0.0)
        peak_act = saved + working
    comp = w.act_bytes
    layer_local = ps["layer_dense_local"] + ps["layer_experts_local"]
    comm = 0.0
    if p_sh and (dpc > 1 or edp > 1):  # all-gathered root + two layers, reduce-scatter staging of one layer
        comm += comp * (root + 2 * layer_local) + 4.0 * layer_local
    elif lay.engine == "deepspeed":
        comm += 2 * 2.0 * min(DS_BUCKET_ELEMS, dense + experts)
    s = w.cached("shapes", lambda: ModelShapes.of(w.model))
    t = act["tokens_per_rank"]
    if lay.cp > 1 and s.n_full:
        kv_l = s.kv / lay.tp if s.kv % lay.tp == 0 else 1
        comm += 2 * 2 * kv_l * s.d * t * comp  # two visiting K/V chunks
    if lay.ep > 1:
        comm += 2 * s.k * t / lay.tp * s.h * comp * a.moe_imbalance  # a2a send + receive of one layer
    temp = 4.0 * shard(dense, experts, o_sh) if (w.optimizer == "foreach" and not lay.offload) else 0.0
    return Memory(
        params,
        grads,
        optim,
        peak_act,
        comm,
        temp,
        detail={
            "activations_saved": act["saved"] if share is None else saved,
            "activations_working": act["working"],
            "params_local_unsharded": dense + experts,
            "host_optimizer_bytes": host,
        },
    )


def capacity_bytes(w: Workload, a: Assumptions) -> float:
    return max(0.0, (w.gpu.memory_gib - a.reserve_gib) * (1 - a.margin)) * GiB
