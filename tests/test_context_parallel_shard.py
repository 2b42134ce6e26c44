"""Context-parallel sharding (zigzag layout) and the single-rank (cp=1) LASP+ / ring paths, in one process."""

import pytest
import torch
from util_models import one_process_lightning, one_process_softmax

from minimax_train.model.layers import PackedSequence
from minimax_train.parallel.context_parallel import (
    build_ring_plan,
    lasp_attention,
    ring_attention,
    shard_for_context_parallel,
    unshard_from_context_parallel,
    zigzag_token_index,
)

LENGTHS = [7, 5, 1, 3, 12, 20]  # T=48: starts 0, 7, 12, 13, 16, 28


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def test_zigzag_index_is_a_partition_and_unshard_inverts_it():
    for cp in (1, 2, 4):
        idx = [zigzag_token_index(2, 48, r, cp) for r in range(cp)]
        assert torch.equal(torch.sort(torch.cat(idx)).values, torch.arange(96))
        x = torch.randn(96, 3)
        assert torch.equal(unshard_from_context_parallel([x[i] for i in idx], 2, 48), x)
    # rank r holds chunks r and 2cp-1-r
    assert zigzag_token_index(1, 16, 1, 4).tolist() == [2, 3, 12, 13]


def test_shard_translates_documents():
    ids = torch.arange(48)[None]
    labels = ids + 100
    cu = _cu(LENGTHS)
    full = PackedSequence.build(1, 48, "cpu", cu)
    for cp in (2, 4):
        n = 48 // (2 * cp)
        for r in range(cp):
            lid, llab, seq = shard_for_context_parallel(ids, labels, cu, r, cp)
            idx = zigzag_token_index(1, 48, r, cp)
            assert torch.equal(lid[0], idx) and torch.equal(llab[0], idx + 100)
            assert torch.equal(seq.causal_pos, idx)
            assert torch.equal(seq.doc_ids, full.doc_ids[idx])
            assert torch.equal(seq.rope_pos, full.rope_pos[idx])
            # local pieces: cut at document starts and at the segment boundary
            bounds = seq.cu_seqlens.tolist()
            assert bounds[0] == 0 and bounds[-1] == 2 * n and n in bounds
            for a, b in zip(bounds[:-1], bounds[1:]):
                assert b > a and len(set(seq.doc_ids[a:b].tolist())) == 1
                assert a % n == 0 or seq.doc_ids[a] != seq.doc_ids[a - 1]
    # cp=4: chunk 2 = [12, 18) starts a document exactly at its first token; chunk 3 = [18, 24) has none
    _, _, seq = shard_for_context_parallel(ids, None, cu, 2, 4)
    assert seq.cp.seg_chunk == [2, 5] and seq.cp.seg_first_start == [0, 6]
    assert seq.cp.chunk_has_start[0].tolist() == [True, True, True, False, True, False, False, False]


def test_shard_position_ids_and_errors():
    ids = torch.arange(48)[None]
    pos = torch.arange(48)[None] * 3
    _, _, seq = shard_for_context_parallel(ids, None, _cu(LENGTHS), 1, 2, position_ids=pos)
    assert torch.equal(seq.rope_pos, zigzag_token_index(1, 48, 1, 2) * 3)
    with pytest.raises(ValueError, match="seq_len=48 must be divisible by 2\\*parallel.cp=10"):
        shard_for_context_parallel(ids, None, _cu(LENGTHS), 0, 5)
    with pytest.raises(ValueError, match="row start"):
        shard_for_context_parallel(torch.zeros(2, 8, dtype=torch.long), None, torch.tensor([0, 4, 16]), 0, 2)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("rows", [1, 2])
def test_single_rank_lasp_and_ring_equal_local(rows):
    """cp=1 still splits each row into two local segments: the carried state and the ring plan must bridge them."""
    torch.manual_seed(0)
    lengths = LENGTHS if rows == 1 else LENGTHS + [48]
    cu = _cu(lengths)
    T, H, D = 48 * rows, 3, 8
    full = PackedSequence.build(rows, 48, "cpu", cu)
    _, _, seq = shard_for_context_parallel(torch.zeros(rows, 48, dtype=torch.long), None, cu, 0, 1)
    assert torch.equal(seq.causal_pos, torch.arange(T))
    q, k, v = (torch.rand(T, H, D, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.05, 0.3, 1.0])
    g = torch.randn(T, H, D)
    ref = one_process_lightning(q, k, v, slopes, full, block_size=4)
    got = lasp_attention(q, k, v, slopes, seq, None, block_size=4)
    assert _rel(got, ref) < 1e-6
    gr = torch.autograd.grad(ref, (q, k, v), g)
    gg = torch.autograd.grad(got, (q, k, v), g)
    assert max(_rel(a, b) for a, b in zip(gg, gr)) < 1e-6

    qs, ks, vs = (torch.randn(T, h, D, requires_grad=True) for h in (4, 2, 2))
    for window in (None, 5):
        ref = one_process_softmax(qs, ks, vs, full, scale=D**-0.5, sliding_window=window)
        gr = torch.autograd.grad(ref, (qs, ks, vs), g[:, :1].expand(T, 4, D))
        for bwd in ("fused", "recompute"):
            got = ring_attention(qs, ks, vs, seq, None, scale=D**-0.5, sliding_window=window, backward=bwd)
            assert _rel(got, ref) < 1e-6
            gg = torch.autograd.grad(got, (qs, ks, vs), g[:, :1].expand(T, 4, D))
            assert max(_rel(a, b) for a, b in zip(gg, gr)) < 1e-6


def test_ring_plan_skips_blocks_that_cannot_interact():
    cu = _cu(LENGTHS)
    ids = torch.zeros(1, 48, dtype=torch.long)
    # cp=4, rank 0 holds chunks 0 and 7; visiting rank 3 (chunks 3, 4): chunk 0 sees neither (future),
    # chunk 7 = [42, 48) is in the document [28, 48) which chunk 3 = [18, 24) is not part of -> only chunk 4.
    _, _, seq = shard_for_context_parallel(ids, None, cu, 0, 4)
    plan = build_ring_plan(seq)
    src, calls = plan.steps[1]
    assert src == 3
    assert [(c.q_ranges, c.k_ranges) for c in calls] == [([(6, 12)], [(6, 12)])]
    # step 0 (own K/V): chunk 0 with itself; chunk 7 is in a different document from chunk 0 -> one call
    assert [(c.q_ranges, c.k_ranges) for c in plan.steps[0][1]] == [([(0, 6)], [(0, 6)]), ([(6, 12)], [(6, 12)])]
