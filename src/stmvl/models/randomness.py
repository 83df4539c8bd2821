"""Counter-based randomness computed on the device: uniforms from a hash of (seed, step, stream, sample id,
element index).

A sample's mask, its MLM corruption and its VTM negative draw depend only on these numbers, never on the batch the
sample is in, the rank that holds it, the DataLoader workers or the device (integer arithmetic is exact on CPU and
GPU alike). Nothing is drawn on the host: no generator objects, no host-to-device copies, no synchronisation.

The hash is SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64 on every torch backend;
right shifts are made logical by masking).
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch
from torch import Tensor

# Streams keep the draws of different uses independent.
MASK, VTM_NEGATIVES, MLM = 0, 1, 2

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 value torch stores."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: Tensor) -> Tensor:
    """SplitMix64 finaliser: an int64 tensor -> well-mixed int64 tensor (elementwise)."""
    z = (z ^ _shift_right(z, 30)) * _signed(_M1)
    z = (z ^ _shift_right(z, 27)) * _signed(_M2)
    return z ^ _shift_right(z, 31)


def stream_key(seed: int, step: int, stream: int) -> int:
    """A 64-bit key of (seed, step, stream), computed on the host from Python ints (no tensor involved)."""
    digest = hashlib.blake2b(struct.pack("<qqq", int(seed), int(step), int(stream)), digest_size=8).digest()
    return _signed(int.from_bytes(digest, "little"))


def hash_uniform(seed: int, step: int, sample_ids: Tensor, shape: tuple[int, ...], stream: int = MASK) -> Tensor:
    """Uniforms in (0, 1), float32 ``[B, *shape]`` on ``sample_ids``' device.

    Element (b, i) is a function of (seed, step, stream, sample_ids[b], i) only. 23 bits of resolution, centred in
    their interval and exact in float32, so that neither 0 nor 1 occurs (safe under log).
    """
    ids = sample_ids.reshape(-1).to(torch.int64)
    count = math.prod(shape)
    key = mix64(ids * _signed(_GOLDEN) + stream_key(seed, step, stream))  # [B]
    counter = torch.arange(1, count + 1, device=ids.device, dtype=torch.int64) * _signed(_GOLDEN)
    bits = mix64(key.unsqueeze(1) + counter.unsqueeze(0))  # [B, count]
    top23 = _shift_right(bits, 41).to(torch.float32)  # (top23 + 0.5) needs 24 bits: exact in float32
    return ((top23 + 0.5) * (1.0 / (1 << 23))).view(ids.shape[0], *shape)


def hash_gumbel(seed: int, step: int, sample_ids: Tensor, shape: tuple[int, ...], stream: int = MASK) -> Tensor:
    """Standard Gumbel noise ``[B, *shape]`` from `hash_uniform`."""
    return -torch.log(-torch.log(hash_uniform(seed, step, sample_ids, shape, stream)))
