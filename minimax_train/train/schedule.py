"""The learning rate of every optimiser step, with lengths in steps or in consumed tokens.

cosine / wsd / linear / constant are optim.lr_at's (in steps); optim.warmup_tokens and optim.decay_tokens
are converted to steps through the batch ramp first. piecewise chains optim.segments: each one runs from
its start lr (the previous segment's end) to its `lr` over `steps` updates or `tokens` consumed tokens,
reaching `lr` at its last update; after the last segment its lr holds.

Progress inside a segment is that after the update: (updates done in it) / steps, or (tokens consumed
since its start) / tokens, clamped to 1. A token segment ends at the first step whose consumed tokens
reach its length (the next segment starts there), so with a batch ramp the boundaries fall where the
tokens say, not where a fixed batch would put them. All of it is a pure function of the step."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minimax_train.config import OptimConfig
from minimax_train.train.batch_ramp import BatchRamp
from minimax_train.train.optim import lr_at


@dataclass(frozen=True)
class _Segment:
    start: int  # first 0-based step of the segment
    end: int  # one past its last step
    start_tokens: int  # tokens consumed before its first step
    tokens: int  # its length in tokens (0: the length is in steps)
    shape: str
    lr0: float
    lr1: float


def _shape(shape: str, lr0: float, lr1: float, p: float) -> float:
    if shape == "constant":
        return lr1
    if shape == "linear":
        return lr0 + (lr1 - lr0) * p
    if shape == "cosine":
        return lr1 + (lr0 - lr1) * 0.5 * (1.0 + math.cos(math.pi * p))
    return lr0 * (lr1 / lr0) ** p  # exponential: the same factor per unit of progress


class LRSchedule:
    def __init__(self, cfg: OptimConfig, total_steps: int, ramp: BatchRamp):
        self.cfg, self.total_steps, self.ramp = cfg, total_steps, ramp
        if cfg.schedule != "piecewise":
            # token lengths -> steps, then the step schedules unchanged
            repl = {}
            if cfg.warmup_tokens is not None:
                repl["warmup_steps"] = ramp.steps_for_tokens(cfg.warmup_tokens)
                repl["warmup_tokens"] = None
            if cfg.decay_tokens is not None:
                done = ramp.tokens_after(total_steps)
                repl["decay_steps"] = total_steps - ramp.steps_for_tokens(max(0, done - cfg.decay_tokens))
                repl["decay_tokens"] = None
            self._step_cfg = dataclasses.replace(cfg, **repl) if repl else cfg
            self.segments: list[_Segment] = []
            return
        segs, step, lr_prev = [], 0, 0.0
        for s in cfg.segments:
            lr0 = lr_prev if s.start_lr is None else float(s.start_lr)
            t0 = ramp.tokens_after(step)
            if s.steps is not None:
                end, length = step + int(s.steps), 0
            else:
                end, length = ramp.steps_for_tokens(t0 + int(s.tokens)), int(s.tokens)
            segs.append(_Segment(step, end, t0, length, s.shape, lr0, float(s.lr)))
            step, lr_prev = end, float(s.lr)
        self.segments = segs

    @property
    def step_config(self) -> OptimConfig:
        """The OptimConfig the step schedules run on (token lengths converted); not for piecewise."""
        return self._step_cfg

    def lr(self, step: int) -> float:
        """Learning rate of the update made at 0-based optimiser step `step`."""
        if not self.segments:
            return lr_at(step, self._step_cfg, self.total_steps)
        for seg in self.segments:
            if seg.start <= step < seg.end:
                if seg.tokens:
                    p = (self.ramp.tokens_after(step + 1) - seg.start_tokens) / seg.tokens
                else:
                    p = (step + 1 - seg.start) / (seg.end - seg.start)
                return _shape(seg.shape, seg.lr0, seg.lr1, min(1.0, p))
        return self.segments[-1].lr1 if step >= self.segments[-1].end else self.segments[0].lr0

    def describe(self) -> str:
        if not self.segments:
            return self.cfg.schedule
        parts = [f"{s.shape} {s.lr0:.3g}->{s.lr1:.3g} over steps {s.start + 1}..{s.end}" for s in self.segments]
        return "piecewise: " + "; ".join(parts)
