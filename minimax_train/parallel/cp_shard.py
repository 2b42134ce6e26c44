"""Context-parallel sharding of packed rows: the zigzag layout shared by both attention kinds.

Each packed row of T tokens is cut into 2*cp chunks of n = T / (2*cp) tokens; rank r keeps chunks r and
2*cp-1-r (zigzag, which balances causal softmax work) and sees them concatenated: [chunk r | chunk 2cp-1-r]
per row, rows one after the other. Documents are not padded; their boundaries are translated:

- cu_seqlens (local): boundaries over the local token stream, with an extra boundary at every local
  segment start (a segment = one chunk of one row), since the two chunks of a row are not contiguous.
  The lightning op runs on these local pieces from a zero state; LASP+ supplies the carried state.
- doc_ids (global): the index of each token's document in the global cu_seqlens, equal on all ranks.
- causal_pos (global): the index of each token in the flattened [B*T] stream (causality across chunks).
- rope_pos: position inside the document (or the given position_ids).

`CPShardInfo` (attached as `seq.cp`) keeps what LASP+ and ring attention need about all ranks: the
global document starts, which global chunks contain a document start, and per local segment the first
document start and the local piece that ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..model.layers import PackedSequence


def zigzag_chunks(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunk indices (of 2*cp_size per row) that rank cp_rank holds, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def zigzag_token_index(rows: int, row_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """int64 [rows * row_len / cp]: for every local token, its index in the flattened [rows * row_len] batch."""
    _check_divisible(row_len, cp_size)
    n = row_len // (2 * cp_size)
    c0, c1 = zigzag_chunks(cp_rank, cp_size)
    base = torch.arange(n, device=device, dtype=torch.long)
    per_row = torch.cat([c0 * n + base, c1 * n + base])
    return (torch.arange(rows, device=device, dtype=torch.long)[:, None] * row_len + per_row[None]).reshape(-1)


def _check_divisible(row_len: int, cp_size: int) -> None:
    if cp_size < 1:
        raise ValueError(f"context parallel size must be >= 1, got {cp_size}")
    if row_len % (2 * cp_size):
        raise ValueError(
            f"train.seq_len={row_len} must be divisible by 2*parallel.cp={2 * cp_size} "
            f"(zigzag context parallelism cuts each row into 2*cp equal chunks)"
        )


@dataclass
class CPShardInfo:
    """What the context-parallel cores need to know about the whole row, on every rank."""

    rank: int
    size: int
    rows: int  # packed rows in the micro-batch
    row_len: int  # T, tokens per (global) row
    chunk: int  # n = T / (2 * size)
    cu_seqlens: torch.Tensor  # int64 [N+1] global document boundaries over rows * T
    chunk_has_start: torch.Tensor  # bool [rows, 2*size]: a document starts at one of the chunk's positions
    seg_chunk: list[int]  # per local segment: its chunk index c in 0..2*size-1 (row = segment // 2)
    seg_first_start: list[int]  # per local segment: offset of its first document start (chunk if none)
    seg_last_piece: torch.Tensor  # int64 [2*rows]: index of the local cu_seqlens piece that ends the segment
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_segments(self) -> int:
        return 2 * self.rows

    def segment_bounds(self, j: int) -> tuple[int, int]:
        return j * self.chunk, (j + 1) * self.chunk

    def chunk_ranges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per global chunk [rows, 2*size]: (first doc, last doc, first pos, last pos) in global terms."""
        key = "chunk_ranges"
        if key not in self._cache:
            dev = self.cu_seqlens.device
            c = torch.arange(2 * self.size, device=dev)
            start = torch.arange(self.rows, device=dev)[:, None] * self.row_len + c[None] * self.chunk
            end = start + self.chunk - 1
            ends = self.cu_seqlens[1:]
            self._cache[key] = (
                torch.searchsorted(ends, start, right=True),
                torch.searchsorted(ends, end, right=True),
                start,
                end,
            )
        return self._cache[key]

    def rank_doc_pos(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(doc_ids, causal_pos) of rank `rank`'s local tokens, computed from the global boundaries."""
        key = ("doc_pos", rank)
        if key not in self._cache:
            pos = zigzag_token_index(self.rows, self.row_len, rank, self.size, device=self.cu_seqlens.device)
            doc = torch.searchsorted(self.cu_seqlens[1:], pos, right=True)
            self._cache[key] = (doc, pos)
        return self._cache[key]


@dataclass
class CPPackedSequence(PackedSequence):
    """A PackedSequence for one context-parallel shard; `cp` holds the global view (see CPShardInfo)."""

    cp: Optional[CPShardInfo] = None


def build_cp_sequence(
    cu_seqlens: torch.Tensor,
    rows: int,
    row_len: int,
    cp_rank: int,
    cp_size: int,
    position_ids: Optional[torch.Tensor] = None,
    device=None,
) -> CPPackedSequence:
    """The local PackedSequence of rank cp_rank for a [rows, row_len] batch with global cu_seqlens."""
    _check_divisible(row_len, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} out of range for cp_size={cp_size}")
    device = cu_seqlens.device if device is None else device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    total = rows * row_len
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor rising from 0 to rows*seq_len={total}, got "
            f"{cu.tolist() if cu.numel() < 20 else tuple(cu.shape)}"
        )
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    row_starts = torch.arange(0, total, row_len, device=device)
    if not bool(torch.isin(row_starts, cu).all()):
        raise ValueError(
            f"cu_seqlens must have a boundary at every row start (multiples of seq_len={row_len}): "
            f"a document cannot cross packed rows"
        )
    n = row_len // (2 * cp_size)
    idx = zigzag_token_index(rows, row_len, cp_rank, cp_size, device=device)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    if position_ids is None:
        rope_pos = idx - cu[doc]
    else:
        if position_ids.numel() != total:
            raise ValueError(f"position_ids has {position_ids.numel()} elements, expected rows*seq_len={total}")
        rope_pos = position_ids.reshape(-1).to(device)[idx]
    local_len = idx.numel()
    change = torch.ones(local_len, dtype=torch.bool, device=device)
    change[1:] = doc[1:] != doc[:-1]
    change[::n] = True  # every local segment starts a local piece
    local_cu = torch.cat([change.nonzero().flatten(), torch.tensor([local_len], device=device)]).to(torch.int32)

    # document starts (the real ones: a zero-length document's start coincides with the next start)
    starts = torch.unique(cu[:-1])
    num_chunks = rows * 2 * cp_size
    chunk_start = torch.arange(num_chunks, device=device) * n  # chunk g = (b, c) starts at b*T + c*n = g*n
    first = torch.searchsorted(starts, chunk_start)  # first start >= chunk start
    first_off = torch.where(
        first < starts.numel(),
        starts[first.clamp(max=starts.numel() - 1)] - chunk_start,
        torch.full_like(chunk_start, n),
    )
    first_off = first_off.clamp(max=n)
    chunk_has_start = (first_off < n).view(rows, 2 * cp_size)
    c0, c1 = zigzag_chunks(cp_rank, cp_size)
    seg_chunk = [c for _ in range(rows) for c in (c0, c1)]
    first_list = first_off.tolist()
    seg_first = [first_list[b * 2 * cp_size + c] for b in range(rows) for c in (c0, c1)]
    seg_ends = torch.arange(1, 2 * rows + 1, device=device) * n
    seg_last_piece = torch.searchsorted(local_cu.long(), seg_ends) - 1
    info = CPShardInfo(
        rank=cp_rank,
        size=cp_size,
        rows=rows,
        row_len=row_len,
        chunk=n,
        cu_seqlens=cu,
        chunk_has_start=chunk_has_start,
        seg_chunk=seg_chunk,
        seg_first_start=seg_first,
        seg_last_piece=seg_last_piece,
    )
    return CPPackedSequence(cu_seqlens=local_cu, doc_ids=doc, causal_pos=idx, rope_pos=rope_pos, cp=info)


