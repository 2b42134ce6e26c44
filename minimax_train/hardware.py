"""Dense bf16 tensor-core peaks of GPUs, TFLOP/s per device: the MFU denominator of the trainer's metrics,
the benchmarks and the layout planner's GPU presets, so that all of them divide by the same number."""

from __future__ import annotations

from typing import Optional

# (substring of the CUDA device name, TFLOP/s); the first match wins, so the more specific names come first.
# The H100 SXM / H200 figure is the datasheet's 1,979 (with sparsity) halved.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
)


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    """The peak of the GPU whose name contains a known key (e.g. 'NVIDIA H100 80GB HBM3'), else None."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None
