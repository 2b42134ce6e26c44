"""Data pipeline core: packing invariants, dp sharding, determinism, exact resume, blending, valid split."""

import io

import numpy as np
import pytest
import torch
from util_data import make_docs, write_jsonl

from minimax_train.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    PackedBatch,
    SourceConfig,
    build_loader,
    tokenize_documents,
)
from minimax_train.data.loader import Blender

pytestmark = pytest.mark.usefixtures("data_cache_env")


def cfg_for(*paths, weights=None, **kw):
    kw.setdefault("valid_fraction", 0.0)
    weights = weights or [1.0] * len(paths)
    return DataConfig(sources=[SourceConfig(kind="jsonl", path=p, weight=w) for p, w in zip(paths, weights)], **kw)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def rows_of(batches):
    """Each row as (input_ids, labels, positions) numpy triples."""
    out = []
    for b in batches:
        for r in range(b.input_ids.shape[0]):
            out.append((b.input_ids[r].numpy(), b.labels[r].numpy(), b.position_ids[r].numpy()))
    return out


def check_invariants(b: PackedBatch, T: int):
    mbs = b.input_ids.shape[0]
    assert b.input_ids.shape == b.labels.shape == b.position_ids.shape == (mbs, T)
    assert b.input_ids.dtype == b.labels.dtype == b.position_ids.dtype == torch.int64
    cu = b.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == mbs * T
    assert bool((cu[1:] > cu[:-1]).all())
    assert set(range(0, mbs * T, T)) <= set(cu.tolist())  # every row start is a boundary
    ids, lab, pos = b.input_ids.flatten(), b.labels.flatten(), b.position_ids.flatten()
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert torch.equal(pos[s:e], torch.arange(e - s))
        assert torch.equal(
            lab[s : e - 1][lab[s : e - 1] != IGNORE_INDEX], ids[s + 1 : e][lab[s : e - 1] != IGNORE_INDEX]
        )
        assert lab[e - 1] == IGNORE_INDEX  # no label crosses a segment (document or row) boundary
    assert b.num_loss_tokens() == int((lab != IGNORE_INDEX).sum())


def test_packing_matches_direct_tokenisation(tmp_path, tok):
    docs = make_docs(40)
    T, mbs = 64, 2
    cfg = cfg_for(write_jsonl(tmp_path / "a.jsonl", docs), shuffle="none")
    loader = build_loader(cfg, tok, seq_len=T, micro_batch_size=mbs, dp_rank=0, dp_size=1, seed=0)
    direct = tokenize_documents(tok, docs, add_eos=True)
    assert all(d[-1] == tok.eos_token_id for d in direct)
    stream = np.concatenate(direct)
    nb = len(stream) // (T * mbs)
    batches = take(loader, nb)
    for b in batches:
        check_invariants(b, T)
        assert b.num_loss_tokens() > 0
    got = torch.cat([b.input_ids.flatten() for b in batches]).numpy()
    assert np.array_equal(got, stream[: len(got)])
    # Segment boundaries are exactly document ends and row starts; real labels are all next tokens.
    doc_ends = set(np.cumsum([len(d) for d in direct]).tolist())
    cuts = set()
    for j, b in enumerate(batches):
        cuts |= {j * mbs * T + int(c) for c in b.cu_seqlens.tolist()}
    expect = {c for c in doc_ends if c <= len(got)} | set(range(0, len(got) + 1, T))
    assert cuts == expect
    labels = torch.cat([b.labels.flatten() for b in batches]).numpy()
    n_segments = sum(len(b.cu_seqlens) - 1 for b in batches)
    assert (labels == IGNORE_INDEX).sum() == n_segments
    # The stream continues seamlessly into the next epoch (no shuffle: same order again).
    more = torch.cat([b.input_ids.flatten() for b in take(loader, nb + 2)]).numpy()
    whole = np.concatenate([got, more])
    assert np.array_equal(whole[len(stream) : 2 * len(stream)], stream)


def test_long_document_continues_in_next_row(tmp_path, tok):
    long_doc = " ".join(["alpha beta"] * 200)
    cfg = cfg_for(write_jsonl(tmp_path / "a.jsonl", [long_doc]), shuffle="none")
    loader = build_loader(cfg, tok, seq_len=32, micro_batch_size=3, dp_rank=0, dp_size=1, seed=0)
    b = next(loader)
    check_invariants(b, 32)
    assert b.cu_seqlens.tolist() == [0, 32, 64, 96]  # one segment per row, positions restart
    assert b.position_ids[1, 0] == 0 and b.labels[0, -1] == IGNORE_INDEX and b.labels[0, 0] == b.input_ids[0, 1]


