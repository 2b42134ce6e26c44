"""Loading a tokenizer by name, and the one tokenisation rule every source and tool shares."""

from __future__ import annotations

import os
import re

import numpy as np

from .config import DataConfig, DataError

# Names a raw tokenizer.json may use for its end-of-document token (it carries no metadata).
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ACCEPTED = (
    "'embedded', a local tokenizer directory (tokenizer.json + tokenizer_config.json, "
    "loadable by transformers.AutoTokenizer), a tokenizer.json file, or a hub id already "
    "downloaded into the local Hugging Face cache"
)


def load_tokenizer(cfg: DataConfig):
    """Return a transformers PreTrainedTokenizerFast for cfg.tokenizer (never downloads)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = cfg.tokenizer
    if name == "embedded":
        from .embedded import embedded_tokenizer_dir

        tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    elif os.path.isdir(name):
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as e:  # transformers raises several types for a dir it cannot read
            raise DataError(
                f"data.tokenizer={name!r}: directory could not be loaded by "
                f"AutoTokenizer ({type(e).__name__}: {e}). Accepted: {ACCEPTED}"
            ) from e
    elif os.path.isfile(name):
        if not name.endswith(".json"):
            raise DataError(f"data.tokenizer={name!r} is a file but not a tokenizer.json. Accepted: {ACCEPTED}")
        tok = _from_tokenizer_json(name)
    elif _HUB_ID.match(name) and not os.path.isabs(name):
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as e:
            raise DataError(
                f"unknown tokenizer data.tokenizer={name!r}: no such local path, and no hub copy in the "
                f"local Hugging Face cache (downloads are not done at run time; fetch it first, e.g. "
                f"`hf download {name}`). Accepted: {ACCEPTED}"
            ) from e
    else:
        raise DataError(f"unknown tokenizer data.tokenizer={name!r}: no such file or directory. Accepted: {ACCEPTED}")

    if not isinstance(tok, PreTrainedTokenizerFast) or not getattr(tok, "is_fast", False):
        raise DataError(
            f"data.tokenizer={name!r} loaded as {type(tok).__name__}, which is not a fast "
            f"(tokenizers-backed) tokenizer; provide a tokenizer.json"
        )
    if cfg.add_eos and tok.eos_token_id is None:
        raise DataError(
            f"data.tokenizer={name!r} has no eos_token, but data.add_eos=True needs one "
            f"(set eos_token in tokenizer_config.json or set data.add_eos=False)"
        )
    return tok


def _from_tokenizer_json(path: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        raw = Tokenizer.from_file(path)
    except Exception as e:
        raise DataError(f"data.tokenizer={path!r}: not a valid tokenizer.json ({e})") from e
    vocab = raw.get_vocab(with_added_tokens=True)
    eos = next((t for t in _EOS_CANDIDATES if t in vocab), None)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, model_max_length=1 << 40)


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenize_documents(tokenizer, texts: list[str], add_eos: bool = True) -> list[np.ndarray]:
    """Token ids of each text (no BOS, no special tokens), + EOS when add_eos.

    This is THE tokenisation of a document: the loader and the corpus preparation tools both call
    it, so a pre-tokenised corpus reads back exactly as a direct tokenisation."""
    if not texts:
        return []
    ids = tokenizer(
        list(texts), add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise DataError("add_eos=True but the tokenizer has no eos_token")
    out = []
    for seq in ids:
        a = np.empty(len(seq) + (1 if add_eos else 0), dtype=np.int64)
        a[: len(seq)] = seq
        if add_eos:
            a[-1] = eos
        out.append(a)
    return out
