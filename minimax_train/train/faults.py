"""Fault injection for tests and drills, read from the environment (never from the config, so a
production config cannot carry it by accident).

MINIMAX_TRAIN_FAULTS="kill@7,nan@3+4,save_crash@6"
  kill@S        SIGKILL this process right after optimiser step S completed (metrics written)
  nan@S[+S..]   make the loss of step S NaN (on every rank)
  save_crash@S  SIGKILL in the middle of saving the checkpoint of step S (data written, not yet complete)
  poison@S      set the weights to NaN after step S's update (a diverged run whose loss check came too late)
  disk_full@S   the checkpoint writer of step S fails with ENOSPC after writing part of meta.pt (a full disk)
  sigterm@S     send SIGTERM to this process after step S (as slurm preemption would); ranks agree on it
                in the next step's statistics all-reduce, so the run saves and stops after step S+1
Only rank 0 kills/signals itself unless the entry is suffixed with :all (e.g. kill@7:all)."""

from __future__ import annotations

import errno
import os
import signal

ENV = "MINIMAX_TRAIN_FAULTS"
KINDS = ("kill", "nan", "save_crash", "sigterm", "poison", "disk_full")


class Faults:
    def __init__(self, spec: str | None = None, rank: int = 0):
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.rank = rank
        self.steps: dict[str, set[int]] = {k: set() for k in KINDS}
        self.all_ranks: dict[str, bool] = {k: False for k in KINDS}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, rest = item.partition("@")
            rest, _, scope = rest.partition(":")
            if name not in KINDS or not rest:
                raise ValueError(
                    f"{ENV}: cannot parse {item!r}; use e.g. kill@7, nan@3+4, save_crash@6, sigterm@5, "
                    "poison@3, disk_full@6"
                )
            self.steps[name] |= {int(s) for s in rest.split("+")}
            self.all_ranks[name] = scope == "all"

    def __bool__(self):
        return any(self.steps.values())

    def _mine(self, kind: str) -> bool:
        return self.rank == 0 or self.all_ranks[kind] or kind in ("nan", "poison")

    def hit(self, kind: str, step: int) -> bool:
        return step in self.steps[kind] and self._mine(kind)

    def maybe_kill(self, kind: str, step: int) -> None:
        if self.hit(kind, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_signal(self, step: int) -> None:
        if self.hit("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)

    def maybe_fill_disk(self, step: int, path) -> None:
        """As a writer on a full file system: part of the file lands, then ENOSPC."""
        if self.hit("disk_full", step):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def maybe_poison(self, step: int, model) -> None:
        if self.hit("poison", step):
            import torch

            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
