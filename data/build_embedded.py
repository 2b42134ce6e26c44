"""Build the embedded corpus and BPE tokenizer (no network) and print where they are.

    python data/build_embedded.py        # cache: $MINIMAX_CACHE or ~/.cache/minimax_train

The trainer builds them on first use anyway; this is for doing it ahead of time."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from minimax_train.data.embedded import CORPUS_FILE, TOKENIZER_DIR, ensure_embedded  # noqa: E402


def main() -> None:
    root = ensure_embedded()
    meta = json.loads((root / "meta.json").read_text())
    print(f"corpus:    {root / CORPUS_FILE} ({meta['documents']} documents, {meta['bytes']} bytes)")
    print(f"tokenizer: {root / TOKENIZER_DIR} (vocab {meta['vocab_size']})")


if __name__ == "__main__":
    main()
