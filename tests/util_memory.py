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


def _rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def anon_rss_growth(fn, interval_s: float = 0.002) -> tuple[object, int]:
    """(fn(), the peak growth of this process's anonymous resident memory while fn runs), sampled by a
    thread every interval_s. Unlike rss_growth it leaves out file-backed pages: the safetensors files a
    reader maps are page cache, shared by every rank and reclaimable, not memory the process allocated."""
    import threading

    base = _rss_anon_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_bytes())
            done.wait(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss_anon_bytes())
    return out, peak[0] - base
