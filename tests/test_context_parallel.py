"""Context parallelism equals the single-process computation (CPU, gloo, cp=2 and cp=4).

Packed rows with documents that cross rank boundaries, that start exactly at a chunk boundary, that are
shorter than a chunk, and a row that is one document over every chunk. For each layer kind the outputs
and the gradients of q, k, v equal the single-process op within 1e-5 relative (float32; relative = max
abs error / max abs reference over the whole tensor); the full model's losses over several AdamW steps
and its gradients equal the single-process run.

One group of processes per cp size runs every check (spawning is the slow part) and reports errors; the
tests below assert on them."""

from __future__ import annotations

import os

import pytest
import torch
from util_models import one_process_lightning, one_process_softmax, tiny_model_config

from minimax_train.tools.spawn import run_distributed

LENGTHS = [7, 5, 1, 3, 12, 20]  # T=48: starts 0, 7, 12, 13, 16, 28 (cp=2: chunks of 12, cp=4: chunks of 6)
ROW_LEN = 48
TOL = 1e-5


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


CASES = {"row1": (1, LENGTHS), "rows2": (2, LENGTHS + [48])}


# ---------------------------------------------------------------------------------------------------
# workers (run in every rank)
# ---------------------------------------------------------------------------------------------------
def _max_err(got, ref, group):
    """max |got - ref| over all ranks' rows, divided by max |ref| (ref is the full tensor, same everywhere)."""
    import torch.distributed as dist

    err = (got.detach() - ref.detach()).abs().max().reshape(1).double()
    dist.all_reduce(err, op=dist.ReduceOp.MAX, group=group)
    return (err / ref.abs().max().double().clamp(min=1e-30)).item()


def _lightning_checks(rank, cp, group):
    from minimax_train.model.layers import PackedSequence
    from minimax_train.parallel.context_parallel import lasp_attention, shard_for_context_parallel

    out = {}
    H, D = 4, 8
    slopes = torch.tensor([1e-4, 0.05, 0.3, 1.0])
    for case, (rows, lengths) in CASES.items():
        cu = _cu(lengths)
        T = rows * ROW_LEN
        gen = torch.Generator().manual_seed(11)
        q, k, v = (torch.randn(T, H, D, generator=gen) * 0.5 for _ in range(3))
        g = torch.randn(T, H, D, generator=gen)
        full = PackedSequence.build(rows, ROW_LEN, "cpu", cu)
        _, _, seq = shard_for_context_parallel(torch.zeros(rows, ROW_LEN, dtype=torch.long), None, cu, rank, cp)
        idx = seq.causal_pos
        for block in (4, 5):
            qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
            ref = one_process_lightning(qr, kr, vr, slopes, full, block_size=block)
            ref_g = torch.autograd.grad(ref, (qr, kr, vr), g)
            for mode in ("plus", "serial"):
                ql, kl, vl = (x[idx].clone().requires_grad_(True) for x in (q, k, v))
                o = lasp_attention(ql, kl, vl, slopes, seq, group, block_size=block, mode=mode)
                grads = torch.autograd.grad(o, (ql, kl, vl), g[idx])
                name = f"lightning/{case}/block{block}/{mode}"
                out[name + "/out"] = _max_err(o, ref[idx], group)
                for t, gl, gr in zip("qkv", grads, ref_g):
                    out[f"{name}/d{t}"] = _max_err(gl, gr[idx], group)
    return out


def _ring_checks(rank, cp, group):
    from minimax_train.model.layers import PackedSequence
    from minimax_train.parallel.context_parallel import ring_attention, shard_for_context_parallel

    out = {}
    Hq, Hkv, D = 4, 2, 8
    for case, (rows, lengths) in CASES.items():
        cu = _cu(lengths)
        T = rows * ROW_LEN
        gen = torch.Generator().manual_seed(12)
        q = torch.randn(T, Hq, D, generator=gen)
        k, v = (torch.randn(T, Hkv, D, generator=gen) for _ in range(2))
        g = torch.randn(T, Hq, D, generator=gen)
        full = PackedSequence.build(rows, ROW_LEN, "cpu", cu)
        _, _, seq = shard_for_context_parallel(torch.zeros(rows, ROW_LEN, dtype=torch.long), None, cu, rank, cp)
        idx = seq.causal_pos
        for window in (None, 5):
            qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
            ref = one_process_softmax(qr, kr, vr, full, scale=D**-0.5, sliding_window=window)
            ref_g = torch.autograd.grad(ref, (qr, kr, vr), g)
            for bwd in ("fused", "recompute"):
                ql, kl, vl = (x[idx].clone().requires_grad_(True) for x in (q, k, v))
                o = ring_attention(ql, kl, vl, seq, group, scale=D**-0.5, sliding_window=window, backward=bwd)
                grads = torch.autograd.grad(o, (ql, kl, vl), g[idx])
                name = f"ring/{case}/window{window}/{bwd}"
                out[name + "/out"] = _max_err(o, ref[idx], group)
                for t, gl, gr in zip("qkv", grads, ref_g):
                    out[f"{name}/d{t}"] = _max_err(gl, gr[idx], group)
    return out


