"""Corpus preparation: tokenise documents in parallel into a Megatron indexed dataset (.bin/.idx) or an
Arrow dataset, with a progress bar and a summary (documents, tokens, length histogram).

    python tools/prepare_data.py --input corpus.jsonl --tokenizer embedded --out data/corpus
    # then train on it:  data.sources='[{kind: megatron, path: data/corpus}]'

Documents come from the trainer's own sources (minimax_train.data.sources: jsonl / parquet / text files,
directories and globs, or a Hugging Face dataset, streaming or not), so a record the trainer would skip
(malformed JSON, a missing or non-string text field, a null, an empty or whitespace-only text) is skipped
here too and counted. Each document is tokenised with minimax_train.data.tokenize_documents (no BOS, EOS
appended unless --no-eos): the same call the loader makes, so the prepared corpus reads back through the
trainer's loader (kind=megatron) token for token as the raw corpus would. Worker processes tokenise batches
of documents; the parent reads the source in order and writes the results in order, so the output does not
depend on the number of workers.

Formats:
- megatron: PREFIX.bin / PREFIX.idx written with megatron-core's IndexedDatasetBuilder, one document per
  entry, uint16 when the vocabulary fits (< 65500 ids) else int32 (Megatron's rule). The trainer reads it
  with a source of kind 'megatron'.
- arrow: a `datasets` directory (Dataset.save_to_disk) with one row per document: input_ids (int32 list),
  num_tokens. Load it with datasets.load_from_disk(DIR); the trainer's loader does not read it (its
  sources hold text or Megatron data).
A PREFIX.summary.json (arrow: DIR/summary.json) records the source, tokenizer, counts and histogram."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from minimax_train.errors import MinimaxError

FORMATS = ("megatron", "arrow")
KINDS = ("jsonl", "parquet", "text", "hf")


class PrepareError(MinimaxError, ValueError):
    pass


@dataclass
class PrepareConfig:
    input: str
    out: str
    kind: str = "jsonl"
    tokenizer: str = "embedded"
    format: str = "megatron"
    text_key: str = "text"
    split: str = "train"
    name: Optional[str] = None  # hf config name
    streaming: bool = False
    sample_by: str = "document"  # text files
    add_eos: bool = True
    workers: int = 1
    batch_docs: int = 256  # documents per worker task
    limit: Optional[int] = None  # stop after this many documents (read, before skipping)
    max_bad_lines: int = 100
    overwrite: bool = False
    progress: bool = True
    cache_dir: Optional[str] = None


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    skipped_empty: int = 0
    skipped_malformed: int = 0
    max_len: int = 0
    lengths: list = field(default_factory=list)  # per-document token counts (for percentiles)
    seconds: float = 0.0

    def add(self, n: int) -> None:
        self.documents += 1
        self.tokens += n
        self.max_len = max(self.max_len, n)
        self.lengths.append(n)

    def histogram(self) -> list[tuple[int, int, int]]:
        """(low, high, count) over power-of-two buckets of document length in tokens."""
        if not self.lengths:
            return []
        arr = np.asarray(self.lengths, dtype=np.int64)
        top = int(math.ceil(math.log2(max(2, int(arr.max()) + 1))))
        out = []
        for b in range(top + 1):
            lo, hi = (1 << b), (1 << (b + 1)) - 1
            if b == 0:
                lo = 0
            c = int(((arr >= lo) & (arr <= hi)).sum())
            out.append((lo, hi, c))
        while out and out[-1][2] == 0:
            out.pop()
        while out and out[0][2] == 0:
            out.pop(0)
        return out

    def to_dict(self) -> dict:
        arr = np.asarray(self.lengths or [0], dtype=np.int64)
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "skipped_empty": self.skipped_empty,
            "skipped_malformed": self.skipped_malformed,
            "mean_tokens": float(arr.mean()) if self.lengths else 0,
            "median_tokens": float(np.median(arr)) if self.lengths else 0,
            "p99_tokens": float(np.percentile(arr, 99)) if self.lengths else 0,
            "max_tokens": self.max_len,
            "histogram": [{"min": lo, "max": hi, "documents": c} for lo, hi, c in self.histogram()],
            "seconds": round(self.seconds, 3),
        }


# ---- reading -----------------------------------------------------------------------------------------------------
def open_input(cfg: PrepareConfig):
    """(DocSource, DataConfig) for the input, through the trainer's source classes."""
    from minimax_train.data.config import DataConfig, SourceConfig, validate_data_config
    from minimax_train.data.sources import open_source

    if cfg.kind not in KINDS:
        raise PrepareError(f"--kind {cfg.kind!r}: use one of {', '.join(KINDS)}")
    src = SourceConfig(
        kind=cfg.kind,
        path=cfg.input,
        text_key=cfg.text_key,
        split=cfg.split,
        name=cfg.name,
        streaming=cfg.streaming,
        sample_by=cfg.sample_by,
    )
    dcfg = DataConfig(
        sources=[src],
        tokenizer=cfg.tokenizer,
        valid_fraction=0.0,
        add_eos=cfg.add_eos,
        max_bad_lines=cfg.max_bad_lines,
        cache_dir=cfg.cache_dir,
    )
    validate_data_config(dcfg)
    return open_source(src, dcfg, 0), dcfg


