"""Shared helpers of the benchmark scripts (tools/bench_*.py): timing with CUDA events (wall clock on CPU),
device calibration (copy bandwidth, bf16 matmul peak), guarded runs that turn a failure into a one-line
reason, markdown tables, JSON output with finite numbers only, and the timing, memory and out-of-memory
agreement of the ranks of a distributed benchmark.

Nothing here asserts a speed: the scripts print tables and ratios; the tests never assert timings."""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minimax_train.train.metrics import max_memory_gb, peak_tflops  # noqa: E402  (the trainer's MFU and memory)

# ---------------------------------------------------------------------------------------------------
# device
# ---------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (use --device cpu for the smoke mode)")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def detect_peak_tflops(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """bf16 dense peak per device: --peak-tflops, else the trainer's table, else None (CPU, unknown GPUs)."""
    return peak_tflops(device, override)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """The trainer's max_memory_gb: torch.cuda.max_memory_allocated on GPU, peak RSS of this process on CPU."""
    return max_memory_gb(device)


def peak_memory_gib(device: torch.device) -> float:
    return peak_memory_gb(device) * 1e9 / 2**30


def free_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free / 1e9
    try:
        import psutil  # noqa: F401

        return psutil.virtual_memory().available / 1e9
    except Exception:
        return float("inf")


def cleanup(device: Optional[torch.device] = None) -> None:
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()


def versions() -> dict[str, Any]:
    """Versions of everything a number depends on (None where a package is absent); read from the installed
    distributions' metadata, so nothing heavy (megatron) is imported just to print a version."""
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "fla-core", "transformers", "megatron-core", "nv-grouped-gemm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------------------------------
# guarded execution
# ---------------------------------------------------------------------------------------------------


def one_line(e: BaseException, limit: int = 220) -> str:
    """A failure as one line: the exception type and the first line of its message."""
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    # a few libraries put the useful line last ("... when instantiating X")
    if len(msg) > 1 and len(first) < 20:
        first = " ".join(m.strip() for m in msg[:2])
    name = type(e).__name__
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        name = "OOM"
        first = first.split(". Of the allocated")[0].split(" Including non-PyTorch")[0]
    s = f"{name}: {first}" if first else name
    return s if len(s) <= limit else s[: limit - 3] + "..."


def guarded(fn: Callable[[], Any], device: Optional[torch.device] = None, verbose: bool = False):
    """(result, None) or (None, one-line reason). Frees cached GPU memory after a failure."""
    try:
        return fn(), None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure becomes a table note
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        if verbose or os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        reason = one_line(e)
        del e
        cleanup(device)
        return None, reason


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------


class _L2Flush:
    """Writes a 256 MB buffer before each timed call so that small inputs are not served from L2 (50 MB on H100)."""

    def __init__(self, device: torch.device, nbytes: int = 256 << 20):
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 2,
    min_iters: int = 3,
    max_iters: int = 30,
    budget_s: float = 1.0,
    flush_l2: bool = True,
) -> dict[str, float]:
    """Median / min milliseconds of fn() over N timed calls after `warmup` untimed ones.

    CUDA: one pair of events around each call (the L2 flush happens before the start event); CPU:
    perf_counter around each call. N = budget_s / (time of the last warm-up call), clamped to
    [min_iters, max_iters], so a 1M-token case and an 8K-token case both take about budget_s."""
    flush = _L2Flush(device) if flush_l2 else (lambda: None)
    est = None
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        est = time.perf_counter() - t0
        if i >= 1 and est > budget_s:  # long calls: the first one compiled / autotuned, the second estimates
            break
    # calls longer than the budget get 2 timed repeats (a 2 s attention call varies little)
    lo = min_iters if est <= budget_s else min(2, min_iters)
    n = int(min(max_iters, max(lo, budget_s / max(est, 1e-6))))
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times), "iters": n}