def _packed_batch(rows, lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (rows, ROW_LEN), generator=gen)
    flat = ids.reshape(-1)
    labels = torch.full_like(flat, -100)
    bounds = _cu(lengths).tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        labels[s : e - 1] = flat[s + 1 : e]
    return ids, labels.view(rows, ROW_LEN), _cu(lengths)


def _model_checks(steps=3, tag="model", **parallel):
    """Full model, `steps` AdamW steps: loss, aux loss and every gradient vs the single-process run. The
    parallel model is built as the trainer builds it (meta device, this rank's shards, the same init) for
    ParallelConfig(**parallel), without FSDP: the test averages the gradients over cp itself (what FSDP
    does over dp x cp). With tp, heads are split by tp and the sequence by cp; with ep, the experts are
    expert-parallel over the mesh's ep groups (folded over cp)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from util_models import build_parallel, make_model

    from minimax_train.parallel.context_parallel import (
        cp_loss_for_backward,
        reduce_loss_over_cp,
        shard_for_context_parallel,
    )

    def local(t):
        return t._local_tensor if isinstance(t, DTensor) else t

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    out = {}
    cfg = tiny_model_config()
    coef = cfg.router_aux_loss_coef
    ref = make_model(cfg)
    par, mesh = build_parallel(cfg, fsdp=False, **parallel)
    rank, cp, group = mesh.cp_rank, mesh.layout.cp, mesh.cp_group
    expert_parallel = mesh.layout.ep > 1
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=2e-3, foreach=False)
    opt_par = torch.optim.AdamW(par.parameters(), lr=2e-3, foreach=False)
    losses = []
    for step in range(steps):
        rows, lengths = CASES["rows2" if step % 2 else "row1"]
        ids, labels, cu = _packed_batch(rows, lengths, seed=100 + step)
        o_ref = ref(ids, labels=labels, cu_seqlens=cu)
        n_tok = int(o_ref.num_loss_tokens)
        loss_ref = o_ref.lm_loss_sum / n_tok + coef * o_ref.aux_loss
        loss_ref.backward()

        lid, llab, seq = shard_for_context_parallel(ids, labels, cu, rank, cp)
        o_par = par(lid, labels=llab, seq=seq)
        cp_loss_for_backward(o_par, n_tok, cp, coef).backward()
        for name, p in par.named_parameters():  # what FSDP does over dp x cp: average
            g = local(p.grad)
            if expert_parallel and "mlp.experts." in name:
                # an expert's gradient already sums the tokens of its whole dispatch group: sum over edp,
                # divide like the dense ones (FSDP's set_gradient_divide_factor(dp * cp))
                if mesh.edp_size > 1:
                    dist.all_reduce(g, group=mesh.edp_group)
            else:
                dist.all_reduce(g, group=group)
            g /= cp
        lm_sum, toks = reduce_loss_over_cp(o_par.lm_loss_sum, o_par.num_loss_tokens, group)
        assert int(toks) == n_tok
        loss_par = lm_sum.item() / n_tok + coef * o_par.aux_loss.item()
        out[f"{tag}/step{step}/loss"] = abs(loss_par - loss_ref.item()) / abs(loss_ref.item())
        out[f"{tag}/step{step}/aux"] = abs(o_par.aux_loss.item() - o_ref.aux_loss.item()) / o_ref.aux_loss.item()
        worst = 0.0
        for pr, pp in zip(ref.parameters(), par.parameters()):
            scale = pr.grad.abs().max().item()
            err = (full(pp.grad).reshape(pr.grad.shape) - pr.grad).abs().max().item()
            worst = max(worst, err / scale if scale > 0 else err)
        out[f"{tag}/step{step}/grads"] = worst
        losses.append((loss_ref.item(), loss_par))
        opt_ref.step(), opt_par.step()
        opt_ref.zero_grad(), opt_par.zero_grad()
    out[f"{tag}/losses"] = losses
    return out


def _worker(cp):
    import torch.distributed as dist

    rank = dist.get_rank()
    group = dist.new_group(list(range(cp)))
    out = {}
    out.update(_lightning_checks(rank, cp, group))
    out.update(_ring_checks(rank, cp, group))
    out.update(_model_checks(cp=cp))
    return out


def _cp_tp_worker():
    """4 ranks = cp 2 x tp 2 (experts split with tp), with and without sequence parallelism."""
    out = {}
    for sp in (False, True):
        out.update(_model_checks(cp=2, tp=2, etp=2, sequence_parallel=sp, tag=f"cp2tp2_sp{int(sp)}"))
    return out


def _cp_ep_worker():
    """2 ranks = cp 2, experts split ep 2 over the same ranks (EP folded over CP)."""
    return _model_checks(cp=2, ep=2, tag="cp2ep2")


_RESULTS: dict[int, dict] = {}


def results_for(cp):
    if cp not in _RESULTS:
        _RESULTS[cp] = run_distributed(_worker, cp, cp, timeout=240)[0]
    return _RESULTS[cp]


def _tp_ready():
    try:
        import minimax_train.parallel.tensor_parallel  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("kind", ["lightning", "ring"])
def test_layer_outputs_and_grads_match_single_process(cp, kind):
    res = results_for(cp)
    errs = {k: v for k, v in res.items() if k.startswith(kind + "/")}
    assert len(errs) == (32 if kind == "lightning" else 32)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"cp={cp}: relative errors above {TOL}: {bad}"


@pytest.mark.parametrize("cp", [2, 4])
def test_model_losses_and_grads_match_single_process(cp):
    res = results_for(cp)
    errs = {k: v for k, v in res.items() if k.startswith("model/step")}
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"cp={cp}: {bad}; losses (ref, cp) {res['model/losses']}"
    # the steps really trained (the losses move)
    losses = [r for r, _ in res["model/losses"]]
    assert len(set(losses)) == len(losses)


@pytest.mark.skipif(not _tp_ready(), reason="minimax_train.parallel.tensor_parallel is not available")
@pytest.mark.parametrize("sp", [0, 1])
def test_cp2_tp2_model_matches_single_process(sp):
    if "cp2tp2" not in _RESULTS:
        _RESULTS["cp2tp2"] = run_distributed(_cp_tp_worker, 4, timeout=240)[0]
    res = _RESULTS["cp2tp2"]
    tag = f"cp2tp2_sp{sp}"
    errs = {k: v for k, v in res.items() if k.startswith(tag + "/step")}
    assert len(errs) == 9
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{bad}; losses (ref, cp x tp) {res[tag + '/losses']}"


def test_cp2_ep2_model_matches_single_process():
    """Expert parallelism folded over the context-parallel ranks (each rank's experts serve both shards)."""
    res = run_distributed(_cp_ep_worker, 2, timeout=240)[0]
    errs = {k: v for k, v in res.items() if k.startswith("cp2ep2/step")}
    assert len(errs) == 9
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{bad}; losses (ref, cp x ep) {res['cp2ep2/losses']}"


def test_bench_cp_smoke(tmp_path):
    """tools/bench_cp.py runs end to end on CPU/gloo (tiny sizes) and reports every implementation."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        os.path.join(repo, "tools", "bench_cp.py"),
        "--nproc",
        "2",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--seqlens",
        "64",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--hidden",
        "32",
        "--layers",
        "2",
        "--softmax-every",
        "2",
        "--model-heads",
        "2",
        "--kv-heads",
        "1",
        "--model-head-dim",
        "8",
        "--experts",
        "4",
        "--ffn",
        "16",
        "--vocab",
        "64",
        "--block-size",
        "8",
        "--iters",
        "1",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speedup vs serial" in proc.stdout
    res = json.loads(out.read_text())["results"]
    assert [(r["mode"], r["seqlen"]) for r in res] == [("lightning", 64), ("model", 64)]
    for r in res:
        for impl in ("plus", "serial") + (("local",) if r["mode"] == "lightning" else ()):
            assert r[impl]["tokens_per_s"] > 0 and r[impl]["peak_gib"] > 0
