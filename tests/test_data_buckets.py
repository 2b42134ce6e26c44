"""data.length_buckets: rows come from documents of each length bucket in the configured shares (measured
on the emitted tokens, not on the loader's counters), a weight-0 bucket never appears, rows never mix
buckets, the order is deterministic and resumes exactly, and the trainer logs the per-bucket rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data import _roundtrip, take
from util_train import read_metrics, run_train

from minimax_train.data import DataConfig, DataError, SourceConfig, build_loader, tokenize_documents

pytestmark = pytest.mark.usefixtures("data_cache_env")

# one marker word per length class, so every emitted token tells which class its document was
CLASSES = {"alpha": (3, 12), "omicron": (30, 60), "kappa": (120, 240), "zeta": (400, 500)}  # words per doc
WEIGHTS = [0.3, 0.5, 0.2, 0.0]


def _corpus(tmp_path, tok):
    rng = np.random.default_rng(0)
    docs, cls = [], []
    for c, (lo, hi) in CLASSES.items():
        for _ in range(40):
            docs.append(" ".join([c] * int(rng.integers(lo, hi))))
            cls.append(c)
    order = rng.permutation(len(docs))
    docs, cls = [docs[i] for i in order], [cls[i] for i in order]
    from util_data import write_jsonl

    path = write_jsonl(tmp_path / "mixed.jsonl", docs)
    lens = np.array([len(t) for t in tokenize_documents(tok, docs, True)])
    cls = np.array(cls)
    names = list(CLASSES)
    # bucket bounds between the classes' token lengths (checked: the classes do not overlap)
    bounds = [int(lens[cls == c].min()) for c in names[1:]]
    for c, b in zip(names[:-1], bounds):
        assert lens[cls == c].max() < b
    buckets = [[b, w] for b, w in zip(bounds, WEIGHTS)] + [[None, WEIGHTS[-1]]]
    marks = {}  # token id -> class
    for c in names:
        ids = set(tokenize_documents(tok, [" ".join([c] * 5)], False)[0].tolist())
        assert not ids & set(marks), "marker words must tokenise to disjoint ids"
        marks.update({i: c for i in ids})
    return path, buckets, marks


def _cfg(path, buckets):
    return DataConfig(sources=[SourceConfig(kind="jsonl", path=path)], valid_fraction=0.0, length_buckets=buckets)


def _row_classes(batches, marks):
    out = []
    for b in batches:
        for row in b.input_ids.tolist():
            kinds = {marks[t] for t in row if t in marks}
            assert len(kinds) == 1, f"a row mixes length buckets: {kinds}"
            out.append(kinds.pop())
    return out


def test_length_buckets_hit_their_weights_and_resume_exactly(tmp_path, tok):
    path, buckets, marks = _corpus(tmp_path, tok)
    kw = dict(seq_len=64, micro_batch_size=4, dp_rank=0, dp_size=1, seed=11)
    loader = build_loader(_cfg(path, buckets), tok, **kw)
    batches = take(loader, 250)  # 1000 rows
    classes = _row_classes(batches, marks)
    share = {c: classes.count(c) / len(classes) for c in CLASSES}
    for c, w in zip(CLASSES, WEIGHTS):
        assert abs(share[c] - w) <= 0.02, f"{c}: {share[c]:.3f} of the rows, weight {w}"
    assert share["zeta"] == 0.0
    # the loader's counters agree with what was emitted
    assert loader.step_metrics() == {"bucket_rows": [classes.count(c) for c in CLASSES]}

    # resume mid-stream: the next batches equal the uninterrupted ones
    first = build_loader(_cfg(path, buckets), tok, **kw)
    take(first, 97)
    sd = _roundtrip(first.state_dict())
    resumed = build_loader(_cfg(path, buckets), tok, **kw)
    resumed.load_state_dict(sd)
    for a, b in zip(batches[97:130], take(resumed, 33)):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert resumed.bucket_rows() == [classes[:520].count(c) for c in CLASSES]

    # deterministic: another loader from scratch gives the same rows
    again = build_loader(_cfg(path, buckets), tok, **kw)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches[:20], take(again, 20)))


@pytest.mark.parametrize(
    "buckets,match",
    [
        ([[100, 0.5], [50, 0.5]], r"length_buckets\[1\]: upper bound 50"),
        ([[None, 0.5], [50, 0.5]], r"length_buckets\[0\]: only the last"),
        ([[100, 0.0], [None, 0.0]], "weights sum to 0"),
        ([[100, -1.0]], r"length_buckets\[0\]: weight -1.0"),
        ([], "length_buckets is empty"),
    ],
)
def test_bad_length_buckets_name_the_entry(tmp_path, tok, buckets, match):
    from minimax_train.data.config import validate_data_config

    with pytest.raises(DataError, match=match):
        validate_data_config(DataConfig(length_buckets=buckets))


def test_an_empty_bucket_is_a_clear_error(tmp_path, tok):
    path, buckets, _ = _corpus(tmp_path, tok)
    buckets[-1][1] = 0.1  # documents beyond the last bound: there are none
    buckets.append([None, 0.1])
    buckets[-2][0] = 100000
    loader = build_loader(_cfg(path, buckets), tok, seq_len=64, micro_batch_size=4, dp_rank=0, dp_size=1, seed=1)
    with pytest.raises(DataError, match="no train documents of 100000 <= tokens < inf"):
        take(loader, 50)


def test_trainer_logs_rows_per_bucket(tmp_path):
    run_train(
        tmp_path / "run",
        "train.steps=2",
        "train.seq_len=64",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.eval_interval=0",
        "optim.warmup_steps=1",
        "data.length_buckets=[[256,0.5],[null,0.5]]",
    )
    got = [r["bucket_rows"] for r in read_metrics(tmp_path / "run")]
    assert got == [[2, 2], [4, 4]]  # cumulative global rows per bucket, half each
