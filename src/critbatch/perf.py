"""Peak FLOP rates for MFU: vendor dense bf16 peaks of known GPUs, or a measured matmul rate."""

from __future__ import annotations

import os
import time

import torch

# dense bf16 peaks (no sparsity), FLOP/s
_GPU_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12),
              ("4090", 165e12), ("3090", 71e12))


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known accelerator; ``CRITBATCH_PEAK_FLOPS`` overrides; ``None`` otherwise."""
    env = os.environ.get("CRITBATCH_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _GPU_PEAKS:
        if key in name:
            return peak
    return None


def matmul_flops(device: str = "cpu", threads: int | None = None, n: int = 2048) -> float:
    """Measured FLOP/s of an n x n fp32 matmul (on ``threads`` CPU threads): the stand-in for a peak
    where no vendor figure applies (CPUs, unknown GPUs)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        reps = 5 if device == "cpu" else 50
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        return 2 * n**3 * reps / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
