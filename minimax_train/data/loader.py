"""The loader: one deterministic global row stream, blended from sources and sharded by rank.

Global row i goes to data-parallel rank i % dp_size. Every rank builds the whole stream (each
source packed on its own) and materialises only its rows, so any layout sees the same global rows
in the same steps: rank r's j-th micro-batch holds global rows r + dp*(j*mbs + k), k < mbs.

State is saved at a group boundary (a multiple of dp_size global rows), identical on all ranks,
so it reloads into any dp_size that divides the number of global rows consumed."""

from __future__ import annotations

import json
import logging
from typing import Optional

from .batch import PackedBatch, collate
from .config import SPLITS, DataConfig, DataError, length_bucket_ranges, validate_data_config
from .docstream import DocStream
from .packing import Row, RowPacker
from .sources import open_source
from .tokenizer import pad_token_id
from .windows import SpanShuffler

log = logging.getLogger(__name__)
STATE_VERSION = 2  # 2: per-source state is the span shuffler's under data.shuffle=samples


class Blender:
    """Deterministic weighted choice (Megatron's rule): row i comes from the live source with the
    largest deficit weight_share*(i+1) - taken; ties go to the lower index."""

    def __init__(self, weights: list[float]):
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        self.taken = [0] * len(weights)
        self.exhausted = [False] * len(weights)  # finite split: a source ran out

    def choose(self) -> Optional[int]:
        i = sum(self.taken) + 1
        best, best_def = None, None
        for s, share in enumerate(self.shares):
            if not self.exhausted[s]:
                d = share * i - self.taken[s]
                if best_def is None or d > best_def + 1e-12:
                    best, best_def = s, d
        return best


class GlobalRows:
    def __init__(self, packers: list, weights: list[float]):  # RowPacker or SpanShuffler per source
        self.packers = packers
        self.blender = Blender(weights)

    def next_row(self, materialize: bool) -> Optional[Row]:
        while (s := self.blender.choose()) is not None:
            row = self.packers[s].next_row(materialize)
            if row is not None:
                self.blender.taken[s] += 1
                return row
            self.blender.exhausted[s] = True
        return None


def _fingerprint(cfg: DataConfig) -> str:
    srcs = [[s.kind, s.path, s.weight, s.text_key, s.split, s.name, s.sample_by] for s in cfg.sources]
    return json.dumps(
        [srcs, cfg.tokenizer, cfg.valid_fraction, cfg.add_eos, cfg.shuffle, cfg.shuffle_span_tokens]
        + ([cfg.length_buckets] if cfg.length_buckets is not None else [])
    )


