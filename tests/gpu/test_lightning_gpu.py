"""fla-core backend of lightning attention vs the torch backend (float64 on the same GPU).

fla's float32 dots run in TF32 and its bf16 path keeps intermediates in bf16, so tolerances are
TF32-level (2e-3) and bf16-level (1e-2) relative errors, measured as ||got - ref|| / ||ref||.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("fla")

from minimax_train.ops.lightning import lightning_attention, lightning_slopes  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-3, torch.bfloat16: 1e-2}

FP32, BF16 = torch.float32, torch.bfloat16
# (B, T, H, D, doc lengths, dtype). Each new (dtype, head_dim, flags) combination costs fla a round of Triton
# autotuning on a fresh machine (a minute or more each; 4 tests took 5 minutes of an H200 with five
# combinations), so the cases are the two that matter, both packed (the trainer always passes cu_seqlens)
# with a 1-token document, initial and final states: fp32 tight at D=64, and the training shape (D=128, bf16
# under autocast). fla's fp32 kernels at D=128 autotune for several minutes and no training path runs them.
CASES = [
    (1, 1000, 4, 64, [1, 250, 511, 238], FP32),
    (1, 8192, 8, 128, [1537, 4096, 2000, 559], BF16),
]


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("layer_idx", [0, 79])  # strongest and weakest decay of an 80-layer model
@pytest.mark.parametrize(
    "B,T,H,D,docs,dtype", CASES, ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else None
)
def test_fla_matches_torch(B, T, H, D, docs, dtype, layer_idx):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(T + H)
    cu = (
        None
        if docs is None
        else torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), device=dev, dtype=torch.int32)
    )
    N = B if docs is None else len(docs)
    # Activated inputs as in the model (silu), v zero-mean so outputs do not share one large mean.
    q = torch.nn.functional.silu(torch.randn(B, T, H, D, generator=g, device=dev)).to(dtype)
    k = torch.nn.functional.silu(torch.randn(B, T, H, D, generator=g, device=dev)).to(dtype)
    v = torch.randn(B, T, H, D, generator=g, device=dev).to(dtype)
    h0 = torch.randn(N, H, D, D, generator=g, device=dev)
    do = torch.randn(B, T, H, D, generator=g, device=dev)
    dht = torch.randn(N, H, D, D, generator=g, device=dev)
    slopes = lightning_slopes(H, layer_idx, 80, device=dev)

    def run(inputs, backend):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        o, ht = lightning_attention(
            *leaves[:3], slopes, cu_seqlens=cu, initial_state=leaves[3], output_final_state=True, backend=backend
        )
        loss = (o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()
        return [o, ht] + list(torch.autograd.grad(loss, leaves))

    got = run([q, k, v, h0], "fla")
    ref = run([x.double() for x in (q, k, v, h0)], "torch")  # the same (rounded) values, exact math
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    names = ["o", "final_state", "dq", "dk", "dv", "dh0"]
    errs = {n: _rel(a, b) for n, a, b in zip(names, got, ref)}
    assert all(e < TOL[dtype] for e in errs.values()), errs


def test_auto_picks_fla_on_cuda():
    dev = torch.device("cuda")
    q, k, v = (torch.randn(1, 1000, 4, 64, device=dev) for _ in range(3))
    cu = torch.tensor([0, 1, 251, 762, 1000], device=dev, dtype=torch.int32)
    slopes = lightning_slopes(4, 1, 4, device=dev)
    o_auto, _ = lightning_attention(q, k, v, slopes, cu_seqlens=cu)
    o_fla, _ = lightning_attention(q, k, v, slopes, cu_seqlens=cu, backend="fla")
    assert torch.equal(o_auto, o_fla)


def test_slopes_on_cuda_match_cpu():
    # The buffers an export writes are computed on CPU; the GPU copy must not drift from them.
    torch.testing.assert_close(
        lightning_slopes(64, 40, 80, device="cuda").cpu(), lightning_slopes(64, 40, 80), rtol=1e-6, atol=0
    )


def test_host_cu_seqlens_same_result_without_device_sync():
    """With the host copy of cu_seqlens, fla's varlen path gives the same bits and, once its caches are
    warm, a forward and backward that never wait on the device (CUDA's sync debug mode raises if one does)."""
    dev = torch.device("cuda")
    T, H, D, docs = 8192, 16, 128, [1537, 4096, 2000, 559]  # the 1B preset's lightning shape at 8K
    g = torch.Generator(device=dev).manual_seed(7)
    host = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.long)
    cu = host.to(dev)
    q, k = (torch.nn.functional.silu(torch.randn(1, T, H, D, generator=g, device=dev)).bfloat16() for _ in range(2))
    v, do = (torch.randn(1, T, H, D, generator=g, device=dev).bfloat16() for _ in range(2))
    h0 = torch.randn(len(docs), H, D, D, generator=g, device=dev)
    slopes = lightning_slopes(H, 3, 8, device=dev)

    def run(**host_kw):
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, h0)]
        o, ht = lightning_attention(
            *leaves[:3], slopes, cu_seqlens=cu, initial_state=leaves[3], output_final_state=True, backend="fla",
            **host_kw,
        )  # fmt: skip
        grads = torch.autograd.grad((o.float() * do).sum() + ht.sum(), leaves)
        return [o, ht, *grads]

    ref = run()
    got = run(cu_seqlens_host=host)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = run(cu_seqlens_host=host)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(again, ref))
