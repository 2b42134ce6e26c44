"""Chunked LM loss (ops/cross_entropy.py, train.loss_chunk_tokens): the same loss and gradients as the
unchunked cross-entropy (plain model, vocabulary-parallel tp=2 with and without SP, the trainer), while the
peak of live tensor memory in forward + backward holds only one chunk's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from util_memory import peak_live_bytes
from util_train import TINY, read_metrics

from minimax_train.conf_tree import compose_job
from minimax_train.tools.spawn import run_distributed


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def lm_model(vocab: int, hidden: int, dtype=torch.float32):
    """A one-layer model: only its lm_head (and lm_loss_sum) is used here."""
    from minimax_train.model.config import ModelConfig
    from minimax_train.model.transformer import MiniMaxForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        block_size=16,
    )
    return MiniMaxForCausalLM(cfg).to(dtype)


def loss_and_grads(model, hidden, labels, chunk: int):
    model.zero_grad(set_to_none=True)
    model.set_memory_options(loss_chunk_tokens=chunk)
    h = hidden.detach().clone().requires_grad_(True)
    loss = model.lm_head.loss_sum(h, labels, chunk)
    loss.backward()
    return loss.detach(), h.grad, model.lm_head.weight.grad.clone()


N, IGNORED = 96, slice(30, 80)  # covers a whole chunk for chunk sizes 32 ([32:64]) and 40 ([40:80])


def _inputs(vocab, hidden, dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(N, hidden, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[IGNORED] = -100
    labels[0] = -100
    return h, labels


# ---- (a) exactness -------------------------------------------------------------------------------------------------


def op_loss_and_grads(weight, hidden, labels, chunk: int):
    """chunked_loss_sum itself with an lm_head + cross-entropy in the inputs' dtype (the model's lm_loss_sum
    computes the cross-entropy in fp32, so float64 exactness is checked here)."""
    from minimax_train.ops.cross_entropy import chunked_loss_sum

    w = weight.detach().clone().requires_grad_(True)
    h = hidden.detach().clone().requires_grad_(True)

    def loss_fn(x, y):
        return F.cross_entropy(F.linear(x, w), y, ignore_index=-100, reduction="sum")

    loss = chunked_loss_sum(h, labels, loss_fn, chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize(
    "path,dtype,tol", [("op", torch.float64, 1e-12), ("op", torch.float32, 1e-6), ("model", torch.float32, 1e-6)]
)
@pytest.mark.parametrize("chunk", [32, 40, 7, N, 1000])
def test_chunked_equals_unchunked(path, dtype, tol, chunk):
    model = lm_model(200, 24, dtype)
    hidden, labels = _inputs(200, 24, dtype)
    if path == "op":
        run = lambda c: op_loss_and_grads(model.lm_head.weight, hidden, labels, c)  # noqa: E731
    else:
        run = lambda c: loss_and_grads(model, hidden, labels, c)  # noqa: E731
    l0, gh0, gw0 = run(0)
    l1, gh1, gw1 = run(chunk)
    assert l1.dtype == l0.dtype == dtype
    assert abs(l1 - l0).item() <= tol * abs(l0).item(), (l1, l0)
    assert rel(gh1, gh0) < tol and rel(gw1, gw0) < tol
    # ignored tokens (a whole chunk among them) get an exact zero gradient, never NaN
    assert torch.isfinite(gh1).all() and gh1[IGNORED].abs().max().item() == 0.0
    if path == "model":
        with torch.no_grad():  # evaluation: plain chunk loop, no checkpoint
            assert abs(model.lm_head.loss_sum(hidden, labels, chunk) - l0).item() <= tol * abs(l0).item()


def test_all_ignored_gives_zero_loss_and_zero_gradients():
    model = lm_model(50, 16)
    hidden, _ = _inputs(50, 16, torch.float32)
    labels = torch.full((N,), -100)
    loss, gh, gw = loss_and_grads(model, hidden, labels, 32)
    assert loss.item() == 0.0 and gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0


def test_chunked_under_cpu_bf16_autocast():
    """The recomputation in backward runs under the forward's autocast state (bf16 lm_head GEMM)."""
    model = lm_model(256, 32)
    hidden, labels = _inputs(256, 32, torch.float32)
    res = []
    for chunk in (0, 40):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res.append(loss_and_grads(model, hidden, labels, chunk))
    (l0, gh0, gw0), (l1, gh1, gw1) = res
    assert l0.dtype == l1.dtype == torch.float32
    assert abs(l1 - l0).item() <= 1e-3 * abs(l0).item()
    assert rel(gh1, gh0) < 1e-2 and rel(gw1, gw0) < 1e-2


def test_config_rejects_negative_chunk():
    from minimax_train.config import ConfigError, TrainConfig

    assert TrainConfig().loss_chunk_tokens == 8192 and TrainConfig(loss_chunk_tokens=0).loss_chunk_tokens == 0
    with pytest.raises(ConfigError, match="train.loss_chunk_tokens"):
        TrainConfig(loss_chunk_tokens=-1)


