"""Kernel benchmark: lightning attention, varlen softmax attention and the expert grouped GEMM,
at MiniMax head shapes, against library kernels and against the hardware floor.

    python tools/bench_kernels.py --out bench_kernels.json            # GPU defaults (bf16)
    python tools/bench_kernels.py --heads 8,64 --seq 8K,128K          # other shapes
    python tools/bench_kernels.py --device cpu --tiny                 # CPU smoke mode (about 20 s)

Sections (--sections):
  lightning  ours = minimax_train.ops.lightning.lightning_attention(backend="fla") on a packed row of
             --docs documents (uneven lengths, cu_seqlens); fla = fla.ops.simple_gla.chunk_simple_gla called
             directly on the same tensors and cu_seqlens (g_gamma = -slopes, scale 1); torch = our blockwise
             PyTorch backend (the CPU path; on GPU only when asked with --lightning-impls).
             Defaults: 8 heads x 128 (MiniMax's 64 heads over TP 8), 8K ... 1M tokens (fits 78 GB with backward;
             --heads 64 runs full width where it fits and reports the rest as skipped).
  softmax    ours = minimax_train.ops.attention.varlen_attention(backend="flex") with --softmax-docs documents
             and with one document; sdpa-flash = F.scaled_dot_product_attention(is_causal=True) on one document
             with the flash backend forced (also sdpa-cudnn / sdpa-efficient / torch on request).
             GQA 64 query / 8 kv heads of 128, 8K ... 128K tokens.
  experts    ours = minimax_train.ops.experts.grouped_swiglu (torch._grouped_mm on CUDA bf16) over E local experts
             with uneven token counts; loop = one F.linear per expert (megatron's SequentialMLP pattern);
             dense = one [N, H] x [H, 3I] matmul of the same FLOPs. MiniMax widths (H 6144, I 9216), top-2.

Columns: ms = median over timed calls (CUDA events, L2 flushed between calls, warm-up excluded, fresh random
non-zero inputs per case); TB/s = the floor's bytes / ms; TFLOP/s = useful FLOPs / ms (model-FLOP convention
of minimax_train/model/flops.py: backward = 2 x forward); floor ms (bytes) = bytes that must move (q, k, v
read, o written; fwd+bwd also dO read and dq, dk, dv written; in the kernel's dtype) / measured copy
bandwidth; floor ms (FLOPs) = FLOPs / measured bf16 matmul rate; x floor = ms / max(both floors).
A case that fails or does not fit prints its reason in the note column instead of stopping the run.
The cases live in tools/bench_kernel_cases.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from bench_common import (  # noqa: E402
    detect_peak_tflops,
    device_name,
    fmt,
    fmt_tokens,
    guarded,
    markdown_table,
    reproduce_command,
    resolve_device,
    versions,
    write_json,
)
from bench_kernel_cases import Bench, bench_experts, bench_lightning, bench_softmax  # noqa: E402

PASSES = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="CPU-sized shapes (smoke mode)")
    p.add_argument("--sections", default="lightning,softmax,experts")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    # lightning
    p.add_argument("--heads", default=None, help="lightning head counts, comma-separated (default 8)")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--seq", default=None, help="lightning token counts (default 8K,32K,128K,512K,1M)")
    p.add_argument("--docs", type=int, default=4, help="documents in the packed row for ours/fla/torch")
    p.add_argument("--lightning-impls", default=None, help="ours,fla,torch (default: ours,fla on GPU; all on CPU)")
    # softmax
    p.add_argument("--softmax-heads", type=int, default=None, help="query heads (default 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default 8)")
    p.add_argument("--softmax-seq", default=None, help="token counts (default 8K,32K,128K)")
    p.add_argument("--softmax-docs", type=int, default=4)
    p.add_argument(
        "--softmax-impls",
        default=None,
        help="flex-docs,fa2-docs,cudnn-docs,flex-1doc,sdpa-flash,sdpa-cudnn,sdpa-efficient,torch-docs,sdpa-math "
        "(default: flex-docs,fa2-docs,cudnn-docs,flex-1doc,sdpa-flash,sdpa-cudnn on GPU; all CPU ones on CPU)",
    )
    # experts
    p.add_argument("--experts", default=None, help="local expert counts E (default 4,32: EP=8 and EP=1)")
    p.add_argument("--hidden", type=int, default=None, help="model width H (default 6144)")
    p.add_argument("--ffn", type=int, default=None, help="per-expert FFN width I (default 9216)")
    p.add_argument("--expert-tokens", type=int, default=None, help="tokens before top-k (default 8192)")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--expert-impls", default="ours,loop,dense")
    # timing
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per case (default 1 GPU)")
    p.add_argument("--max-iters", type=int, default=30)
    p.add_argument("--peak-tflops", type=float, default=None, help="nominal bf16 peak shown in the header")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cases")
    a = p.parse_args(argv)
    a.device = resolve_device(a.device)
    gpu = a.device.type == "cuda"
    tiny = a.tiny or not gpu
    if not gpu and not a.tiny:
        print("note: --device cpu runs the --tiny shapes")
    a.tiny = tiny
    d = dict(
        heads="2" if tiny else "8",
        head_dim=16 if tiny else 128,
        seq="256,1024" if tiny else "8K,32K,128K,512K,1M",
        lightning_impls="ours,fla,torch" if not gpu else "ours,fla",
        softmax_heads=4 if tiny else 64,
        kv_heads=2 if tiny else 8,
        softmax_seq="256,512" if tiny else "8K,32K,128K",
        softmax_impls=(
            "flex-docs,flex-1doc,torch-docs,sdpa-math"
            if not gpu
            else "flex-docs,fa2-docs,cudnn-docs,flex-1doc,sdpa-flash,sdpa-cudnn"
        ),
        experts="4" if tiny else "4,32",
        hidden=64 if tiny else 6144,
        ffn=128 if tiny else 9216,
        expert_tokens=256 if tiny else 8192,
        dtype="bf16" if gpu else "fp32",
        budget=0.2 if not gpu else 1.0,
    )
    for k, v in d.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    a.section_list = [s.strip() for s in a.sections.split(",") if s.strip()]
    a.pass_list = [s.strip() for s in a.passes.split(",") if s.strip()]
    for s in a.pass_list:
        if s not in PASSES:
            p.error(f"--passes: unknown pass {s!r}; use {', '.join(PASSES)}")
    return a


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------


def _ms(r):
    return r["ms"] if r["status"] == "ok" else None


def print_tables(b: Bench, meta: dict):
    rows = [r for r in b.rows if r.get("impl") != "-"]
    mm = meta["calibration"].get("matmul") or {}
    print("\n## Kernel benchmark")
    print(
        f"device: {meta['device']} | dtype {meta['dtype']} | copy {fmt(b.bw)} TB/s (read+write) | matmul "
        f"{fmt(b.mm)} TFLOP/s ({mm.get('n')}^3 {mm.get('dtype')}) | nominal peak {fmt(meta['peak_tflops'])} TFLOP/s"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    lt = [r for r in rows if r["section"] == "lightning"]
    if lt:
        print("\n### Lightning attention (ours = lightning_attention(backend='fla'), fla = chunk_simple_gla direct)")
        print(
            markdown_table(
                [
                    "H",
                    "T",
                    "docs",
                    "pass",
                    "impl",
                    "ms",
                    "TB/s",
                    "TFLOP/s",
                    "floor ms (bytes)",
                    "floor ms (FLOPs)",
                    "x floor",
                    "note",
                ],
                [
                    [
                        r["H"],
                        fmt_tokens(r["T"]),
                        r["docs"],
                        r["pass"],
                        r["impl"],
                        _ms(r),
                        r["tb_per_s"],
                        r["tflops"],
                        r["floor_bytes_ms"],
                        r["floor_flops_ms"],
                        r.get("x_floor"),
                        r["note"],
                    ]
                    for r in lt
                ],
            )
        )
    st = [r for r in rows if r["section"] == "softmax"]
    if st:
        print("\n### Softmax attention, causal, GQA (TFLOP/s counts only the visible (document, causal) pairs)")
        print(
            markdown_table(
                [
                    "Hq/Hkv",
                    "T",
                    "docs",
                    "pass",
                    "impl",
                    "ms",
                    "TFLOP/s",
                    "TB/s",
                    "floor ms (bytes)",
                    "floor ms (FLOPs)",
                    "x floor",
                    "note",
                ],
                [
                    [
                        f"{r['Hq']}/{r['Hkv']}",
                        fmt_tokens(r["T"]),
                        r["docs"],
                        r["pass"],
                        r["impl"],
                        _ms(r),
                        r["tflops"],
                        r["tb_per_s"],
                        r["floor_bytes_ms"],
                        r["floor_flops_ms"],
                        r.get("x_floor"),
                        r["note"],
                    ]
                    for r in st
                ],
            )
        )
    et = [r for r in rows if r["section"] == "experts"]
    if et:
        dense = {(r["E"], r["pass"]): _ms(r) for r in et if r["impl"] == "dense"}
        for r in et:
            dm = dense.get((r["E"], r["pass"]))
            r["x_dense"] = (_ms(r) / dm) if (_ms(r) and dm) else None
        print("\n### Experts: SwiGLU over E local experts, uneven counts (FLOPs 6*rows*H*I forward)")
        print(
            markdown_table(
                [
                    "E",
                    "H x I",
                    "rows",
                    "counts",
                    "pass",
                    "impl",
                    "ms",
                    "TFLOP/s",
                    "floor ms (FLOPs)",
                    "x floor",
                    "x dense",
                    "note",
                ],
                [
                    [
                        r["E"],
                        f"{r['H']}x{r['I']}",
                        r["rows"],
                        r["counts"],
                        r["pass"],
                        r["impl"],
                        _ms(r),
                        r["tflops"],
                        r["floor_flops_ms"],
                        r.get("x_floor"),
                        r["x_dense"],
                        r["note"],
                    ]
                    for r in et
                ],
            )
        )
    summary = []
    for sec, ours_impl, ref_impl in (
        ("lightning", "ours", "fla"),
        ("softmax", "flex-1doc", "sdpa-flash"),
        ("softmax", "flex-docs", "flex-1doc"),
        ("experts", "ours", "dense"),
        ("experts", "ours", "loop"),
    ):
        keyed = {}
        for r in rows:
            if r["section"] == sec and r["impl"] in (ours_impl, ref_impl) and r["status"] == "ok":
                key = tuple(r.get(k) for k in ("H", "Hq", "E", "T", "pass"))
                keyed.setdefault(key, {})[r["impl"]] = r
        for key, pair in keyed.items():
            if ours_impl in pair and ref_impl in pair:
                o, f = pair[ours_impl], pair[ref_impl]
                shape = ", ".join(
                    f"{k}={fmt_tokens(v) if k == 'T' else v}"
                    for k, v in zip(("H", "Hq", "E", "T"), key[:4])
                    if v is not None
                )
                summary.append(
                    [
                        sec,
                        shape,
                        key[4],
                        f"{ours_impl} / {ref_impl}",
                        o["ms"],
                        f["ms"],
                        f"{o['ms'] / f['ms']:.2f}",
                        o.get("x_floor"),
                    ]
                )
    if summary:
        print("\n### Summary: ours against the reference kernel (ratio < 1: ours faster)")
        print(
            markdown_table(["section", "shape", "pass", "pair", "ours ms", "ref ms", "ratio", "ours x floor"], summary)
        )
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows) - len(bad)} cases timed, {len(bad)} skipped or failed (reasons in the note column).")
    for r in b.rows:
        if r.get("impl") == "-":
            print(f"section {r['section']} failed before timing anything: {r['note']}")


def main(argv=None):
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    if a.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    b = Bench(a)
    print(f"calibrating on {device_name(a.device)} ...", flush=True)
    calib = b.calibrate()
    meta = {
        "device": device_name(a.device),
        "dtype": a.dtype,
        "versions": versions(),
        "calibration": calib,
        "copy_tb_per_s": b.bw,
        "matmul_tflops": b.mm,
        "peak_tflops": detect_peak_tflops(a.device, a.peak_tflops),
        "tiny": a.tiny,
        "command": reproduce_command(),
    }
    sections = {"lightning": bench_lightning, "softmax": bench_softmax, "experts": bench_experts}
    try:
        for s in a.section_list:
            if s not in sections:
                print(f"unknown section {s!r}; use {', '.join(sections)}")
                continue
            print(f"{s} ...", flush=True)
            _, err = guarded(lambda: sections[s](b), a.device, a.verbose)
            if err:  # a whole section failed to start (an import, say): one row says why
                b.rows.append({"section": s, "impl": "-", "pass": "-", "status": "failed", "note": err, "ms": None})
                print(f"  {s}: failed: {err}")
    except KeyboardInterrupt:  # e.g. `timeout -s INT`: keep and report what was measured
        meta["interrupted"] = True
        print("\ninterrupted: reporting the cases measured so far", flush=True)
    print_tables(b, meta)
    print(f"\nreproduce: {meta['command']}")
    write_json(a.out, {"meta": meta, "rows": b.rows})
    return b.rows


if __name__ == "__main__":
    main()
