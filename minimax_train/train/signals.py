"""Preemption and shutdown signals: SIGTERM / SIGUSR1 set a flag that the step loop reads once per step (the
flag travels in the step's statistics all-reduce, so every rank stops after the same step)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional

log = logging.getLogger("minimax_train.train")


class StopFlag:
    """SIGTERM / SIGUSR1 (slurm preemption, torchrun shutdown) -> save at the end of this step and exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.name: Optional[str] = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.name is None:
            self.name = signal.Signals(signum).name
            log.warning("received %s: will save a checkpoint after this step and exit", self.name)

    def install(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        _term_with_parent()
        for s in self.SIGNALS:
            sig = getattr(signal, s, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handler)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _term_with_parent() -> None:
    """Under a bare torchrun, SIGUSR1 kills the agent (launch/torchrun.sh makes it immune) and would leave
    its workers running orphaned: ask Linux for SIGTERM when our parent dies, so they save and exit."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the README says to use launch/torchrun.sh
        pass


__all__ = ["StopFlag"]
