"""Benchmark one expert-parallel MoE layer: step time (forward + backward) for overlap chunks K = 1 vs
K > 1, the share of the K = 1 step spent in all-to-all, and how much of it the overlap hides.

GPU (MiniMax-Text-01 shapes by default: hidden 6144, 32 experts of 9216, top-2, 8192 tokens per rank,
bf16; EP over all ranks):
    torchrun --nproc-per-node 8 tools/bench_moe.py
    torchrun --nproc-per-node 4 tools/bench_moe.py --tokens 4096 --chunks 1,2,4,8
CPU smoke run (gloo, tiny shapes, spawns its own processes):
    python tools/bench_moe.py --device cpu --nproc 2

Columns (times are the slowest rank's mean per iteration):
  step ms       router + dispatch + experts + combine, forward and backward, at this K
  a2a ms        the layer's four all-to-alls (dispatch and combine, forward and backward) run alone with
                the same split sizes (the bytes do not depend on K)
  expert ms     the local experts' grouped SwiGLU forward + backward alone on the rows this rank receives
  a2a share     a2a ms / step ms of K = 1 (the K = 1 path runs its transfers serially)
  exposed ms    step(K) - (step(1) - a2a): all-to-all time still on the critical path at this K
  hidden        1 - exposed / a2a: the share of the all-to-all the overlap hides (0 at K = 1 by definition;
                chunking also costs smaller GEMMs, which shows up as less hidden)
  of hideable   (step(1) - step(K)) / min(a2a, step(1) - a2a): the time saved over the most any overlap could
                save (a transfer can only hide behind as much computation as the step has, and vice versa);
                this is the column that measures the overlap where the all-to-all outweighs the compute
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import max_over_ranks, timed_over_ranks  # noqa: E402

from minimax_train.parallel.mesh import process_group_teardown  # noqa: E402
from minimax_train.tools.spawn import run_distributed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--inter", type=int, default=None, help="per-expert FFN width I")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--tokens", type=int, default=None, help="tokens per rank (one micro-batch)")
    p.add_argument("--chunks", default="1,2,4", help="comma-separated moe_overlap_chunks values")
    p.add_argument("--ep", type=int, default=None, help="expert parallel size (default: world / etp)")
    p.add_argument("--etp", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true", help="tokens differ across etp ranks")
    p.add_argument("--routing", choices=("dropless", "capacity"), default="dropless")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--check", action="store_true", help="also compare outputs and gradients of every K to K=1")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    defaults = dict(
        hidden=6144 if gpu else 64,
        inter=9216 if gpu else 128,
        experts=32 if gpu else 8,
        tokens=8192 if gpu else 256,
        dtype="bf16" if gpu else "fp32",
        iters=20 if gpu else 5,
        warmup=5 if gpu else 2,
    )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.chunk_list = [int(c) for c in a.chunks.split(",")]
    return a


def _timed_ms(fn, dev, iters, warmup) -> float:
    return timed_over_ranks(fn, dev, iters, warmup) * 1e3


def check(moe, x, gy, chunk_list, dev) -> None:
    """Outputs and gradients of every K against K = 1 on the same inputs (max relative error over ranks)."""
    got = {}
    for k in sorted(set(chunk_list) | {1}):
        moe.dispatcher.chunks = k
        moe.zero_grad(set_to_none=True)
        x.grad = None
        out, _, _ = moe(x)
        out.backward(gy)
        got[k] = [
            out.detach().float(),
            x.grad.float(),
            moe.experts.gate_up_proj.grad.float(),
            moe.experts.down_proj.grad.float(),
            moe.gate.weight.grad.float(),
        ]
    x.grad = None
    moe.zero_grad(set_to_none=True)
    for k in sorted(got):
        if k == 1:
            continue
        errs = [
            max_over_ranks(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item(), dev)
            for a, b in zip(got[k], got[1])
        ]
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(
                f"check K={k} vs K=1 (max |diff| / max |ref|): out {errs[0]:.1e}, dx {errs[1]:.1e}, "
                f"d gate_up {errs[2]:.1e}, d down {errs[3]:.1e}, d router {errs[4]:.1e}"
            )


def run(a) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from minimax_train.model.config import ModelConfig
    from minimax_train.model.moe import MoE
    from minimax_train.model.parts import ModelParts
    from minimax_train.parallel.expert_parallel import ExpertGroups, ExpertParallelExperts, expert_groups
    from minimax_train.parallel.moe_dispatch import AllToAllDispatcher, all_to_all_async
    from minimax_train.parallel.moe_experts import swiglu_backward_input, swiglu_forward, weight_grad

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if a.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    ep = a.ep or world // a.etp
    if world % (ep * a.etp):
        raise SystemExit(f"ep {ep} x etp {a.etp} does not divide the world size {world}")
    cfg = ModelConfig(
        hidden_size=a.hidden,
        intermediate_size=a.inter,
        num_local_experts=a.experts,
        num_experts_per_tok=a.topk,
        moe_routing=a.routing,
        capacity_factor=a.capacity_factor,
        num_attention_heads=1,
        num_key_value_heads=1,
        num_hidden_layers=1,
    )
    if world > 1:
        dm = init_device_mesh(dev.type, (world // (ep * a.etp), ep, a.etp), mesh_dim_names=("edp", "ep", "etp"))
        g = expert_groups(dm, sequence_parallel=a.sequence_parallel)
        g.mesh = None  # plain local tensors: the full experts never exist on one rank here
    else:
        g = ExpertGroups()

    class BenchParts(ModelParts):  # the expert-parallel experts and dispatcher (a world of one included)
        def experts(self, cfg):
            return ExpertParallelExperts(cfg, g)

        def dispatcher(self, cfg):
            e, k = cfg.num_local_experts, cfg.num_experts_per_tok
            return AllToAllDispatcher(g, e, k, cfg.moe_routing, cfg.capacity_factor, 1)

    with torch.device("meta"):
        moe = MoE(cfg, BenchParts())
    captured = {}
    moe.experts.register_forward_pre_hook(lambda mod, args: captured.update(plan=args[1], rows=args[0].shape[0]))
    moe.to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02, generator=gen)
        if world > 1:  # one router for all ranks, as in a real model
            dist.broadcast(moe.gate.weight, 0)
        moe.experts.gate_up_proj.normal_(0, 0.02, generator=gen)
        moe.experts.down_proj.normal_(0, 0.02, generator=gen)
    moe.to(dtype)
    # tokens are replicated over etp unless sequence parallel (tensor-parallel ranks see the same micro-batch)
    holder = rank if a.sequence_parallel else rank // a.etp
    gen_x = torch.Generator(device=dev).manual_seed(777 + holder)
    x = torch.randn(a.tokens, a.hidden, device=dev, dtype=dtype, generator=gen_x).requires_grad_()
    gy = torch.randn(a.tokens, a.hidden, device=dev, dtype=dtype, generator=gen_x)

    def step():
        out, _, _ = moe(x)
        out.backward(gy)

    if a.check:
        check(moe, x, gy, a.chunk_list, dev)
    step_ms = {}
    for k in a.chunk_list:
        moe.dispatcher.chunks = k
        step_ms[k] = _timed_ms(step, dev, a.iters, a.warmup)

    # isolated all-to-alls with K = 1's split sizes, and the isolated expert compute
    moe.dispatcher.chunks = 1
    step()
    plan = captured["plan"]
    h = a.hidden
    send = torch.randn(plan.send_rows[0], h, device=dev, dtype=dtype)
    recv = torch.empty(plan.recv_rows[0], h, device=dev, dtype=dtype)
    grp = plan.group

    def a2a4():
        for _ in range(2):  # forward (dispatch, combine) and backward (the same two, reversed)
            all_to_all_async(recv, send, plan.recv_splits[0], plan.send_splits[0], grp).wait()
            all_to_all_async(send, recv, plan.send_splits[0], plan.recv_splits[0], grp).wait()

    a2a_ms = _timed_ms(a2a4, dev, a.iters, a.warmup) if grp is not None else 0.0
    gu, dn = moe.experts.local_weights()
    xr = torch.randn(plan.recv_rows[0], h, device=dev, dtype=dtype)
    gr = torch.randn(plan.recv_rows[0], h, device=dev, dtype=dtype)
    offs, counts, act = plan.offs[0], plan.expert_counts[0], moe.experts.act

    def expert():  # the exchange's own expert math: forward, activation gradient, weight gradients
        with torch.no_grad():
            _, hid = swiglu_forward(xr, gu.detach(), dn.detach(), act, offs, counts)
            _, dh, a_ = swiglu_backward_input(gr, hid, gu.detach(), dn.detach(), act, offs, counts)
            weight_grad(dh, xr, offs, counts)
            weight_grad(gr, a_, offs, counts)

    expert_ms = _timed_ms(expert, dev, a.iters, a.warmup)
    recv_max = max_over_ranks(plan.recv_rows[0], dev)
    send_max = max_over_ranks(plan.send_rows[0], dev)

    if rank == 0:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (gloo)"
        el, il = a.experts // ep, a.inter // a.etp
        print(
            f"MoE layer: hidden {a.hidden}, {a.experts} experts of {a.inter} (ep {ep}: {el} per rank; etp {a.etp}: "
            f"I {il} per rank), top-{a.topk}, {a.tokens} tokens/rank, {a.dtype}, {a.routing}"
            f"{' sp' if a.sequence_parallel else ''}; {world} x {name}"
        )
        print(
            f"rows per rank: sent up to {int(send_max)}, received up to {int(recv_max)} "
            f"({int(send_max) * a.hidden * (2 if dtype == torch.bfloat16 else 4) / 2**20:.1f} MiB per transfer); "
            f"a2a alone {a2a_ms:.2f} ms, experts alone {expert_ms:.2f} ms (fwd+bwd)"
        )
        base = step_ms[a.chunk_list[0]] if 1 not in step_ms else step_ms[1]
        non_comm = base - a2a_ms
        hdr = f"{'K':>3} | {'step ms':>9} | {'vs K=1':>7} | {'a2a ms':>8} | {'a2a share':>9} | {'exposed ms':>10} | {'hidden':>7} | {'of hideable':>11}"
        print(hdr)
        print("-" * len(hdr))
        for k in a.chunk_list:
            exposed = step_ms[k] - non_comm
            hidden = (1.0 - exposed / a2a_ms) if a2a_ms > 0 else 0.0
            share = a2a_ms / base if base > 0 else 0.0
            hideable = min(a2a_ms, non_comm)
            of_hideable = (base - step_ms[k]) / hideable if hideable > 0 else 0.0
            print(
                f"{k:>3} | {step_ms[k]:>9.2f} | {base / step_ms[k]:>6.2f}x | {a2a_ms:>8.2f} | {share:>8.1%} | "
                f"{exposed:>10.2f} | {hidden:>6.1%} | {of_hideable:>10.1%}"
            )


def _main_in_process(a) -> None:
    """This rank of a torchrun / srun job, or of the processes main() spawns: torch.distributed from the
    environment, then run()."""
    kw = {}
    if a.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", **kw)
    with process_group_teardown():
        run(a)


def main(argv=None):
    a = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / srun
        _main_in_process(a)
    elif a.nproc > 1:
        threads = max(1, (os.cpu_count() or 1) // a.nproc)
        run_distributed(_main_in_process, a.nproc, a, backend=None, threads=threads, timeout=None)
    else:
        run(a)


if __name__ == "__main__":
    main()
