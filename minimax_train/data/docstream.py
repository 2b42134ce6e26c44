"""Tokenised documents of one source, for one split, in a deterministic order.

Order: the train split visits every document once per epoch, in a permutation drawn from
(seed, source index, epoch); the valid split visits the held-out documents once, in storage order.
A document is held out when a stable hash of its content falls below valid_fraction; a small
source holds out more documents, lowest hash first, until the split has MIN_VALID_TOKENS tokens (at
most half its documents), so a validation loss is never one short file's. The split never depends
on the seed, the order or the machine.

Position (epoch, pos) is a raw index into the epoch's order, counting documents that are skipped
(held out for the other split, empty, malformed): seeking to it reproduces the stream exactly."""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from typing import Optional

import numpy as np

from .config import DataConfig, DataError
from .sources import DocSource
from .tokenizer import tokenize_documents


def holdout_score(doc) -> float:
    """Stable in [0, 1): blake2b of the text's UTF-8 (or the token ids as little-endian int64)."""
    raw = doc.encode("utf-8") if isinstance(doc, str) else np.ascontiguousarray(doc, dtype="<i8").tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") / 2.0**64


def is_held_out(doc, valid_fraction: float) -> bool:
    return valid_fraction > 0 and holdout_score(doc) < valid_fraction


MIN_VALID_TOKENS = 16384
# Sources expected to hold out fewer documents than this are scored in full up front (one read of
# every document) so the minimum can be enforced; larger ones are assumed to meet it by hashing.
_MIN_EXPECTED_HELD_OUT = 200
_CACHE_MAX_TOKENS = 8 << 20  # per source and loader (int64: 64 MB)
_CACHED = object()  # marks a document whose tokens are in the cache


def _is_empty(doc) -> bool:
    return len(doc) == 0 if not isinstance(doc, str) else not doc.strip()


def _seed_words(seed: int, index: int, epoch: int) -> list[int]:
    return [seed % 2**64, index, epoch]


