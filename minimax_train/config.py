"""Typed schema of a training job: the Hydra config tree (conf/) is merged into these dataclasses, so
an unknown key or a value of the wrong type fails while the config is composed; every value is then
checked here (and the model/data/parallel schemas check their own), before any work starts.

Groups: model (ModelConfig), data (DataConfig), optim, parallel (ParallelConfig), train, checkpoint,
logging. Batch keys follow Megatron: train.seq_len tokens per packed row, train.global_batch_size and
train.micro_batch_size in rows; gradient accumulation = global / (micro * dp)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from minimax_train.data.config import DataConfig, SourceConfig, validate_data_config
from minimax_train.errors import MinimaxError
from minimax_train.model.config import ModelConfig
from minimax_train.ops.cross_entropy import LOSS_KERNELS
from minimax_train.parallel.mesh import ParallelConfig

SCHEDULES = ("cosine", "wsd", "linear", "constant", "piecewise")
SEGMENT_SHAPES = ("constant", "linear", "cosine", "exponential")
INIT_LOADS = ("model", "model+optim")
DECAY_STYLES = ("linear", "cosine", "sqrt")
OPTIM_IMPLS = ("auto", "fused", "foreach", "apex")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
AC_MODES = ("none", "selective", "full")
WANDB_MODES = ("online", "offline", "disabled")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(MinimaxError, ValueError):
    """A configuration value that cannot work; the message names the key and what is allowed."""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; use one of {', '.join(map(str, allowed))}")


def _positive(key: str, value, *, zero_ok: bool = False) -> None:
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}: must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def check_finite(obj, prefix: str = "") -> None:
    """Every float in a (nested) config dataclass is finite: a NaN or inf learning rate, coefficient or
    weight passes every range comparison and only shows up as NaN weights much later."""
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return
    for name, v in items:
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: must be a finite number, got {v!r}")
        check_finite(v, key)


@dataclass
class SegmentConfig:
    """One segment of optim.schedule=piecewise: from its start lr to `lr` over `steps` or `tokens`."""

    shape: str = "constant"  # constant (lr throughout) | linear | cosine | exponential (geometric)
    lr: float = 1.0e-4  # the lr at the segment's end (constant: throughout)
    steps: Optional[int] = None  # length in optimiser steps ...
    tokens: Optional[int] = None  # ... or in consumed tokens (exactly one of the two)
    start_lr: Optional[float] = None  # None: where the previous segment ended (the first: 0)


@dataclass
class OptimConfig:
    name: str = "adamw"
    impl: str = "auto"  # auto: apex FusedAdam if importable (GPU, unsharded), else torch fused on GPU, foreach on CPU
    lr: float = 3.0e-3  # peak learning rate
    min_lr: float = 3.0e-4  # final learning rate of the cosine / linear / wsd decay
    weight_decay: float = 0.1  # not applied to 1-D parameters (norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | linear | constant | piecewise
    warmup_steps: int = 10
    warmup_tokens: Optional[int] = None  # instead of warmup_steps: warm up until this many tokens are consumed
    decay_steps: Optional[int] = None  # wsd: length of the final decay; None: decay_fraction * train.steps
    decay_tokens: Optional[int] = None  # wsd, instead of decay_steps: the decay covers the last N tokens
    # piecewise: the whole schedule as segments in order (warmup included); the last lr holds after them
    segments: list[SegmentConfig] = field(default_factory=list)
    decay_fraction: float = 0.2  # wsd only
    decay_style: str = "sqrt"  # wsd decay shape: linear | cosine | sqrt (1 - sqrt, as MiniCPM/DeepSeek)

    def __post_init__(self):
        _choice("optim.name", self.name, ("adamw",))
        _choice("optim.impl", self.impl, OPTIM_IMPLS)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _choice("optim.decay_style", self.decay_style, DECAY_STYLES)
        _positive("optim.lr", self.lr)
        _positive("optim.min_lr", self.min_lr, zero_ok=True)
        if self.min_lr > self.lr and self.schedule != "piecewise":
            raise ConfigError(f"optim.min_lr={self.min_lr} exceeds optim.lr={self.lr}")
        _positive("optim.weight_decay", self.weight_decay, zero_ok=True)
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ConfigError(f"optim.{k}: must be in [0, 1), got {getattr(self, k)}")
        _positive("optim.eps", self.eps)
        _positive("optim.clip_grad", self.clip_grad, zero_ok=True)
        _positive("optim.warmup_steps", self.warmup_steps, zero_ok=True)
        if self.decay_steps is not None:
            _positive("optim.decay_steps", self.decay_steps, zero_ok=True)
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"optim.decay_fraction: must be in [0, 1], got {self.decay_fraction}")
        for k in ("warmup_tokens", "decay_tokens"):
            if getattr(self, k) is not None:
                _positive(f"optim.{k}", getattr(self, k), zero_ok=True)
        if self.warmup_tokens is not None and self.warmup_steps:
            raise ConfigError(
                f"optim.warmup_tokens={self.warmup_tokens} and optim.warmup_steps={self.warmup_steps}: "
                f"give one (set optim.warmup_steps=0)"
            )
        if self.decay_tokens is not None and self.decay_steps is not None:
            raise ConfigError("optim.decay_tokens and optim.decay_steps: give one (set optim.decay_steps=null)")
        if self.schedule == "piecewise":
            self._check_segments()
        elif self.segments:
            raise ConfigError(f"optim.segments is set but optim.schedule={self.schedule}; use optim.schedule=piecewise")

    def _check_segments(self) -> None:
        if not self.segments:
            raise ConfigError(
                "optim.schedule=piecewise needs optim.segments, e.g. "
                "'[{shape:linear,lr:2e-4,steps:500},{shape:constant,lr:2e-4,tokens:7200000000000}]'"
            )
        if self.warmup_steps or self.warmup_tokens:
            raise ConfigError(
                "optim.schedule=piecewise: the warmup is a segment (e.g. {shape:linear,lr:2e-4,steps:500}); "
                "set optim.warmup_steps=0"
            )
        prev = 0.0
        for i, seg in enumerate(self.segments):
            key = f"optim.segments[{i}]"
            _choice(f"{key}.shape", seg.shape, SEGMENT_SHAPES)
            if (seg.steps is None) == (seg.tokens is None):
                raise ConfigError(f"{key}: give exactly one of steps or tokens (its length)")
            _positive(f"{key}.{'steps' if seg.steps is not None else 'tokens'}", seg.steps or seg.tokens)
            _positive(f"{key}.lr", seg.lr, zero_ok=seg.shape != "exponential")
            start = prev if seg.start_lr is None else seg.start_lr
            if seg.start_lr is not None:
                _positive(f"{key}.start_lr", seg.start_lr, zero_ok=True)
            if seg.shape == "exponential" and not start > 0:
                raise ConfigError(
                    f"{key}: an exponential segment needs a start lr > 0 (got {start}); set {key}.start_lr"
                )
            prev = seg.lr


@dataclass
class TrainConfig:
    steps: int = 150  # optimiser steps
    seq_len: int = 128  # tokens per packed row
    global_batch_size: int = 8  # rows per optimiser step, over all data-parallel ranks (unused with batch_ramp)
    # [[consumed_tokens, global_batch_size], ...] from [0, rows]: the batch of a step is that of the last
    # threshold the tokens consumed before it reached (Megatron's --rampup-batch-size); null: global_batch_size
    batch_ramp: Optional[list[list[int]]] = None
    tokens: Optional[int] = None  # train this many tokens: train.steps is then derived (with the ramp)
    micro_batch_size: int = 4  # rows per forward/backward on one rank
    seed: int = 1234  # model init, data order, dropout/jitter
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto: bf16 autocast (fp32 master weights) on GPU, fp32 on CPU
    activation_checkpointing: str = "none"  # none | selective (attention) | full (whole layers)
    eval_interval: int = 50  # validation loss every N steps (and at the end); 0 disables
    eval_iters: int = 2  # validation micro-batches per data-parallel rank
    max_nonfinite_steps: int = 5  # stop after this many consecutive steps with NaN/inf loss or gradients
    loss_chunk_tokens: int = 8192  # lm_head + cross-entropy per chunk of N tokens, recomputed in backward; 0: off
    loss_kernel: str = "auto"  # auto: Liger's fused linear cross-entropy on CUDA if installed | chunked | liger
    moe_chunk_tokens: int = 0  # norm + MoE sublayer per checkpointed chunk of N tokens (long context); 0: off

    def __post_init__(self):
        for k in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "eval_iters", "max_nonfinite_steps"):
            _positive(f"train.{k}", getattr(self, k))
        _positive("train.eval_interval", self.eval_interval, zero_ok=True)
        _positive("train.loss_chunk_tokens", self.loss_chunk_tokens, zero_ok=True)
        _positive("train.moe_chunk_tokens", self.moe_chunk_tokens, zero_ok=True)
        _choice("train.device", self.device, DEVICES)
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.activation_checkpointing", self.activation_checkpointing, AC_MODES)
        _choice("train.loss_kernel", self.loss_kernel, LOSS_KERNELS)
        if self.tokens is not None:
            _positive("train.tokens", self.tokens)
        for key, g in self.batch_sizes():
            if g % self.micro_batch_size:
                raise ConfigError(
                    f"{key}={g} is not a multiple of train.micro_batch_size={self.micro_batch_size}; "
                    f"valid micro_batch_size: {_divs(g)}"
                )

    def ramp(self):
        """The BatchRamp of this config (one row of global_batch_size without train.batch_ramp)."""
        from minimax_train.train.batch_ramp import BatchRamp, BatchRampError

        try:
            return BatchRamp.from_train(self)
        except BatchRampError as e:
            raise ConfigError(str(e)) from None

    def batch_sizes(self) -> list[tuple[str, int]]:
        """(config key, rows) of every global batch size the run uses."""
        if not self.batch_ramp:
            return [("train.global_batch_size", self.global_batch_size)]
        return [(f"train.batch_ramp[{i}] global_batch_size", g) for i, g in enumerate(self.ramp().rows)]


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: <run dir>/checkpoints. A dir holding checkpoints is resumed from.
    interval: int = 100  # save every N steps; 0: only at the end
    keep_last: int = 2  # complete checkpoints kept; 0 keeps all
    save_final: bool = True  # save after the last step
    resume: bool = True  # resume from the latest complete checkpoint in dir when there is one
    # a fresh run into a dir holding another run's checkpoints: refused unless true (then they are
    # removed after the new run's first save)
    overwrite: bool = False
    init_from_hf: Optional[str] = None  # start a fresh run from these transformers weights
    # start a new run (its own step 0, data position and schedule) from this checkpoint (a step dir, or a
    # checkpoint.dir: its latest); model shapes must match, rope_theta / seq_len / data / schedule may change
    init_from: Optional[str] = None
    init_load: str = "model"  # model | model+optim (also the AdamW moments and step counts)
    require_init: bool = False  # refuse to start without init_from / init_from_hf (continuation recipes)

    def __post_init__(self):
        _positive("checkpoint.interval", self.interval, zero_ok=True)
        _positive("checkpoint.keep_last", self.keep_last, zero_ok=True)
        _choice("checkpoint.init_load", self.init_load, INIT_LOADS)
        if self.init_from is not None and self.init_from_hf is not None:
            raise ConfigError("checkpoint.init_from and checkpoint.init_from_hf: give one")


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "minimax_train"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: W&B picks one
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    notes: Optional[str] = None
    dir: Optional[str] = None  # None: the run dir

    def __post_init__(self):
        _choice("logging.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LoggingConfig:
    interval: int = 10  # console progress line every N steps (metrics.jsonl gets every step)
    level: str = "INFO"
    metrics_file: str = "metrics.jsonl"  # relative to the run dir
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: known GPUs (bf16 dense), null on CPU
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile_start: int = 0  # torch.profiler over optimiser steps profile_start.. (1-based); 0 disables
    profile_steps: int = 2  # steps profiled; trace + op table land in <run dir>/profile/

    def __post_init__(self):
        _positive("logging.interval", self.interval)
        _positive("logging.profile_start", self.profile_start, zero_ok=True)
        _positive("logging.profile_steps", self.profile_steps)
        _choice("logging.level", self.level, LOG_LEVELS)
        if self.peak_tflops is not None:
            _positive("logging.peak_tflops", self.peak_tflops)


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _divs(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def register_configs() -> None:
    """Register the schema as `config_schema` (conf/config.yaml lists it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=JobConfig)