class PackedLoader:
    """Iterator of PackedBatch for one rank (see the module docstring for the row assignment)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        split: str,
    ):
        self.cfg, self.seq_len, self.mbs = cfg, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.split = dp_rank, dp_size, seed, split
        self.finite = split == "valid"
        self.pad_id = pad_token_id(tokenizer)
        self.sources = [open_source(s, cfg, i) for i, s in enumerate(cfg.sources)]
        # one stream per (source, length bucket of weight > 0), each a length-filtered view of the source's
        # order; the validation pass keeps every length (it measures the held-out set as it is)
        self.buckets = length_bucket_ranges(cfg) if not self.finite else [(0, None, 1.0)]
        bucketed = cfg.length_buckets is not None and not self.finite
        streams, weights, self._bucket_of = [], [], []
        for i, src in enumerate(self.sources):
            for b, (lo, hi, w) in enumerate(self.buckets):
                if w > 0:
                    rng = (lo, hi) if bucketed else None
                    streams.append(DocStream(src, tokenizer, cfg, split=split, seed=seed, index=i, length_range=rng))
                    weights.append(cfg.sources[i].weight * w)
                    self._bucket_of.append(b)
        self.bucketed = bucketed
        packers = [RowPacker(d, seq_len) for d in streams]
        self.shuffle_rows = cfg.shuffle == "samples" and not self.finite
        if self.shuffle_rows:
            span_rows = max(1, cfg.shuffle_span_tokens // seq_len)
            packers = [SpanShuffler(p, seed=seed, index=k, span_rows=span_rows) for k, p in enumerate(packers)]
        self._stream = GlobalRows(packers, weights)
        self.rows = 0  # global rows consumed (a multiple of dp_size between batches)
        self._initial = self.state_dict()

    @property
    def stats(self) -> dict:
        return {
            "sources": [
                {
                    "label": s.label,
                    "documents": s.num_docs,
                    "bad_records": s.bad_records,
                    "max_token_id": s.max_token_id,
                }
                for s in self.sources
            ],
            "rows_per_source": list(self._stream.blender.taken),
            "global_rows": self.rows,
        }

    def bucket_rows(self) -> list[int]:
        """Global rows taken so far from each data.length_buckets bucket (all sources together)."""
        out = [0] * len(self.buckets)
        for b, n in zip(self._bucket_of, self._stream.blender.taken):
            out[b] += n
        return out

    def step_metrics(self) -> dict:
        """What the trainer adds to each metrics.jsonl record: rows per length bucket, when mixing by length."""
        return {"bucket_rows": self.bucket_rows()} if self.bucketed else {}

    def __iter__(self):
        if self.finite:  # each pass over a finite split starts from its beginning
            self.load_state_dict(self._initial)
        return self

    def __next__(self) -> PackedBatch:
        mine: list[Row] = []
        for k in range(self.mbs):
            for j in range(self.dp_size):
                row = self._stream.next_row(materialize=(j == self.dp_rank))
                if row is None and k == 0 and j == 0:
                    raise StopIteration  # finite split ended on a micro-batch boundary (same on all ranks)
                self.rows += 1
                if j == self.dp_rank:
                    mine.append(row if row is not None else Row([], None))  # None: pad row
        return collate(mine, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        b = self._stream.blender
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "rows": self.rows,
            "sources": [p.state_dict() for p in self._stream.packers],
            "taken": list(b.taken),
            "exhausted": list(b.exhausted),
            "fingerprint": _fingerprint(self.cfg),
        }

    def load_state_dict(self, sd: dict) -> None:
        version = sd.get("version")
        # Version 1 (before row shuffling) holds packer positions: they resume data.shuffle=documents/none.
        if version != STATE_VERSION and not (version == 1 and not self.shuffle_rows):
            hint = "; resume it with data.shuffle=documents (its order)" if version == 1 else ""
            raise DataError(f"data loader state version {version!r}, expected {STATE_VERSION}{hint}")
        for key, mine in (("split", self.split), ("seq_len", self.seq_len), ("seed", self.seed)):
            if sd[key] != mine:
                raise DataError(
                    f"data loader state was saved with {key}={sd[key]!r}, this loader has "
                    f"{key}={mine!r}: exact resume is impossible"
                )
        if len(sd["sources"]) != len(self._stream.packers):
            raise DataError(
                f"data loader state has {len(sd['sources'])} sources, the config has {len(self._stream.packers)}"
            )
        if sd["rows"] % self.dp_size:
            raise DataError(
                f"data loader state is at global row {sd['rows']}, not a multiple of "
                f"dp_size={self.dp_size}: resume with a dp size that divides it"
            )
        if sd.get("fingerprint") != _fingerprint(self.cfg):
            log.warning("data config differs from the one the loader state was saved with; positions are reused as is")
        for p, s in zip(self._stream.packers, sd["sources"]):
            p.load_state_dict(s)
        b = self._stream.blender
        b.taken = [int(x) for x in sd["taken"]]
        b.exhausted = [bool(x) for x in sd["exhausted"]]
        self.rows = int(sd["rows"])


def build_loader(
    cfg: DataConfig,
    tokenizer,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    split: str = "train",
) -> PackedLoader:
    """Loader of PackedBatch for one data-parallel rank: infinite for "train" (each epoch
    reshuffled from seed), one finite pass over the held-out documents for "valid" (padded with
    no-loss rows to a whole number of micro-batches on every rank)."""
    validate_data_config(cfg)
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if seq_len < 1 or micro_batch_size < 1 or dp_size < 1 or not (0 <= dp_rank < dp_size):
        raise DataError(
            f"bad loader shape: seq_len={seq_len}, micro_batch_size={micro_batch_size}, "
            f"dp_rank={dp_rank}, dp_size={dp_size}"
        )
    return PackedLoader(
        cfg,
        tokenizer,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        split=split,
    )
