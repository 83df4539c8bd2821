"""Toy training run for the engine's resume and DDP tests (run as a script, optionally under torchrun).

A tiny MLP with dropout (and a frozen `teacher` submodule, to exercise the frozen path) regresses a fixed linear
target on a seeded synthetic dataset. The batch order depends only on (seed, epoch); under torchrun every rank takes
its slice of the same global batch, so 2 ranks x B/2 see exactly the samples of 1 rank x B.

Setting STMVL_TEST_EXIT_AFTER=k makes the process die with os._exit right after optimizer step k (after that
step's logging and checkpointing), like a killed job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

from stmvl.config import load_config
from stmvl.train.distributed import cleanup_distributed, get_rank, get_world_size
from stmvl.train.engine import Trainer

NUM_SAMPLES = 48
DIM = 8


class ToyModel(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.teacher = nn.Linear(DIM, DIM)
        self.teacher.requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(2 * DIM, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))
        self.temp = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x)
        return self.net(torch.cat([x, t], dim=-1)).squeeze(-1) * self.temp


class ToyTask:
    """Seeded regression data; each rank yields its slice of every global batch."""

    def __init__(self, seed: int, global_batch: int, dropout: float) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(NUM_SAMPLES, DIM, generator=g)
        self.y = self.x @ torch.randn(DIM, generator=g) + 0.1 * torch.randn(NUM_SAMPLES, generator=g)
        self.seed = seed
        self.global_batch = global_batch
        self.dropout = dropout
        self.steps_per_epoch = NUM_SAMPLES // global_batch

    def build_model(self) -> nn.Module:
        return ToyModel(self.dropout)

    def train_batches(self, epoch: int, start_step: int):
        order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        world, rank = get_world_size(), get_rank()
        local = self.global_batch // world
        for b in range(start_step, self.steps_per_epoch):
            idx = order[b * self.global_batch:(b + 1) * self.global_batch][rank * local:(rank + 1) * local]
            yield self.x[idx], self.y[idx]

    def train_step(self, model: nn.Module, batch, step: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = ((model(x).float() - y) ** 2).mean()
        return {"loss": loss}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--ckpt-every", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--grad-compression", default="none")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(None, [
        f"runtime.out_dir={args.run_dir}", f"optim.max_steps={args.steps}", "optim.warmup_steps=2",
        "optim.lr=0.05", f"optim.precision={args.precision}", "optim.clip_grad=5.0",
        f"runtime.ckpt_every_steps={args.ckpt_every}", "runtime.keep_last=2", "runtime.log_every=1",
        "runtime.tensorboard=false", "runtime.progress=false", "runtime.seed=7", "runtime.device=cpu",
        f"runtime.resume={'true' if args.resume else 'false'}", f"runtime.grad_compression={args.grad_compression}",
    ])
    exit_after = int(os.environ.get("STMVL_TEST_EXIT_AFTER", "0"))

    def die_after(trainer: Trainer, step: int, metrics: dict) -> None:
        if exit_after and step == exit_after:
            sys.stdout.flush()
            os._exit(17)

    summary = Trainer(cfg, ToyTask(cfg.runtime.seed, args.global_batch, args.dropout), callbacks=[die_after]).fit()
    if get_rank() == 0:
        print(json.dumps(summary))
    cleanup_distributed()  # ranks leave together; a live gloo group at exit can abort the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
