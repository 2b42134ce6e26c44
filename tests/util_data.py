"""Small corpora for the data tests: random documents over a fixed vocabulary of words, jsonl files."""

from __future__ import annotations

import json

import numpy as np

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def make_docs(n, seed=0, prefix="doc", max_words=60):
    rng = np.random.default_rng(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, max_words)))) for i in range(n)]


def write_jsonl(path, docs, key="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return str(path)
