"""Charts of one or several runs' metrics.jsonl (the trainer writes one JSON object per optimiser step).

    tools/plot_metrics.py outputs/run_a outputs/run_b --out plots/ [--labels a,b] [--x tokens] [--smooth 20]

Writes, into --out: loss.png (training loss, and validation loss as markers when present), lr.png,
tokens_per_s.png, mfu.png (MFU; runs without a known peak, e.g. CPU, show TFLOP/s per device instead),
expert_load.png (max / mean expert assignments of the most imbalanced layer, 1 = balanced), grad_norm.png,
memory.png (max_memory_gb) and overview.png (all of them in one figure). One line per run.

A run is a run directory (holding metrics.jsonl) or a .jsonl file. A resumed run logs the steps it redoes
after a crash again: the last record of every step wins. Lines that are not JSON objects are skipped and
counted."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from minimax_train.errors import MinimaxError

CHARTS = (
    # file, title, y label, metric keys (first = main series), log y
    ("loss", "Loss", "loss", ("loss",), False),
    ("lr", "Learning rate", "learning rate", ("lr",), False),
    ("tokens_per_s", "Throughput", "tokens / s", ("tokens_per_s",), False),
    ("mfu", "Model FLOPs utilisation", "MFU", ("mfu",), False),
    ("expert_load", "Expert load imbalance", "max / mean expert load", ("expert_load_imbalance",), False),
    ("grad_norm", "Gradient norm", "grad norm", ("grad_norm",), True),
    ("memory", "Peak memory", "GB", ("max_memory_gb",), False),
)


class PlotError(MinimaxError, ValueError):
    pass


@dataclass
class Run:
    label: str
    path: Path
    records: list = field(default_factory=list)  # by step, last record of each step
    bad_lines: int = 0


def load_run(path: str | os.PathLike, label: Optional[str] = None) -> Run:
    p = Path(path)
    if p.is_dir():
        f = p / "metrics.jsonl"
        if not f.is_file():
            raise PlotError(f"{p} has no metrics.jsonl (give a run directory or a .jsonl file)")
        p_label = p.name
    elif p.is_file():
        f, p_label = p, (p.parent.name if p.name == "metrics.jsonl" else p.stem)
    else:
        raise PlotError(f"{p}: no such run directory or metrics file")
    by_step: dict[int, dict] = {}
    bad = 0
    with open(f, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                bad += 1
                continue
            by_step[rec["step"]] = rec
    if not by_step:
        raise PlotError(f"{f}: no metric records (empty, or no JSON objects with a 'step')")
    return Run(label or p_label, f, [by_step[s] for s in sorted(by_step)], bad)


def _num(v) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def series(run: Run, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in run.records:
        xv, yv = _num(r.get(x)), _num(r.get(key))
        if xv is not None and yv is not None:
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1: unchanged)."""
    if window <= 1 or len(ys) < 2:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _draw(ax, runs: list[Run], name: str, title: str, ylabel: str, keys, log: bool, x: str, window: int) -> bool:
    """One chart on `ax`; False when no run has the metric."""
    key = keys[0]
    drawn = False
    note = None
    if name == "mfu" and not any(series(r, "mfu", x)[1] for r in runs):
        key, ylabel, note = "tflops_per_device", "TFLOP/s per device", "MFU not logged (no peak FLOP/s known)"
    for i, run in enumerate(runs):
        xs, ys = series(run, key, x)
        if not xs:
            continue
        color = f"C{i % 10}"
        if window > 1 and name in ("loss", "tokens_per_s", "grad_norm", "mfu", "expert_load"):
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth(ys, window), color=color, label=run.label, linewidth=1.5)
        else:
            ax.plot(xs, ys, color=color, label=run.label, linewidth=1.5)
        drawn = True
        if name == "loss":
            vx, vy = series(run, "val_loss", x)
            if vx:
                ax.plot(vx, vy, "o--", color=color, markersize=4, linewidth=1, label=f"{run.label} (val)")
    if not drawn:
        ax.text(0.5, 0.5, f"no '{key}' in any run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title + (f"\n({note})" if note else ""), fontsize=10)
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel(ylabel)
    if log and drawn:
        ax.set_yscale("log")
    if name == "expert_load" and drawn:
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def plot_runs(
    runs: list[Run], out: str | os.PathLike, *, x: str = "step", window: int = 1, dpi: int = 110
) -> list[Path]:
    """Write one PNG per chart plus overview.png into `out`; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "tokens"):
        raise PlotError(f"--x {x!r}: use step or tokens")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, ylabel, keys, log in CHARTS:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        _draw(ax, runs, name, title, ylabel, keys, log, x, window)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    cols = 3
    rows = math.ceil(len(CHARTS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows))
    for ax, (name, title, ylabel, keys, log) in zip(axes.flat, CHARTS):
        _draw(ax, runs, name, title, ylabel, keys, log, x, window)
    for ax in list(axes.flat)[len(CHARTS) :]:
        ax.axis("off")
    fig.suptitle(" vs ".join(r.label for r in runs), fontsize=12)
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    written.append(path)
    return written


def summarize(runs: list[Run]) -> str:
    lines = []
    for r in runs:
        last = r.records[-1]
        tps = [v for v in (_num(x.get("tokens_per_s")) for x in r.records[1:]) if v is not None]
        val = [v for v in (_num(x.get("val_loss")) for x in r.records) if v is not None]
        loss = _num(last.get("loss"))
        parts = [
            f"{r.label}: {len(r.records)} steps (last {last['step']})",
            f"loss {loss:.4f}" if loss is not None else "loss n/a",
        ]
        if val:
            parts.append(f"val {val[-1]:.4f}")
        if tps:
            parts.append(f"median {sorted(tps)[len(tps) // 2]:,.0f} tokens/s")
        if r.bad_lines:
            parts.append(f"{r.bad_lines} unreadable lines skipped")
        lines.append(", ".join(parts))
    return "\n".join(lines)


def build_parser():
    import argparse

    ap = argparse.ArgumentParser(
        prog="tools/plot_metrics.py",
        description="Plot one or several runs' metrics.jsonl as PNG charts for comparison: loss (+ validation), "
        "learning rate, tokens/s, MFU, expert load imbalance, gradient norm, peak memory, and an "
        "overview of all of them.",
        epilog="examples:\n"
        "  tools/plot_metrics.py outputs/2026-01-01/12-00-00 --out plots\n"
        "  tools/plot_metrics.py runs/a runs/b/metrics.jsonl --labels baseline,cp8 --x tokens --smooth 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl) or .jsonl files")
    ap.add_argument("--out", default="plots", help="output directory (default %(default)s)")
    ap.add_argument("--labels", help="comma-separated legend labels, one per run (default: directory names)")
    ap.add_argument("--x", default="step", choices=("step", "tokens"), help="x axis (default %(default)s)")
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window in points (default: none)")
    ap.add_argument("--dpi", type=int, default=110)
    return ap


def main(argv=None) -> int:
    from minimax_train.errors import USER_ERRORS, report

    args = build_parser().parse_args(argv)
    try:
        labels = [s.strip() for s in args.labels.split(",")] if args.labels else [None] * len(args.runs)
        if len(labels) != len(args.runs):
            raise PlotError(f"--labels has {len(labels)} labels for {len(args.runs)} runs")
        if args.smooth < 1 or args.dpi < 10:
            raise PlotError("--smooth must be >= 1 and --dpi >= 10")
        runs = [load_run(p, lab) for p, lab in zip(args.runs, labels)]
        written = plot_runs(runs, args.out, x=args.x, window=args.smooth, dpi=args.dpi)
    except USER_ERRORS as e:
        return report("plot_metrics", e)
    print(summarize(runs))
    print(f"wrote {len(written)} charts to {args.out}: {', '.join(p.name for p in written)}")
    return 0
