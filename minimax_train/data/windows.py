"""Sample-level shuffling: the rows of one source's packed stream, emitted in a shuffled order.

This is the order of Megatron's GPTDataset (document index -> sample index -> shuffle index): the
documents of an epoch are shuffled, packed into a stream, cut into windows of seq_len tokens (the
packer's rows, which keep document boundaries as segments), and the windows are shuffled, so a long
document no longer fills many consecutive steps.

Windows are shuffled within spans: a span holds the rows whose first token belongs to one epoch,
up to span_rows of them (an epoch larger than that is cut into several spans). A span's rows are
read in packing order, held in memory and emitted in a permutation drawn from (seed, source index,
epoch, span number). Every row of the packed stream is emitted exactly once, nothing is padded or
dropped, and a row that runs past an epoch's end (into the next epoch's first document) belongs to
the span of the epoch it starts in.

Position: the packer state at the span's first row, the span's (epoch, number) and how many of its
rows were emitted. Resuming re-reads that span from the packer and skips the emitted rows."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .packing import Row, RowPacker

_SPAN_SEED_TAG = 1  # keeps span permutations apart from the document permutations of the same epoch


def _compact(row: Row) -> Row:
    row.tokens = row.tokens.astype(np.int32)  # vocabularies fit int32: half the memory while a span waits
    return row


class SpanShuffler:
    def __init__(self, packer: RowPacker, *, seed: int, index: int, span_rows: int):
        self.packer, self.seed, self.index = packer, seed, index
        self.span_rows = max(1, int(span_rows))
        self._start = packer.state_dict()  # packer position of the current span's first row
        self._epoch, self._span = 0, 0  # the current span; settled by its first row (see _read_span)
        self._emitted = 0  # rows of the current span already returned
        self._rows: Optional[list[Row]] = None  # the current span in emission order; None: not read yet
        self._ahead: Optional[tuple[dict, Row]] = None  # first row of the next span, read past this one's end

    def next_row(self, materialize: bool = True) -> Row:
        """The next row of the shuffled stream (always materialised: a span is read once, in order)."""
        if self._rows is None:
            self._read_span()
        row = self._rows[self._emitted]
        self._emitted += 1
        if self._emitted == len(self._rows):
            self._next_span()
        return row

    def _read_span(self) -> None:
        rows: list[Row] = []
        if self._ahead is not None:
            rows.append(_compact(self._ahead[1]))
            self._ahead = None
        while len(rows) < self.span_rows:
            before = self.packer.state_dict()
            row = self.packer.next_row(materialize=True)
            assert row is not None, "the train stream is infinite"
            if not rows and row.epoch != self._epoch:  # a span cut by size ended where an epoch did
                self._epoch, self._span = row.epoch, 0
            if row.epoch != self._epoch:
                self._ahead = (before, row)
                break
            rows.append(_compact(row))
        rng = np.random.default_rng([self.seed % 2**64, self.index, self._epoch, self._span, _SPAN_SEED_TAG])
        self._rows = [rows[i] for i in rng.permutation(len(rows))]

    def _next_span(self) -> None:
        if self._ahead is not None:  # the epoch ended: its first row starts the next epoch's span 0
            self._start = self._ahead[0]
            self._epoch, self._span = self._ahead[1].epoch, 0
        else:  # the span reached span_rows: the next one continues the epoch (or starts one, see _read_span)
            self._start = self.packer.state_dict()
            self._span += 1
        self._rows, self._emitted = None, 0

    def state_dict(self) -> dict:
        return {"start": dict(self._start), "epoch": self._epoch, "span": self._span, "emitted": self._emitted}

    def load_state_dict(self, sd: dict) -> None:
        self._start = {k: int(v) for k, v in sd["start"].items()}
        self._epoch, self._span, self._emitted = int(sd["epoch"]), int(sd["span"]), int(sd["emitted"])
        self._rows, self._ahead = None, None
        self.packer.load_state_dict(self._start)
