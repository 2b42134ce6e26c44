"""Document boundaries stay on the host next to their device copy, so GPU kernels that size their grids
by them (fla's varlen state kernels, the flash kernels' longest document) need no device sync; the
host-side values must equal what the device copy would give."""

import torch

from minimax_train.data.batch import collate
from minimax_train.data.packing import Row
from minimax_train.model.layers import PackedSequence
from minimax_train.model.moe import expert_counts
from minimax_train.ops.fla_varlen import host_chunk_offsets
from minimax_train.ops.lightning import lightning_attention, lightning_slopes


def test_batch_to_device_keeps_cu_seqlens_on_the_host():
    rows = [Row(tokens=list(range(1, 8)), seglens=[3, 4]), Row(tokens=list(range(1, 6)), seglens=[5])]
    b = collate(rows, seq_len=8, pad_id=0).to("meta")
    assert b.input_ids.device.type == "meta" and b.cu_seqlens.device.type == "cpu"
    assert b.cu_seqlens.tolist() == [0, 3, 7, 8, 13, 16]


def test_packed_sequence_records_the_host_boundaries():
    cu = torch.tensor([0, 5, 5, 17, 32], dtype=torch.int32)
    seq = PackedSequence.build(2, 16, "cpu", cu)
    assert seq.cu_seqlens_host.dtype == torch.long and seq.cu_seqlens_host.tolist() == cu.tolist()
    assert seq.max_doc_len == 15


def test_host_chunk_offsets_count_each_documents_chunks():
    cu = torch.tensor([0, 1, 64, 64, 65, 300])  # lengths 1, 63, 0, 1, 235
    want = [0]
    for n in torch.diff(cu).tolist():
        want.append(want[-1] + -(-n // 64))  # ceil(n / 64) chunks, none for an empty document
    assert host_chunk_offsets(cu, 64).tolist() == want == [0, 1, 2, 2, 3, 7]


def test_lightning_with_host_boundaries_equals_without():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 7, 30, 40])
    slopes = lightning_slopes(2, 1, 4)
    want, _ = lightning_attention(q, k, v, slopes, cu_seqlens=cu, block_size=4)
    got, _ = lightning_attention(q, k, v, slopes, cu_seqlens=cu, cu_seqlens_host=cu.clone(), block_size=4)
    assert torch.equal(got, want)


def test_expert_counts_equal_bincount():
    flat = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(1))
    got = expert_counts(flat, 9)
    assert got.dtype == torch.long and torch.equal(got, torch.bincount(flat, minlength=9))
    assert expert_counts(flat[:0], 3).tolist() == [0, 0, 0]
