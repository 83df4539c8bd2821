"""Process-group helpers for `torchrun` (env:// rendezvous): rank info, device choice, reductions, gathers.

A run started without `torchrun` (no WORLD_SIZE in the environment, or WORLD_SIZE=1) is a plain single process and
never creates a process group, so every helper here also works there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_reduce_mean",
    "any_rank",
    "all_gather_object",
    "broadcast_object",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from exc


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto` -> the local GPU when CUDA is available, else CPU; `cuda` fails clearly when there is no GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"runtime.device: {device!r} is not one of auto, cpu, cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but torch.cuda.is_available() is False")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR/PORT for the rendezvous).

    backend `auto` picks NCCL for CUDA devices and gloo for CPU. Idempotent: a second call reuses the group.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError("runtime.backend is 'nccl' but the device is CPU: use 'gloo' or 'auto'")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def cleanup_distributed() -> None:
    """Wait for every rank, then destroy the process group (if there is one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average a dict of floats over ranks (same keys on every rank), in one collective."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: torch.Tensor) -> bool:
    """Whether a boolean 0-d tensor is True on any rank (one small all-reduce, then one read-back)."""
    if not is_distributed():
        return bool(flag)
    t = flag.detach().to(torch.float32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