def shard_for_context_parallel(
    input_ids: torch.Tensor,
    labels: Optional[torch.Tensor],
    cu_seqlens: torch.Tensor,
    cp_rank: int,
    cp_size: int,
    position_ids: Optional[torch.Tensor] = None,
):
    """Cut a packed micro-batch into this rank's zigzag shard.

    input_ids, labels, position_ids: [B, T] (or [T]); labels are the aligned next-token targets (-100: no
    loss) and are sharded like the inputs; cu_seqlens: document boundaries over the flattened B*T tokens
    (every row start must be a boundary). T must be divisible by 2*cp_size.

    Returns (local_input_ids [B, T/cp], local_labels [B, T/cp] or None, CPPackedSequence); pass the
    sequence to the model as `model(local_input_ids, labels=local_labels, seq=seq)`.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    rows, row_len = input_ids.shape
    seq = build_cp_sequence(
        cu_seqlens, rows, row_len, cp_rank, cp_size, position_ids=position_ids, device=input_ids.device
    )
    idx = seq.causal_pos
    local_ids = input_ids.reshape(-1)[idx].view(rows, -1)
    local_labels = None
    if labels is not None:
        if labels.numel() != input_ids.numel():
            raise ValueError(f"labels has {labels.numel()} elements, input_ids {input_ids.numel()}")
        local_labels = labels.reshape(-1)[idx].view(rows, -1)
    return local_ids, local_labels, seq


def unshard_from_context_parallel(shards: list[torch.Tensor], rows: int, row_len: int) -> torch.Tensor:
    """Inverse of the sharding for tests and tools: the cp per-rank tensors [rows * T/cp, ...] (in rank
    order) -> [rows * T, ...] in global token order."""
    cp = len(shards)
    out = shards[0].new_empty((rows * row_len,) + tuple(shards[0].shape[1:]))
    for r, s in enumerate(shards):
        out[zigzag_token_index(rows, row_len, r, cp, device=s.device)] = s
    return out


__all__ = [
    "CPShardInfo",
    "CPPackedSequence",
    "build_cp_sequence",
    "shard_for_context_parallel",
    "unshard_from_context_parallel",
    "zigzag_chunks",
    "zigzag_token_index",
]
