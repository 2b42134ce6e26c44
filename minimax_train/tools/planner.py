"""Layout planner: which parallel layout trains a model at a given sequence length, batch and GPU count,
how much memory each GPU needs, and how long a step takes.

    from minimax_train.tools.planner import Workload, plan, format_result, load_model_config, gpu_spec
    w = Workload(load_model_config("minimax_text_01"), seq_len=1 << 20, global_batch_tokens=16 << 20,
                 num_gpus=256, gpu=gpu_spec("h100"))
    print(format_result(plan(w)))

Everything here is arithmetic on the model's shapes: nothing is allocated. FLOPs come from
minimax_train.model.flops (count_params, train_flops_per_token), the counter the trainer's MFU uses;
validity comes from minimax_train.parallel.mesh.resolve_layout (the trainer's own check) plus the
zigzag-CP, vocabulary-parallel and batch-split rules.

A layout: tp (tensor parallel, with sequence parallelism when tp > 1), cp (context parallel), dp = world /
(tp * cp), ep / etp (expert parallel / expert tensor parallel; edp = world / (ep * etp) replicates the
experts), the data-parallel engine and its sharding stage (fsdp2 = ZeRO-3 style, or deepspeed ZeRO 1/2/3),
the gradient synchronisation for gradient accumulation (see below), activation checkpointing
(none | selective | full, the trainer's train.activation_checkpointing), and the micro-batch (rows per
forward pass; accumulation = rows per dp rank / micro-batch).

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

The optimiser step: torch's foreach AdamW (CPU) allocates one temporary of the local optimiser shard
(4 B per element); fused AdamW (GPU) none. The reported total is parameters + gradients + optimiser
state + max(peak activations + communication buffers, the step's temporary); it fits when it is at most
(memory - reserve) * (1 - margin).

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
step = compute + exposed communication; MFU = model FLOPs / (step * peak); ranking: step time among the
layouts that fit, then memory.

All of this is a model: real runs add allocator fragmentation (margin), NCCL and CUDA context memory
(reserve), and kernels that differ from these counts. tools/plot_metrics.py and the trainer's
max_memory_gb metric are how to check a plan against a run; `tools/plan_layout.py --validate-cpu`
compares the estimate with measured peak tensor memory of CPU training steps.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from minimax_train.model.config import FULL, ModelConfig
from minimax_train.model.flops import count_params, forward_flops_per_token, train_flops_per_token

GiB = float(1 << 30)
ENGINE_STAGES = (("fsdp2", 3), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3))
AC_MODES = ("none", "selective", "full")
GRAD_SYNCS = ("step", "micro")
DS_BUCKET_ELEMS = 5e8  # DeepSpeed's default reduce_bucket_size / allgather_bucket_size


class PlanError(ValueError):
    """Bad planner input (unknown preset, impossible fixed layout, bad numbers): a one-line message."""


# ---- model presets ------------------------------------------------------------------------------------------------
def conf_model_dir() -> Path:
    """conf/model of the repository (or $MINIMAX_TRAIN_CONF/model)."""
    env = os.environ.get("MINIMAX_TRAIN_CONF")
    pkg = Path(__file__).resolve().parent.parent
    for c in ([Path(env)] if env else []) + [pkg.parent / "conf", pkg / "conf"]:
        if (c / "model").is_dir():
            return c / "model"
    return pkg.parent / "conf" / "model"


def preset_names() -> list[str]:
    d = conf_model_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_model_config(name: str) -> ModelConfig:
    """A preset name (conf/model/<name>.yaml), a model yaml file, or a transformers config.json (or its
    directory). Raises PlanError naming the accepted forms."""
    p = Path(name)
    try:
        if p.is_dir() and (p / "config.json").is_file():
            p = p / "config.json"
        if p.is_file() and p.suffix == ".json":
            return ModelConfig.from_hf_dict(json.loads(p.read_text()))
        if p.is_file() and p.suffix in (".yaml", ".yml"):
            return _model_from_yaml(p)
        cand = conf_model_dir() / f"{name}.yaml"
        if "/" not in name and cand.is_file():
            return _model_from_yaml(cand)
    except PlanError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise PlanError(f"model {name!r}: {e}") from None
    raise PlanError(
        f"unknown model preset {name!r}: use one of {', '.join(preset_names()) or '(none found)'}, "
        f"a model .yaml file or a transformers config.json"
    )


def _model_from_yaml(path: Path) -> ModelConfig:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: not a mapping of model fields")
    raw = raw.get("model", raw)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PlanError(f"{path}: unknown model field(s) {', '.join(unknown)}")
    return ModelConfig(**raw)


# ---- hardware ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float  # usable device memory
    peak_tflops: float  # dense bf16 (fp32 for cpu) peak per device
    intra_gbps: float  # GB/s per direction per GPU inside a node (NVLink)
    inter_gbps: float  # GB/s per direction per GPU between nodes (InfiniBand / RoCE)
    gpus_per_node: int = 8


GPU_KINDS = {
    # NVLink 4: 900 GB/s bidirectional = 450 per direction; 8 x 400 Gb/s NDR per node = 50 GB/s per GPU.
    "h100": GPUSpec("H100 SXM 80GB", 80.0, 989.0, 450.0, 50.0, 8),
    "h200": GPUSpec("H200 SXM 141GB", 141.0, 989.0, 450.0, 50.0, 8),
    # NVLink 3: 600 GB/s bidirectional; 8 x 200 Gb/s HDR per node = 25 GB/s per GPU.
    "a100": GPUSpec("A100 SXM 80GB", 80.0, 312.0, 300.0, 25.0, 8),
}


def gpu_spec(
    kind: str = "h100",
    *,
    memory_gib: Optional[float] = None,
    peak_tflops: Optional[float] = None,
    intra_gbps: Optional[float] = None,
    inter_gbps: Optional[float] = None,
    gpus_per_node: Optional[int] = None,
) -> GPUSpec:
    """A known kind with any field overridden, or 'custom' (then every field must be given)."""
    over = {
        k: v
        for k, v in dict(
            memory_gib=memory_gib,
            peak_tflops=peak_tflops,
            intra_gbps=intra_gbps,
            inter_gbps=inter_gbps,
            gpus_per_node=gpus_per_node,
        ).items()
        if v is not None
    }
    if kind == "custom":
        missing = [k for k in ("memory_gib", "peak_tflops", "intra_gbps", "inter_gbps") if k not in over]
        if missing:
            raise PlanError(f"--gpu custom needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
        spec = GPUSpec("custom", gpus_per_node=over.pop("gpus_per_node", 8), **over)
    elif kind in GPU_KINDS:
        spec = dataclasses.replace(GPU_KINDS[kind], **over)
    else:
        raise PlanError(f"unknown GPU kind {kind!r}: use one of {', '.join(GPU_KINDS)} or custom")
    for k in ("memory_gib", "peak_tflops", "intra_gbps", "inter_gbps"):
        if not getattr(spec, k) > 0:
            raise PlanError(f"GPU {k} must be > 0, got {getattr(spec, k)}")
    if spec.gpus_per_node < 1:
        raise PlanError(f"gpus_per_node must be >= 1, got {spec.gpus_per_node}")
    return spec


# ---- inputs -----------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    model: ModelConfig
    seq_len: int  # tokens per packed row
    global_batch_tokens: int  # tokens per optimiser step (a multiple of seq_len)
    num_gpus: int
    gpu: GPUSpec
    precision: str = "bf16"  # bf16 (GPU: bf16 compute, fp32 master/grads/Adam) | fp32 (CPU runs)
    kernels: str = "gpu"  # gpu (fla, flash/flex, grouped GEMM) | reference (the CPU torch kernels)
    optimizer: str = "fused"  # fused (no step temporary) | foreach (one temporary of the optimiser shard)
    model_name: str = ""
    loss_chunk_tokens: int = 8192  # the trainer's train.loss_chunk_tokens (0: logits of all tokens at once)
    moe_chunk_tokens: int = 0  # the trainer's train.moe_chunk_tokens (0: the MoE sublayer on all tokens at once)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def cached(self, key, fn):
        """Per-workload memo of model-only quantities (shapes, FLOPs, parameter splits)."""
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def __post_init__(self):
        if self.precision not in ("bf16", "fp32"):
            raise PlanError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.kernels not in ("gpu", "reference"):
            raise PlanError(f"kernels must be gpu or reference, got {self.kernels!r}")
        if self.optimizer not in ("fused", "foreach"):
            raise PlanError(f"optimizer must be fused or foreach, got {self.optimizer!r}")
        for k in ("seq_len", "global_batch_tokens", "num_gpus"):
            if int(getattr(self, k)) < 1:
                raise PlanError(f"{k} must be a positive integer, got {getattr(self, k)}")
        if self.global_batch_tokens % self.seq_len:
            raise PlanError(
                f"global batch of {self.global_batch_tokens} tokens is not a whole number of rows of "
                f"seq_len={self.seq_len} (use a multiple, e.g. {self.seq_len * max(1, self.global_batch_tokens // self.seq_len)})"
            )
        if self.seq_len > self.model.max_position_embeddings:
            raise PlanError(
                f"seq_len={self.seq_len} exceeds the model's max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )

    @property
    def rows(self) -> int:
        return self.global_batch_tokens // self.seq_len

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


@dataclass(frozen=True)
class Assumptions:
    compute_efficiency: float = 0.5  # achieved fraction of peak FLOP/s in the kernels
    margin: float = 0.10  # fraction of (memory - reserve) kept free (fragmentation, spikes)
    reserve_gib: float = 2.0  # CUDA context, NCCL buffers, allocator reserve
    moe_imbalance: float = 1.0  # routed rows on the busiest rank / the balanced share
    ep_overlap: float = 0.5  # fraction of expert all-to-all time hidden behind expert compute
    dp_overlap: bool = True  # data-parallel traffic runs behind compute (FSDP prefetch, bucketed reduces)
    host_gbps: float = 25.0  # GPU <-> host copies per GPU (PCIe 5 x16 in practice), for optimiser offload
    host_adam_elems_per_s: float = 1.0e9  # CPU AdamW throughput per GPU's share of host cores (offload)


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    ep: int
    etp: int
    edp: int
    engine: str  # fsdp2 | deepspeed
    zero_stage: int  # fsdp2: 3
    grad_sync: str  # step | micro (only differs when accum > 1 and parameters are sharded)
    ac: str  # none | selective | full
    micro_batch_rows: int
    accum: int
    offload: bool = False  # deepspeed only: optimiser state and step on the host (parallel.offload_optimizer)

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    def engine_label(self) -> str:
        return "fsdp2" if self.engine == "fsdp2" else f"ds-z{self.zero_stage}" + ("-offload" if self.offload else "")

    def short(self) -> str:
        return (
            f"tp{self.tp} cp{self.cp} dp{self.dp} ep{self.ep} etp{self.etp} {self.engine_label()} "
            f"sync-{self.grad_sync} ac-{self.ac} mb{self.micro_batch_rows}x{self.accum}"
        )

    def overrides(self) -> str:
        """The trainer's Hydra overrides for this layout."""
        parts = [
            f"parallel.tp={self.tp}",
            f"parallel.cp={self.cp}",
            f"parallel.ep={self.ep}",
            f"parallel.etp={self.etp}",
            f"parallel.sequence_parallel={str(self.tp > 1).lower()}",
            f"parallel.engine={self.engine}",
        ]
        if self.engine == "deepspeed":
            parts.append(f"parallel.zero_stage={self.zero_stage}")
            if self.offload:
                parts.append("parallel.offload_optimizer=true")
        elif self.grad_sync == "micro":
            parts.append("parallel.grad_sync=micro")
        parts.append(f"train.activation_checkpointing={self.ac}")
        return " ".join(parts)


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


