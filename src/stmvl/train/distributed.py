"""Process-group helpers for `torchrun` (env:// rendezvous): rank info, device choice, reductions, gathers.

A run started without `torchrun` (no WORLD_SIZE in the environment, or WORLD_SIZE=1) is a plain single process and
never creates a process group, so every helper here also works there.

Partial failure: the process group is created with an explicit timeout (`runtime.dist_timeout_s`), so a rank that hangs
or dies ends every other rank's next collective within that time. An error that one rank catches at an agreed point
(the data of a step, an evaluation) is shared with `raise_if_any_failed`: every rank learns which rank failed and why
and raises at once, instead of waiting in the next collective.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from stmvl.errors import UserError

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
    "any_rank_each",
    "all_gather_object",
    "broadcast_object",
    "resolve_device",
    "raise_if_any_failed",
    "RankFailedError",
    "RankUserError",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 900.0
_timeout_s = DEFAULT_TIMEOUT_S  # of the process group this process joined


class RankFailedError(RuntimeError):
    """Another rank failed with an internal error (its traceback is in that rank's output); this rank stops too."""


class RankUserError(UserError):
    """A rank hit a user error (bad data, the bad-sample bound); every rank stops with this same one-line message."""


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


def init_distributed(backend: str = "auto", device: str = "auto",
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR/PORT for the rendezvous).

    backend `auto` picks NCCL for CUDA devices and gloo for CPU. `timeout_s` bounds every collective: a rank that
    waits longer for the others fails (gloo raises; NCCL's watchdog aborts the process). Idempotent: a second call
    reuses the group.
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
    global _timeout_s
    if not dist.is_initialized():
        _timeout_s = float(timeout_s)
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://",
                                  "timeout": datetime.timedelta(seconds=float(timeout_s))}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def cleanup_distributed() -> None:
    """Wait for every rank, then destroy the process group (if there is one). Call it on the error paths too: a
    gloo group still alive at interpreter exit can abort the process (SIGABRT, "terminate called without an active
    exception") instead of letting it exit with its code. The same happens when an object that holds the group
    (a DDP wrapper left in a reference cycle by an exception) is freed only at exit, after a peer has gone: so
    garbage is collected first, while every rank is still there. The group is destroyed even when the barrier
    fails (a peer is gone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # see above: free what still holds the group while every peer is alive
    try:
        dist.barrier()
    finally:
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


def any_rank_each(flags: torch.Tensor) -> list[bool]:
    """For a boolean 1-d tensor: whether each entry is True on any rank (one all-reduce, one read-back)."""
    t = flags.detach().to(torch.float32).reshape(-1)
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


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


def _report(error: BaseException | None, user_errors: tuple[type[BaseException], ...]) -> tuple[bool, str, str] | None:
    """(is a user error, type name, message on one line) of a rank's error, as gathered from every rank."""
    if error is None:
        return None
    return isinstance(error, user_errors), type(error).__name__, " ".join(str(error).split())


def raise_if_any_failed(error: BaseException | None, where: str, device: torch.device | None = None,
                        counts: Sequence[float] = (),
                        user_errors: tuple[type[BaseException], ...] = (UserError,)) -> list[float]:
    """Collective: every rank reports whether it failed at `where` (`error`, or None); if any rank did, every rank
    raises now, naming the lowest failed rank. Returns `counts` summed over the ranks (in the same all-reduce).

    A user error (an instance of `user_errors`) there becomes the same one-line RankUserError on every rank, so the
    job ends with exit code 2 everywhere. An internal error is re-raised as is on the rank that had it (its
    traceback is the bug report) and as RankFailedError on the others. Without a process group the error is simply re-raised.
    Costs one small all-reduce when nothing failed; the messages are gathered only on failure. `device`: where the
    flags are reduced (default: the current CUDA device under NCCL, else the CPU).
    """
    if not is_distributed():
        if error is not None:
            raise error
        return [float(c) for c in counts]
    world, rank = dist.get_world_size(), dist.get_rank()
    if device is None:  # NCCL reduces only CUDA tensors
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    # one slot per rank (its failure flag) and the counts, summed in float64 (exact for counts below 2**53)
    flags = [1.0 if r == rank and error is not None else 0.0 for r in range(world)]
    values = torch.tensor(flags + [float(c) for c in counts], dtype=torch.float64, device=device)
    try:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        summed = values.tolist()
    except Exception as exc:  # noqa: BLE001 - gloo's timeout or a peer's closed connection, in its own words
        raise RankFailedError(f"rank {rank} got no answer from the other ranks at {where} within "
                              f"runtime.dist_timeout_s={_timeout_s:g}: a rank hung or died (see its output); "
                              f"{_report(exc, ())[2]}") from (error or exc)
    failed = [r for r, flag in enumerate(summed[:world]) if flag > 0]
    if not failed:
        return summed[world:]
    first = failed[0]
    is_user, kind, message = all_gather_object(_report(error, user_errors))[first]
    others = f" (and rank(s) {', '.join(map(str, failed[1:]))})" if len(failed) > 1 else ""
    if is_user:
        raise RankUserError(f"rank {first}{others} at {where}: {message}") from error
    if error is not None and not isinstance(error, user_errors):
        raise error
    raise RankFailedError(f"rank {first}{others} failed at {where} with {kind}: {message} (its traceback is in "
                          f"that rank's output); rank {rank} stops too") from error
