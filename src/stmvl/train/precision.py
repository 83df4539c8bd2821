"""Which floating-point precision a run computes in, chosen from what the hardware does natively.

`optim.precision: auto` (the default) picks:
- CUDA with bf16 (Ampere and later): bf16 autocast;
- CUDA without bf16: fp16 autocast with a gradient scaler;
- a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX tiles): bf16 autocast when a bf16 matmul measures faster
  than fp32 there, else fp32. Native is not always faster: on an AMD EPYC with AVX-512 BF16 (no AMX) the demo's
  pretraining step took 3.10 s in bf16 against 1.73 s in fp32 (benchmarks/bench_pretrain.py, 2026-12-02);
- any other CPU: fp32. Such CPUs emulate bf16 matmuls in software, about 50x slower than fp32 (measured 0.7 against
  38 GFLOP/s on an AVX2 machine), so bf16 would make a laptop demo crawl.

An explicit `bf16` is honoured, with a one-time warning that states the slowdown measured on this machine when the CPU
has no native bf16.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "bf16", "fp16", "fp32")
_warned: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """The resolved precision (`name`: bf16 | fp16 | fp32) and a sentence saying why it was chosen."""

    name: str
    reason: str


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16 on this CPU?, the instruction sets behind the answer)."""
    cpu = torch.cpu
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    capability = torch.backends.cpu.get_cpu_capability()
    if amx or avx512_bf16:
        units = " and ".join(n for n, ok in (("AMX", amx), ("AVX-512 BF16", avx512_bf16)) if ok)
        return True, f"CPU with {units} ({capability})"
    return False, f"CPU without AVX-512 BF16 or AMX ({capability}): bf16 would be emulated"


def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """Measured time of a size^3 bf16 matmul over the same fp32 matmul on this CPU (> 1 means bf16 is slower)."""

    def best_time(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: first calls pick kernels
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return best_time(torch.bfloat16) / max(best_time(torch.float32), 1e-9)


BF16_WINS_BELOW = 0.9  # bf16 / fp32 matmul time under which auto takes bf16 on a CPU with native bf16


@functools.cache
def measured_bf16_slowdown() -> float:
    """bf16_slowdown at a size like the models' matmuls (512^3), measured once per process."""
    return bf16_slowdown(size=512, repeats=3)


def resolve(precision: str, device: torch.device) -> Precision:
    """The precision to compute in for `optim.precision` on `device` (see the module docstring)."""
    if precision not in CHOICES:
        raise ValueError(f"optim.precision: {precision!r} is not one of {', '.join(CHOICES)}")
    if device.type == "cuda":
        has_bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        if precision == "auto":
            if has_bf16:
                return Precision("bf16", f"auto: {name} computes bf16 natively")
            return Precision("fp16", f"auto: {name} has no bf16, fp16 with a gradient scaler")
        if precision == "bf16" and not has_bf16:
            return Precision("fp16", f"bf16 requested but {name} has no bf16: fp16 with a gradient scaler")
        return Precision(precision, f"set explicitly on {name}")
    native, why = cpu_bf16_support()
    if precision == "auto":
        if not native:
            return Precision("fp32", f"auto: {why}")
        ratio = measured_bf16_slowdown()
        if ratio < BF16_WINS_BELOW:
            return Precision("bf16", f"auto: {why}, bf16 matmul {1 / ratio:.1f}x faster than fp32 here")
        return Precision("fp32", f"auto: {why}, but a bf16 matmul measured {ratio:.1f}x the time of fp32 here")
    if precision == "bf16" and not native and "bf16" not in _warned:
        _warned.add("bf16")
        log.warning("optim.precision is bf16 on a %s; a bf16 matmul measured %.0fx slower than fp32 here: "
                    "set optim.precision=auto (fp32 on this CPU) unless you need bf16 numerics", why, bf16_slowdown())
    return Precision(precision, f"set explicitly on a {why}")
