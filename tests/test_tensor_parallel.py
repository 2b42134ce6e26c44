"""Tensor (+ sequence) parallelism equals the single-process model: logits, losses over AdamW steps, every
gradient, aux loss and expert load; TP x FSDP2; DCP checkpoints reshard between tp=2, tp=1 and dp=4.

Two process launches (gloo, CPU): one of 2 ranks runs every tp=2 case (tp, tp+SP, one KV head with tied
embeddings, TP + expert_parallel.py) and the checkpoint test, one of 4 ranks runs tp=2 x dp=2 (FSDP2),
tp=4 with replicated KV heads, and the dp=4 reload. The single-process references run in the pytest
process. Every row packs several documents (cu_seqlens), one of them crossing a lightning block."""

from __future__ import annotations

import pytest
import torch
from util_models import build_parallel, make_config, make_model, make_rows

from minimax_train.tools.spawn import run_distributed

STEPS = 6
LR = 3e-3
TOL = 1e-5


def micro_batches(rows_per_mb: int):
    """The global batch (2 rows) as micro-batches of rows_per_mb rows: (ids, labels, cu_seqlens)."""
    ids, labels, _ = make_rows()
    out = []
    for i in range(0, ids.shape[0], rows_per_mb):
        n = min(rows_per_mb, ids.shape[0] - i)
        t = ids.shape[1]
        cu = [0]
        for r in range(n):
            cu += [r * t + 5, r * t + 16, (r + 1) * t]
        out.append((ids[i : i + n], labels[i : i + n], torch.tensor(cu, dtype=torch.int32)))
    return out


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, mbs, steps, *, dp: int = 1, dp_group=None, n_mb_total: int | None = None, clip=None):
    """AdamW steps on the objective sum_mb lm_loss_sum / global_tokens + coef * mean_mb aux (the trainer's),
    mbs being this rank's micro-batches. With dp > 1 (FSDP averages gradients) the local loss is scaled by dp.
    Returns per-step objective values (summed over dp), aux losses, expert loads, first-step gradients,
    final parameters (full tensors), and each step's (lm_loss_sum, num_loss_tokens) of the first micro-batch.
    clip: the norm-clipping function (default torch's; the trainer's for gradients on several meshes)."""
    import torch.distributed as dist

    coef = model.config.router_aux_loss_coef
    n_mb_total = n_mb_total or len(mbs)
    global_tokens = float(sum(int((lab != -100).sum()) for _, lab, _ in mbs))
    if dp_group is not None:
        t = torch.tensor([global_tokens], dtype=torch.float64)
        dist.all_reduce(t, group=dp_group)
        global_tokens = float(t.item())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    res = {"loss": [], "aux": [], "load": [], "lm": []}
    for step in range(steps):
        total = torch.zeros((), dtype=torch.float64)
        for ids, labels, cu in mbs:
            out = model(ids, labels=labels, cu_seqlens=cu)
            part = out.lm_loss_sum / global_tokens + coef / n_mb_total * out.aux_loss
            (part * dp).backward()
            total += part.detach().double()
            if len(res["lm"]) == step:
                res["lm"].append((out.lm_loss_sum.item(), int(out.num_loss_tokens)))
                res["aux"].append(out.aux_loss.item())
                res["load"].append(out.expert_load.clone())
        if dp_group is not None:
            dist.all_reduce(total, group=dp_group)
        res["loss"].append(total.item())
        if step == 0:
            res["grads"] = {n: full(p.grad).clone() for n, p in model.named_parameters()}
        # as the trainer: clip the global norm (DTensor gradients: the norm is reduced over the mesh)
        clip_fn = clip or torch.nn.utils.clip_grad_norm_
        res.setdefault("grad_norm", []).append(full(clip_fn(list(model.parameters()), 1.0)).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    res["params"] = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    return res, opt


def reference(cfg_overrides: dict, rows_per_mb: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (50x slower on a busy 2-core box)
    try:
        model = make_model(make_config(**cfg_overrides))
        mbs = micro_batches(rows_per_mb)
        with torch.no_grad():
            ids, labels, cu = mbs[0]
            logits = model(ids, cu_seqlens=cu, return_logits=True).logits
        res, _ = train(model, mbs, STEPS)
    finally:
        torch.set_num_threads(threads)
    res["logits"] = logits
    return res


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def assert_matches(got: dict, ref: dict, what: str, *, grads: bool = True):
    for i, (a, b) in enumerate(zip(got["loss"], ref["loss"])):
        assert abs(a - b) <= TOL * abs(b), f"{what}: step {i} loss {a} vs {b}"
    for i, (a, b) in enumerate(zip(got["grad_norm"], ref["grad_norm"])):
        assert abs(a - b) <= TOL * abs(b), f"{what}: step {i} gradient norm {a} vs {b}"
    for i, (a, b) in enumerate(zip(got["aux"], ref["aux"])):
        assert abs(a - b) <= TOL * abs(b), f"{what}: step {i} aux {a} vs {b}"
    for i, (a, b) in enumerate(zip(got["load"], ref["load"])):
        assert torch.equal(a, b), f"{what}: step {i} expert load {a} vs {b}"
    if grads:
        assert got["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():
            assert rel(got["grads"][n], g) < TOL, f"{what}: gradient of {n}: rel {rel(got['grads'][n], g)}"
    for n, p in ref["params"].items():
        err = rel(got["params"][n], p)
        assert err < TOL, f"{what}: parameter {n} after {STEPS} steps: rel {err}"


# ---- rank functions -------------------------------------------------------------------------------------------


def _tp_case(tp, cfg_overrides, sp, steps=STEPS):
    model, _ = build_parallel(make_config(**cfg_overrides), tp=tp, etp=tp, sequence_parallel=sp)  # experts follow tp
    mbs = micro_batches(2)
    with torch.no_grad():
        ids, labels, cu = mbs[0]
        logits = model(ids, cu_seqlens=cu, return_logits=True).logits
    res, opt = train(model, mbs, steps)
    res["logits"] = logits
    return res, model, opt


def _ranks_2(ckpt_dir: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    out = {}
    out["tp2"], _, _ = _tp_case(2, {}, sp=False)
    out["tp2_sp"], model, opt = _tp_case(2, {}, sp=True)
    out["kv1_tied"], _, _ = _tp_case(2, dict(num_key_value_heads=1, tie_word_embeddings=True), sp=True)
    out["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())

    # DCP: save the tp=2 (SP) model and optimiser, load into a tp=1 model + AdamW, take one more step in both
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    plain = make_model(make_config())
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.01)
    psd, posd = get_state_dict(plain, plain_opt)
    state = {"model": psd, "optim": posd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(plain, plain_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    tp_params = {n: p.full_tensor() for n, p in model.named_parameters()}
    out["ckpt_param_diff"] = max((tp_params[n] - p).abs().max().item() for n, p in plain.named_parameters())
    ids, labels, cu = micro_batches(2)[0]
    losses = []
    for m, o in ((model, opt), (plain, plain_opt)):
        loss = m(ids, labels=labels, cu_seqlens=cu).loss
        loss.backward()
        o.step()
        losses.append(m(ids, labels=labels, cu_seqlens=cu).loss.item())
    out["resumed_losses"] = losses

    # composition with expert parallelism: TP/SP for everything but the experts, which expert
    # parallelism owns (etp = tp, or ep = tp) and dispatches
    for name, pkw in (
        ("etp2", dict(tp=2, etp=2, sequence_parallel=True)),
        ("ep2", dict(tp=2, ep=2)),
        ("ep2_sp", dict(tp=2, ep=2, sequence_parallel=True)),
    ):
        out[f"with_{name}"] = _tp_with_expert_parallel(pkw)
    return out


def _tp_with_expert_parallel(pkw):
    """One step's objective and gradients of TP with the experts owned by expert parallelism."""
    cfg = make_config()
    model, _ = build_parallel(cfg, **pkw)
    ids, labels, cu = micro_batches(2)[0]
    out = model(ids, labels=labels, cu_seqlens=cu)
    loss = out.lm_loss_sum / int((labels != -100).sum()) + cfg.router_aux_loss_coef * out.aux_loss
    loss.backward()
    grads = {n: full(p.grad) for n, p in model.named_parameters()}
    # expert_parallel keeps gate_up_proj [E, 2, I, H] in memory when etp > 1: transformers' [E, 2I, H] is its flattening
    grads = {n: g.flatten(1, 2) if g.dim() == 4 else g for n, g in grads.items()}
    return {"loss": loss.item(), "aux": out.aux_loss.item(), "load": out.expert_load.clone(), "grads": grads}


def _ranks_4(ckpt_dir: str):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict

    out = {}
    # tp=2 x dp=2: TP placements, then FSDP2 over dp of the same 2-D mesh; dp rank i gets row i
    model, pm = build_parallel(make_config(), tp=2, etp=2, sequence_parallel=True)
    mbs = [micro_batches(1)[pm.dp_rank]]
    out["tp2_dp2"], opt = train(model, mbs, STEPS, dp=2, dp_group=pm.dp_group, n_mb_total=2)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    saved = {n: p.full_tensor() for n, p in model.named_parameters()}

    # the same checkpoint into dp=4 (FSDP2 only) and into tp=1 (plain tensors)
    dp4, _ = build_parallel(make_config(), seed=0)  # FSDP2 over dp=4; other init values than the saved ones
    plain = make_model(make_config())
    diffs = []
    for m in (dp4, plain):
        sd = get_model_state_dict(m)
        state = {"model": sd}
        dcp.load(state, checkpoint_id=ckpt_dir)
        set_model_state_dict(m, state["model"])
        diffs.append(max((saved[n] - full(p.detach())).abs().max().item() for n, p in m.named_parameters()))
    out["ckpt_dp4_diff"], out["ckpt_tp1_diff"] = diffs
    dist.barrier()

    # tp=4 > num_key_value_heads=2: each KV head replicated on the two ranks whose query heads read it
    out["tp4_kv2"], _, _ = _tp_case(4, {}, sp=True, steps=3)
    return out


# ---- tests --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_distributed(_ranks_2, 2, str(tmp_path_factory.mktemp("tp2_ckpt")), timeout=240, threads=1)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_distributed(_ranks_4, 4, str(tmp_path_factory.mktemp("tp2dp2_ckpt")), timeout=240, threads=1)


@pytest.fixture(scope="module")
def ref_base():
    return reference({}, rows_per_mb=2)


@pytest.mark.parametrize("case", ["tp2", "tp2_sp"])
def test_tp2_equals_single_process(two_ranks, ref_base, case):
    for rank, res in enumerate(two_ranks):
        got = res[case]
        assert (got["logits"] - ref_base["logits"]).abs().max().item() < 1e-5, (case, rank)
        assert_matches(got, ref_base, f"{case} rank {rank}")
    # lm_loss_sum / num_loss_tokens: the whole micro-batch's, identical on every tp rank
    assert two_ranks[0][case]["lm"] == two_ranks[1][case]["lm"]
    assert two_ranks[0][case]["lm"][0][1] == ref_base["lm"][0][1]


def test_tp2_one_kv_head_tied_embeddings(two_ranks):
    ref = reference(dict(num_key_value_heads=1, tie_word_embeddings=True), rows_per_mb=2)
    assert_matches(two_ranks[0]["kv1_tied"], ref, "tp2 kv=1 tied")


def test_tp_parameters_are_dtensors(two_ranks):
    assert two_ranks[0]["all_dtensor"]


# ep2 without sequence parallelism: the EP group folds over tp ranks holding the same tokens; the
# dispatcher divides expert weight gradients by that replica count (expert_parallel._token_replicas)
@pytest.mark.parametrize("name", ["etp2", "ep2", "ep2_sp"])
def test_tp2_composes_with_expert_parallelism(two_ranks, ref_base, name):
    for rank, res in enumerate(two_ranks):
        got = res[f"with_{name}"]
        assert abs(got["loss"] - ref_base["loss"][0]) <= TOL * ref_base["loss"][0], (rank, got["loss"])
        assert abs(got["aux"] - ref_base["aux"][0]) <= TOL * ref_base["aux"][0], (rank, got["aux"])
        assert torch.equal(got["load"], ref_base["load"][0])
        for n, g in ref_base["grads"].items():
            assert rel(got["grads"][n], g) < TOL, f"{name} rank {rank}: gradient of {n}: rel {rel(got['grads'][n], g)}"


def test_dcp_checkpoint_tp2_loads_into_tp1(two_ranks):
    for res in two_ranks:
        assert res["ckpt_param_diff"] == 0.0
        a, b = res["resumed_losses"]  # the optimiser state came across too: one more step agrees
        assert abs(a - b) <= TOL * abs(b), (a, b)


def test_tp2_x_dp2_fsdp2_equals_single_process(four_ranks):
    ref = reference({}, rows_per_mb=1)  # the same global batch, one row per micro-batch (= per dp rank)
    for rank, res in enumerate(four_ranks):
        got = res["tp2_dp2"]
        for i, (a, b) in enumerate(zip(got["loss"], ref["loss"])):
            assert abs(a - b) <= TOL * abs(b), f"rank {rank} step {i}: {a} vs {b}"
        for i, (a, b) in enumerate(zip(got["grad_norm"], ref["grad_norm"])):
            assert abs(a - b) <= TOL * abs(b), f"rank {rank} step {i}: gradient norm {a} vs {b}"
        for n, g in ref["grads"].items():
            assert rel(got["grads"][n], g) < TOL, f"rank {rank}: gradient of {n}: rel {rel(got['grads'][n], g)}"
        for n, p in ref["params"].items():
            assert rel(got["params"][n], p) < TOL, f"rank {rank}: {n}"


def test_dcp_checkpoint_tp2_dp2_loads_into_dp4_and_tp1(four_ranks):
    for res in four_ranks:
        assert res["ckpt_dp4_diff"] == 0.0
        assert res["ckpt_tp1_diff"] == 0.0


def test_tp4_replicated_kv_heads(four_ranks, ref_base):
    ref3 = dict(
        ref_base,
        loss=ref_base["loss"][:3],
        aux=ref_base["aux"][:3],
        load=ref_base["load"][:3],
        grad_norm=ref_base["grad_norm"][:3],
        params={},
    )
    for rank, res in enumerate(four_ranks):
        got = res["tp4_kv2"]  # 3 steps: losses, aux, expert loads and first-step gradients
        assert_matches(got, ref3, f"tp4 rank {rank}")
        assert (got["logits"] - ref_base["logits"]).abs().max().item() < 1e-5