@dataclass
class Plan:
    layout: Layout
    memory: Memory
    time: StepTime
    fits: bool
    capacity: float


# ---- the model's shapes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shapes:
    h: int
    n: int
    d: int
    kv: int
    E: int
    k: int
    I: int
    V: int
    rot: int
    m: int  # lightning block
    n_lin: int
    n_full: int
    L: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> _Shapes:
        types = cfg.resolved_layer_types()
        return cls(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim,
            cfg.num_key_value_heads,
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.effective_rotary_dim,
            cfg.block_size,
            sum(t != FULL for t in types),
            sum(t == FULL for t in types),
            len(types),
        )


def parameter_split(cfg: ModelConfig, tp: int, ep: int, etp: int) -> dict[str, float]:
    """Parameters per rank before data-parallel sharding: dense (tp-sharded + replicated) and experts, plus the
    pieces FSDP gathers together (root = embedding, lm_head, final norm; the largest decoder layer)."""
    s = _Shapes.of(cfg)
    h, n, d, kv, E, I, V = s.h, s.n, s.d, s.kv, s.E, s.I, s.V
    kv_sharded = kv % tp == 0
    head = 0 if cfg.tie_word_embeddings else V * h
    root_tp, root_rep = V * h + head, h
    lin_tp, lin_rep = 5 * h * n * d + n * d, 2 * h + E * h
    full_tp = 2 * h * n * d + (2 * h * kv * d if kv_sharded else 0)
    full_rep = 2 * h + E * h + (0 if kv_sharded else 2 * h * kv * d)
    expert_layer = E * 3 * h * I
    dense_tp = root_tp + s.n_lin * lin_tp + s.n_full * full_tp
    dense_rep = root_rep + s.n_lin * lin_rep + s.n_full * full_rep
    experts = s.L * expert_layer
    layer_dense = max(lin_tp / tp + lin_rep if s.n_lin else 0, full_tp / tp + full_rep if s.n_full else 0)
    return {
        "total": dense_tp + dense_rep + experts,
        "dense_local": dense_tp / tp + dense_rep,
        "experts_local": experts / (ep * etp),
        "root_local": root_tp / tp + root_rep,
        "layer_dense_local": layer_dense,
        "layer_experts_local": expert_layer / (ep * etp),
    }