def to_job_config(cfg: Any) -> JobConfig:
    """OmegaConf DictConfig (or plain dict) -> validated JobConfig. Raises ConfigError naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        # Always merge into a fresh schema: Hydra's `+key=value` appends bypass the struct flag, and
        # this merge rejects any key the schema does not have.
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ of ModelConfig / ParallelConfig
        raise ConfigError(str(e)) from None
    validate_job(job)
    return job


def _omegaconf_message(e) -> str:
    msg = str(e).split("\n")[0]
    key = getattr(e, "full_key", None)
    if key:
        return f"{key}: {msg}"
    return msg


def validate_job(job: JobConfig) -> None:
    """Cross-group checks that need no process group (layout checks against the world size happen when
    the mesh is built)."""
    try:
        validate_data_config(job.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_finite(job)
    t, o = job.train, job.optim
    if t.tokens is not None:
        t.steps = t.ramp().steps_for_tokens(t.tokens)  # train.steps follows train.tokens
    if o.warmup_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}")
    if o.schedule == "wsd" and o.decay_steps is not None and o.warmup_steps + o.decay_steps > t.steps:
        raise ConfigError(
            f"optim.warmup_steps + optim.decay_steps = {o.warmup_steps + o.decay_steps} exceeds train.steps={t.steps}"
        )
    if o.warmup_tokens is not None or o.decay_tokens is not None:
        from minimax_train.train.schedule import LRSchedule

        sc = LRSchedule(o, t.steps, t.ramp()).step_config
        if sc.warmup_steps + (sc.decay_steps or 0) > t.steps:
            raise ConfigError(
                f"optim.warmup_tokens / optim.decay_tokens cover {sc.warmup_steps} + {sc.decay_steps or 0} steps, "
                f"more than train.steps={t.steps} ({t.ramp().tokens_after(t.steps)} tokens)"
            )
    if job.model.max_position_embeddings < t.seq_len:
        raise ConfigError(
            f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={job.model.max_position_embeddings}"
        )
    if t.moe_chunk_tokens > 0 and job.model.moe_routing != "dropless":
        raise ConfigError(
            f"train.moe_chunk_tokens={t.moe_chunk_tokens} needs model.moe_routing=dropless (capacity "
            f"routing ranks all tokens of a micro-batch together); set train.moe_chunk_tokens=0"
        )
    # the layout rules that need no world size (the mesh checks the rest before any process group exists)
    from minimax_train.parallel.layout import ParallelConfigError, resolve_layout

    try:
        resolve_layout(job.parallel, None, job.model, job.train)
    except ParallelConfigError as e:
        raise ConfigError(str(e)) from None
    c = job.checkpoint
    if c.require_init and c.init_from is None and c.init_from_hf is None:
        raise ConfigError(
            "checkpoint.require_init: this config continues from another run; set "
            "checkpoint.init_from=<a checkpoint step dir or checkpoint.dir> (or checkpoint.init_from_hf=<dir>)"
        )
    if job.checkpoint.init_from_hf is not None and not Path(job.checkpoint.init_from_hf).is_dir():
        raise ConfigError(f"checkpoint.init_from_hf={job.checkpoint.init_from_hf!r}: no such directory")


def check_batch_layout(train: TrainConfig, dp: int, global_batch_size: Optional[int] = None) -> int:
    """Gradient-accumulation steps for `dp` data-parallel ranks (of train.global_batch_size, or of the given
    batch size: a batch_ramp row); a clear error when the batch does not split. Checks every ramp row
    when none is given."""
    if global_batch_size is None:
        accum = [check_batch_layout(train, dp, g) for _, g in train.batch_sizes()]
        return accum[0]
    g, m = global_batch_size, train.micro_batch_size
    key = next((k for k, v in train.batch_sizes() if v == g), "train.global_batch_size")
    if g % (m * dp):
        ok_m = [d for d in range(1, g // dp + 1) if g % (d * dp) == 0] if g % dp == 0 else []
        hint = (
            f"valid micro_batch_size for dp={dp}: {', '.join(map(str, ok_m))}"
            if ok_m
            else f"global_batch_size must be a multiple of dp={dp} (e.g. {dp * m}, {2 * dp * m})"
        )
        raise ConfigError(f"{key}={g} is not divisible by train.micro_batch_size * dp = {m} * {dp}; {hint}")
    return g // (m * dp)


def job_to_container(job: JobConfig) -> dict:
    """Plain nested dict (for config.yaml, W&B, checkpoints)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(job), resolve=True)


def job_to_yaml(job: JobConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(job))


def load_job_yaml(path) -> JobConfig:
    """Read a config.yaml written by job_to_yaml (e.g. one saved with a checkpoint)."""
    from omegaconf import OmegaConf

    return to_job_config(OmegaConf.load(path))


__all__ = [
    "JobConfig",
    "OptimConfig",
    "SegmentConfig",
    "TrainConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "WandbConfig",
    "ModelConfig",
    "DataConfig",
    "SourceConfig",
    "ParallelConfig",
    "ConfigError",
    "register_configs",
    "to_job_config",
    "validate_job",
    "check_batch_layout",
    "job_to_container",
    "job_to_yaml",
    "load_job_yaml",
]
