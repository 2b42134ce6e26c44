"""Data order (data.shuffle=samples, Megatron's GPTDataset order): per epoch, the rows of the packed
document stream in a shuffled order; exact resume at any row and after a SIGKILL; the validation
split's minimum size."""

import math
import signal

import numpy as np
import pytest
import torch
from test_data import _roundtrip, cfg_for, check_invariants, rows_of, take
from util_data import make_docs, write_jsonl
from util_train import TINY, by_step, read_metrics, run_train

from minimax_train.conf_tree import compose_job
from minimax_train.data import DataError, build_loader, tokenize_documents
from minimax_train.data.docstream import MIN_VALID_TOKENS

pytestmark = pytest.mark.usefixtures("data_cache_env")  # tok and the cache come from conftest

T = 32
LONG_WORD = "omega"  # the long document's only word: its rows are recognisable


def corpus(tmp_path):
    """40 short documents (~2900 tokens) and one long one (~800 tokens: 25 rows of T)."""
    docs = make_docs(40, prefix="doc") + [" ".join([LONG_WORD] * 200)]
    return write_jsonl(tmp_path / "a.jsonl", docs), docs


def key(row):
    return tuple(a.tobytes() for a in row)


def row_stream(path, tok, n_rows, seed=3, mbs=1, **cfg):
    loader = build_loader(cfg_for(path, **cfg), tok, seq_len=T, micro_batch_size=mbs, dp_rank=0, dp_size=1, seed=seed)
    batches = take(loader, n_rows // mbs)
    for b in batches:
        check_invariants(b, T)
    return rows_of(batches)


def test_sample_order_permutes_each_epochs_rows(tmp_path, tok):
    path, docs = corpus(tmp_path)
    epoch_tokens = sum(len(t) for t in tokenize_documents(tok, docs))
    # Rows whose first token lies in epoch e: [ceil(e*L/T), ceil((e+1)*L/T)) of the packed stream.
    bounds = [math.ceil(e * epoch_tokens / T) for e in range(4)]
    packed = row_stream(path, tok, bounds[3], shuffle="documents")
    shuffled = row_stream(path, tok, bounds[3])
    for e in range(3):
        lo, hi = bounds[e], bounds[e + 1]
        assert sorted(map(key, shuffled[lo:hi])) == sorted(map(key, packed[lo:hi])), f"epoch {e}"
        assert [key(r) for r in shuffled[lo:hi]] != [key(r) for r in packed[lo:hi]]
    # The long document fills consecutive rows when packed in order, scattered rows when shuffled.
    long_ids = set(tokenize_documents(tok, [docs[-1]], add_eos=False)[0].tolist())
    inside = [i for i, r in enumerate(shuffled[: bounds[1]]) if set(r[0].tolist()) <= long_ids]
    inside_packed = [i for i, r in enumerate(packed[: bounds[1]]) if set(r[0].tolist()) <= long_ids]
    assert len(inside) == len(inside_packed) >= 10
    assert np.all(np.diff(inside_packed) == 1) and np.diff(inside).max() > 1
    # Deterministic from the seed.
    assert [key(r) for r in row_stream(path, tok, bounds[3])] == [key(r) for r in shuffled]
    assert [key(r) for r in row_stream(path, tok, bounds[3], seed=4)] != [key(r) for r in shuffled]


def test_spans_cut_an_epoch_by_size(tmp_path, tok):
    path, docs = corpus(tmp_path)
    epoch_tokens = sum(len(t) for t in tokenize_documents(tok, docs))
    span = 5
    end0 = math.ceil(epoch_tokens / T)  # rows starting in epoch 0; epoch 1's spans start there
    packed = row_stream(path, tok, end0 + 3 * span, shuffle="documents")
    shuffled = row_stream(path, tok, end0 + 3 * span, shuffle_span_tokens=span * T)
    cuts = list(range(0, end0, span)) + list(range(end0, end0 + 3 * span + 1, span))
    moved = 0
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        hi = min(hi, end0) if lo < end0 else hi
        assert sorted(map(key, shuffled[lo:hi])) == sorted(map(key, packed[lo:hi])), (lo, hi)
        moved += [key(r) for r in shuffled[lo:hi]] != [key(r) for r in packed[lo:hi]]
    assert moved >= len(cuts) // 2


@pytest.mark.parametrize("span_rows", [4, 10_000])  # spans cut by size, and whole epochs
def test_sample_order_resumes_exactly_at_every_position(tmp_path, tok, span_rows):
    path, _ = corpus(tmp_path)
    kw = dict(seq_len=T, micro_batch_size=2, dp_rank=1, dp_size=2, seed=11)
    cfg = cfg_for(path, shuffle_span_tokens=span_rows * T)
    n = 70  # batches: four rows each, past the second epoch
    ref = take(build_loader(cfg, tok, **kw), n)
    first = build_loader(cfg, tok, **kw)
    for cut in range(n - 3):
        sd = _roundtrip(first.state_dict())
        resumed = build_loader(cfg, tok, **kw)
        resumed.load_state_dict(sd)
        for a, b in zip(ref[cut : cut + 3], take(resumed, 3)):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens), cut
        next(first)
    assert sd["sources"][0]["epoch"] >= 2