# ---- memory -------------------------------------------------------------------------------------------------------
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
    s = w.cached("shapes", lambda: _Shapes.of(w.model))
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
        working = max([loss_ws, moe_bwd] + [bwd for _, _, bwd in kinds])
    elif lay.ac == "full":  # layer inputs kept; one layer recomputed and back-propagated at a time
        saved = s.L * t_res * A * h + final + meta
        working = max([loss_ws] + [layer + max(bwd, moe_bwd) for layer, _, bwd in kinds])
    else:  # selective: attention internals dropped, recomputed one layer at a time
        dropped = s.n_lin * (lin - t * A * h) + s.n_full * (full - t * A * h)
        saved = layers - dropped + final + meta
        working = max([loss_ws, moe_bwd] + [attn - t * A * h + bwd for _, attn, bwd in kinds])
    return {
        "saved": saved,
        "working": working,
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
    a = a or Assumptions()
    ps = w.cached(("split", lay.tp, lay.ep, lay.etp), lambda: parameter_split(w.model, lay.tp, lay.ep, lay.etp))
    dpc, edp = lay.dp * lay.cp, lay.edp
    pb, gb, ob, p_sh, g_sh, o_sh = _bytes_per_param(w, lay)
    dense, experts = ps["dense_local"], ps["experts_local"]

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
    comp = w.act_bytes
    layer_local = ps["layer_dense_local"] + ps["layer_experts_local"]
    comm = 0.0
    if p_sh and (dpc > 1 or edp > 1):  # all-gathered root + two layers, reduce-scatter staging of one layer
        comm += comp * (ps["root_local"] + 2 * layer_local) + 4.0 * layer_local
    elif lay.engine == "deepspeed":
        comm += 2 * 2.0 * min(DS_BUCKET_ELEMS, dense + experts)
    s = w.cached("shapes", lambda: _Shapes.of(w.model))
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
        act["peak"],
        comm,
        temp,
        detail={
            "activations_saved": act["saved"],
            "activations_working": act["working"],
            "params_local_unsharded": dense + experts,
            "host_optimizer_bytes": host,
        },
    )


