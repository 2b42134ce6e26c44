"""Profile a window of optimiser steps with torch.profiler (logging.profile_start / profile_steps).

Each rank writes <run dir>/profile/rank{r}_trace.json.gz (open in Perfetto or chrome://tracing) and
rank{r}_ops.txt: the ops of the window sorted by device time (CPU time on CPU), the first place to
look when a step is slower than its FLOPs say; on CUDA also rank{r}_cpu_ops.txt, sorted by host time
(`tools/trace_gaps.py` on the trace says how much of the step the GPU sat idle, and why)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("minimax_train.train")


class StepProfiler:
    def __init__(self, start: int, steps: int, out_dir: Path, rank: int, device: torch.device):
        self.start, self.end = start, start + steps - 1  # 1-based optimiser steps, inclusive
        self.out_dir, self.rank, self.device = Path(out_dir), rank, device
        self._prof: Optional[torch.profiler.profile] = None

    @property
    def enabled(self) -> bool:
        return self.start > 0

    def before_step(self, step: int) -> None:
        """`step`: the 1-based number of the optimiser step about to run."""
        if not self.enabled or step != self.start or self._prof is not None:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts, record_shapes=True)
        self._prof.__enter__()
        log.info("profiling steps %d..%d", self.start, self.end)

    def after_step(self, step: int) -> None:
        if self._prof is not None and step >= self.end:
            self.close()

    def close(self) -> None:
        """Stop and write the outputs (also when the run ends inside the window)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}_trace.json.gz"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
        (self.out_dir / f"rank{self.rank}_ops.txt").write_text(table + "\n")
        if self.device.type == "cuda":  # host time per op: where a launch-bound step spends it
            cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
            (self.out_dir / f"rank{self.rank}_cpu_ops.txt").write_text(cpu + "\n")
        log.info("profile written to %s (trace, op table)", self.out_dir)