class DocStream:
    def __init__(
        self,
        source: DocSource,
        tokenizer,
        cfg: DataConfig,
        *,
        split: str,
        seed: int,
        index: int,
        length_range: Optional[tuple[int, Optional[int]]] = None,
    ):
        """length_range (lo, hi): keep only documents of lo <= tokens < hi (hi None: no bound), skipping
        the others like held-out ones, so positions stay raw indices (data.length_buckets)."""
        self.source, self.tokenizer, self.index, self.seed = source, tokenizer, index, seed
        self.length_range = length_range
        self.finite = split == "valid"
        self.shuffle = cfg.shuffle != "none" and not self.finite
        self.valid_fraction, self.add_eos = cfg.valid_fraction, cfg.add_eos
        self.batch, self.shuffle_buffer = cfg.tokenize_batch, cfg.shuffle_buffer
        label = source.label
        if source.num_docs == 0:
            raise DataError(
                f"{label}: empty dataset (no documents"
                + (f"; {source.bad_records} malformed records skipped)" if source.bad_records else ")")
            )
        if self.finite and self.valid_fraction == 0:
            raise DataError(
                f"{label}: split 'valid' is empty because data.valid_fraction=0; "
                f"set valid_fraction > 0 or skip evaluation"
            )
        # The hash rule alone holds out few or no documents of a small source (232 files at 1% held
        # out none): there, the threshold rises until the split has MIN_VALID_TOKENS. Needs every
        # score, which is cheap only for small sources; large ones skip this.
        self.threshold = self.valid_fraction
        self._valid_ids: Optional[np.ndarray] = None
        small = not source.streaming and source.num_docs * self.valid_fraction < _MIN_EXPECTED_HELD_OUT
        if self.valid_fraction > 0 and not source.streaming and (small or self.finite):
            scores = self._scores()
            if small:
                self.threshold = self._small_source_threshold(scores)
            if self.finite:
                self._valid_ids = np.flatnonzero(scores < self.threshold)  # nan compares False
                if len(self._valid_ids) == 0:
                    raise DataError(self._no_valid_msg())
        self._bad_positions: set[int] = set()  # streaming: malformed records met in epoch 0
        self._perm_epoch, self._perm = -1, None
        self._cache: dict = {}  # doc index -> tokens (None: skipped for this split)
        self._cached_tokens = 0
        self.seek(0, 0)

    def _no_valid_msg(self) -> str:
        n = f" of {self.source.num_docs}" if self.source.num_docs is not None else ""
        return (
            f"{self.source.label}: split 'valid' is empty: data.valid_fraction={self.valid_fraction} "
            f"held out none{n} documents; raise valid_fraction or skip evaluation"
        )

    def _scores(self) -> np.ndarray:
        """holdout_score of every document; nan for malformed or empty ones."""
        n, step = self.source.num_docs, max(self.batch, 1024)
        out = np.full(n, np.nan)
        for lo in range(0, n, step):
            ids = list(range(lo, min(lo + step, n)))
            for i, d in zip(ids, self.source.fetch(ids)):
                if d is not None and not _is_empty(d):
                    out[i] = holdout_score(d)
        return out

    def _small_source_threshold(self, scores: np.ndarray) -> float:
        """Lowest threshold >= valid_fraction that holds out MIN_VALID_TOKENS tokens, taking
        documents in score order, at most half of them (at least one of two or more)."""
        good = np.flatnonzero(~np.isnan(scores))
        order = good[np.argsort(scores[good], kind="stable")]
        limit = len(order) // 2
        by_hash = max(1, int((scores[order] < self.valid_fraction).sum()))
        held = tokens = 0
        while held < limit and (held < by_hash or tokens < MIN_VALID_TOKENS):
            ids = order[held : min(limit, held + self.batch)].tolist()
            for n in self._token_counts(ids):
                if not (held < limit and (held < by_hash or tokens < MIN_VALID_TOKENS)):
                    break
                held, tokens = held + 1, tokens + n
        if held == 0:
            return self.valid_fraction
        return max(self.valid_fraction, float(np.nextafter(scores[order[held - 1]], 1.0)))

    def _token_counts(self, ids: list[int]) -> list[int]:
        docs = self.source.fetch(ids)
        if self.source.pretokenized:
            return [len(d) for d in docs]
        return [len(t) for t in tokenize_documents(self.tokenizer, docs, self.add_eos)]

    # -- position ---------------------------------------------------------------------------
    def seek(self, epoch: int, pos: int) -> None:
        """Next document returned is the first kept one at or after raw position pos of epoch."""
        self.epoch, self.pos = int(epoch), int(pos)
        self._ready: deque = deque()
        self._grow = 2
        self._it = None  # streaming iterator, rebuilt lazily
        self._kept_this_epoch = 1 if pos > 0 else 0  # unknown after a seek mid-epoch: assume some

    def _epoch_len(self) -> Optional[int]:
        if self._valid_ids is not None:
            return len(self._valid_ids)
        return self.source.num_docs  # None when streaming

    def _ids(self, lo: int, hi: int) -> list[int]:
        if self._valid_ids is not None:
            return self._valid_ids[lo:hi].tolist()
        if not self.shuffle:
            return list(range(lo, hi))
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng(_seed_words(self.seed, self.index, self.epoch))
            self._perm, self._perm_epoch = rng.permutation(self.source.num_docs), self.epoch
        return self._perm[lo:hi].tolist()

    # -- reading ----------------------------------------------------------------------------
    def next_doc(self):
        """(epoch, pos, tokens int64 array) of the next kept document; None at the end of a finite split."""
        while not self._ready:
            if not self._fill():
                return None
        return self._ready.popleft()

    def _end_epoch(self) -> None:
        if self._kept_this_epoch == 0:
            n = f"{self.source.num_docs} " if self.source.num_docs is not None else ""
            if self.length_range is not None:
                lo, hi = self.length_range
                raise DataError(
                    f"{self.source.label}: no train documents of {lo} <= tokens < {hi or 'inf'} for its "
                    f"data.length_buckets bucket; give that bucket weight 0 or change its bounds"
                )
            raise DataError(
                f"{self.source.label}: no documents for the train split (all {n}documents are "
                f"empty, malformed or held out by data.valid_fraction={self.valid_fraction})"
            )
        self.seek(self.epoch + 1, 0)

    def _fill(self) -> bool:
        lo, n = self.pos, self._epoch_len()
        # Small first batches: the first row of a fresh loader should not wait for 64 documents.
        size = min(self.batch, self._grow)
        self._grow *= 2
        if n is not None:
            if lo >= n:
                if self.finite:
                    return False
                self._end_epoch()
                return True
            hi = min(lo + size, n)
            ids = self._ids(lo, hi)
            todo = [i for i in ids if i not in self._cache]
            fetched = dict(zip(todo, self.source.fetch(todo))) if todo else {}
            docs = [fetched.get(i, _CACHED) for i in ids]
        else:
            if self._it is None:
                seed = None
                if self.shuffle:  # a 32-bit seed for the streaming shuffle
                    seed = int(
                        np.random.SeedSequence(_seed_words(self.seed, self.index, self.epoch)).generate_state(1)[0]
                    )
                self._it = iter(self.source.stream(seed, self.shuffle_buffer))
                for _ in itertools.islice(self._it, lo):
                    pass
            docs = list(itertools.islice(self._it, size))
            hi = lo + len(docs)
            ids = [None] * len(docs)
            if not docs:
                if self.finite:
                    if self._kept_this_epoch == 0:
                        raise DataError(self._no_valid_msg())
                    return False
                self._end_epoch()
                return True
        self.pos = hi

        out = [None] * len(docs)  # tokens per position; None: skipped
        todo_k, todo_docs = [], []
        for k, (p, i, d) in enumerate(zip(range(lo, hi), ids, docs)):
            if d is _CACHED:
                out[k] = self._cache[i]
            elif d is None:
                if n is None and self.epoch == 0 and p not in self._bad_positions:
                    self._bad_positions.add(p)
                    self.source.count_bad()
            elif _is_empty(d) or (
                self._valid_ids is None and self.valid_fraction > 0 and is_held_out(d, self.threshold) != self.finite
            ):
                self._remember(i, None)
            else:
                todo_k.append(k)
                todo_docs.append(d)
        if self.source.pretokenized:
            toks = [np.asarray(d, dtype=np.int64) for d in todo_docs]
        else:
            toks = tokenize_documents(self.tokenizer, todo_docs, self.add_eos)
            for k, t in zip(todo_k, toks):
                self._remember(ids[k], t)
        for k, t in zip(todo_k, toks):
            out[k] = t
        for p, t in zip(range(lo, hi), out):
            if t is not None and len(t) and self._in_range(len(t)):
                self._ready.append((self.epoch, p, t))
                self._kept_this_epoch += 1
        return True

    def _in_range(self, n: int) -> bool:
        if self.length_range is None:
            return True
        lo, hi = self.length_range
        return lo <= n and (hi is None or n < hi)

    def _remember(self, doc_id, tokens) -> None:
        """Cache tokenised text documents of map-style sources (by index) while the budget lasts,
        so later epochs of a small corpus cost no tokenisation."""
        if doc_id is None or self.source.pretokenized:
            return
        if tokens is not None:
            if self._cached_tokens + len(tokens) > _CACHE_MAX_TOKENS:
                return
            self._cached_tokens += len(tokens)
        self._cache[doc_id] = tokens
