"""Checks that keep a checkpoint from being silently wrong: non-finite tensors, a full disk, and the
messages that name a damaged checkpoint."""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

# what reading or writing checkpoint files can raise (DCP's CheckpointException is a BaseException)
FILE_ERRORS = (Exception, CheckpointException)

# below this much free space a failed write is a full disk, whatever the writer's message says
_FULL_BYTES = 1 << 20
# what torch's writers say instead of ENOSPC (PyTorchStreamWriter: "enforce fail ... file write failed")
_FULL_TEXTS = ("no space left", "file write failed", "unexpected pos")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def first_nonfinite(state, prefix: str = "") -> Optional[str]:
    """Key of the first floating-point tensor in a nested state dict holding NaN or inf (this rank's
    shard of a DTensor), or None."""
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        items = ()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, torch.Tensor):
            t = _local(v)
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                return key
        elif isinstance(v, (dict, list, tuple)):
            found = first_nonfinite(v, key)
            if found:
                return found
    return None


def _chain(e: BaseException):
    seen = set()
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__]
        # torch.distributed.checkpoint's CheckpointException carries each rank's failure
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
            todo += [f[0] for f in failures.values() if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]


def wrapped_error(e: BaseException, cls: type) -> BaseException | None:
    """The first exception of type `cls` in e's chain (DCP's per-rank failures included), or None."""
    return next((x for x in _chain(e) if isinstance(x, cls)), None)


def is_out_of_space(e: BaseException, path: Path) -> bool:
    """Did this write fail because the file system of `path` is full?"""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(x).lower() for s in _FULL_TEXTS):
            return True
    try:
        return shutil.disk_usage(path).free < _FULL_BYTES
    except OSError:
        return False


def short_reason(e: BaseException) -> str:
    """One line about why a file could not be read, without torch.load's advice on weights_only (our
    files are meant to load with weights_only=True: one that does not is damaged, not untrusted)."""
    first = (str(e).strip().splitlines() or [""])[0]
    if "weights only load failed" in first.lower() or "weights_only" in first:
        first = "not a readable torch file"
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


class _DropDcpFallbackNoise(logging.Filter):
    """DCP logs a traceback on the root logger for a .metadata it cannot read before raising; we report
    the damaged checkpoint ourselves, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "distributed/checkpoint" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_dcp_errors():
    f = _DropDcpFallbackNoise()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)