# ---- time ---------------------------------------------------------------------------------------------------------
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
    s = _Shapes.of(cfg)
    moe = s.L * (2.0 * s.h * s.E + s.k * 2.0 * 3 * s.h * s.I)
    head = 2.0 * s.h * s.V
    return total - moe - head


def estimate_time(w: Workload, lay: Layout, a: Optional[Assumptions] = None) -> StepTime:
    a = a or Assumptions()
    cfg, g = w.model, w.gpu
    s = w.cached("shapes", lambda: _Shapes.of(w.model))
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
    dense, experts = ps["dense_local"], ps["experts_local"]
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
    )


def capacity_bytes(w: Workload, a: Assumptions) -> float:
    return max(0.0, (w.gpu.memory_gib - a.reserve_gib) * (1 - a.margin)) * GiB


def estimate(w: Workload, lay: Layout, a: Optional[Assumptions] = None) -> Plan:
    a = a or Assumptions()
    mem = estimate_memory(w, lay, a)
    cap = capacity_bytes(w, a)
    return Plan(lay, mem, estimate_time(w, lay, a), mem.total <= cap, cap)


# ---- enumeration ----------------------------------------------------------------------------------------------------
@dataclass
class Constraints:
    """Fix any dimension (None: enumerate it)."""

    tp: Optional[int] = None
    cp: Optional[int] = None
    ep: Optional[int] = None
    etp: Optional[int] = None
    engines: tuple = ("fsdp2", "deepspeed")
    zero_stages: Optional[tuple] = None
    ac: Optional[tuple] = None
    grad_sync: tuple = ("step", "micro")  # fsdp2 gradient sync with accumulation (parallel.grad_sync)
    offload: tuple = (False, True)  # deepspeed optimiser offload off / on
    micro_batch_rows: Optional[int] = None
    max_tp: Optional[int] = None  # default: gpus_per_node


