"""Per-step learning-rate schedule: linear warmup, then cosine decay to a floor, applied to every parameter group.

Each group keeps its own base lr (`initial_lr`), so a group created with its own lr (the STM lambda, the predictor)
keeps its ratio to the others at every step; the floor is `min_lr_ratio` times each group's base lr.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lr_factor", "WarmupCosineSchedule"]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, kind: str = "cosine") -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    Warmup rises linearly to 1 at step `warmup_steps - 1`; `cosine` then decays from 1 to `min_lr_ratio` at the last
    step; `constant` stays at 1 after warmup.
    """
    if kind not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule: {kind!r} is not one of cosine, constant")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every group's lr to `initial_lr * lr_factor(step)`; call `step()` after each optimizer step."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int,
        min_lr_ratio: float,
        kind: str = "cosine",
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.kind = kind
        self.last_step = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def factor(self) -> float:
        return lr_factor(self.last_step, self.total_steps, self.warmup_steps, self.min_lr_ratio, self.kind)

    def _apply(self) -> None:
        f = self.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f

    def step(self) -> None:
        """Advance to the next optimizer step and set its lr."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "kind": self.kind,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the shape of the schedule stays the one this run was configured with."""
        self.last_step = int(state["last_step"])
        self._apply()
