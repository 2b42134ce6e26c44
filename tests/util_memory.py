"""Peak live tensor bytes of a CPU computation, forward and backward (for memory tests of chunking)."""

from __future__ import annotations

import torch


def peak_live_bytes(fn) -> int:
    """Peak bytes of the storages that aten ops allocate while fn() runs (forward and backward: the autograd
    engine carries the dispatch mode into backward), sampled after every op."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[StorageWeakRef, int]] = {}
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    s = t.untyped_storage()
                    ref = StorageWeakRef(s)
                    if ref.cdata not in self.live:
                        self.live[ref.cdata] = (ref, s.nbytes())
            self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(n for _, n in self.live.values()))
            return out

    tracker = Tracker()
    with tracker:
        fn()
    return tracker.peak
