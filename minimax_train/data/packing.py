"""Greedy packing of one document stream into rows of exactly seq_len tokens.

Documents are concatenated in stream order; a document that does not fit the rest of a row
continues at the start of the next row as a new segment (positions restart there). Only a finite
stream's last row can be short (the batch builder pads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .docstream import DocStream


@dataclass
class Row:
    seglens: list[int]  # lengths of the document segments, in order; sum <= seq_len
    tokens: Optional[np.ndarray] = None  # int64 [sum(seglens)]; None when not materialised
    epoch: int = 0  # epoch of the document the row's first token belongs to


class RowPacker:
    def __init__(self, docs: DocStream, seq_len: int):
        self.docs, self.seq_len = docs, seq_len
        self._cur = None  # (epoch, pos, tokens) of the document being consumed
        self._offset = 0  # tokens of _cur already emitted
        self._next = (0, 0)  # where the stream resumes when _cur is None
        self._resume_offset = 0

    def next_row(self, materialize: bool = True) -> Optional[Row]:
        """The next row, or None once a finite stream is exhausted."""
        need, pieces, seglens, first_epoch = self.seq_len, [], [], None
        while need > 0:
            if self._cur is None:
                item = self.docs.next_doc()
                if item is None:
                    break
                self._cur, self._offset = item, 0
                if self._resume_offset:  # first document after load_state_dict: continue mid-document
                    assert (item[0], item[1]) == self._next, "resumed stream does not start at the saved document"
                    self._offset, self._resume_offset = self._resume_offset, 0
            epoch, pos, toks = self._cur
            first_epoch = epoch if first_epoch is None else first_epoch
            take = min(need, len(toks) - self._offset)
            if materialize:
                pieces.append(toks[self._offset : self._offset + take])
            seglens.append(take)
            self._offset += take
            need -= take
            if self._offset == len(toks):
                self._cur, self._next = None, (epoch, pos + 1)
        if not seglens:
            return None
        tokens = None
        if materialize:
            tokens = pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)
        return Row(seglens, tokens, first_epoch)

    def state_dict(self) -> dict:
        if self._cur is not None:
            return {"epoch": int(self._cur[0]), "pos": int(self._cur[1]), "offset": int(self._offset)}
        return {"epoch": int(self._next[0]), "pos": int(self._next[1]), "offset": 0}

    def load_state_dict(self, sd: dict) -> None:
        self._cur = None
        self._next = (int(sd["epoch"]), int(sd["pos"]))
        self._resume_offset = int(sd["offset"])
        self.docs.seek(*self._next)
