"""Expert parallelism equals the single-process model (CPU, gloo, 2 and 4 processes).

Semantics: every token-holding rank has its own micro-batch (EP folds over data parallel; with
tp > 1 and no sequence parallelism the tp ranks hold the same one). The reference runs, in one process,
dropless: each micro-batch separately; capacity: the micro-batches of each dispatch group concatenated
rank-major (documents kept apart by cu_seqlens), the unit over which capacity is enforced. The loss is
the sum of the per-rank (lm_loss_sum + coef * aux) over distinct token holders. Dense gradients summed
over the token holders and expert gradients summed over edp must equal the reference's (expert ones on
this rank's slice) within 1e-5 relative, over several SGD steps, for overlap chunks 1 and 4.
"""

from __future__ import annotations

import math

import pytest
import torch

from minimax_train.tools.spawn import run_distributed

TOL = 1e-5
STEPS = 3
LR = 0.02


def _cfg(routing="dropless"):
    from minimax_train.model import ModelConfig

    return ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        block_size=4,
        softmax_every=2,
        moe_routing=routing,
        capacity_factor=0.75,
        router_aux_loss_coef=0.01,
    )


# name: (world, parallel config, overlap chunks, routing, activation checkpointing)
CASES = {
    "ep2_k1": (2, dict(ep=2), 1, "dropless", "none"),
    "ep2_k4": (2, dict(ep=2), 4, "dropless", "none"),
    "ep2_capacity_k2": (2, dict(ep=2), 2, "capacity", "none"),
    # tp=2 without sequence parallelism: both ranks hold the same tokens, the ep group folds over tp
    "tp2_ep2_etp1_replicated_k2": (2, dict(tp=2, ep=2, etp=1), 2, "dropless", "none"),
    "tp2_ep2_etp1_capacity_rejected": (2, dict(tp=2, ep=2, etp=1), 1, "reject", "none"),
    "ep4_k1": (4, dict(ep=4), 1, "dropless", "none"),
    "ep4_k4": (4, dict(ep=4), 4, "dropless", "none"),
    "ep2xetp2_k1": (4, dict(tp=2, ep=2, etp=2), 1, "dropless", "none"),
    "ep2xetp2_k4": (4, dict(tp=2, ep=2, etp=2), 4, "dropless", "none"),
    "ep2xetp2_sp_k1": (4, dict(tp=2, ep=2, etp=2, sequence_parallel=True), 1, "dropless", "none"),
    "ep2xetp2_sp_k4": (4, dict(tp=2, ep=2, etp=2, sequence_parallel=True), 4, "dropless", "none"),
    "ep2_edp2_k1": (4, dict(ep=2), 1, "dropless", "none"),
    "ep2_edp2_k4": (4, dict(ep=2), 4, "dropless", "none"),
    "ep2_edp2_k4_ckpt": (4, dict(ep=2), 4, "dropless", "full"),
    "ep4_capacity_k4": (4, dict(ep=4), 4, "capacity", "none"),
    "ep2_edp2_capacity_k1": (4, dict(ep=2), 1, "capacity", "none"),
    "ep2xetp2_capacity_k4": (4, dict(tp=2, ep=2, etp=2), 4, "capacity", "none"),
    "ep2xetp2_sp_capacity_k4": (4, dict(tp=2, ep=2, etp=2, sequence_parallel=True), 4, "capacity", "none"),
}


