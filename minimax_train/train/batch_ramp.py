"""Global batch size as a function of the tokens consumed (train.batch_ramp), and the step <-> token map.

A ramp is a list of [consumed_tokens, global_batch_size] rows, thresholds strictly increasing from 0:
the update made after `c` tokens were consumed uses the batch of the last row whose threshold is <= c.
The batch therefore changes exactly at the first step that starts at or past a threshold (Megatron's
--rampup-batch-size counts samples the same way). Without a ramp the batch is train.global_batch_size.

Everything here is a pure function of the step (or of the tokens), so a resumed run recomputes the same
batch sizes from the checkpointed token count, and token-based schedule lengths map to steps exactly."""

from __future__ import annotations

from dataclasses import dataclass


class BatchRampError(ValueError):
    """A ramp that cannot work; the message names train.batch_ramp."""


@dataclass(frozen=True)
class BatchRamp:
    thresholds: tuple[int, ...]  # consumed tokens at which each row starts (first: 0)
    rows: tuple[int, ...]  # global batch size (rows per step) from that threshold on
    seq_len: int

    @classmethod
    def from_train(cls, train) -> BatchRamp:
        """The ramp of a TrainConfig (a one-row ramp of global_batch_size when train.batch_ramp is unset)."""
        spec = train.batch_ramp if train.batch_ramp else [[0, train.global_batch_size]]
        return cls.from_spec(spec, train.seq_len)

    @classmethod
    def from_spec(cls, spec, seq_len: int) -> BatchRamp:
        if not spec:
            raise BatchRampError("train.batch_ramp: empty; give [[0, rows], [tokens, rows], ...] or null")
        thresholds, rows = [], []
        for i, pair in enumerate(spec):
            if len(pair) != 2:
                raise BatchRampError(
                    f"train.batch_ramp[{i}]={list(pair)!r}: expected [consumed_tokens, global_batch_size]"
                )
            t, g = pair
            if t is None or g is None or int(t) != t or int(g) != g:
                raise BatchRampError(f"train.batch_ramp[{i}]={list(pair)!r}: both entries must be whole numbers")
            thresholds.append(int(t))
            rows.append(int(g))
        if thresholds[0] != 0:
            raise BatchRampError(
                f"train.batch_ramp[0] starts at {thresholds[0]} tokens; the first row must start at 0 "
                f"(e.g. [[0, {rows[0]}], ...])"
            )
        for i in range(1, len(thresholds)):
            if thresholds[i] <= thresholds[i - 1]:
                raise BatchRampError(
                    f"train.batch_ramp[{i}]: threshold {thresholds[i]} is not above the previous one "
                    f"({thresholds[i - 1]}); thresholds must increase"
                )
        for i, g in enumerate(rows):
            if g < 1:
                raise BatchRampError(f"train.batch_ramp[{i}]: global_batch_size must be > 0, got {g}")
        return cls(tuple(thresholds), tuple(rows), int(seq_len))

    @property
    def ramped(self) -> bool:
        return len(self.rows) > 1

    def rows_at(self, consumed_tokens: int) -> int:
        """Global batch size (rows) of the step that starts after `consumed_tokens` tokens."""
        g = self.rows[0]
        for t, r in zip(self.thresholds, self.rows):
            if consumed_tokens >= t:
                g = r
        return g

    def tokens_after(self, steps: int) -> int:
        """Tokens consumed by the first `steps` optimiser steps (closed form per ramp row)."""
        tokens, done = 0, 0
        for i, rows in enumerate(self.rows):
            per_step = rows * self.seq_len
            if i + 1 < len(self.rows):
                # steps of this row: until the consumed tokens reach the next threshold
                n = max(0, -(-(self.thresholds[i + 1] - tokens) // per_step))
                n = min(n, steps - done)
            else:
                n = steps - done
            tokens += n * per_step
            done += n
            if done == steps:
                break
        return tokens

    def steps_for_tokens(self, target: int) -> int:
        """The fewest optimiser steps whose consumed tokens reach `target`."""
        tokens, steps = 0, 0
        for i, rows in enumerate(self.rows):
            if tokens >= target:
                break
            per_step = rows * self.seq_len
            end = target if i + 1 == len(self.rows) else min(target, self.thresholds[i + 1])
            n = max(0, -(-(end - tokens) // per_step))
            tokens += n * per_step
            steps += n
        return steps