def test_shuffle_is_a_permutation_per_epoch_and_deterministic(tmp_path, tok):
    docs = make_docs(30, prefix="d")
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    direct = tokenize_documents(tok, docs)
    epoch_tokens = sum(len(d) for d in direct)

    def stream(seed, n_rows=None):  # documents shuffled, rows in packing order
        loader = build_loader(
            cfg_for(path, shuffle="documents"), tok, seq_len=50, micro_batch_size=1, dp_rank=0, dp_size=1, seed=seed
        )
        n_rows = n_rows or (2 * epoch_tokens) // 50 + 1
        return torch.cat([b.input_ids.flatten() for b in take(loader, n_rows)]).numpy()

    a, b, c = stream(1), stream(1), stream(2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[:500], c[:500])
    e0, e1 = a[:epoch_tokens], a[epoch_tokens : 2 * epoch_tokens]
    assert sorted(e0.tolist()) == sorted(np.concatenate(direct).tolist())  # each doc once per epoch
    assert not np.array_equal(e0, e1)  # reshuffled

    # Split at EOS: each epoch is a permutation of the documents.
    def docs_of(x):
        cut = np.flatnonzero(x == tok.eos_token_id)
        return sorted(tuple(p.tolist()) for p in np.split(x, cut + 1) if len(p))

    assert docs_of(e0) == docs_of(e1) == sorted(tuple(d.tolist()) for d in direct)


@pytest.mark.parametrize("dp,mbs", [(2, 2), (3, 1), (4, 3)])
def test_dp_sharding_covers_single_process_rows(tmp_path, tok, dp, mbs):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(25))
    T, steps = 40, 3
    single = build_loader(cfg_for(path), tok, seq_len=T, micro_batch_size=1, dp_rank=0, dp_size=1, seed=7)
    ref = rows_of(take(single, steps * dp * mbs))
    for r in range(dp):
        loader = build_loader(cfg_for(path), tok, seq_len=T, micro_batch_size=mbs, dp_rank=r, dp_size=dp, seed=7)
        for j, b in enumerate(take(loader, steps)):
            for k, (ids, lab, pos) in enumerate(rows_of([b])):
                g = r + dp * (j * mbs + k)
                assert np.array_equal(ids, ref[g][0]) and np.array_equal(lab, ref[g][1])
                assert np.array_equal(pos, ref[g][2])


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cut", [3, 9])  # mid-epoch 0, and after crossing into epoch 1
def test_exact_resume(tmp_path, tok, cut):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(12))
    kw = dict(seq_len=48, micro_batch_size=2, dp_rank=1, dp_size=2, seed=3)
    full = build_loader(cfg_for(path), tok, **kw)
    ref = take(full, cut + 8)
    first = build_loader(cfg_for(path), tok, **kw)
    take(first, cut)
    sd = _roundtrip(first.state_dict())
    assert (sd["sources"][0]["epoch"] >= 1) == (cut == 9)
    resumed = build_loader(cfg_for(path), tok, **kw)
    resumed.load_state_dict(sd)
    for a, b in zip(ref[cut:], take(resumed, 8)):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.position_ids, b.position_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_resume_into_other_dp_size(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(20))
    single = build_loader(cfg_for(path), tok, seq_len=32, micro_batch_size=1, dp_rank=0, dp_size=1, seed=5)
    ref = rows_of(take(single, 40))
    two = build_loader(cfg_for(path), tok, seq_len=32, micro_batch_size=2, dp_rank=0, dp_size=2, seed=5)
    take(two, 3)  # 12 global rows
    sd = _roundtrip(two.state_dict())
    assert sd["rows"] == 12
    for dp in (3, 4):
        for r in range(dp):
            loader = build_loader(cfg_for(path), tok, seq_len=32, micro_batch_size=1, dp_rank=r, dp_size=dp, seed=5)
            loader.load_state_dict(sd)
            ids = rows_of(take(loader, 2))
            for j in range(2):
                assert np.array_equal(ids[j][0], ref[12 + r + dp * j][0])
    bad = build_loader(cfg_for(path), tok, seq_len=32, micro_batch_size=1, dp_rank=0, dp_size=5, seed=5)
    with pytest.raises(DataError, match="dp_size=5"):
        bad.load_state_dict(sd)
    other_seed = build_loader(cfg_for(path), tok, seq_len=32, micro_batch_size=1, dp_rank=0, dp_size=1, seed=6)
    with pytest.raises(DataError, match="seed"):
        other_seed.load_state_dict(sd)


