"""Where a profiled step leaves the GPU idle: reads a torch.profiler chrome trace (the trainer writes
<run>/profile/rank0_trace.json.gz with logging.profile_start) and prints the GPU busy fraction and the idle
time grouped by what the host was doing when the GPU ran dry.

    python tools/trace_gaps.py outputs/run/profile/rank0_trace.json.gz [--min-gap-us 5] [--top 25]

Idle time is the union of all kernel and memcpy intervals subtracted from the window. Each gap is charged
to the host side: a synchronising runtime call overlapping the gap (cudaStreamSynchronize, a device-to-host
cudaMemcpy, ...) makes it a "sync" gap named by the CPU op around that call; otherwise it is a launch gap
(the host was slower than the GPU) named by the CPU op that launched the first kernel after the gap."""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

# runtime calls that can block the host until the GPU catches up (cudaMemcpy covers cudaMemcpyAsync too)
SYNC_CALLS = ("Synchronize", "cudaMemcpy")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def busy_intervals(gpu: list[dict]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for e in sorted(gpu, key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e["dur"]
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t)
        else:
            merged.append([s, t])
    return [(s, t) for s, t in merged]


def enclosing_op(ops_by_tid: dict, tid, ts: float) -> str:
    """The innermost cpu_op on thread `tid` that contains time ts."""
    starts, ops = ops_by_tid.get(tid, ([], []))
    i = bisect.bisect_right(starts, ts)
    best = None
    for j in range(i - 1, max(-1, i - 400), -1):  # ops are sorted by start; scan back a bounded window
        o = ops[j]
        if o["ts"] <= ts <= o["ts"] + o["dur"] and (best is None or o["dur"] < best["dur"]):
            best = o
    return best["name"] if best else "(no cpu op)"


def analyse(events: list[dict], min_gap_us: float):
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    if not gpu:
        raise SystemExit("no GPU events in this trace (was it recorded on CUDA?)")
    ops_by_tid: dict = defaultdict(list)
    for o in sorted(cpu_ops, key=lambda o: o["ts"]):
        ops_by_tid[o["tid"]].append(o)
    ops_by_tid = {t: ([o["ts"] for o in v], v) for t, v in ops_by_tid.items()}
    launch_of = {e["args"].get("correlation"): e for e in runtime if "correlation" in e.get("args", {})}
    syncs = sorted((e for e in runtime if any(s in e["name"] for s in SYNC_CALLS)), key=lambda e: e["ts"])
    sync_starts = [e["ts"] for e in syncs]

    busy = busy_intervals(gpu)
    first_kernel_at = sorted(gpu, key=lambda e: e["ts"])
    k_starts = [e["ts"] for e in first_kernel_at]
    window = busy[-1][1] - busy[0][0]
    idle = defaultdict(float)
    counts = defaultdict(int)
    for (_, prev_end), (nxt_start, _) in zip(busy, busy[1:]):
        gap = nxt_start - prev_end
        if gap < min_gap_us:
            continue
        # a synchronising call running across the start of the gap
        i = bisect.bisect_right(sync_starts, nxt_start)
        cause = None
        for j in range(i - 1, max(-1, i - 50), -1):
            s = syncs[j]
            if s["ts"] <= nxt_start and s["ts"] + s["dur"] >= prev_end:
                cause = f"sync  {s['name']} in {enclosing_op(ops_by_tid, s['tid'], s['ts'])}"
                break
        if cause is None:
            k = first_kernel_at[bisect.bisect_left(k_starts, nxt_start)]
            launch = launch_of.get(k.get("args", {}).get("correlation"))
            where = enclosing_op(ops_by_tid, launch["tid"], launch["ts"]) if launch else "(unknown launch)"
            cause = f"launch  from {where}"
        idle[cause] += gap
        counts[cause] += 1
    busy_us = sum(t - s for s, t in busy)
    return window, busy_us, idle, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--min-gap-us", type=float, default=5.0)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    window, busy_us, idle, counts = analyse(load(a.trace), a.min_gap_us)
    total_idle = sum(idle.values())
    print(
        f"window {window / 1e3:.1f} ms, GPU busy {busy_us / 1e3:.1f} ms ({busy_us / window:.1%}), "
        f"idle in gaps >= {a.min_gap_us:g} us: {total_idle / 1e3:.1f} ms"
    )
    sync_total = sum(v for k, v in idle.items() if k.startswith("sync"))
    print(
        f"  of which synchronising calls: {sync_total / 1e3:.1f} ms, launch-bound: {(total_idle - sync_total) / 1e3:.1f} ms"
    )
    print(f"{'idle ms':>9} {'gaps':>6}  cause")
    for cause, us in sorted(idle.items(), key=lambda kv: -kv[1])[: a.top]:
        print(f"{us / 1e3:9.2f} {counts[cause]:6d}  {cause}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
