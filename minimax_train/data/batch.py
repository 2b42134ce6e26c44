"""PackedBatch: a micro-batch of packed rows, and its construction from rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import Row

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # int64 [mbs, T]
    labels: torch.Tensor  # int64 [mbs, T]: next token of the same segment, -100 where no loss
    position_ids: torch.Tensor  # int64 [mbs, T]: restart at 0 at every segment start
    cu_seqlens: torch.Tensor  # int32 [n+1]: segment boundaries over the flattened mbs*T tokens

    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """The token tensors on `device`; cu_seqlens stays where it is (the host, from collate): the model
        reads document lengths from it without a device sync and copies it over itself."""
        ids, labels, pos = (
            t.to(device, non_blocking=non_blocking) for t in (self.input_ids, self.labels, self.position_ids)
        )
        return PackedBatch(ids, labels, pos, self.cu_seqlens)


def collate(rows: list[Row], seq_len: int, pad_id: int) -> PackedBatch:
    """Rows (materialised; a short or empty one is padded with its own segment) -> PackedBatch."""
    mbs = len(rows)
    ids = np.full((mbs, seq_len), pad_id, dtype=np.int64)
    labels = np.full((mbs, seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.empty((mbs, seq_len), dtype=np.int64)
    bounds = [0]
    for b, row in enumerate(rows):
        seglens = list(row.seglens)
        n = sum(seglens)
        if n:
            ids[b, :n] = row.tokens
            labels[b, : n - 1] = row.tokens[1:]
        if n < seq_len:
            seglens.append(seq_len - n)  # padding: own segment, no loss
        ends = np.cumsum(seglens)
        starts = ends - np.asarray(seglens)
        labels[b, ends[ends <= n] - 1] = IGNORE_INDEX  # last token of each segment predicts nothing
        pos[b] = np.arange(seq_len) - np.repeat(starts, seglens)
        bounds.extend((b * seq_len + ends).tolist())
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(pos),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
    )