def _divisors(n: int) -> list[int]:
    return [x for x in range(1, n + 1) if n % x == 0]


def layout_error(
    w: Workload, tp: int, cp: int, ep: int, etp: int, engine: str = "fsdp2", zero_stage: int = 3
) -> Optional[str]:
    """Why this layout cannot run (the trainer's messages), or None."""
    from minimax_train.parallel.mesh import ParallelConfig, ParallelConfigError, resolve_layout

    cfg = w.model
    try:
        pc = ParallelConfig(
            tp=tp,
            cp=cp,
            ep=ep,
            etp=etp,
            sequence_parallel=tp > 1,
            engine=engine,
            zero_stage=zero_stage if engine == "deepspeed" else 1,
        )
        lay = resolve_layout(pc, w.num_gpus, cfg)
    except ParallelConfigError as e:
        return str(e)
    if cfg.vocab_size % tp:
        return f"parallel.tp={tp} does not divide vocab_size={cfg.vocab_size} (vocabulary-parallel embedding)"
    if ep == 1 and etp == tp and cfg.intermediate_size % tp:
        return f"parallel.tp={tp} does not divide intermediate_size={cfg.intermediate_size} (experts with etp = tp)"
    if w.seq_len % (2 * cp):
        return f"seq_len={w.seq_len} must be divisible by 2*parallel.cp={2 * cp} (zigzag context parallelism)"
    if w.rows % lay.dp:
        return (
            f"the global batch has {w.rows} rows of {w.seq_len} tokens, not divisible by dp={lay.dp} "
            f"(world {w.num_gpus} / (tp {tp} x cp {cp})): raise the batch or use more tp/cp"
        )
    return None


