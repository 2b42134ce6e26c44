"""Document sources: random access (or a stream) of raw documents, one class per storage kind.

A source yields text (str) or, when pre-tokenised, token arrays; None marks a malformed record,
which the document stream skips (sources count them and fail past data.max_bad_lines)."""

from __future__ import annotations

import glob
import gzip
import json
import logging
import mmap
import os
import re
from array import array
from collections.abc import Iterator
from typing import Optional

import numpy as np

from .config import DataConfig, DataError, SourceConfig

log = logging.getLogger(__name__)

_EXTENSIONS = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
    "parquet": (".parquet",),
    "text": None,  # any non-hidden file
}


class DocSource:
    """Base: map-style (num_docs set, fetch by index) or streaming (num_docs None, iterate)."""

    label: str  # names the source in messages, e.g. "data.sources[0] (jsonl 'x.jsonl')"
    num_docs: Optional[int] = None
    bad_records: int = 0  # malformed records found (and skipped) so far
    pretokenized: bool = False
    max_token_id: Optional[int] = None  # pretokenized sources: the largest id stored (checked against the vocab)

    def fetch(self, indices: list[int]) -> list:
        raise NotImplementedError

    def stream(self, seed: Optional[int], buffer_size: int) -> Iterator:
        raise NotImplementedError

    @property
    def streaming(self) -> bool:
        return self.num_docs is None


def resolve_files(path: str, kind: str, label: str) -> list[str]:
    """A file, a directory (searched recursively) or a glob -> sorted list of files."""
    exts = _EXTENSIONS[kind]

    def wanted(f: str) -> bool:
        base = os.path.basename(f)
        return not base.startswith(".") and (exts is None or base.endswith(exts))

    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"{label}: no files match the pattern {path!r}")
        return files
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if wanted(f))
        if not files:
            want = "files" if exts is None else "files ending in " + "/".join(exts)
            raise DataError(f"{label}: directory {path!r} holds no {want} (empty dataset)")
        return files
    if os.path.isfile(path):
        return [path]
    raise FileNotFoundError(f"{label}: path {path!r} does not exist")


_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonlSource(DocSource):
    """JSON-lines files read by byte offset.

    Not through `datasets`: its json builder aborts on the first malformed line, while we must skip
    and count them. One pass indexes the start of every good record (8 bytes each)."""

    def __init__(self, files: list[str], text_key: str, max_bad_lines: int, label: str):
        self.label, self.text_key, self.files = label, text_key, files
        self._bufs: list = [None] * len(files)
        offsets, file_ids, bad = array("q"), array("i"), []
        for fi, f in enumerate(files):
            buf = self._buffer(fi)
            pos, lineno, n = 0, 0, len(buf)
            while pos < n:
                end = buf.find(b"\n", pos)
                end = n if end < 0 else end
                lineno += 1
                line = buf[pos:end]
                if line.strip():
                    why = self._check(line)
                    if why is None:
                        offsets.append(pos)
                        file_ids.append(fi)
                    else:
                        bad.append(f"{f}:{lineno}: {why}")
                pos = end + 1
        self.bad_records = len(bad)
        if bad:
            shown = "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            if len(bad) > max_bad_lines:
                raise DataError(
                    f"{label}: {len(bad)} malformed lines, more than data.max_bad_lines={max_bad_lines}: {shown}"
                )
            log.warning("%s: skipped %d malformed lines: %s", label, len(bad), shown)
        self._offsets = np.frombuffer(offsets, dtype=np.int64) if offsets else np.zeros(0, np.int64)
        self._file_ids = np.frombuffer(file_ids, dtype=np.int32) if file_ids else np.zeros(0, np.int32)
        self.num_docs = len(offsets)

    def _buffer(self, fi: int):
        if self._bufs[fi] is None:
            f = self.files[fi]
            if f.endswith(".gz"):
                with gzip.open(f, "rb") as fh:
                    self._bufs[fi] = fh.read()
            elif os.path.getsize(f) == 0:
                self._bufs[fi] = b""
            else:
                with open(f, "rb") as fh:
                    self._bufs[fi] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._bufs[fi]

    def _check(self, line: bytes) -> Optional[str]:
        try:
            rec = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return f"invalid JSON ({e})"
        if not isinstance(rec, dict):
            return f"not a JSON object ({type(rec).__name__})"
        if self.text_key not in rec:
            return f"no {self.text_key!r} field"
        if not isinstance(rec[self.text_key], str):
            return f"{self.text_key!r} is {type(rec[self.text_key]).__name__}, not a string"
        if _SURROGATE.search(line):  # only a \uD800-\uDFFF escape can give a str that is not Unicode text
            try:
                rec[self.text_key].encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{self.text_key!r} holds a lone surrogate (character {e.start}), not valid Unicode text"
        return None

    def fetch(self, indices: list[int]) -> list:
        out = []
        for i in indices:
            buf = self._buffer(int(self._file_ids[i]))
            start = int(self._offsets[i])
            end = buf.find(b"\n", start)
            out.append(json.loads(buf[start : end if end >= 0 else len(buf)])[self.text_key])
        return out


