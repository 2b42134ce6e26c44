"""The embedded default: a small real-text corpus and a BPE tokenizer that need no network.

The corpus is the running Python's standard library sources (present on every machine), each file
one document: hand-written modules sampled across the whole library, generated tables left out
(stdlib_corpus.py), up to CORPUS_MAX_BYTES. A byte-level BPE tokenizer of EMBEDDED_VOCAB_SIZE is
trained on it with `tokenizers` and saved as a transformers tokenizer dir.

Both are built on first use into `$MINIMAX_CACHE` (default ~/.cache/minimax_train), under a name
that includes a hash of the stdlib sources and of the build rule, so a different Python (different
stdlib) never silently reuses another tokenizer. The build writes a temp dir and renames it into place: several processes may
race on first use; one rename wins and the others discard their copy (same content anyway, since
BPE training is deterministic)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

from .stdlib_corpus import select_documents, stdlib_files

EMBEDDED_VOCAB_SIZE = 4096  # the tiny model preset's vocabulary
EOS_TOKEN = "<|endoftext|>"  # also bos: documents are separated by EOS only
PAD_TOKEN = "<|pad|>"
EMBEDDED_EOS_ID = 0
EMBEDDED_PAD_ID = 1
CORPUS_MAX_BYTES = 4_000_000  # ~1.1M tokens, ~250 documents: BPE trains in about a second
_BUILD_VERSION = "v2"  # bump when the corpus rule or tokenizer recipe changes

CORPUS_FILE = "corpus.jsonl"
TOKENIZER_DIR = "tokenizer"


def cache_root() -> Path:
    return Path(os.environ.get("MINIMAX_CACHE") or Path.home() / ".cache" / "minimax_train")


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every string round-trips exactly, no unknown token is ever needed.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=EMBEDDED_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOS_TOKEN) == EMBEDDED_EOS_ID and tok.token_to_id(PAD_TOKEN) == EMBEDDED_PAD_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 40,  # packing decides lengths; silence "sequence too long" warnings
    )


def _build(target: Path, docs: list[tuple[str, str]], digest: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with open(tmp / CORPUS_FILE, "w", encoding="utf-8") as f:
            for rel, text in docs:
                f.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
        _train_tokenizer([t for _, t in docs]).save_pretrained(str(tmp / TOKENIZER_DIR))
        meta = {
            "version": _BUILD_VERSION,
            "sources_sha256": digest,
            "documents": len(docs),
            "bytes": sum(len(t.encode()) for _, t in docs),
            "vocab_size": EMBEDDED_VOCAB_SIZE,
            "stdlib": sysconfig.get_paths()["stdlib"],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "meta.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def _ensure(root: str) -> Path:
    # The key hashes every candidate file (cheap) so that the selection rule (regexes over the
    # text) runs only when the cache is built.
    files = stdlib_files()
    h = hashlib.sha256(f"{_BUILD_VERSION}\0{CORPUS_MAX_BYTES}\0".encode())
    for rel, raw in files:
        h.update(rel.encode() + b"\0" + raw + b"\0")
    digest = h.hexdigest()
    target = Path(root) / f"embedded-{_BUILD_VERSION}-{digest[:16]}"
    if not (target / "meta.json").exists():
        _build(target, select_documents(files, CORPUS_MAX_BYTES), digest)
    return target


def ensure_embedded() -> Path:
    """Build the embedded corpus and tokenizer if needed; return their directory."""
    return _ensure(str(cache_root()))


def embedded_tokenizer_dir() -> Path:
    return ensure_embedded() / TOKENIZER_DIR


def embedded_corpus_path() -> Path:
    """A jsonl file, one {"text", "path"} record per stdlib source file."""
    return ensure_embedded() / CORPUS_FILE
