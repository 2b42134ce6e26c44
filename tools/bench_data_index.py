#!/usr/bin/env python
"""Cost of the data order, per 1B tokens: Megatron's GPTDataset indices next to ours (CPU, no GPU).

    python tools/bench_data_index.py [--tokens 64e6] [--doc-tokens 1000] [--seq-len 4096] [--json out.json]

Megatron (megatron-core's own functions): the document index (int32 per document and epoch), the
sample index (helpers.cpp build_sample_idx: an int32 or int64 pair per sample) and the shuffle index
(uint32 or int64 per sample), built for one epoch of synthetic document lengths.

Ours, on a Megatron .bin/.idx of the same size read through the trainer's loader: the per-epoch
document permutation (int64 per document), and the rows of one span (data.shuffle_span_tokens
tokens, held as int32 plus a small Row object per row) read, packed and permuted, timed against reading
the same rows in packing order (data.shuffle=documents), so the difference is what shuffling the
rows costs. Numbers are scaled linearly to 1B tokens."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PER = 1e9  # report per 1B tokens


def doc_lengths(tokens: int, mean: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lens = rng.geometric(1.0 / mean, size=int(tokens / mean * 1.1)).astype(np.int32)
    lens = lens[np.cumsum(lens) <= tokens]
    return np.maximum(lens, 1)


def megatron_indices(lens: np.ndarray, seq_len: int) -> dict:
    with warnings.catch_warnings():  # megatron.core's import warns about Apex/TE, irrelevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers
        from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index

    rs = np.random.RandomState(1234)
    t0 = time.perf_counter()
    doc_idx = _build_document_index(np.arange(len(lens), dtype=np.int32), 1, rs, False)
    sample_idx = helpers.build_sample_idx(lens, doc_idx, seq_len, 1, int(lens.sum()), True, True)
    shuffle_idx = _build_shuffle_index(len(sample_idx) - 1, len(sample_idx) - 1, rs)
    dt = time.perf_counter() - t0
    arrays = {"document_index": doc_idx, "sample_index": sample_idx, "shuffle_index": shuffle_idx}
    return {
        "build_s": dt,
        "bytes": {k: int(a.nbytes) for k, a in arrays.items()},
        "dtypes": {k: str(a.dtype) for k, a in arrays.items()},
    }


def ours(lens: np.ndarray, seq_len: int, span_tokens: int, workdir: str) -> dict:
    from minimax_train.data import DataConfig, SourceConfig, build_loader
    from minimax_train.data.megatron import write_megatron_dataset

    rng = np.random.default_rng(1)
    prefix = write_megatron_dataset(
        os.path.join(workdir, "synthetic"), (rng.integers(2, 60000, n, dtype=np.uint16) for n in lens), np.uint16
    )
    t0 = time.perf_counter()
    perm = np.random.default_rng([1234, 0, 0]).permutation(len(lens))  # DocStream's per-epoch order
    perm_s = time.perf_counter() - t0
    rows_per_span = span_tokens // seq_len

    class _Tok:  # pretokenised source: the tokenizer only supplies the pad id
        pad_token_id, eos_token_id = 1, 0

    def held_bytes(loader) -> int:  # the span's rows: token arrays, Row objects, segment lists
        rows = loader._stream.packers[0]._rows or []
        return sum(r.tokens.nbytes + sys.getsizeof(r) + sys.getsizeof(r.seglens) + 28 * len(r.seglens) for r in rows)

    def read(shuffle: str) -> tuple[float, int]:
        cfg = DataConfig(
            sources=[SourceConfig(kind="megatron", path=prefix)],
            valid_fraction=0.0,
            shuffle=shuffle,
            shuffle_span_tokens=span_tokens,
        )
        loader = build_loader(cfg, _Tok(), seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_size=1, seed=1234)
        t = time.perf_counter()
        next(loader)
        held = held_bytes(loader) if shuffle == "samples" else 0  # read whole after the first row
        for _ in range(rows_per_span - 1):
            next(loader)
        return time.perf_counter() - t, held

    in_order_s, _ = read("documents")
    span_s, span_held = read("samples")
    return {
        "document_permutation": {"build_s": perm_s, "bytes": int(perm.nbytes), "dtype": str(perm.dtype)},
        "span": {"tokens": rows_per_span * seq_len, "rows": rows_per_span, "held_bytes": int(span_held)},
        "read_span_shuffled_s": span_s,
        "read_span_in_order_s": in_order_s,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=float, default=64e6, help="synthetic corpus size (default 64M tokens)")
    ap.add_argument("--doc-tokens", type=int, default=1000, help="mean document length (geometric)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--span-tokens", type=float, default=1 << 24, help="data.shuffle_span_tokens")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    lens = doc_lengths(int(args.tokens), args.doc_tokens)
    n_tokens = int(lens.sum())
    scale = PER / n_tokens
    mg = megatron_indices(lens, args.seq_len)
    with tempfile.TemporaryDirectory() as d:
        us = ours(lens, args.seq_len, min(int(args.span_tokens), n_tokens), d)
    spans_per_b = PER / us["span"]["tokens"]
    out = {
        "corpus": {"tokens": n_tokens, "documents": len(lens), "seq_len": args.seq_len},
        "megatron": mg,
        "ours": us,
        "per_1b_tokens": {
            "megatron_build_s": mg["build_s"] * scale,
            "megatron_index_mb": sum(mg["bytes"].values()) * scale / 2**20,
            "ours_document_permutation_s": us["document_permutation"]["build_s"] * scale,
            "ours_document_permutation_mb": us["document_permutation"]["bytes"] * scale / 2**20,
            "ours_span_mb_held": us["span"]["held_bytes"] / 2**20,
            "ours_row_shuffle_overhead_s": (us["read_span_shuffled_s"] - us["read_span_in_order_s"]) * spans_per_b,
            "ours_read_s": us["read_span_shuffled_s"] * spans_per_b,
        },
    }
    p = out["per_1b_tokens"]
    print(f"corpus: {n_tokens / 1e6:.1f}M tokens, {len(lens)} documents, seq_len {args.seq_len}; scaled to 1B tokens:")
    print(
        f"  megatron  indices {p['megatron_index_mb']:8.1f} MB  built in {p['megatron_build_s']:6.2f} s  {mg['dtypes']}"
    )
    print(
        f"  ours      document permutation {p['ours_document_permutation_mb']:6.1f} MB in "
        f"{p['ours_document_permutation_s']:.2f} s; one span held: {p['ours_span_mb_held']:.1f} MB "
        f"(independent of corpus size); row shuffling adds {p['ours_row_shuffle_overhead_s']:.2f} s to "
        f"{p['ours_read_s']:.1f} s of reading"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
