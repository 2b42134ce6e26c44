"""Pipeline-parallel layout rules, pure functions (no process group): the schedules, how many model chunks
(virtual stages) each pp rank holds, which layers each stage holds, and which rank runs each stage.

A pipeline of S = pp x virtual stages stages. Stage s holds a contiguous run of decoder layers; stage 0 also
holds the embedding and stage S-1 the final norm, the lm_head and the loss. The balanced split (TorchTitan's
and Megatron's `account_for_embedding/loss_in_pipeline_split`) counts the embedding and the head+loss as
one layer each, spreads the L + 2 units as evenly as possible over the stages (earlier stages take the
remainder) and gives the layers what is left; `parallel.pp_split` overrides it with the first layer of
stages 1..S-1. Stage placement: loop (stage s on rank s mod pp) for gpipe / 1f1b / interleaved schedules,
V (rank r holds stages r and 2pp-1-r) for zbv and dualpipev."""

from __future__ import annotations

from dataclasses import dataclass

from minimax_train.errors import MinimaxError

# schedule -> (torch.distributed.pipelining class, stages per rank: 1 = exactly one, 2 = exactly two,
# 0 = any number >= 1 (interleaved), placement style)
SCHEDULES = {
    "gpipe": ("ScheduleGPipe", 1, "loop"),
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", 0, "loop"),
    "interleaved_zb": ("ScheduleInterleavedZeroBubble", 0, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
}


def _error(msg: str) -> MinimaxError:
    from .layout import ParallelConfigError

    return ParallelConfigError(msg)


@dataclass(frozen=True)
class StageSpec:
    """Stage `index` of `num_stages`: decoder layers [first_layer, end_layer), on pp rank `rank`."""

    index: int
    num_stages: int
    first_layer: int
    end_layer: int
    rank: int

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)


def virtual_stages(cfg) -> int:
    """Model chunks per pp rank for parallel.pp_schedule (parallel.pp_virtual_stages, 0 = the schedule's)."""
    _, per_rank, _ = SCHEDULES[cfg.pp_schedule]
    if cfg.pp_virtual_stages:
        return cfg.pp_virtual_stages
    return 1 if per_rank == 1 else 2


def check_pipeline_config(cfg) -> None:
    """The pp keys on their own (no model, world or batch needed)."""
    if cfg.pp_schedule not in SCHEDULES:
        raise _error(f"parallel.pp_schedule: unknown '{cfg.pp_schedule}'; use one of {', '.join(SCHEDULES)}")
    if not isinstance(cfg.pp_virtual_stages, int) or cfg.pp_virtual_stages < 0:
        raise _error(
            f"parallel.pp_virtual_stages: must be 0 (the schedule's) or positive, got {cfg.pp_virtual_stages!r}"
        )
    if cfg.pp == 1:
        return
    _, per_rank, _ = SCHEDULES[cfg.pp_schedule]
    v = virtual_stages(cfg)
    if per_rank and v != per_rank:
        need = "one model chunk" if per_rank == 1 else "exactly 2 model chunks (a V)"
        hint = "use parallel.pp_schedule=interleaved_1f1b for several" if per_rank == 1 else "set 2 or 0"
        raise _error(
            f"parallel.pp_schedule={cfg.pp_schedule} runs {need} per pp rank, got parallel.pp_virtual_stages={v}; "
            f"{hint}"
        )
    if cfg.grad_sync == "micro":
        raise _error(
            "parallel.grad_sync=micro with parallel.pp > 1: the pipeline schedule reduces gradients once, after "
            "the last micro-batch's backward; use parallel.grad_sync=step"
        )