def _batch(step: int, mb: int):
    g = torch.Generator().manual_seed(1000 * step + mb)
    t = 12 + 4 * (mb % 3)  # uneven token counts across ranks
    return torch.randint(0, 64, (1, t), generator=g), torch.randint(0, 64, (1, t), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _run_case(name, spec, rank, world):
    import torch.distributed as dist
    from util_models import build_parallel

    from minimax_train.model import MiniMaxForCausalLM
    from minimax_train.parallel.context_parallel import CPStatsReducer
    from minimax_train.parallel.layout import ParallelConfigError
    from minimax_train.parallel.model_parts import ParallelParts

    _, pkw, chunks, routing, ckpt = spec
    cfg = _cfg("capacity" if routing == "reject" else routing)
    if routing == "reject":
        try:
            build_parallel(cfg, fsdp=False, **pkw)
        except ParallelConfigError as e:
            return {"rejected": "sequence_parallel" in str(e)}
        return {"rejected": False}

    class ExpertsOnly(ParallelParts):
        """Expert parallelism alone on this layout: the dense part stays one-process (every rank holds all
        heads; the tp dimension only shapes the expert groups), so the test isolates the dispatcher. With
        capacity routing the aux statistics are those of the capacity unit (the dispatch group), as the
        reference computes them."""

        def __init__(self, mesh, cfg):
            super().__init__(mesh, cfg)
            self.tp, self.h0, self.h1 = None, 0, cfg.num_attention_heads

        def aux_stats(self):
            return CPStatsReducer(self._groups().dispatch_group) if routing == "capacity" else super().aux_stats()

    ref = MiniMaxForCausalLM(cfg, seed=0)
    model, pm = build_parallel(
        cfg,
        seed=0,
        fsdp=False,
        memory=dict(activation_checkpointing=ckpt),
        parts=lambda mesh: ExpertsOnly(mesh, cfg),
        moe_overlap_chunks=chunks,
        **pkw,
    )
    sp = pm.cfg.sequence_parallel
    disp = model.model.layers[0].mlp.dispatcher
    g = disp.groups
    holders = None if sp else pm.dp_group  # dense grads are summed over the distinct token holders
    mb = rank if sp else pm.dp_rank
    # reference units: micro-batches run together in one process
    info = [None] * world
    dist.all_gather_object(info, (pm.edp_rank, -1 if sp else pm.etp_rank, g.dispatch_rank, mb))
    if routing == "capacity":
        groups = {}
        for edp, etp, drank, m in info:
            groups.setdefault((edp, etp), {})[drank] = m
        units = sorted({tuple(v[r] for r in sorted(v)) for v in groups.values()})
    else:
        units = sorted({(m,) for *_, m in info})
    my_unit = [u for u in units if mb in u]
    el, il = cfg.num_local_experts // g.ep_size, cfg.intermediate_size // g.etp_size
    e0, i0 = g.ep_rank * el, g.etp_rank * il
    res = {"loss": 0.0, "grad": 0.0, "grad_name": "", "load": True, "dropped": 0, "dropped_ok": True}
    for step in range(STEPS):
        # ---- reference
        ref.zero_grad(set_to_none=True)
        ref_loss, ref_load, ref_dropped = 0.0, {}, {}
        for u in units:
            ids, lab = zip(*[_batch(step, m) for m in u])
            lens = [x.shape[1] for x in ids]
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
            out = ref(torch.cat(ids, 1), labels=torch.cat(lab, 1), cu_seqlens=cu)
            loss = out.lm_loss_sum + cfg.router_aux_loss_coef * len(u) * out.aux_loss
            loss.backward()
            ref_loss += loss.item()
            ref_load[u], ref_dropped[u] = out.expert_load, int(out.dropped_tokens)
        # ---- parallel
        model.zero_grad(set_to_none=True)
        ids, lab = _batch(step, mb)
        out = model(ids, labels=lab)
        loss = out.lm_loss_sum + cfg.router_aux_loss_coef * out.aux_loss
        loss.backward()
        tot = loss.detach().clone()
        dist.all_reduce(tot, group=holders)
        res["loss"] = max(res["loss"], abs(tot.item() - ref_loss) / abs(ref_loss))
        load, dropped = out.expert_load.clone(), out.dropped_tokens.clone().view(1)
        if routing == "capacity":  # statistics of the whole capacity unit
            dist.all_reduce(load, group=g.dispatch_group)
            dist.all_reduce(dropped, group=g.dispatch_group)
        res["load"] &= bool(torch.equal(load, ref_load[my_unit[0]]))
        res["dropped_ok"] &= int(dropped) == ref_dropped[my_unit[0]]
        res["dropped"] = max(res["dropped"], int(dropped))
        # ---- gradients
        rp = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            gr = p.grad
            if "mlp.experts." in n:
                gl = gr.to_local().clone()
                dist.all_reduce(gl, group=pm.edp_group)
                full = rp[n].grad
                if n.endswith("gate_up_proj"):
                    want = full.view(full.shape[0], 2, -1, full.shape[-1])[e0 : e0 + el, :, i0 : i0 + il]
                else:
                    want = full[e0 : e0 + el, :, i0 : i0 + il]
                err = _rel(gl.reshape(want.shape), want)
                with torch.no_grad():
                    p.to_local().sub_(LR * gl)
            else:
                gl = gr.clone()
                dist.all_reduce(gl, group=holders)
                err = _rel(gl, rp[n].grad)
                with torch.no_grad():
                    p.sub_(LR * gl)
            if err > res["grad"]:
                res["grad"], res["grad_name"] = err, n
        with torch.no_grad():
            for p in ref.parameters():
                p.sub_(LR * p.grad)
    return res


def _worker(names):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in names:
        try:
            results[name] = _run_case(name, CASES[name], rank, world)
        except Exception as e:  # report, keep the other ranks' collectives aligned as far as possible
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"}
            break
    return results


def _spawn(world: int) -> list[dict]:
    return run_distributed(_worker, world, [n for n, c in CASES.items() if c[0] == world], timeout=800)


@pytest.fixture(scope="module")
def results():
    return {2: _spawn(2), 4: _spawn(4)}


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_equals_single_process(results, name):
    world, _, _, routing, _ = CASES[name]
    for rank, r in enumerate(results[world]):
        assert name in r, f"rank {rank} did not run {name} (an earlier case failed: {list(r)})"
        r = r[name]
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        if routing == "reject":
            assert r["rejected"], f"rank {rank}: layout was not refused"
            continue
        assert r["loss"] < TOL, f"rank {rank}: loss rel err {r['loss']:.2e}"
        assert r["grad"] < TOL, f"rank {rank}: grad rel err {r['grad']:.2e} on {r['grad_name']}"
        assert r["load"], f"rank {rank}: expert load differs from the reference"
        assert r["dropped_ok"], f"rank {rank}: dropped-token count differs from the reference"
        if routing == "capacity":
            assert r["dropped"] > 0, "capacity test dropped nothing: lower capacity_factor"
        else:
            assert r["dropped"] == 0


def test_single_process_chunks_equal_plain():
    """The expert-parallel experts and dispatcher in one process (no groups): K chunks equal the local
    dispatcher, both modes."""
    from minimax_train.model import MiniMaxForCausalLM
    from minimax_train.model.parts import ModelParts
    from minimax_train.parallel.expert_parallel import ExpertGroups, ExpertParallelExperts
    from minimax_train.parallel.moe_dispatch import AllToAllDispatcher

    class OneProcessEP(ModelParts):
        def __init__(self, chunks):
            self.chunks = chunks

        def experts(self, cfg):
            return ExpertParallelExperts(cfg, ExpertGroups())

        def dispatcher(self, cfg):
            return AllToAllDispatcher(
                ExpertGroups(), cfg.num_local_experts, cfg.num_experts_per_tok, cfg.moe_routing,
                cfg.capacity_factor, self.chunks,
            )  # fmt: skip

    for routing in ("dropless", "capacity"):
        ref = MiniMaxForCausalLM(_cfg(routing), seed=0)
        ids, lab = _batch(0, 1)
        o = ref(ids, labels=lab)
        o.loss.backward()
        for k in (1, 3, 40):  # 40 > tokens: empty chunks
            m = MiniMaxForCausalLM(_cfg(routing), OneProcessEP(k), seed=0)  # the same init values
            o2 = m(ids, labels=lab)
            o2.loss.backward()
            assert abs(o2.loss.item() - o.loss.item()) < 1e-6 * abs(o.loss.item())
            assert torch.equal(o2.expert_load, o.expert_load) and int(o2.dropped_tokens) == int(o.dropped_tokens)
            rp = dict(ref.named_parameters())
            for n, p in m.named_parameters():
                assert _rel(p.grad.reshape(rp[n].grad.shape), rp[n].grad) < TOL, (routing, k, n)
        if routing == "capacity":
            assert int(o.dropped_tokens) > 0


def test_capacity_reference_rule():
    """LocalDispatcher capacity: per expert the first C (token, slot) assignments are kept, C = ceil(f*T*k/E);
    dropless stays exact; a token whose slots are all dropped gets a zero MoE output."""
    from minimax_train.model.moe import MoE, capacity_keep, expert_capacity
    from minimax_train.model.parts import ModelParts

    cfg = _cfg("capacity")
    moe = MoE(cfg, ModelParts())
    torch.manual_seed(3)
    for p in moe.parameters():
        p.data.normal_(0, 0.5)
    x = torch.randn(20, cfg.hidden_size)
    out, route, stats = moe(x)
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    cap = expert_capacity(cfg.capacity_factor, 20, k, e)
    assert cap == math.ceil(0.75 * 20 * 2 / 8)
    flat = route.experts.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    seen = [0] * e
    for i, ex in enumerate(flat.tolist()):
        keep[i] = seen[ex] < cap
        seen[ex] += 1
    assert torch.equal(keep, capacity_keep(flat, e, cap))
    assert int(stats["dropped"]) == int((~keep).sum()) > 0
    w = route.weights.reshape(-1) * keep
    want = torch.zeros_like(x)
    for i, ex in enumerate(flat.tolist()):
        if keep[i]:
            gu, dn = moe.experts.gate_up_proj[ex], moe.experts.down_proj[ex]
            g, u = (x[i // k] @ gu.T).chunk(2)
            want[i // k] += w[i] * ((torch.nn.functional.silu(g) * u) @ dn.T)
    assert ((out - want).abs().max() / want.abs().max()).item() < 1e-6
    all_dropped = (~keep.view(-1, k)).all(1)
    assert torch.all(out[all_dropped] == 0)
