"""Model FLOPs utilisation (MFU): achieved FLOP/s over the device's peak.

Peaks for known GPUs are the dense (no sparsity) tensor-core numbers from the vendors' data
sheets; on CPU the peak is measured once with a large matmul in the training dtype (the
PaLM/nanoGPT convention: MFU counts only the model's FLOPs, 6N per token plus attention).
"""

from __future__ import annotations

import math
import time

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s (data sheets; SXM parts unless named).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}

_cpu_peak_cache: dict[str, float] = {}


def measure_cpu_matmul_peak(dtype: torch.dtype = torch.bfloat16, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a (size x size) @ (size x size) matmul on this CPU."""
    key = f"{dtype}-{size}"
    if key in _cpu_peak_cache:
        return _cpu_peak_cache[key]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up (thread pool, kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    peak = 2 * size**3 / best
    _cpu_peak_cache[key] = peak
    return peak


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
            if key in name:
                peak = GPU_PEAK_BF16[key]
                return (peak if dtype in (torch.bfloat16, torch.float16) else peak / 2), f"datasheet:{key}"
        return float("nan"), f"unknown GPU {name}"
    return measure_cpu_matmul_peak(dtype if dtype != torch.float16 else torch.float32), f"measured:cpu-{dtype}"


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    if seconds_per_step <= 0 or not peak_flops or math.isnan(peak_flops):
        return float("nan")
    return flops_per_step / seconds_per_step / peak_flops
