"""Model FLOPs utilisation (MFU): the model FLOPs of a training step / its time / the device's peak.

One definition for the training log and `mmgen/evaluation/speed.py`. FLOPs follow the PaLM/nanoGPT convention
(model FLOPs, not hardware FLOPs: no recomputation, no padding, no optimizer): per pass of the network,
`MMGenForConditionalGeneration.estimate_flops` (6N per trained token plus dense attention, a third of that
for tokens run without gradient). A step runs the student pass (every non-pad token, with gradient)
and, for IMM, the target branch under no_grad: either only the target copies over the student's
keys/values ("prefix") or a second whole forward ("full"); `compute_losses` reports which passes it ran,
`pass_token_counts` turns them into token counts and `training_flops` into FLOPs.

Peaks for known GPUs are the dense (no sparsity) tensor-core numbers from the vendors' data sheets; on
CPU the peak is measured once per process (dtype, thread count) with a large matmul in the training dtype.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping

import torch

from mmgen.masks import TokenKind, image_token_counts

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

PASSES = ("student", "prefix", "full")  # what `compute_losses` reports in diagnostics["passes"]

_cpu_peak_cache: dict[tuple, float] = {}


def pass_token_counts(token_kind: torch.Tensor, passes: Iterable[str]) -> Counter:
    """Tokens one step's passes computed over rows `token_kind` (B, L), as `training_flops` takes them.

    "student": every non-pad token with gradient ("tokens"), of which "clean" / "noisy" / "target" image
    tokens; "prefix": one target copy per noisy-copy token, forward only, over the student's keys/values
    (estimate_flops' "target" tokens); "full": a whole forward without gradient ("forward_*")."""
    kinds = image_token_counts(token_kind)
    tokens = int((token_kind != TokenKind.PAD).sum())
    counts: Counter = Counter()
    for p in passes:
        if p == "student":
            counts.update(tokens=tokens, **kinds)
        elif p == "prefix":
            counts.update(tokens=kinds["noisy"], target=kinds["noisy"])
        elif p == "full":
            counts.update(forward_tokens=tokens, **{f"forward_{k}": v for k, v in kinds.items()})
        else:
            raise ValueError(f"unknown pass {p!r}; expected one of {PASSES}")
    return counts


def training_flops(model, counts: Mapping[str, int], seq_len: int) -> float:
    """Model FLOPs of the passes behind `counts` (`pass_token_counts`, summed over any number of steps)."""
    image = lambda prefix: {k: counts.get(prefix + k, 0) for k in ("clean", "noisy", "target")}
    flops = model.estimate_flops(counts.get("tokens", 0), seq_len, image_tokens=image(""))
    if counts.get("forward_tokens", 0):
        flops += model.estimate_flops(counts["forward_tokens"], seq_len, training=False, image_tokens=image("forward_"))
    return flops


def measure_cpu_matmul_peak(dtype: torch.dtype = torch.bfloat16, size: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a (size x size) @ (size x size) matmul on this CPU, at the current
    thread count (cached per process)."""
    key = (dtype, size, torch.get_num_threads())
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
    dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # CPU autocast runs fp16 as bf16 (accel.py)
    return measure_cpu_matmul_peak(dtype), f"measured:cpu-{dtype}-{torch.get_num_threads()}threads"


def training_dtype(mixed_precision: str) -> torch.dtype:
    """The matmul dtype of a run with `run.mixed_precision` (fp16 on CPU runs as bf16, see accel.py)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak; NaN when either is unknown."""
    if seconds_per_step <= 0 or not peak_flops or math.isnan(peak_flops):
        return float("nan")
    return flops_per_step / seconds_per_step / peak_flops
