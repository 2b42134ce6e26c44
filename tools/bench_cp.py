"""Context-parallel benchmark: LASP+ (one all-gather) vs serial-ring LASP, tokens/s and peak memory per GPU.

Two modes (both by default):
- lightning: one lightning attention layer's core, forward + backward, H heads of head_dim D on the local
  tokens of a cp-sharded packed row (what LASP+ changes), plus "local": the same op on T/cp tokens with no
  communication and no carried state (the floor that perfect context parallelism would reach);
- model: a MiniMax model (lightning + softmax layers, MoE) trained for whole steps (forward, backward, AdamW)
  with the cp cores installed; lasp=plus vs lasp=serial on the lightning layers, ring attention on the
  softmax layers in both.

GPU (4 GPUs of one host; bf16, fla-core for lightning, FlexAttention for softmax):
    torchrun --nproc-per-node 4 tools/bench_cp.py --seqlens 32768,131072,262144,524288,1048576
    torchrun --nproc-per-node 4 tools/bench_cp.py --mode model --seqlens 1048576 --checkpoint full
CPU / gloo smoke run (tiny sizes; spawns its own processes when not under torchrun):
    python tools/bench_cp.py --nproc 4 --device cpu --dtype fp32 --seqlens 256,512 --heads 2 --head-dim 16 \
        --hidden 32 --layers 2 --softmax-every 2 --experts 4 --ffn 32 --vocab 128 --iters 2 --warmup 1

Rows are one document by default (--doc-len 0: the state must cross every rank); --doc-len L packs
documents of random lengths around L. Times are the slowest rank's mean over --iters after --warmup;
tokens/s counts the whole row (T tokens per step over the cp group); peak memory is the largest
torch.cuda.max_memory_allocated over ranks (CPU: the largest process max RSS). Prints a table (rank 0) and
writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import max_over_ranks, oom_guarded_over_ranks, peak_memory_gib, sync, timed_over_ranks  # noqa: E402

from minimax_train.parallel.mesh import process_group_teardown  # noqa: E402
from minimax_train.tools.spawn import run_distributed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="lightning,model", help="lightning, model or both (comma-separated)")
    p.add_argument("--seqlens", default="32768,131072,262144,524288,1048576")
    p.add_argument(
        "--impls",
        default="plus,serial",
        help="lasp implementations: plus, serial (lightning mode also runs 'local', the no-communication floor)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--doc-len", type=int, default=0, help="0: one document per row; else mean document length")
    p.add_argument("--nproc", type=int, default=4, help="processes to spawn when not launched by torchrun")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after timing, profile one step of each case and print the top ops by self time (rank 0)",
    )
    # lightning mode
    p.add_argument("--heads", type=int, default=8, help="lightning heads on one rank (64 heads / tp 8 = 8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lightning-backend", default="auto", choices=["auto", "torch", "fla"])
    # model mode
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--softmax-every", type=int, default=8, help="layer i is softmax iff (i+1) %% this == 0")
    p.add_argument("--model-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--model-head-dim", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024, help="expert intermediate size")
    p.add_argument("--vocab", type=int, default=4096, help="small by default: the loss materialises fp32 logits")
    p.add_argument("--checkpoint", default="full", choices=["none", "selective", "full"])
    p.add_argument("--loss-chunk", type=int, default=8192, help="train.loss_chunk_tokens (0: all logits at once)")
    p.add_argument("--moe-chunk", type=int, default=0, help="train.moe_chunk_tokens (0: the MoE on all tokens at once)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "flex"])
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
def _device(args):
    if args.device == "auto":
        return (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if args.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _doc_bounds(T: int, doc_len: int, seed: int = 0) -> torch.Tensor:
    if doc_len <= 0:
        return torch.tensor([0, T], dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    bounds, pos = [0], 0
    while pos < T:
        pos = min(T, pos + int(torch.randint(1, 2 * doc_len, (1,), generator=g)))
        bounds.append(pos)
    return torch.tensor(bounds, dtype=torch.int32)


def _timed(step, args, device, label=""):
    """Warm up, then time `iters` calls of step(); returns (slowest rank's mean seconds, peak GiB) or raises."""
    sec = timed_over_ranks(step, device, args.iters, args.warmup, reset_peak=True)
    if args.profile:
        _profile_once(step, device, label)
    return sec, max_over_ranks(peak_memory_gib(device), device)


def _profile_once(step, device, label):
    """One more step under torch.profiler; rank 0 prints where the time goes (the top ops by self time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(
            f"--- profile {label} (rank 0, one step) ---\n"
            + prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60),
            flush=True,
        )


# ---------------------------------------------------------------------------------------------------------
def bench_lightning(args, T, impl, group, device, dtype):
    from minimax_train.ops.lightning import lightning_attention, lightning_slopes
    from minimax_train.parallel.context_parallel import build_cp_sequence, lasp_attention

    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    H, D = args.heads, args.head_dim
    seq = build_cp_sequence(_doc_bounds(T, args.doc_len).to(device), 1, T, rank, cp, device=device)
    n = T // cp
    g = torch.Generator(device=device).manual_seed(rank)
    q, k, v = (
        torch.nn.functional.silu(torch.randn(n, H, D, device=device, generator=g)).to(dtype).requires_grad_(True)
        for _ in range(3)
    )
    do = torch.randn(n, H, D, device=device, dtype=dtype, generator=g)
    slopes = lightning_slopes(H, 0, 8).to(device)

    def step():
        if impl == "local":
            o, _ = lightning_attention(
                q[None],
                k[None],
                v[None],
                slopes,
                cu_seqlens=seq.cu_seqlens,
                block_size=args.block_size,
                backend=args.lightning_backend,
            )
            o = o[0]
        else:
            o = lasp_attention(
                q, k, v, slopes, seq, group, block_size=args.block_size, mode=impl, backend=args.lightning_backend
            )
        o.backward(do)
        q.grad = k.grad = v.grad = None

    return _timed(step, args, device, f"lightning T={T} {impl}")


def bench_model(args, T, impl, group, device, dtype):
    from minimax_train.model.config import ModelConfig
    from minimax_train.model.init import InitSource
    from minimax_train.model.parts import DecayRates
    from minimax_train.parallel.context_parallel import (
        LaspCore,
        RingAttentionCore,
        cp_loss_for_backward,
        shard_for_context_parallel,
    )
    from minimax_train.parallel.mesh import ParallelConfig, ParallelMesh
    from minimax_train.parallel.model_parts import ParallelParts
    from minimax_train.parallel.parallelize import build_model

    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.model_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.model_head_dim,
        num_local_experts=args.experts,
        num_experts_per_tok=args.topk,
        softmax_every=args.softmax_every,
        block_size=args.block_size,
        max_position_embeddings=T,
    )

    class BenchParts(ParallelParts):  # the layout's parts with the kernels named on the command line
        def softmax_core(self, cfg, layer_idx):
            return RingAttentionCore(self.cp_group, backend=args.attention_backend)

        def lightning_core(self, cfg, layer_idx):
            decays = DecayRates(cfg, layer_idx, self.h0, self.h1)
            return LaspCore(decays, self.cp_group, block_size=cfg.block_size, mode=impl, backend=args.lightning_backend)

    mesh = ParallelMesh(
        ParallelConfig(cp=cp), world_size=cp, rank=rank, local_rank=device.index or 0, device=device, model_cfg=cfg
    )
    memory = dict(
        activation_checkpointing=args.checkpoint, moe_chunk_tokens=args.moe_chunk, loss_chunk_tokens=args.loss_chunk
    )
    model = build_model(cfg, mesh, InitSource(cfg, 0), fsdp=False, memory=memory, parts=BenchParts(mesh, cfg))
    model.to(dtype)  # the decay rates are not parameters: they stay fp32 (the lightning op's state math)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g)
    cu = _doc_bounds(T, args.doc_len)
    labels = torch.roll(ids, -1, dims=1)
    labels[0, (cu[1:] - 1).long()] = -100
    lid, llab, seq = shard_for_context_parallel(ids.to(device), labels.to(device), cu.to(device), rank, cp)
    n_tok = float((labels != -100).sum())

    def step():
        out = model(lid, labels=llab, seq=seq)
        cp_loss_for_backward(out, n_tok, cp, cfg.router_aux_loss_coef).backward()
        for p in model.parameters():  # the dense gradients' reduction over cp (FSDP would reduce-scatter)
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, args, device, f"model T={T} {impl}")


# ---------------------------------------------------------------------------------------------------------
def run(args):
    device = _device(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    group = dist.group.WORLD
    cp, rank = dist.get_world_size(), dist.get_rank()
    seqlens = [int(s) for s in args.seqlens.split(",") if s]
    for T in seqlens:
        if T % (2 * cp):
            raise SystemExit(f"--seqlens: {T} is not divisible by 2*cp={2 * cp}")
    impls = [s for s in args.impls.split(",") if s]
    modes = [m for m in args.mode.split(",") if m]
    results = []
    for mode in modes:
        for T in seqlens:
            row = {"mode": mode, "seqlen": T}
            for impl in (["local"] if mode == "lightning" else []) + impls:
                fn = bench_lightning if mode == "lightning" else bench_model
                res = oom_guarded_over_ranks(lambda: fn(args, T, impl, group, device, dtype), device)
                if res is None:
                    row[impl] = None
                else:
                    sec, gib = res
                    row[impl] = {"ms": sec * 1e3, "tokens_per_s": T / sec, "peak_gib": gib}
                if rank == 0:
                    print(
                        f"  {mode:9s} T={T:>8d} {impl:6s} "
                        + (
                            "OOM"
                            if res is None
                            else f"{res[0] * 1e3:10.2f} ms  {T / res[0]:12.0f} tok/s  {res[1]:7.2f} GiB"
                        ),
                        flush=True,
                    )
            results.append(row)
    if rank == 0:
        print_table(results, cp, device, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "cp": cp,
                        "device": str(device),
                        "dtype": args.dtype,
                        "doc_len": args.doc_len,
                        "args": vars(args),
                        "results": results,
                    },
                    f,
                    indent=1,
                )
    return results


def print_table(results, cp, device, args):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\ncontext parallel cp={cp} on {name}, {args.dtype}, "
        f"{'one document per row' if args.doc_len <= 0 else f'documents ~{args.doc_len} tokens'}"
    )
    head = (
        f"{'mode':9s} {'seqlen':>8s} {'impl':6s} {'ms/step':>10s} {'tokens/s':>12s} {'peak GiB/GPU':>12s} "
        f"{'speedup vs serial':>18s}"
    )
    print(head)
    print("-" * len(head))
    for row in results:
        base = row.get("serial")
        for impl in ("local", "plus", "serial"):
            if impl not in row:
                continue
            r = row[impl]
            if r is None:
                print(f"{row['mode']:9s} {row['seqlen']:>8d} {impl:6s} {'OOM':>10s}")
                continue
            sp = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
            print(
                f"{row['mode']:9s} {row['seqlen']:>8d} {impl:6s} {r['ms']:10.2f} {r['tokens_per_s']:12.0f} "
                f"{r['peak_gib']:12.2f} {sp:>18s}"
            )


# ---------------------------------------------------------------------------------------------------------
def _main_in_process(args):
    device = _device(args)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, **({"device_id": device} if backend == "nccl" else {}))
    with process_group_teardown(device):
        try:
            run(args)
        except Exception:
            traceback.print_exc()
            raise


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ:
        _main_in_process(args)
        return
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    threads = max(1, (os.cpu_count() or 1) // args.nproc) if cpu else None
    run_distributed(_main_in_process, args.nproc, args, backend=None, threads=threads, timeout=None)


if __name__ == "__main__":
    main()
