"""The whole model on CUDA (fla lightning kernels, flex attention, grouped GEMM experts) against the
same weights on the CPU reference path in float64."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from minimax_train.model import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax_train.ops.experts import grouped_swiglu  # noqa: E402


def _cfg():
    return ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=8,
        softmax_every=2,
        block_size=64,
        rope_theta=1e4,
    )


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "dtype,autocast,tol",
    [(torch.float32, False, 5e-3), (torch.bfloat16, False, 3e-2), (torch.float32, True, 3e-2)],
    ids=["fp32", "bf16", "autocast_bf16"],
)
def test_model_cuda_matches_cpu_reference(dtype, autocast, tol):
    """autocast_bf16 is the trainer's GPU path: fp32 weights, bf16 autocast (grouped GEMM in bf16)."""
    pytest.importorskip("fla")
    torch.manual_seed(0)
    ref = MiniMaxForCausalLM(_cfg()).double()
    gpu = MiniMaxForCausalLM(_cfg()).to("cuda", dtype)
    gpu.load_state_dict(ref.state_dict())
    lengths = [700, 1, 300, 1047]  # documents of odd lengths, one of a single token
    ids = torch.randint(0, 512, (1, sum(lengths)))
    labels = torch.roll(ids, -1, 1)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out_ref = ref(ids, labels=labels, cu_seqlens=cu, return_logits=True)
    out_ref.loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = gpu(ids.cuda(), labels=labels.cuda(), cu_seqlens=cu.cuda(), return_logits=True)
    out.loss.backward()
    assert _rel(out.logits.cpu(), out_ref.logits) < tol
    assert abs(out.loss.item() - out_ref.loss.item()) / out_ref.loss.item() < tol
    ref_grads = dict(ref.named_parameters())
    for name, p in gpu.named_parameters():
        assert _rel(p.grad.cpu(), ref_grads[name].grad) < 5 * tol, name


def test_grouped_mm_experts_match_loop():
    torch.manual_seed(1)
    e, h, i = 8, 256, 512
    counts = torch.tensor([0, 37, 1, 200, 64, 0, 5, 93], device="cuda")
    x = torch.randn(int(counts.sum()), h, device="cuda")
    gu = torch.randn(e, 2 * i, h, device="cuda") * 0.05
    dn = torch.randn(e, h, i, device="cuda") * 0.05
    ref = grouped_swiglu(x.double(), counts, gu.double(), dn.double())  # loop path
    got = grouped_swiglu(x.bfloat16(), counts, gu.bfloat16(), dn.bfloat16())  # torch._grouped_mm path
    assert _rel(got, ref) < 2e-2


def test_grouped_mm_is_used_under_autocast(monkeypatch):
    """fp32 inputs and fp32 weights under bf16 autocast (fp32 master weights; any fp32 caller) still take
    torch._grouped_mm, not the per-expert loop, and the weight gradients come back in fp32."""
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = torch.tensor([3, 0, 5, 8], device="cuda")
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    gu = torch.randn(4, 256, 64, device="cuda", requires_grad=True)
    dn = torch.randn(4, 64, 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = grouped_swiglu(x, counts, gu, dn)
    y.float().sum().backward()
    assert len(calls) == 2 and y.dtype == torch.bfloat16
    assert gu.grad.dtype == torch.float32 and dn.grad.dtype == torch.float32


def test_fused_elementwise_matches_eager(monkeypatch):
    """The compiled elementwise kernels (ops/fused.py) give the eager formulas' loss and gradients under the
    trainer's bf16 autocast (MINIMAX_FUSED=1 compiles them; 0 is the eager path)."""
    pytest.importorskip("fla")
    ids = torch.randint(0, 512, (1, 2048), device="cuda")
    cu = torch.tensor([0, 1000, 2048], dtype=torch.int32, device="cuda")
    results = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("MINIMAX_FUSED", fused)
        model = MiniMaxForCausalLM(_cfg(), seed=3).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=torch.roll(ids, -1, 1), cu_seqlens=cu)
        out.loss.backward()
        results[fused] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss_f, grads_f), (loss_e, grads_e) = results["1"], results["0"]
    assert abs(loss_f.item() - loss_e.item()) / loss_e.item() < 1e-3
    for name, g in grads_e.items():
        assert _rel(grads_f[name], g) < 2e-2, name


def test_liger_loss_matches_chunked():
    """Liger-Kernel's fused linear cross-entropy (train.loss_kernel auto on CUDA) gives the chunked
    lm_head + fp32 cross-entropy's loss and gradients under bf16 autocast."""
    pytest.importorskip("fla")
    pytest.importorskip("liger_kernel")
    ids = torch.randint(0, 512, (1, 3000), device="cuda")
    labels = torch.roll(ids, -1, 1)
    labels[0, 1000:1100] = -100
    cu = torch.tensor([0, 1000, 3000], dtype=torch.int32)
    results = {}
    for kernel in ("liger", "chunked"):
        model = MiniMaxForCausalLM(_cfg(), seed=5).cuda()
        model.set_memory_options(loss_chunk_tokens=1024, loss_kernel=kernel)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=labels, cu_seqlens=cu)
        (out.lm_loss_sum * 0.25).backward()  # the trainer scales the summed loss: not a unit upstream gradient
        results[kernel] = (out.lm_loss_sum.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss_l, grads_l), (loss_c, grads_c) = results["liger"], results["chunked"]
    assert abs(loss_l.item() - loss_c.item()) / loss_c.item() < 1e-3
    for name, g in grads_c.items():
        assert grads_l[name].dtype == torch.float32 and _rel(grads_l[name], g) < 2e-2, name


def test_training_step_host_syncs():
    """A forward + backward on host cu_seqlens waits on the device only where a library must: Liger's loss
    (its token count and its unit-gradient check) and fla's chunk-index copy, none per layer."""
    import warnings

    pytest.importorskip("fla")
    model = MiniMaxForCausalLM(_cfg(), seed=1).cuda()
    model.set_memory_options(activation_checkpointing="selective", loss_kernel="auto")
    ids = torch.randint(0, 512, (1, 2048), device="cuda")
    cu = torch.tensor([0, 700, 701, 2048], dtype=torch.int32)  # on the host, as PackedBatch.to leaves it

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=torch.roll(ids, -1, 1), cu_seqlens=cu.clone())
        (out.lm_loss_sum * 0.5 + out.aux_loss).backward()

    step()  # compiles and autotunes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 4, syncs