def _is_empty(doc) -> bool:
    return not isinstance(doc, str) or not doc.strip()


def iter_batches(source, batch: int, limit: Optional[int]) -> Iterator[list]:
    """Raw documents (str, or None for a malformed record) in storage order, in lists of `batch`."""
    if source.num_docs is not None:
        n = source.num_docs if limit is None else min(limit, source.num_docs)
        for lo in range(0, n, batch):
            yield source.fetch(list(range(lo, min(lo + batch, n))))
        return
    buf, seen = [], 0
    for doc in source.stream(None, 1):
        if limit is not None and seen >= limit:
            break
        seen += 1
        if not isinstance(doc, str):
            source.count_bad()
        buf.append(doc)
        if len(buf) == batch:
            yield buf
            buf = []
    if buf:
        yield buf


# ---- tokenising (workers) -------------------------------------------------------------------------------------------
_WORKER_TOKENIZER = None


def _worker_init(tokenizer_name: str, add_eos: bool) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead
    _WORKER_TOKENIZER = _load_tokenizer(tokenizer_name, add_eos)


def _load_tokenizer(name: str, add_eos: bool):
    from minimax_train.data import load_tokenizer
    from minimax_train.data.config import DataConfig

    return load_tokenizer(DataConfig(tokenizer=name, add_eos=add_eos))


def _tokenize(texts: list[str], add_eos: bool, tokenizer=None) -> list[np.ndarray]:
    from minimax_train.data.tokenizer import tokenize_documents

    return tokenize_documents(tokenizer or _WORKER_TOKENIZER, texts, add_eos)


def _worker_task(args):
    texts, add_eos = args
    return _tokenize(texts, add_eos)


def tokenized_documents(cfg: PrepareConfig, source, summary: Summary, tokenizer, bar=None) -> Iterator[np.ndarray]:
    """Token arrays of the kept documents, in source order; updates `summary` and the progress bar."""

    def keep(batch):
        texts = []
        for d in batch:
            if d is None:
                summary.skipped_malformed += 1
            elif _is_empty(d):
                summary.skipped_empty += 1
            else:
                texts.append(d)
        return texts

    def emit(batch_len, toks):
        for t in toks:
            summary.add(len(t))
            yield t
        if bar is not None:
            bar.update(batch_len)

    batches = iter_batches(source, cfg.batch_docs, cfg.limit)
    if cfg.workers <= 1:
        for batch in batches:
            yield from emit(len(batch), _tokenize(keep(batch), cfg.add_eos, tokenizer))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(cfg.workers, initializer=_worker_init, initargs=(cfg.tokenizer, cfg.add_eos)) as pool:
        window: deque = deque()
        for batch in batches:
            window.append((len(batch), pool.apply_async(_worker_task, ((keep(batch), cfg.add_eos),))))
            if len(window) >= 2 * cfg.workers:  # bounded read-ahead, results written in order
                n, res = window.popleft()
                yield from emit(n, res.get())
        while window:
            n, res = window.popleft()
            yield from emit(n, res.get())


