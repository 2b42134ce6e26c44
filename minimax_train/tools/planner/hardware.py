"""GPU presets of the planner: memory, bf16 peak and the links inside and between nodes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from minimax_train.hardware import peak_bf16_tflops
from minimax_train.tools.planner.inputs import PlanError


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float  # usable device memory
    peak_tflops: float  # dense bf16 (fp32 for cpu) peak per device
    intra_gbps: float  # GB/s per direction per GPU inside a node (NVLink)
    inter_gbps: float  # GB/s per direction per GPU between nodes (InfiniBand / RoCE)
    gpus_per_node: int = 8


# peak FLOP/s from the trainer's table (minimax_train.hardware), so plans and runs report the same MFU
GPU_KINDS = {
    # NVLink 4: 900 GB/s bidirectional = 450 per direction; 8 x 400 Gb/s NDR per node = 50 GB/s per GPU.
    "h100": GPUSpec("H100 SXM 80GB", 80.0, peak_bf16_tflops("H100 SXM"), 450.0, 50.0, 8),
    "h200": GPUSpec("H200 SXM 141GB", 141.0, peak_bf16_tflops("H200 SXM"), 450.0, 50.0, 8),
    # NVLink 3: 600 GB/s bidirectional; 8 x 200 Gb/s HDR per node = 25 GB/s per GPU.
    "a100": GPUSpec("A100 SXM 80GB", 80.0, peak_bf16_tflops("A100 SXM"), 300.0, 25.0, 8),
}


def gpu_spec(
    kind: str = "h100",
    *,
    memory_gib: Optional[float] = None,
    peak_tflops: Optional[float] = None,
    intra_gbps: Optional[float] = None,
    inter_gbps: Optional[float] = None,
    gpus_per_node: Optional[int] = None,
) -> GPUSpec:
    """A known kind with any field overridden, or 'custom' (then every field must be given)."""
    over = {
        k: v
        for k, v in dict(
            memory_gib=memory_gib,
            peak_tflops=peak_tflops,
            intra_gbps=intra_gbps,
            inter_gbps=inter_gbps,
            gpus_per_node=gpus_per_node,
        ).items()
        if v is not None
    }
    if kind == "custom":
        missing = [k for k in ("memory_gib", "peak_tflops", "intra_gbps", "inter_gbps") if k not in over]
        if missing:
            raise PlanError(f"--gpu custom needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
        spec = GPUSpec("custom", gpus_per_node=over.pop("gpus_per_node", 8), **over)
    elif kind in GPU_KINDS:
        spec = dataclasses.replace(GPU_KINDS[kind], **over)
    else:
        raise PlanError(f"unknown GPU kind {kind!r}: use one of {', '.join(GPU_KINDS)} or custom")
    for k in ("memory_gib", "peak_tflops", "intra_gbps", "inter_gbps"):
        if not getattr(spec, k) > 0:
            raise PlanError(f"GPU {k} must be > 0, got {getattr(spec, k)}")
    if spec.gpus_per_node < 1:
        raise PlanError(f"gpus_per_node must be >= 1, got {spec.gpus_per_node}")
    return spec