def stage_layer_bounds(num_layers: int, num_stages: int, split=None) -> list[tuple[int, int]]:
    """[first, end) decoder layers of every stage: `split` (first layer of stages 1..S-1) or balanced."""
    if split is not None:
        split = list(split)
        if len(split) != num_stages - 1:
            raise _error(
                f"parallel.pp_split={split}: needs {num_stages - 1} layer indices (the first layer of stages "
                f"1..{num_stages - 1}; {num_stages} stages = pp x virtual stages), got {len(split)}"
            )
        bounds = [0, *split, num_layers]
        if any(not isinstance(b, int) for b in split) or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise _error(f"parallel.pp_split={split}: must be non-decreasing layer indices in 0..{num_layers}")
        if bounds[-2] > num_layers:
            raise _error(f"parallel.pp_split={split}: layer {bounds[-2]} is past the last layer ({num_layers - 1})")
    else:
        units = num_layers + 2  # the embedding and the head + loss weigh one layer each
        base, extra = divmod(units, num_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
        sizes[0] -= 1
        sizes[-1] -= 1
        if min(sizes) < 0:  # fewer layers than stages need: every stage then gets at least its share
            sizes = [num_layers // num_stages + (1 if s < num_layers % num_stages else 0) for s in range(num_stages)]
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
    out = list(zip(bounds, bounds[1:]))
    for s, (a, b) in enumerate(out):
        if a == b and 0 < s < num_stages - 1:  # the first and last stages still hold the embedding / head
            where = f"parallel.pp_split={split}" if split is not None else "the balanced split"
            raise _error(
                f"{where} leaves pipeline stage {s} of {num_stages} without layers; give every stage at "
                f"least one layer (fewer stages, or another parallel.pp_split)"
            )
    return out


def stage_rank(stage: int, pp: int, style: str) -> int:
    if style == "v":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def pipeline_stages(cfg, num_layers: int) -> list[StageSpec]:
    """Every stage of the pipeline of `cfg` (a ParallelConfig) for a model of `num_layers` layers."""
    _, _, style = SCHEDULES[cfg.pp_schedule]
    n = cfg.pp * virtual_stages(cfg)
    bounds = stage_layer_bounds(num_layers, n, cfg.pp_split)
    return [StageSpec(s, n, a, b, stage_rank(s, cfg.pp, style)) for s, (a, b) in enumerate(bounds)]


def min_microbatches(cfg) -> int:
    """The fewest micro-batches per step the schedule runs with (TorchTitan's and Megatron's rule: at least
    one per stage of the first round; DualPipeV: one per stage)."""
    if cfg.pp_schedule == "gpipe":
        return 1
    if cfg.pp_schedule == "dualpipev":
        return cfg.pp * virtual_stages(cfg)
    return cfg.pp


def check_microbatches(cfg, m: int, key: str) -> None:
    need = min_microbatches(cfg)
    if m < need:
        raise _error(
            f"parallel.pp_schedule={cfg.pp_schedule} with parallel.pp={cfg.pp} needs at least {need} micro-batches "
            f"per step, {key} gives {m} (global batch / (micro_batch_size x dp)); raise the global batch or "
            f"lower train.micro_batch_size"
        )
    if cfg.pp_schedule in ("interleaved_1f1b", "interleaved_zb"):
        rounds = max(1, m // cfg.pp)
        if m % rounds:
            raise _error(
                f"parallel.pp_schedule={cfg.pp_schedule}: {key} gives {m} micro-batches per step, which must be a "
                f"multiple of {rounds} (micro-batches // pp); use a multiple of parallel.pp={cfg.pp}"
            )


def check_pipeline_layout(cfg, model_cfg=None, train_cfg=None, dp: int | None = None) -> None:
    """pp against the model (layers, tied embeddings) and the batch (micro-batches per step, for every
    batch size of the ramp), before any process group exists."""
    v = virtual_stages(cfg)
    n = cfg.pp * v
    if model_cfg is not None:
        layers = model_cfg.num_hidden_layers
        if cfg.pp > layers:
            raise _error(f"parallel.pp={cfg.pp} exceeds the model's {layers} layers; use parallel.pp <= {layers}")
        if n > layers and cfg.pp_split is None:
            raise _error(
                f"parallel.pp={cfg.pp} x {v} virtual stages = {n} stages for {layers} layers: use fewer "
                f"parallel.pp_virtual_stages (at most {max(1, layers // cfg.pp)}) or a parallel.pp_split"
            )
        stage_layer_bounds(layers, n, cfg.pp_split)
        if model_cfg.tie_word_embeddings:
            raise _error(
                "model.tie_word_embeddings=true with parallel.pp > 1: the embedding (first stage) and the lm_head "
                "(last stage) would live on different ranks; untie them or use parallel.pp=1"
            )
    if train_cfg is not None and dp is not None:
        for key, g in train_cfg.batch_sizes():
            per = train_cfg.micro_batch_size * dp
            if g % per == 0:
                check_microbatches(cfg, g // per, key)


__all__ = [
    "SCHEDULES",
    "StageSpec",
    "check_microbatches",
    "check_pipeline_config",
    "check_pipeline_layout",
    "min_microbatches",
    "pipeline_stages",
    "stage_layer_bounds",
    "virtual_stages",
]