def test_blender_rule():
    b = Blender([3.0, 1.0])
    picks = []
    for _ in range(8):
        s = b.choose()
        b.taken[s] += 1
        picks.append(s)
    assert picks == [0, 0, 1, 0, 0, 0, 1, 0]


def test_blending_proportions(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", make_docs(10, prefix="alpha"))
    b = write_jsonl(tmp_path / "b.jsonl", make_docs(10, prefix="omicron", seed=1))
    c = write_jsonl(tmp_path / "c.jsonl", make_docs(10, prefix="kappa", seed=2))
    cfg = cfg_for(a, b, c, weights=[0.5, 0.3, 0.2])
    loader = build_loader(cfg, tok, seq_len=16, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    take(loader, 100)
    assert loader.stats["rows_per_source"] == [200, 120, 80]
    again = build_loader(cfg, tok, seq_len=16, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    assert all(
        torch.equal(x.input_ids, y.input_ids)
        for x, y in zip(
            take(again, 5),
            take(build_loader(cfg, tok, seq_len=16, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0), 5),
        )
    )


def test_valid_split_is_held_out_finite_and_padded(tmp_path, tok):
    docs = make_docs(60)
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    cfg = cfg_for(path, valid_fraction=0.2, shuffle="none")
    direct = {tuple(d.tolist()) for d in tokenize_documents(tok, docs)}

    def split_eos(x):
        cut = np.flatnonzero(x == tok.eos_token_id)
        return [tuple(p.tolist()) for p in np.split(x, cut + 1)[:-1]]

    dp, mbs = 2, 2
    per_rank = []
    for r in range(dp):
        v = build_loader(cfg, tok, seq_len=256, micro_batch_size=mbs, dp_rank=r, dp_size=dp, seed=0, split="valid")
        batches = list(v)
        assert len(list(v)) == len(batches)  # iterating again restarts the finite pass
        for b in batches:
            check_invariants(b, 256)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) >= 1  # same number of micro-batches on every rank
    rows = {}
    for r in range(dp):
        for j, row in enumerate(rows_of(per_rank[r])):
            rows[r + dp * j] = row
    ordered = np.concatenate([rows[g][0][rows[g][0] != tok.pad_token_id] for g in sorted(rows)])
    valid_docs = split_eos(ordered)
    assert len(valid_docs) >= 1 and set(valid_docs) <= direct and len(valid_docs) == len(set(valid_docs))
    last = per_rank[-1][-1]
    assert (last.input_ids == tok.pad_token_id).any()  # the pass ends in padding, which has no loss
    assert (last.labels[last.input_ids == tok.pad_token_id] == IGNORE_INDEX).all()
    # Train never sees a held-out document; train + valid = all documents.
    train = build_loader(cfg, tok, seq_len=64, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    stream = torch.cat([b.input_ids.flatten() for b in take(train, 150)]).numpy()
    train_docs = set(split_eos(stream))
    assert train_docs.isdisjoint(valid_docs) and train_docs | set(valid_docs) == direct


def test_valid_split_of_small_source_is_never_empty(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(5))
    v = build_loader(
        cfg_for(path, valid_fraction=0.01),
        tok,
        seq_len=64,
        micro_batch_size=1,
        dp_rank=0,
        dp_size=1,
        seed=0,
        split="valid",
    )
    assert sum(b.num_loss_tokens() for b in v) > 0
    with pytest.raises(DataError, match="valid_fraction=0"):
        build_loader(cfg_for(path), tok, seq_len=64, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0, split="valid")


def test_embedded_default_loader(tok):
    cfg = DataConfig()
    a = build_loader(cfg, tok, seq_len=128, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    b = next(a)
    check_invariants(b, 128)
    text = tok.decode(b.input_ids[0])
    assert len(text) > 100 and b.num_loss_tokens() > 200
    v = build_loader(cfg, tok, seq_len=128, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, split="valid")
    assert next(iter(v)).num_loss_tokens() > 0
