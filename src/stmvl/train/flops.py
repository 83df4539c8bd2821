"""Counted work and model FLOPs utilisation (MFU): FLOPs of a step counted by torch's FlopCounterMode (matmuls,
convolutions and attention, forward and backward), against a matmul peak measured on the same device in the same
process, so that a number means the same on a laptop and on a GPU node."""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel that SDPA picks on a CPU: it would
# count CPU attention as 0 FLOPs. Counted here with torch's formulas for the CUDA flash kernel: forward two matmuls,
# backward five (the flash kernels recompute the scores; `layers.explicit_attention` keeps them, so its backward is
# counted as the four matmuls it runs)
def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that `fn()` runs (call it with the forward and the backward inside to count a training step)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=None)
def matmul_peak(precision: str, device_type: str = "cpu", device_index: int | None = None,
                size: int | None = None, repeats: int = 3) -> float:
    """Measured FLOP/s of a square matmul in `precision` (bf16 | fp16 | fp32) on the device, best of `repeats`.

    CPU: 1024^3 with the current intra-op threads (a 2048^3 matmul reaches a few percent more on 2 cores, but costs a
    second per run). CUDA: 8192^3. Cached per process: one measurement serves every step.
    """
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    n = size or (8192 if device.type == "cuda" else 1024)
    dtype = DTYPES[precision]
    # a private generator: measuring must not move the global RNG streams (exact resume depends on them)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: kernel choice, allocation
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the measured matmul peak (0..1, can exceed 1 only if the peak
    measurement was disturbed)."""
    return flops / max(seconds, 1e-12) / peak
