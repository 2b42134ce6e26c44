"""Tensor memory of CPU computations: peak live bytes over forward and backward (memory tests of chunking),
bytes autograd saves for backward (the planner's activation model)."""

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


def saved_tensor_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass of `model` on `batch`
    (parameters excluded): the planner's 'saved activations' measured directly."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch.input_ids, labels=batch.labels, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)
    params = set()
    for p in model.parameters():
        p = p.to_local() if hasattr(p, "to_local") else p
        params.add(p.untyped_storage().data_ptr())
    del out
    return sum(n for k, n in seen.items() if k not in params)


def rss_growth(fn) -> tuple[object, int]:
    """(fn(), the growth of this process's peak resident set while fn runs over the RSS just before): run in
    a fresh process started with memcheck.MALLOC_ENV, so freed tensors go back to the OS."""
    from minimax_train.tools.memcheck import _max_rss_bytes, _reset_peak_rss, _rss_bytes

    _reset_peak_rss()
    rss0 = _rss_bytes()
    out = fn()
    return out, max(0, _max_rss_bytes() - rss0)
