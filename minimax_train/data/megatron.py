"""Megatron indexed datasets (.bin/.idx) through megatron-core: reader source and writers.

Documents are read as stored: they are already tokenised, and Megatron's preprocess_data
appends EOD itself (--append-eod). To make a corpus that reads back exactly like a direct
tokenisation, write `tokenize_documents(tok, texts, add_eos)` with write_megatron_dataset.

megatron-core is imported lazily: its package import takes several seconds (it pulls in the
whole core), and only runs that read or write these files should pay for it."""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterable
from typing import Optional

import numpy as np

from .config import DataError
from .sources import DocSource


def strip_prefix(path: str) -> str:
    """Accept 'corpus', 'corpus.bin' or 'corpus.idx' for the prefix 'corpus'."""
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def _indexed_dataset_module():
    from minimax_train.errors import import_extra

    with warnings.catch_warnings():  # megatron.core's import warns about Apex/TE, irrelevant here
        warnings.simplefilter("ignore")
        indexed_dataset = import_extra("megatron.core.datasets.indexed_dataset", "megatron", "data kind 'megatron'")
    return indexed_dataset


def choose_dtype(max_token_id: int):
    """Megatron's rule: uint16 while the vocabulary fits, else int32."""
    return np.uint16 if max_token_id < 65500 else np.int32


def write_megatron_dataset(path_prefix: str, token_lists: Iterable, dtype=None) -> str:
    """Write one document per token list to path_prefix.bin/.idx; return the prefix.

    dtype None picks uint16 or int32 from the largest id (this materialises token_lists)."""
    idx_mod = _indexed_dataset_module()
    path_prefix = strip_prefix(str(path_prefix))
    if dtype is None:
        token_lists = [np.asarray(t, dtype=np.int64) for t in token_lists]
        dtype = choose_dtype(max((int(t.max()) for t in token_lists if len(t)), default=0))
    dtype = np.dtype(dtype).type
    info = np.iinfo(dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
    builder = idx_mod.IndexedDatasetBuilder(idx_mod.get_bin_path(path_prefix), dtype=dtype)
    for i, toks in enumerate(token_lists):
        arr = np.asarray(toks, dtype=np.int64)
        if len(arr) and (arr.min() < info.min or arr.max() > info.max):
            raise DataError(
                f"document {i}: token ids outside {np.dtype(dtype).name} range "
                f"[{info.min}, {info.max}]: choose a wider dtype"
            )
        builder.add_document(arr.astype(dtype), [len(arr)])
    builder.finalize(idx_mod.get_idx_path(path_prefix))
    return path_prefix


def merge_megatron_datasets(out_prefix: str, in_prefixes: list[str]) -> str:
    """Concatenate indexed datasets (e.g. shards tokenised in parallel) in the given order."""
    idx_mod = _indexed_dataset_module()
    out_prefix = strip_prefix(str(out_prefix))
    in_prefixes = [strip_prefix(str(p)) for p in in_prefixes]
    if not in_prefixes:
        raise DataError("merge_megatron_datasets: no inputs")
    dtype = idx_mod.IndexedDataset(in_prefixes[0]).index.dtype
    builder = idx_mod.IndexedDatasetBuilder(idx_mod.get_bin_path(out_prefix), dtype=dtype)
    for p in in_prefixes:
        builder.add_index(p)
    builder.finalize(idx_mod.get_idx_path(out_prefix))
    return out_prefix


def read_megatron_documents(path_prefix: str) -> list[np.ndarray]:
    """All documents of an indexed dataset (tests and tools; the loader reads lazily)."""
    src = MegatronSource(path_prefix, repr(path_prefix))
    return src.fetch(range(src.num_docs))


_IDX_HEADER = b"MMIDIDX\x00\x00"  # then version u64, dtype code u8, sequence and document counts u64


def _check_idx(idx_path: str, label: str, redo: str) -> None:
    """A .idx cut short (or not one) fails here, before megatron's reader asserts on it."""
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or not head.startswith(_IDX_HEADER):
        raise DataError(f"{label}: {idx_path} is truncated or not a Megatron index (bad header); {redo}")
    seqs, docs = struct.unpack("<QQ", head[18:34])
    want, have = 34 + seqs * (4 + 8) + docs * 8, os.path.getsize(idx_path)
    if have < want:
        raise DataError(f"{label}: {idx_path} is truncated ({have} bytes, its header needs {want}); {redo}")


def _max_token(bin_path: str, dtype, count: int, chunk: int = 1 << 24) -> Optional[int]:
    """Largest id in the first `count` tokens of a .bin (one pass, 16M tokens at a time)."""
    if count == 0:
        return None
    data = np.memmap(bin_path, dtype=dtype, mode="r", shape=(count,))
    return max(int(data[i : i + chunk].max()) for i in range(0, count, chunk))


class MegatronSource(DocSource):
    pretokenized = True

    def __init__(self, path: str, label: str):
        self.label = label
        prefix = strip_prefix(path)
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{label}: Megatron indexed dataset not found: missing "
                f"{', '.join(map(repr, missing))} (path is the prefix without .bin/.idx)"
            )
        idx_mod = _indexed_dataset_module()
        redo = "re-create it (tools/prepare_data.py --format megatron)"
        _check_idx(prefix + ".idx", label, redo)
        try:
            self.ds = idx_mod.IndexedDataset(prefix, mmap=True)
        except Exception as e:  # megatron's reader asserts, struct and numpy errors on a short or foreign .idx
            raise DataError(f"{label}: {prefix}.idx is truncated or not a Megatron index ({e}); {redo}") from None
        index = self.ds.index
        itemsize = np.dtype(index.dtype).itemsize
        want = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * itemsize if len(index) else 0
        have = os.path.getsize(prefix + ".bin")
        if have < want:
            raise DataError(f"{label}: {prefix}.bin is truncated ({have} bytes, its .idx needs {want}); {redo}")
        self.max_token_id = _max_token(prefix + ".bin", index.dtype, want // itemsize)
        # A Megatron "document" may hold several sequences (sentences); we pack documents.
        self._doc_idx = np.asarray(self.ds.document_indices, dtype=np.int64)
        self._one_seq_per_doc = len(self._doc_idx) == len(self.ds) + 1
        self.num_docs = len(self._doc_idx) - 1

    def fetch(self, indices) -> list:
        out = []
        for d in indices:
            if self._one_seq_per_doc:
                out.append(np.asarray(self.ds[int(d)], dtype=np.int64))
            else:
                lo, hi = int(self._doc_idx[d]), int(self._doc_idx[d + 1])
                parts = self.ds[lo:hi] if hi > lo else []
                out.append(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))
        return out
