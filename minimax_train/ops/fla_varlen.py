"""fla-core's varlen state kernels without a host-device sync per call.

fla-core 0.6.0's `chunk_fwd_h` and `chunk_bwd_dh` size their state tensors by reading
`split_offsets[-1].item()` from the device copy of cu_seqlens: one sync per call, three per lightning
layer and micro-batch in training (forward, backward's recomputed states, backward's state gradients).
`HostOffsetsBackend` is an fla backend (fla.backends.register, the library's own extension point) that
takes the chunk offsets from a host copy of cu_seqlens recorded by `remember_host_cu_seqlens`; calls
whose cu_seqlens has no host copy fall through to fla's implementation. The two launches below are
fla-core 0.6.0's (the version the `cuda` extra pins) with the offsets computed on the host.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakTensorKeyDictionary

# device cu_seqlens -> its int64 host copy; weak keys, so an entry lives as long as the batch's tensor
_HOST_CU_SEQLENS = WeakTensorKeyDictionary()
_REGISTERED = False


def remember_host_cu_seqlens(cu_seqlens: torch.Tensor, host: torch.Tensor) -> None:
    """Record the host copy of a device cu_seqlens for the fla calls that will receive it."""
    register_backend()
    _HOST_CU_SEQLENS[cu_seqlens] = host.to(device="cpu", dtype=torch.long)


def host_chunk_offsets(host_cu_seqlens: torch.Tensor, split_size: int) -> torch.Tensor:
    """fla's prepare_chunk_offsets on the host: [0, cumulative ceil(len / split_size) per document]."""
    lens = host_cu_seqlens[1:] - host_cu_seqlens[:-1]
    return torch.nn.functional.pad((lens + split_size - 1) // split_size, (1, 0)).cumsum(0)


def _device_offsets(cu_seqlens: torch.Tensor, split_size: int) -> tuple[torch.Tensor, int]:
    offsets = host_chunk_offsets(_HOST_CU_SEQLENS[cu_seqlens], split_size)
    # non_blocking from pageable memory stages the data and returns: no wait on the stream
    return offsets.to(cu_seqlens.device, non_blocking=True), int(offsets[-1])


def _state_grid(K: int, V: int, N: int, H: int):
    """fla's launch grid of the state kernels: one program per (K block, V block, sequence, head)."""
    import triton

    return lambda meta: (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]) * N * H,)


def _has_host_copy(*args, cu_seqlens=None, **kwargs):
    if cu_seqlens is None or cu_seqlens not in _HOST_CU_SEQLENS:
        return False, "no host copy of cu_seqlens"
    return True, None


def register_backend() -> None:
    """Register HostOffsetsBackend with fla once per process (fla imported lazily: CUDA machines only)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from fla.backends import BaseBackend, register
    from fla.ops.common.chunk_h import chunk_bwd_kernel_dh, chunk_fwd_kernel_h

    class HostOffsetsBackend(BaseBackend):
        backend_type = "minimax_host_offsets"
        priority = 1  # before fla's own; the verifier sends calls without a host copy on to it

        chunk_fwd_h_verifier = staticmethod(_has_host_copy)
        chunk_bwd_dh_verifier = staticmethod(_has_host_copy)

        def chunk_fwd_h(self, k, v, g=None, g_gamma=None, gk=None, gv=None, h0=None, output_final_state=False,
                        state_v_first=False, cu_seqlens=None, chunk_size=64, split_size=None,
                        states_in_fp32=False):  # fmt: skip
            B, T, H, K, V = *k.shape, v.shape[-1]
            BT, BS = chunk_size, chunk_size if split_size is None else split_size
            split_offsets, NS = _device_offsets(cu_seqlens, BS)
            N = len(cu_seqlens) - 1
            state_shape = (V, K) if state_v_first else (K, V)
            h = k.new_empty(B, NS, H, *state_shape, dtype=torch.float if states_in_fp32 else k.dtype)
            ht = k.new_empty(N, H, *state_shape, dtype=torch.float) if output_final_state else None
            chunk_fwd_kernel_h[_state_grid(K, V, N, H)](
                k=k, v=v, h=h, g=g, g_gamma=g_gamma, gk=gk, gv=gv, h0=h0, ht=ht, cu_seqlens=cu_seqlens,
                split_offsets=split_offsets, T=T, H=H, K=K, V=V, BT=BT, BS=BS, USE_G=g is not None,
                USE_G_GAMMA=g_gamma is not None, USE_GK=gk is not None, USE_GV=gv is not None,
                STATE_V_FIRST=state_v_first,
            )  # fmt: skip
            return h, ht

        def chunk_bwd_dh(self, q, k, v, do, h0, dht, scale, g=None, g_gamma=None, gk=None, gv=None,
                         state_v_first=False, cu_seqlens=None, chunk_size=64, split_size=None,
                         states_in_fp32=False):  # fmt: skip
            B, T, H, K, V = *k.shape, v.shape[-1]
            HQ = q.shape[2]
            BT, BS = chunk_size, chunk_size if split_size is None else split_size
            split_offsets, NS = _device_offsets(cu_seqlens, BS)
            N = len(cu_seqlens) - 1
            state_shape = (V, K) if state_v_first else (K, V)
            dh = k.new_empty(B, NS, HQ, *state_shape, dtype=torch.float if states_in_fp32 else k.dtype)
            dh0 = torch.empty_like(h0, dtype=torch.float) if h0 is not None else None
            chunk_bwd_kernel_dh[_state_grid(K, V, N, H)](
                q=q, g=g, g_gamma=g_gamma, gk=gk, gv=gv, do=do, dh=dh, dht=dht, dh0=dh0, cu_seqlens=cu_seqlens,
                split_offsets=split_offsets, scale=scale, T=T, HQ=HQ, H=H, K=K, V=V, BT=BT, BS=BS,
                NG=HQ // H, USE_G=g is not None, USE_G_GAMMA=g_gamma is not None, USE_GK=gk is not None,
                USE_GV=gv is not None, STATE_V_FIRST=state_v_first,
            )  # fmt: skip
            return dh, dh0

    register("common")(HostOffsetsBackend)
    _REGISTERED = True


__all__ = ["host_chunk_offsets", "register_backend", "remember_host_cu_seqlens"]