def _check_text_column(ds, text_key: str, label: str) -> None:
    cols = list(ds.column_names or [])
    if text_key not in cols:
        raise DataError(f"{label}: no column {text_key!r} (columns: {cols}); set text_key")
    feat = ds.features[text_key] if ds.features is not None else None
    dtype = getattr(feat, "dtype", None)
    if feat is not None and dtype not in ("string", "large_string"):
        raise DataError(f"{label}: column {text_key!r} has type {feat}, expected a string column")


class ArrowSource(DocSource):
    """A map-style `datasets.Dataset` (local parquet/text files or a hub/local hf dataset)."""

    def __init__(self, ds, text_key: str, max_bad_lines: int, label: str):
        self.label, self.text_key = label, text_key
        _check_text_column(ds, text_key, label)
        self.ds = ds.select_columns([text_key])
        self.num_docs = len(self.ds)
        # Nulls are the only malformed value a typed string column can hold: count them up front.
        self.bad_records = int(self.ds.data.column(text_key).null_count)
        if self.bad_records > max_bad_lines:
            raise DataError(
                f"{label}: {self.bad_records} records with a null {text_key!r}, more than "
                f"data.max_bad_lines={max_bad_lines}"
            )
        if self.bad_records:
            log.warning("%s: skipping %d records with a null %r", label, self.bad_records, text_key)

    def fetch(self, indices: list[int]) -> list:
        return self.ds[list(indices)][self.text_key] if len(indices) else []


class StreamingSource(DocSource):
    """A `datasets.IterableDataset`; malformed records are counted as they are met."""

    def __init__(self, ds, text_key: str, max_bad_lines: int, label: str):
        self.label, self.text_key, self.ds, self.max_bad = label, text_key, ds, max_bad_lines
        cols = ds.column_names
        if cols is not None and text_key not in cols:
            raise DataError(f"{label}: no column {text_key!r} (columns: {list(cols)}); set text_key")

    def stream(self, seed: Optional[int], buffer_size: int) -> Iterator:
        texts = (rec.get(self.text_key) for rec in self.ds)
        texts = (t if isinstance(t, str) else None for t in texts)
        # Our own buffer shuffle, not IterableDataset.shuffle: that one interleaves parquet shards on
        # threads and sleeps 5 s whenever an iterator is closed (every epoch end and every resume).
        return texts if seed is None else _buffer_shuffle(texts, seed, buffer_size)

    def count_bad(self) -> None:
        self.bad_records += 1
        if self.bad_records > self.max_bad:
            raise DataError(
                f"{self.label}: more than data.max_bad_lines={self.max_bad} records without a string {self.text_key!r}"
            )


def _buffer_shuffle(items: Iterator, seed: int, size: int) -> Iterator:
    """Deterministic streaming shuffle: each item swaps into a random slot of a full buffer."""
    rng = np.random.default_rng(seed)
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def _load_dataset(label: str, *args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except (FileNotFoundError, DataError):
        raise
    except Exception as e:  # datasets/pyarrow raise many types for unreadable data
        raise DataError(f"{label}: could not load ({type(e).__name__}: {e})") from e


def open_source(src: SourceConfig, cfg: DataConfig, index: int) -> DocSource:
    label = f"data.sources[{index}] ({src.kind} {src.path!r})" if src.path else f"data.sources[{index}] ({src.kind})"
    if src.kind == "embedded":
        from .embedded import embedded_corpus_path

        return JsonlSource([str(embedded_corpus_path())], "text", cfg.max_bad_lines, label)
    if src.kind == "megatron":
        from .megatron import MegatronSource

        return MegatronSource(src.path, label)
    if src.kind == "jsonl":
        return JsonlSource(resolve_files(src.path, "jsonl", label), src.text_key, cfg.max_bad_lines, label)
    if src.kind in ("parquet", "text"):
        files = resolve_files(src.path, src.kind, label)
        extra = {"sample_by": src.sample_by, "keep_linebreaks": True} if src.kind == "text" else {}
        ds = _load_dataset(label, src.kind, data_files=files, split="train", cache_dir=cfg.cache_dir, **extra)
        key = "text" if src.kind == "text" else src.text_key
        return ArrowSource(ds, key, cfg.max_bad_lines, label)
    if src.kind == "hf":
        # A hub id is "name" or "org/name"; anything else that does not exist locally is a typo'd path.
        looks_local = src.path.startswith((".", "/", "~")) or src.path.count("/") > 1
        if looks_local and not os.path.exists(os.path.expanduser(src.path)):
            raise FileNotFoundError(f"{label}: local dataset path {src.path!r} does not exist")
        ds = _load_dataset(
            label,
            os.path.expanduser(src.path),
            src.name,
            split=src.split,
            streaming=src.streaming,
            cache_dir=cfg.cache_dir,
        )
        cls = StreamingSource if src.streaming else ArrowSource
        return cls(ds, src.text_key, cfg.max_bad_lines, label)
    raise DataError(f"data.sources[{index}].kind={src.kind!r} is unknown")
