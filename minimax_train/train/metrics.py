"""Per-step metrics: metrics.jsonl, the console progress line, and W&B (imported only when enabled)."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from minimax_train.config import WandbConfig
from minimax_train.hardware import peak_bf16_tflops

log = logging.getLogger("minimax_train.train")


def peak_tflops(device: torch.device, override: Optional[float]) -> Optional[float]:
    """The MFU denominator: logging.peak_tflops, else the GPU's bf16 peak (minimax_train.hardware), None on CPU."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_bf16_tflops(torch.cuda.get_device_name(device))


def max_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or peak RSS of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024) / 1e9


def load_imbalance(load: torch.Tensor) -> float:
    """max over layers of (the busiest expert's tokens / the mean per expert), from [layers, experts] counts."""
    mean = load.mean(dim=1).clamp(min=1e-9)
    return float((load.max(dim=1).values / mean).max().item())


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


class MetricsWriter:
    """Appends one JSON object per optimiser step (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        rec = {k: _finite_or_none(v) for k, v in record.items()}
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def format_duration(s: float) -> str:
    s = int(max(0, s))
    h, m, sec = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def format_progress(rec: dict[str, Any], total_steps: int, eta_s: float) -> str:
    parts = [
        f"step {rec['step']}/{total_steps}",
        f"loss {rec['loss']:.4f}",
        f"lm {rec['lm_loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"gnorm {rec['grad_norm']:.3f}",
        f"{rec['tokens_per_s'] / 1e3:.1f}k tok/s",
    ]
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if rec.get("val_loss") is not None:
        parts.append(f"val {rec['val_loss']:.4f}")
    if rec.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


ONLINE_INIT_TIMEOUT_S = 15.0  # W&B's own default is 90 s


def _redact(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


class WandbLogger:
    """Thin wrapper; wandb is imported only when mode != disabled. The API key is never logged (wandb takes
    it from its own login / WANDB_API_KEY; a wandb error quoting it is redacted)."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, run_id: Optional[str]):
        self.run = None
        self.run_id = run_id
        if cfg.mode == "disabled":
            return
        from minimax_train.errors import import_extra

        wandb = import_extra("wandb", "wandb", f"logging.wandb.mode={cfg.mode} (or logging.wandb.mode=disabled)")
        wdir = Path(cfg.dir) if cfg.dir else Path(run_dir)
        wdir.mkdir(parents=True, exist_ok=True)
        kw = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            notes=cfg.notes,
            dir=str(wdir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        mode = cfg.mode
        if mode == "online":
            # a training job must not die (or wait ~100 s) for its logger: without a key (wandb fails at
            # once), or when no server answers within ONLINE_INIT_TIMEOUT_S, log offline (`wandb sync` later)
            problem = None
            try:
                settings = wandb.Settings(init_timeout=ONLINE_INIT_TIMEOUT_S)
                self.run = wandb.init(mode="online", settings=settings, **kw)
            except Exception as e:  # wandb raises UsageError without a key, CommError when no server answers
                problem = _redact(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if problem is not None:
                log.warning(
                    "W&B online logging unavailable: %s; logging offline to %s (upload later with wandb sync)",
                    problem,
                    wdir,
                )
                mode = "offline"
        if self.run is None:
            self.run = wandb.init(mode=mode, **kw)
        self.run_id = self.run.id
        log.info("W&B run %s (mode %s, dir %s)", self.run_id, mode, wdir)

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        data = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None and k != "step"}
        for k, v in record.items():  # per-bucket counts and the like: one W&B series per entry
            if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                data.update({f"{k}/{i}": x for i, x in enumerate(v)})
        self.run.log(data, step=int(record["step"]))

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