# ---- writing -----------------------------------------------------------------------------------------------------
def _check_out(cfg: PrepareConfig) -> list[Path]:
    if cfg.format not in FORMATS:
        raise PrepareError(f"--format {cfg.format!r}: use one of {', '.join(FORMATS)}")
    if cfg.format == "megatron":
        from minimax_train.data.megatron import strip_prefix

        prefix = strip_prefix(cfg.out)
        targets = [Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".summary.json")]
    else:
        targets = [Path(cfg.out)]
    existing = [str(t) for t in targets if t.exists() and not (t.is_dir() and not any(t.iterdir()))]
    if existing and not cfg.overwrite:
        raise PrepareError(f"output exists: {', '.join(existing)} (pass --overwrite to replace it)")
    parent = targets[0].parent
    if parent and not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    return targets


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenise cfg.input into cfg.out; return the summary dict (also written as JSON next to the output)."""
    if cfg.workers < 1 or cfg.batch_docs < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise PrepareError("--workers, --batch-docs and --limit must be positive integers")
    targets = _check_out(cfg)
    import datasets

    restore_bars = not cfg.progress and datasets.is_progress_bar_enabled()
    if restore_bars:  # --quiet: no bars from datasets either (e.g. "Generating train split")
        datasets.disable_progress_bars()
    try:
        return _prepare(cfg, targets)
    finally:
        if restore_bars:
            datasets.enable_progress_bars()


def _prepare(cfg: PrepareConfig, targets: list[Path]) -> dict:
    tokenizer = _load_tokenizer(cfg.tokenizer, cfg.add_eos)
    source, _ = open_input(cfg)
    if source.num_docs == 0:
        raise PrepareError(f"{source.label}: empty dataset (no documents)")
    summary = Summary()
    total = source.num_docs if cfg.limit is None or source.num_docs is None else min(cfg.limit, source.num_docs)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="doc", desc="tokenising", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        docs = tokenized_documents(cfg, source, summary, tokenizer, bar)
        if cfg.format == "megatron":
            out = _write_megatron(cfg, docs, len(tokenizer))
        else:
            out = _write_arrow(cfg, docs)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.skipped_malformed = max(summary.skipped_malformed, int(getattr(source, "bad_records", 0) or 0))
    if summary.documents == 0:
        for t in targets:
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            elif t.exists():
                t.unlink()
        raise PrepareError(
            f"{source.label}: no non-empty documents to write ({summary.skipped_empty} empty, "
            f"{summary.skipped_malformed} malformed)"
        )
    info = {
        "output": out,
        "format": cfg.format,
        "input": cfg.input,
        "kind": cfg.kind,
        "tokenizer": cfg.tokenizer,
        "vocab_size": len(tokenizer),
        "add_eos": cfg.add_eos,
        "source": source.label,
        **summary.to_dict(),
    }
    if cfg.format == "megatron":
        from minimax_train.data.megatron import choose_dtype

        info["dtype"] = np.dtype(choose_dtype(len(tokenizer) - 1)).name
        summary_path = Path(out + ".summary.json")
    else:
        summary_path = Path(out) / "summary.json"
    summary_path.write_text(json.dumps(info, indent=2) + "\n")
    info["summary_file"] = str(summary_path)
    return info


def _write_megatron(cfg: PrepareConfig, docs: Iterator[np.ndarray], vocab: int) -> str:
    from minimax_train.data.megatron import choose_dtype, strip_prefix, write_megatron_dataset

    prefix = strip_prefix(cfg.out)
    tmp = prefix + ".tmp"
    try:
        write_megatron_dataset(tmp, docs, dtype=choose_dtype(vocab - 1))
        for ext in (".bin", ".idx"):
            os.replace(tmp + ext, prefix + ext)
    finally:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return prefix


def _write_arrow(cfg: PrepareConfig, docs: Iterator[np.ndarray]) -> str:
    import datasets
    from datasets.arrow_writer import ArrowWriter

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(str(out) + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    features = datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32")), "num_tokens": datasets.Value("int64")}
    )
    try:
        arrow = tmp_dir / "data.arrow"
        with ArrowWriter(features=features, path=str(arrow)) as writer:
            for toks in docs:
                writer.write({"input_ids": toks.astype(np.int32), "num_tokens": int(len(toks))})
            writer.finalize()
        ds = datasets.Dataset.from_file(str(arrow))
        staged = Path(str(out) + ".staged")
        shutil.rmtree(staged, ignore_errors=True)
        ds.save_to_disk(str(staged))
        del ds
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return str(out)


# ---- printing -----------------------------------------------------------------------------------------------------
def format_summary(info: dict) -> str:
    lines = [
        f"wrote {info['output']} ({info['format']}{', ' + info['dtype'] if 'dtype' in info else ''}) from "
        f"{info['source']} with tokenizer {info['tokenizer']!r} (vocab {info['vocab_size']:,}, "
        f"EOS {'appended' if info['add_eos'] else 'not appended'})",
        f"documents {info['documents']:,}, tokens {info['tokens']:,} (skipped: {info['skipped_empty']:,} empty, "
        f"{info['skipped_malformed']:,} malformed) in {info['seconds']:.1f}s",
        f"tokens per document: mean {info['mean_tokens']:,.1f}, median {info['median_tokens']:,.0f}, "
        f"p99 {info['p99_tokens']:,.0f}, max {info['max_tokens']:,}",
        "length histogram (tokens per document):",
    ]
    hist = info["histogram"]
    top = max((h["documents"] for h in hist), default=1) or 1
    for h in hist:
        bar = "#" * max(1 if h["documents"] else 0, round(40 * h["documents"] / top))
        lines.append(f"  {h['min']:>9,}-{h['max']:<9,} {bar:<40s} {h['documents']:,}")
    lines.append(f"summary: {info['summary_file']}")
    return "\n".join(lines)


def build_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="tools/prepare_data.py",
        description="Tokenise a corpus (jsonl / parquet / text files, a directory or glob of them, or a Hugging Face "
        "dataset) in parallel into a Megatron indexed dataset (.bin/.idx, what the trainer reads with "
        "data.sources kind=megatron) or an Arrow dataset, and print a summary (documents, tokens, length "
        "histogram). Records the trainer would skip (malformed, empty) are skipped and counted; tokens "
        "are those of minimax_train.data.tokenize_documents, so training on the output equals training "
        "on the raw corpus.",
        epilog="examples:\n"
        "  tools/prepare_data.py --input corpus.jsonl --out data/corpus --workers 8\n"
        "  tools/prepare_data.py --kind parquet --input 'shards/*.parquet' --tokenizer ./tok --out data/web\n"
        "  tools/prepare_data.py --kind hf --input org/dataset --split train --streaming --limit 100000 \\\n"
        "      --format arrow --out data/sample_arrow\n"
        'train on a megatron output:  python -m minimax_train.train "data.sources=[{kind: megatron, path: '
        'data/corpus}]"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--input", required=True, help="file, directory, glob, or hf dataset id / local dataset dir")
    ap.add_argument("--out", required=True, help="megatron: output prefix (PREFIX.bin/.idx); arrow: output directory")
    ap.add_argument("--kind", default="jsonl", choices=KINDS, help="input kind (default %(default)s)")
    ap.add_argument("--format", default="megatron", choices=FORMATS, help="output format (default %(default)s)")
    ap.add_argument(
        "--tokenizer",
        default="embedded",
        help="'embedded', a tokenizer directory, a tokenizer.json, or a cached hub id (default %(default)s)",
    )
    ap.add_argument("--text-key", default="text", help="field/column with the text (jsonl, parquet, hf)")
    ap.add_argument("--split", default="train", help="hf split (default %(default)s)")
    ap.add_argument("--name", default=None, help="hf dataset config name")
    ap.add_argument("--streaming", action="store_true", help="hf: stream instead of downloading/converting")
    ap.add_argument(
        "--sample-by",
        default="document",
        choices=("document", "paragraph", "line"),
        help="text files: one document per file, paragraph or line (default %(default)s)",
    )
    ap.add_argument("--no-eos", action="store_true", help="do not append the tokenizer's EOS to each document")
    ap.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) - 1)),
        help="tokenising processes (default %(default)s)",
    )
    ap.add_argument("--batch-docs", type=int, default=256, help="documents per worker task (default %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="read at most this many documents")
    ap.add_argument("--max-bad-lines", type=int, default=100, help="malformed records tolerated (default %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--cache-dir", default=None, help="datasets cache for parquet/text/hf inputs")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(
        input=args.input,
        out=args.out,
        kind=args.kind,
        tokenizer=args.tokenizer,
        format=args.format,
        text_key=args.text_key,
        split=args.split,
        name=args.name,
        streaming=args.streaming,
        sample_by=args.sample_by,
        add_eos=not args.no_eos,
        workers=args.workers,
        batch_docs=args.batch_docs,
        limit=args.limit,
        max_bad_lines=args.max_bad_lines,
        overwrite=args.overwrite,
        progress=not args.quiet,
        cache_dir=args.cache_dir,
    )
    from minimax_train.errors import run_cli

    def body():
        info = prepare(cfg)
        print(json.dumps(info, indent=2) if args.json else format_summary(info))

    return run_cli("prepare_data", body)