def enumerate_layouts(w: Workload, c: Optional[Constraints] = None) -> Iterable[Layout]:
    c = c or Constraints()
    N = w.num_gpus
    max_tp = c.max_tp or w.gpu.gpus_per_node
    tps = [c.tp] if c.tp else [x for x in _divisors(N) if x <= max_tp]
    for tp in tps:
        cps = [c.cp] if c.cp else _divisors(N // tp) if N % tp == 0 else []
        for cp in cps:
            if N % (tp * cp):
                continue
            dp = N // (tp * cp)
            etps = [c.etp] if c.etp else _divisors(tp)
            for etp in etps:
                room = dp * cp * (tp // etp) if tp % etp == 0 else 0
                eps = (
                    [c.ep]
                    if c.ep
                    else [x for x in _divisors(room) if w.model.num_local_experts % x == 0]
                    if room
                    else []
                )
                for ep in eps:
                    if layout_error(w, tp, cp, ep, etp) is not None:
                        continue
                    edp = N // (ep * etp)
                    rows_per_dp = w.rows // dp
                    mbrs = [c.micro_batch_rows] if c.micro_batch_rows else _divisors(rows_per_dp)
                    for mb in mbrs:
                        if mb < 1 or rows_per_dp % mb:
                            continue
                        accum = rows_per_dp // mb
                        for engine, stage in ENGINE_STAGES:
                            if engine not in c.engines or (
                                engine == "deepspeed" and c.zero_stages and stage not in c.zero_stages
                            ):
                                continue
                            if engine == "deepspeed" and (tp, cp, ep, etp) != (1, 1, 1, 1):
                                continue  # the DeepSpeed engine is data parallel only
                            syncs = ("step", "micro") if (accum > 1 and stage == 3) else ("step",)
                            offloads = c.offload if engine == "deepspeed" else (False,)
                            for sync, off in itertools.product(syncs, offloads):
                                if sync not in c.grad_sync:
                                    continue
                                for ac in c.ac or AC_MODES:
                                    yield Layout(tp, cp, dp, ep, etp, edp, engine, stage, sync, ac, mb, accum, off)


@dataclass
class PlanResult:
    workload: Workload
    assumptions: Assumptions
    plans: list  # fitting plans, best first
    closest: list  # smallest-memory plans when nothing fits
    enumerated: int
    fitting: int


def plan(w: Workload, a: Optional[Assumptions] = None, c: Optional[Constraints] = None, top: int = 5) -> PlanResult:
    """Every valid layout, estimated; the `top` fastest that fit (or the smallest when none fits)."""
    a = a or Assumptions()
    c = c or Constraints()
    _check_fixed(w, c)
    fits, others, n = [], [], 0
    for lay in enumerate_layouts(w, c):
        n += 1
        p = estimate(w, lay, a)
        (fits if p.fits else others).append(p)
    if n == 0:
        raise PlanError(_no_layout_message(w, c))
    # fastest first; step times within 0.5% count as equal, and then fewer micro-batches (bigger GEMMs, less
    # per-micro-batch overhead, which the model does not price) and less memory win
    fits.sort(key=lambda p: (round(math.log(p.time.step) / math.log(1.005)), p.layout.accum, p.memory.total))
    closest = sorted(others, key=lambda p: p.memory.total)[:top] if not fits else []
    return PlanResult(w, a, fits[:top], closest, n, len(fits))


def _check_fixed(w: Workload, c: Constraints) -> None:
    """A fully or partly fixed layout that cannot work: the trainer's error message."""
    for key in ("tp", "cp", "ep", "etp", "micro_batch_rows"):
        v = getattr(c, key)
        if v is not None and (not isinstance(v, int) or v < 1):
            raise PlanError(f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")
    if c.tp and w.num_gpus % c.tp:
        raise PlanError(
            f"parallel.tp={c.tp} does not divide the GPU count {w.num_gpus}; valid: "
            f"{', '.join(map(str, _divisors(w.num_gpus)))}"
        )
    if c.tp and c.cp and c.ep and c.etp:
        err = layout_error(w, c.tp, c.cp, c.ep, c.etp)
        if err:
            raise PlanError(err)
    if c.engines == ("deepspeed",):
        from minimax_train.parallel.deepspeed_engine import check_deepspeed_layout
        from minimax_train.parallel.mesh import ParallelConfig, ParallelConfigError

        try:
            check_deepspeed_layout(
                ParallelConfig(
                    tp=c.tp or 1, cp=c.cp or 1, ep=c.ep or 1, etp=c.etp or 1, engine="deepspeed", zero_stage=3
                )
            )
        except ParallelConfigError as e:
            raise PlanError(str(e)) from None
    if c.tp and c.etp and c.tp % c.etp:
        raise PlanError(
            f"parallel.etp={c.etp} must divide parallel.tp={c.tp}; valid: {', '.join(map(str, _divisors(c.tp)))}"
        )


def _no_layout_message(w: Workload, c: Constraints) -> str:
    tp = c.tp or 1
    cp = c.cp or 1
    err = layout_error(w, tp, cp, c.ep or 1, c.etp or 1)
    if err:
        return f"no valid layout: {err}"
    return (
        f"no valid layout for {w.num_gpus} GPUs, seq_len {w.seq_len}, {w.rows} rows per step with the given "
        f"constraints (check --micro-batch and the fixed dimensions)"
    )


# ---- printing -------------------------------------------------------------------------------------------------------
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
    lines = [
        f"#{i} tp {L.tp} (SP {'on' if L.tp > 1 else 'off'}) x cp {L.cp} x dp {L.dp} | experts: ep {L.ep} x etp {L.etp} "
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


__all__ = [
    "GPU_KINDS",
    "GPUSpec",
    "gpu_spec",
    "Workload",
    "Assumptions",
    "Layout",
    "Constraints",
    "Memory",
    "StepTime",
    "Plan",
    "PlanResult",
    "PlanError",
    "load_model_config",
    "preset_names",
    "parameter_split",
    "activation_memory",
    "estimate_memory",
    "estimate_time",
    "estimate",
    "enumerate_layouts",
    "plan",
    "layout_error",
    "format_result",
    "format_plan",
    "result_to_dict",
    "capacity_bytes",
]


# ---- command line -----------------------------------------------------------------------------------------------------
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
        "The accounting is documented in minimax_train/tools/planner.py.",
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
        )
        r = plan(w, a, c, top=args.top)
    except PlanError as e:
        print(f"plan_layout: error: {e}", file=sys.stderr)
        return 2
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
