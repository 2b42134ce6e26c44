"""The model's elementwise steps, fused into one kernel each on CUDA (torch.compile: Triton), eager elsewhere.

A profile of the 1B preset at 8K on an H100 (docs/PERFORMANCE.md) spent about half of the CUDA time in
unfused elementwise kernels and dtype casts: each norm, gate, RoPE and SwiGLU step read and wrote the
activations several times. Each function here is the eager formula, so CPU (and the float64 references
of the tests) run exactly that; on CUDA the same code is compiled once per function with dynamic shapes
(the token count changes from batch to batch). The compiled path is opt-in, MINIMAX_FUSED=1, until it
has been measured and tested on a GPU (tests/gpu/test_model_gpu.py::test_fused_elementwise_matches_eager)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from .rope import apply_rope


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """transformers' MiniMaxRMSNorm: normalise in fp32, back to x's dtype, then times the weight, both in
    out_dtype (the weights' dtype, or the matmul dtype under autocast)."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(out_dtype) * normed.to(out_dtype)


def _swiglu(gate_up: torch.Tensor, act: Callable) -> torch.Tensor:
    """act(gate) * up of rows [N, 2I] whose first half is the gate."""
    g, u = gate_up.chunk(2, dim=-1)
    return act(g) * u


def _sigmoid_gate(gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(gate) * y


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (ops/rope.py) in cos/sin's precision, the result in x's dtype."""
    return apply_rope(x, cos, sin).to(x.dtype)


def _weighted_slot_sum(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * slots[t, j] of slots [T, k, H] and weights [T, k], in slots' dtype (for k = 2
    bit-equal to adding the weighted slots into zeros one by one: fp32 addition commutes)."""
    return (slots * weights.unsqueeze(-1).to(slots.dtype)).sum(1)


def _scaled_sum(a: torch.Tensor, alpha: float, b: torch.Tensor, beta: float) -> torch.Tensor:
    return alpha * a + beta * b


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def _on_cuda(fn: Callable) -> Callable:
    """fn, compiled when its first tensor argument is on CUDA and MINIMAX_FUSED=1."""

    @functools.wraps(fn)
    def call(x, *args):
        if x.is_cuda and os.environ.get("MINIMAX_FUSED") == "1" and not torch.compiler.is_compiling():
            return _compiled(fn)(x, *args)
        return fn(x, *args)

    return call


rms_norm = _on_cuda(_rms_norm)
swiglu = _on_cuda(_swiglu)
sigmoid_gate = _on_cuda(_sigmoid_gate)
rope = _on_cuda(_rope)
scaled_sum = _on_cuda(_scaled_sum)
weighted_slot_sum = _on_cuda(_weighted_slot_sum)

__all__ = ["rms_norm", "rope", "scaled_sum", "sigmoid_gate", "swiglu", "weighted_slot_sum"]