# ---- (b) memory ----------------------------------------------------------------------------------------------------


def test_chunking_bounds_the_peak_memory():
    n, v, h, chunk = 4096, 8192, 64, 512
    model = lm_model(v, h)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(n, h, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    logits_bytes = n * v * 4

    def run(c):
        return peak_live_bytes(lambda: loss_and_grads(model, hidden, labels, c))

    full, chunked = run(0), run(chunk)
    assert full >= 2 * logits_bytes, full  # logits (log-probs) saved + their gradient: the tracker sees backward
    assert chunked < full / 4, (chunked, full)
    assert chunked < 4 * chunk * v * 4 + 4 * v * h * 4 + 4 * n * h * 4, chunked  # ~ one chunk's logits


# ---- (c) vocabulary-parallel tp=2 --------------------------------------------------------------------------------

TP_CHUNK = 24  # 64 tokens per micro-batch: chunks of 24, 24, 16 (one fully ignored)


def _tp_labels():
    from util_models import make_rows

    ids, labels, cu = make_rows()
    labels.view(-1)[TP_CHUNK : 2 * TP_CHUNK] = -100
    return ids, labels, cu


def _loss_and_grads(model, chunk):
    ids, labels, cu = _tp_labels()
    model.set_memory_options(loss_chunk_tokens=chunk)
    out = model(ids, labels=labels, cu_seqlens=cu)
    out.lm_loss_sum.backward()
    full = {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for n, p in model.named_parameters()
    }
    return out.lm_loss_sum.item(), full


def _tp_ranks():
    from util_models import build_parallel, make_config

    out = {}
    for sp in (False, True):
        model, _ = build_parallel(make_config(), tp=2, etp=2, sequence_parallel=sp)
        out[sp] = _loss_and_grads(model, TP_CHUNK)
    return out


def test_vocab_parallel_tp2_chunked_equals_single_process():
    from util_models import make_config, make_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_loss, ref_grads = _loss_and_grads(make_model(make_config()), 0)
    finally:
        torch.set_num_threads(threads)
    ranks = run_distributed(_tp_ranks, 2, timeout=240, threads=1)
    for rank, res in enumerate(ranks):
        for sp, (loss, grads) in res.items():
            assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (rank, sp, loss, ref_loss)
            for n, g in ref_grads.items():
                assert rel(grads[n], g) < 1e-5, f"rank {rank} sp={sp}: gradient of {n}: rel {rel(grads[n], g)}"


# ---- (d) the trainer -------------------------------------------------------------------------------------------------


def test_trainer_chunked_loss_equals_unchunked(tmp_path):
    """seq_len 64, one row per micro-batch: train.loss_chunk_tokens=16 runs 4 chunks (eval included)."""
    from minimax_train.train import train

    recs = {}
    for chunk in (0, 16):
        job = compose_job(
            *TINY,
            "train.steps=4",
            "train.eval_interval=2",
            "checkpoint.interval=0",
            "checkpoint.save_final=false",
            f"train.loss_chunk_tokens={chunk}",
        )
        assert job.train.loss_chunk_tokens == chunk
        train(job, tmp_path / f"c{chunk}")
        recs[chunk] = read_metrics(tmp_path / f"c{chunk}")
    assert len(recs[0]) == len(recs[16]) == 4
    for a, b in zip(recs[16], recs[0]):
        for key in ("loss", "lm_loss", "grad_norm", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (a["step"], key, a[key], b[key])
    assert sum("val_loss" in r for r in recs[16]) == 2


LAYOUT_STEPS = [*TINY, "train.steps=4", "checkpoint.interval=0", "checkpoint.save_final=false"]


@pytest.fixture(scope="module")
def unchunked_run(tmp_path_factory):
    from util_train import train_rank

    run_dir = tmp_path_factory.mktemp("unchunked")
    run_distributed(train_rank, 1, [*LAYOUT_STEPS, "train.loss_chunk_tokens=0"], str(run_dir))
    return run_dir


@pytest.mark.parametrize(
    "name,extra",
    [("dp2_fsdp2", []), ("cp2", ["parallel.cp=2"]), ("zero3", ["parallel=deepspeed", "parallel.zero_stage=3"])],
)
def test_trainer_chunked_loss_composes_with_layouts(name, extra, unchunked_run, tmp_path):
    """Chunks recomputed in backward under FSDP2 (root kept unsharded), context parallelism (local tokens)
    and DeepSpeed ZeRO-3 (lm_head re-gathered for the recompute): the unchunked single-process losses."""
    from util_train import by_step, compare_metrics, train_rank

    if name == "zero3":
        pytest.importorskip("deepspeed")
    run_distributed(
        train_rank, 2, [*LAYOUT_STEPS, *extra, "train.loss_chunk_tokens=16"], str(tmp_path / name), timeout=600
    )
    compare_metrics(by_step(read_metrics(unchunked_run)), by_step(read_metrics(tmp_path / name)))
