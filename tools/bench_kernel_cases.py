"""The cases of tools/bench_kernels.py: a recorder that times each (section, implementation, pass, shape)
against the device's floors, and the lightning-attention, softmax-attention and expert sections with their
FLOP counts."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from bench_common import (
    cleanup,
    fmt,
    free_memory_gb,
    guarded,
    measure_copy_bandwidth,
    measure_matmul_peak,
    parse_int_list,
    time_fn,
)

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def uneven_lengths(total: int, n: int, gen: torch.Generator, min_len: int = 1) -> list[int]:
    """n positive lengths summing to total, uneven (Gamma(2) proportions), each >= min_len where possible."""
    n = max(1, min(n, total))
    if n == 1:
        return [total]
    g = torch.empty(n).exponential_(generator=gen) + torch.empty(n).exponential_(generator=gen)
    w = g / g.sum()
    min_len = max(1, min(min_len, total // n))
    lens = [min_len + int(x) for x in (w * (total - n * min_len)).floor().tolist()]
    lens[-1] += total - sum(lens)
    return lens


def _grad_fn(fn: Callable, inputs: tuple, grad_out: torch.Tensor) -> Callable:
    """fwd+bwd closure: forward, then torch.autograd.grad (no .grad accumulation in the timing)."""

    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, grad_out)

    return run


def _fwd_fn(fn: Callable, inputs: tuple) -> Callable:
    def run():
        with torch.no_grad():
            return fn(*inputs)

    return run


class Bench:
    def __init__(self, args):
        self.a = args
        self.dev = args.device
        self.rows: list[dict[str, Any]] = []
        self.bw = None  # TB/s
        self.mm = None  # TFLOP/s

    def calibrate(self) -> dict[str, Any]:
        bw, err = guarded(lambda: measure_copy_bandwidth(self.dev), self.dev, self.a.verbose)
        mm, err2 = guarded(lambda: measure_matmul_peak(self.dev), self.dev, self.a.verbose)
        self.bw = bw["tb_per_s"] if bw else None
        self.mm = mm["tflops"] if mm else None
        return {"copy": bw, "copy_error": err, "matmul": mm, "matmul_error": err2}

    def floors(self, nbytes: Optional[float], flops: Optional[float]):
        b = nbytes / (self.bw * 1e12) * 1e3 if (nbytes and self.bw) else None
        f = flops / (self.mm * 1e12) * 1e3 if (flops and self.mm) else None
        return b, f

    def record(
        self,
        section: str,
        impl: str,
        pas: str,
        shape: dict,
        fn_builder: Callable[[], Callable],
        nbytes: Optional[float],
        flops: Optional[float],
        note: str = "",
        skip: Optional[str] = None,
    ):
        """Time fn_builder()() (or record why not) and append a row."""
        row = {
            "section": section,
            "impl": impl,
            "pass": pas,
            **shape,
            "bytes": nbytes,
            "flops": flops,
            "ms": None,
            "min_ms": None,
            "iters": None,
            "tb_per_s": None,
            "tflops": None,
            "note": note,
        }
        row["floor_bytes_ms"], row["floor_flops_ms"] = self.floors(nbytes, flops)
        if skip:
            row["status"] = "skipped"
            row["note"] = skip
        else:
            extra = []

            def go():
                fn = fn_builder()
                if isinstance(fn, tuple):  # (fn, note about how it ran)
                    fn, more = fn
                    extra.append(more)
                try:
                    return time_fn(
                        fn,
                        self.dev,
                        warmup=self.a.warmup,
                        min_iters=3,
                        max_iters=self.a.max_iters,
                        budget_s=self.a.budget,
                    )
                finally:
                    del fn

            t, err = guarded(go, self.dev, self.a.verbose)
            if extra and extra[0]:
                row["note"] = f"{row['note']}; {extra[0]}" if row["note"] else extra[0]
            if t is None and err.startswith("OOM"):  # a length that does not fit is skipped, and says so
                row["status"] = "skipped"
                row["note"] = f"skipped: {err}"
            elif t is None:
                row["status"] = "failed"
                row["note"] = err if not row["note"] else f"{err} ({row['note']})"
            else:
                row["status"] = "ok"
                row.update(t)
                s = t["ms"] * 1e-3
                row["tb_per_s"] = nbytes / s / 1e12 if nbytes else None
                row["tflops"] = flops / s / 1e12 if flops else None
                floors = [x for x in (row["floor_bytes_ms"], row["floor_flops_ms"]) if x]
                row["x_floor"] = t["ms"] / max(floors) if floors else None
                row["x_floor_bytes"] = t["ms"] / row["floor_bytes_ms"] if row["floor_bytes_ms"] else None
        cleanup(self.dev)
        self.rows.append(row)
        status = row["ms"] if row["status"] == "ok" else row["note"]
        print(
            f"  {section:9s} {impl:12s} {pas:7s} "
            + " ".join(f"{k}={v}" for k, v in shape.items())
            + f"  ->  {fmt(status)}"
            + (" ms" if row["status"] == "ok" else ""),
            flush=True,
        )
        return row


def _fits(need_bytes: float, device: torch.device, headroom: float = 0.92) -> Optional[str]:
    """None when `need_bytes` (a rough estimate) fits the free device memory, else the skip reason."""
    free = free_memory_gb(device)
    if need_bytes / 1e9 > headroom * free:
        return f"skipped: needs ~{need_bytes / 1e9:.0f} GB, {free:.0f} GB free"
    return None


# ---------------------------------------------------------------------------------------------------
# lightning attention
# ---------------------------------------------------------------------------------------------------


def lightning_flops(T: int, H: int, d: int) -> float:
    """Forward FLOPs of the chunked lightning kernel, the per-head term of model/flops.py (chunk C):
    intra-chunk QK^T and (.)V over the causal half of a chunk, plus q @ S and the state update."""
    from minimax_train.model.flops import LIGHTNING_CHUNK

    C = min(LIGHTNING_CHUNK, T)
    return float(T) * H * (2.0 * 2 * d * (C + 1) / 2 + 2.0 * 2 * d * d)


def bench_lightning(b: Bench):
    a, dev = b.a, b.dev
    from minimax_train.ops.lightning import fla_chunk_simple_gla, lightning_attention, lightning_slopes

    chunk_simple_gla = fla_chunk_simple_gla()
    impls = [s.strip() for s in a.lightning_impls.split(",") if s.strip()]
    esize = torch.empty((), dtype=a.dt).element_size()
    d = a.head_dim
    for H in parse_int_list(a.heads):
        slopes = lightning_slopes(H, 1, 80, device=dev)  # a MiniMax-Text-01 layer's decay rates
        for T in parse_int_list(a.seq):
            gen = torch.Generator().manual_seed(a.seed + T + H)
            lens = uneven_lengths(T, a.docs, gen, min_len=min(T, 64))
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.long, device=dev)
            E = T * H * d
            shape = {"H": H, "d": d, "T": T, "docs": len(lens)}
            for pas in a.pass_list:
                bwd = pas == "fwd+bwd"
                nbytes = (8 if bwd else 4) * E * esize
                flops = lightning_flops(T, H, d) * (3 if bwd else 1)
                # rough peak: 8 [T,H,d] tensors + fla's per-chunk fp32 states (2 E elements) and their grads
                need = E * (8 * esize + (24 if bwd else 8)) if dev.type == "cuda" else 0
                fit = _fits(need, dev) if dev.type == "cuda" else None
                for impl in impls:
                    skip, note = fit, ""
                    if impl in ("ours", "fla"):
                        if dev.type != "cuda":
                            skip = "skipped: fla-core Triton kernels need CUDA (CPU path is 'torch')"
                        elif chunk_simple_gla is None:
                            skip = "skipped: fla-core is not installed (import fla.ops.simple_gla failed)"
                    elif impl == "torch":
                        note = "blockwise PyTorch"
                    else:
                        print(f"unknown lightning impl {impl!r}; use ours, fla, torch")
                        continue

                    def build(impl=impl, bwd=bwd):
                        # fresh random non-zero inputs (MiniMax feeds silu-activated q, k, v)
                        q, k, v = (F.silu(torch.randn(1, T, H, d, device=dev, dtype=a.dt)) for _ in range(3))
                        if impl == "ours":

                            def f(q, k, v):
                                return lightning_attention(q, k, v, slopes, cu_seqlens=cu, backend="fla")[0]
                        elif impl == "fla":
                            g = -slopes.float()

                            def f(q, k, v):
                                return chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0, cu_seqlens=cu)[0]
                        else:

                            def f(q, k, v):
                                return lightning_attention(q, k, v, slopes, cu_seqlens=cu, backend="torch")[0]

                        if not bwd:
                            return _fwd_fn(f, (q, k, v))
                        q, k, v = (x.requires_grad_() for x in (q, k, v))
                        return _grad_fn(f, (q, k, v), torch.randn(1, T, H, d, device=dev, dtype=a.dt))

                    b.record("lightning", impl, pas, shape, build, nbytes, flops, note=note, skip=skip)


# ---------------------------------------------------------------------------------------------------
# softmax attention
# ---------------------------------------------------------------------------------------------------


def softmax_flops(lens: list[int], Hq: int, d: int) -> float:
    """Forward FLOPs of causal attention within documents (QK^T and PV over the visible half)."""
    return sum(4.0 * Hq * d * L * (L + 1) / 2 for L in lens)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[name]


def bench_softmax(b: Bench):
    a, dev = b.a, b.dev
    from minimax_train.ops.attention import varlen_attention

    for name in ("recompile_limit", "cache_size_limit"):  # one compiled graph per length / pass / mask
        try:
            setattr(torch._dynamo.config, name, 64)
        except (AttributeError, KeyError):
            pass
    impls = [s.strip() for s in a.softmax_impls.split(",") if s.strip()]
    Hq, Hkv, d = a.softmax_heads, a.kv_heads, a.head_dim
    esize = torch.empty((), dtype=a.dt).element_size()
    scale = d**-0.5
    for T in parse_int_list(a.softmax_seq):
        gen = torch.Generator().manual_seed(a.seed + 7 * T)
        lens_docs = uneven_lengths(T, a.softmax_docs, gen, min_len=min(T, 128))
        for pas in a.pass_list:
            bwd = pas == "fwd+bwd"
            nbytes = (2 * T * Hq * d + 2 * T * Hkv * d) * esize * (2 if bwd else 1)
            need = nbytes * 3 if dev.type == "cuda" else 0
            fit = _fits(need, dev) if dev.type == "cuda" else None
            for impl in impls:
                docs = impl.endswith("-docs")
                lens = lens_docs if docs else [T]
                shape = {"Hq": Hq, "Hkv": Hkv, "d": d, "T": T, "docs": len(lens)}
                flops = softmax_flops(lens, Hq, d) * (3 if bwd else 1)
                skip, note = fit, ""
                if impl.startswith("flex"):
                    if dev.type != "cuda":
                        skip = "skipped: FlexAttention path is CUDA-only (no backward on CPU; CPU path is 'torch')"
                    note = "torch.compile(flex_attention), block mask from (doc, pos)"
                elif impl in ("fa2-docs", "cudnn-docs"):
                    if dev.type != "cuda":
                        skip = "skipped: CUDA-only kernel"
                    note = f"packed_causal_attention backend {impl[:-5]} (cu_seqlens), lse returned"
                elif impl == "torch-docs":
                    note = "PyTorch reference (chunked, recompute in backward)"
                    if dev.type == "cuda" and T > 16384:
                        skip = "skipped: the PyTorch reference is a CPU path (python loop over query chunks)"
                elif impl.startswith("sdpa-"):
                    try:
                        _sdpa_backend(impl)
                    except KeyError:
                        print(f"unknown softmax impl {impl!r}")
                        continue
                    note = f"F.scaled_dot_product_attention is_causal, {impl[5:]} backend, one document"
                    if impl == "sdpa-math" and dev.type == "cuda" and T > 16384:
                        skip = "skipped: math backend materialises T x T scores"
                else:
                    print(f"unknown softmax impl {impl!r}")
                    continue

                def build(impl=impl, lens=lens, bwd=bwd):
                    if impl.startswith("sdpa-"):
                        from torch.nn.attention import sdpa_kernel

                        backend = _sdpa_backend(impl)
                        q = torch.randn(1, Hq, T, d, device=dev, dtype=a.dt)
                        k, v = (torch.randn(1, Hkv, T, d, device=dev, dtype=a.dt) for _ in range(2))
                        rep = Hq // Hkv

                        def f(q, k, v):
                            with sdpa_kernel([backend]):
                                return F.scaled_dot_product_attention(
                                    q, k, v, is_causal=True, scale=scale, enable_gqa=rep > 1
                                )

                        how = ""
                        if rep > 1:  # a backend without native GQA: repeat the kv heads (counted in the time)
                            qs, ks, vs = q[:, :, :256], k[:, :, :256], v[:, :, :256]
                            _, err = guarded(lambda: f(qs, ks, vs), dev)
                            if err:

                                def f(q, k, v):
                                    with sdpa_kernel([backend]):
                                        return F.scaled_dot_product_attention(
                                            q,
                                            k.repeat_interleave(rep, 1),
                                            v.repeat_interleave(rep, 1),
                                            is_causal=True,
                                            scale=scale,
                                        )

                                how = f"kv heads repeated (enable_gqa failed: {err[:80]})"
                        do_shape = (1, Hq, T, d)
                    elif impl in ("fa2-docs", "cudnn-docs"):
                        from minimax_train.ops.attention import packed_causal_attention

                        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=dev)
                        q = torch.randn(T, Hq, d, device=dev, dtype=a.dt)
                        k, v = (torch.randn(T, Hkv, d, device=dev, dtype=a.dt) for _ in range(2))
                        longest = max(lens)

                        def f(q, k, v, cu=cu, impl=impl, longest=longest):
                            return packed_causal_attention(
                                q, k, v, cu, longest, scale=scale, return_lse=True, backend=impl[:-5]
                            )[0]

                        do_shape, how = (T, Hq, d), ""
                    else:
                        backend = "flex" if impl.startswith("flex") else "torch"
                        doc = torch.cat(
                            [torch.full((L,), i, dtype=torch.int32, device=dev) for i, L in enumerate(lens)]
                        )
                        pos = torch.arange(T, dtype=torch.int32, device=dev)
                        q = torch.randn(T, Hq, d, device=dev, dtype=a.dt)
                        k, v = (torch.randn(T, Hkv, d, device=dev, dtype=a.dt) for _ in range(2))

                        def f(q, k, v):
                            return varlen_attention(
                                q, k, v, q_doc=doc, q_pos=pos, k_doc=doc, k_pos=pos, scale=scale, backend=backend
                            )

                        do_shape, how = (T, Hq, d), ""
                    if not bwd:
                        return _fwd_fn(f, (q, k, v)), how
                    q, k, v = (x.requires_grad_() for x in (q, k, v))
                    return _grad_fn(f, (q, k, v), torch.randn(*do_shape, device=dev, dtype=a.dt)), how

                b.record("softmax", impl, pas, shape, build, nbytes, flops, note=note, skip=skip)


# ---------------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------------


def uneven_counts(N: int, E: int, gen: torch.Generator) -> list[int]:
    """Tokens per expert for N routed rows over E experts: skewed (Gamma(1) weights), every expert non-empty."""
    w = torch.empty(E).exponential_(generator=gen) + 0.05
    c = (w / w.sum() * (N - E)).floor().long() + 1
    c[torch.argmax(c)] += N - int(c.sum())
    return c.tolist()


def bench_experts(b: Bench):
    a, dev = b.a, b.dev
    from minimax_train.ops.experts import grouped_swiglu, use_grouped_mm

    H, I, k = a.hidden, a.ffn, a.topk
    N = a.expert_tokens * k
    esize = torch.empty((), dtype=a.dt).element_size()
    impls = [s.strip() for s in a.expert_impls.split(",") if s.strip()]
    for E in parse_int_list(a.experts):
        gen = torch.Generator().manual_seed(a.seed + E)
        counts = uneven_counts(N, E, gen)
        shape = {"E": E, "H": H, "I": I, "rows": N, "counts": f"{min(counts)}..{max(counts)}"}
        for pas in a.pass_list:
            bwd = pas == "fwd+bwd"
            flops = 6.0 * N * H * I * (3 if bwd else 1)
            wbytes = 3 * E * H * I * esize
            need = (wbytes * (2 if bwd else 1) + 8 * N * max(H, 2 * I) * esize) if dev.type == "cuda" else 0
            fit = _fits(need, dev) if dev.type == "cuda" else None
            for impl in impls:
                if impl not in ("ours", "loop", "dense"):
                    print(f"unknown expert impl {impl!r}; use ours, loop, dense")
                    continue
                note = {
                    "loop": "one F.linear per expert (SequentialMLP pattern)",
                    "dense": "one [N,H]x[H,3I] matmul, same FLOPs, no activation",
                }.get(impl, "")

                def build(impl=impl, bwd=bwd):
                    x = torch.randn(N, H, device=dev, dtype=a.dt)
                    counts_t = torch.tensor(counts, device=dev)
                    if impl == "dense":
                        w = torch.randn(H, 3 * I, device=dev, dtype=a.dt) * H**-0.5
                        f, ins = (lambda x, w: x @ w), (x, w)
                        out_shape = (N, 3 * I)
                    else:
                        gu = torch.randn(E, 2 * I, H, device=dev, dtype=a.dt) * H**-0.5
                        dn = torch.randn(E, H, I, device=dev, dtype=a.dt) * I**-0.5
                        out_shape = (N, H)
                        if impl == "ours":

                            def f(x, gu, dn):
                                return grouped_swiglu(x, counts_t, gu, dn, counts_cpu=counts)
                        else:

                            def f(x, gu, dn):
                                outs = []
                                for e, part in enumerate(x.split(counts)):
                                    g, u = F.linear(part, gu[e]).chunk(2, dim=-1)
                                    outs.append(F.linear(F.silu(g) * u, dn[e]))
                                return torch.cat(outs)

                        ins = (x, gu, dn)
                    if not bwd:
                        return _fwd_fn(f, ins)
                    ins = tuple(t.requires_grad_() for t in ins)
                    return _grad_fn(f, ins, torch.randn(*out_shape, device=dev, dtype=a.dt))

                if impl == "ours":
                    probe = torch.empty(1, device=dev, dtype=a.dt)
                    note = (
                        "torch._grouped_mm" if use_grouped_mm(probe) else "loop fallback (grouped_mm needs CUDA bf16)"
                    )
                b.record("experts", impl, pas, shape, build, None, flops, note=note, skip=fit)