def test_state_of_documents_order_before_row_shuffling(tmp_path, tok):
    path, _ = corpus(tmp_path)
    kw = dict(seq_len=T, micro_batch_size=2, dp_rank=0, dp_size=1, seed=2)
    docs_cfg = cfg_for(path, shuffle="documents")
    old = build_loader(docs_cfg, tok, **kw)
    ref = take(build_loader(docs_cfg, tok, **kw), 8)
    take(old, 5)
    sd = dict(_roundtrip(old.state_dict()), version=1)  # a checkpoint written before data.shuffle=samples
    again = build_loader(docs_cfg, tok, **kw)
    again.load_state_dict(sd)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(ref[5:], take(again, 3)))
    with pytest.raises(DataError, match="version 1.*data.shuffle=documents"):
        build_loader(cfg_for(path), tok, **kw).load_state_dict(sd)


def test_unknown_shuffle_mode_names_the_key(tmp_path, tok):
    path, _ = corpus(tmp_path)
    with pytest.raises(DataError, match=r"data\.shuffle='rows' is not one of samples, documents, none"):
        build_loader(cfg_for(path, shuffle="rows"), tok, seq_len=T, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


# ---- validation split --------------------------------------------------------------------------------
def valid_docs_and_tokens(cfg, tok):
    v = build_loader(cfg, tok, seq_len=256, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, split="valid")
    ids = torch.cat([b.input_ids.flatten() for b in v]).numpy()
    ids = ids[ids != tok.pad_token_id]
    cut = np.flatnonzero(ids == tok.eos_token_id)
    return {tuple(p.tolist()) for p in np.split(ids, cut + 1)[:-1]}, len(ids)


def test_small_source_holds_out_at_least_min_valid_tokens(tmp_path, tok):
    docs = make_docs(200, max_words=400)  # ~40K words: 1% by hash alone would be about two documents
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    cfg = cfg_for(path, valid_fraction=0.01, shuffle="none")  # in order: whole documents can be read back
    direct = tokenize_documents(tok, docs)
    valid, n_tokens = valid_docs_and_tokens(cfg, tok)
    assert n_tokens >= MIN_VALID_TOKENS and len(valid) <= len(docs) // 2
    # ... taken whole, lowest hash first: dropping its largest document would fall below the minimum
    assert n_tokens - max(map(len, valid)) < MIN_VALID_TOKENS
    train = build_loader(cfg, tok, seq_len=64, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0, split="train")
    stream = torch.cat([b.input_ids.flatten() for b in take(train, 3 * sum(map(len, direct)) // 64)]).numpy()
    cut = np.flatnonzero(stream == tok.eos_token_id)
    train_docs = {tuple(p.tolist()) for p in np.split(stream, cut + 1)[1:-1]}  # whole documents only
    assert train_docs.isdisjoint(valid) and train_docs | valid == {tuple(d.tolist()) for d in direct}
    # A tiny source gives at most half its documents.
    tiny = write_jsonl(tmp_path / "tiny.jsonl", make_docs(6))
    assert len(valid_docs_and_tokens(cfg_for(tiny, valid_fraction=0.01), tok)[0]) == 3


def test_embedded_valid_split_has_min_valid_tokens(tok):
    data = compose_job().data  # the trainer's default: the embedded corpus
    assert data.sources[0].kind == "embedded"
    v = build_loader(data, tok, seq_len=128, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0, split="valid")
    assert sum(b.num_loss_tokens() for b in v) >= MIN_VALID_TOKENS


# ---- the trainer --------------------------------------------------------------------------------------
def test_kill9_mid_span_resumes_the_same_data(tmp_path, tok):
    """SIGKILL and resume while a span of shuffled rows is half consumed (spans of 5 rows, 4 rows a step,
    checkpoint at step 6 = row 24): the resumed steps equal the uninterrupted run's, loss and val_loss."""
    common = [*TINY, "data.shuffle_span_tokens=320", "train.eval_interval=4", "train.eval_iters=3"]
    run_train(tmp_path / "ref", *common, f"checkpoint.dir={tmp_path / 'ref_ckpt'}")
    ref = by_step(read_metrics(tmp_path / "ref"))
    ckpt = tmp_path / "ckpt"
    p = run_train(tmp_path / "a", *common, f"checkpoint.dir={ckpt}", faults="kill@7", check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    run_train(tmp_path / "b", *common, f"checkpoint.dir={ckpt}")
    got = by_step(read_metrics(tmp_path / "b"))
    assert sorted(got) == [7, 8]
    for s in (7, 8):
        assert got[s]["loss"] == ref[s]["loss"] and got[s]["grad_norm"] == ref[s]["grad_norm"]
    assert got[8]["val_loss"] == ref[8]["val_loss"]
    # val_tokens: the loss tokens of the first eval_iters validation micro-batches, counted here
    data = compose_job(*common).data
    v = build_loader(data, tok, seq_len=64, micro_batch_size=1, dp_rank=0, dp_size=1, seed=1234, split="valid")
    expect = sum(b.num_loss_tokens() for b in take(iter(v), 3))
    assert ref[4]["val_tokens"] == ref[8]["val_tokens"] == got[8]["val_tokens"] == expect
    assert "val_tokens" not in ref[3]