# ---------------------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------------------


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None) -> dict[str, float]:
    """Device-to-device copy of nbytes (default 2 GiB on GPU, 64 MiB on CPU); counts read + write."""
    if nbytes is None:
        nbytes = (2 << 30) if device.type == "cuda" else (64 << 20)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    src = torch.randn(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, min_iters=5, max_iters=20, budget_s=0.5, flush_l2=False)
    src = dst = None
    cleanup(device)
    return {"bytes": moved, "ms": t["ms"], "tb_per_s": moved / (t["ms"] * 1e-3) / 1e12}


def measure_matmul_peak(
    device: torch.device, n: Optional[int] = None, dtype: Optional[torch.dtype] = None
) -> dict[str, float]:
    """n x n x n matmul (default 8192 bf16 on GPU, 512 fp32 on CPU): achieved TFLOP/s."""
    if n is None:
        n = 8192 if device.type == "cuda" else 512
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    t = time_fn(
        lambda: torch.matmul(a, b, out=c), device, warmup=3, min_iters=5, max_iters=30, budget_s=0.5, flush_l2=False
    )
    a = b = c = None
    cleanup(device)
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "ms": t["ms"],
        "tflops": 2.0 * n**3 / (t["ms"] * 1e-3) / 1e12,
    }


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables: 3 significant digits, '-' for None."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) >= 10**digits:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 else f"{x:.2e}"
    return str(x)


def fmt_pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def fmt_tokens(t: int) -> str:
    if t >= 1 << 20 and t % (1 << 20) == 0:
        return f"{t >> 20}M"
    if t >= 1024 and t % 1024 == 0:
        return f"{t >> 10}K"
    return str(t)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def finite_or_none(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by None, so the JSON is strict."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, torch.device):
        return str(obj)
    return obj


def write_json(path: Optional[str], obj: Any) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {p}")


def reproduce_command(argv: Optional[Sequence[str]] = None) -> str:
    import shlex

    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), os.getcwd()) if argv else "?"
    return " ".join(["python", shlex.quote(script), *(shlex.quote(a) for a in argv[1:])])


def median(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def parse_int_list(s: str) -> list[int]:
    """'8192,32K,1M' -> [8192, 32768, 1048576]."""
    out = []
    for part in str(s).split(","):
        part = part.strip()
        if not part:
            continue
        mult = 1
        if part[-1] in "kK":
            mult, part = 1024, part[:-1]
        elif part[-1] in "mM":
            mult, part = 1 << 20, part[:-1]
        out.append(int(float(part) * mult))
    return out


# ---------------------------------------------------------------------------------------------------
# ranks of a distributed benchmark (torchrun, or minimax_train.tools.spawn.run_distributed)
# ---------------------------------------------------------------------------------------------------


def max_over_ranks(x: float, device: torch.device) -> float:
    """The largest x over the ranks of the default group (x itself in one process)."""
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def timed_over_ranks(
    fn: Callable[[], Any], device: torch.device, iters: int, warmup: int, reset_peak: bool = False
) -> float:
    """Mean seconds of fn() over `iters` calls after `warmup` untimed ones, on the slowest rank; the ranks
    start the timed calls together (a barrier). reset_peak: cached memory is freed and the peak-memory
    counters restart after the warm-up."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    sync(device)
    if reset_peak:
        cleanup(device)
        reset_peak_memory(device)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return max_over_ranks((time.perf_counter() - t0) / iters, device)


def oom_guarded_over_ranks(fn: Callable[[], Any], device: torch.device) -> Any:
    """fn()'s result, or None on every rank when any rank ran out of memory (other errors propagate)."""
    failed, res = 0.0, None
    try:
        res = fn()
    except torch.cuda.OutOfMemoryError:
        failed = 1.0
    except RuntimeError as e:  # CPU allocators raise plain RuntimeErrors
        if "out of memory" not in str(e).lower():
            raise
        failed = 1.0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if max_over_ranks(failed, device) > 0:
        return None
    return res
