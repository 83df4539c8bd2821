"""Toy training run for the engine's resume and DDP tests (run as a script, optionally under torchrun).

A tiny MLP with dropout (and a frozen `teacher` submodule, to exercise the frozen path) regresses a fixed linear
target on a seeded synthetic dataset. The batch order depends only on (seed, epoch); under torchrun every rank takes
its slice of the same global batch, so 2 ranks x B/2 see exactly the samples of 1 rank x B.

Setting STMVL_TEST_EXIT_AFTER=k makes the process die with os._exit right after optimizer step k (after that
step's logging and checkpointing), like a killed job.

Partial failure (`--fail-rank R --fail-batch B --fail-kind K`): rank R's data path, at its B-th batch of the run,
- `error`: raises a RuntimeError (a decoder crash);
- `bound`: loads through a real BrokenMediaGuard whose every load fails, until it raises TooManyBadSamples;
- `hang`: sleeps for 10 minutes (a stuck file system);
- `count`: reports 2 failed loads per batch through the task's `bad_sample_counts()` hook (the others report
  none), so that the bound is reached on the sum over the ranks;
- `local`: the run's task is a StreamTask whose MixedBatchStream loads every sample through a real BrokenMediaGuard;
  on rank R every third load fails (rank R's own fraction is 1/3, the others' 0), so the bound (0.25, say) is over
  on rank R alone and under over all ranks.
Like the commands, the worker prints a user error as one line `stmvl: error: ...` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from torch import nn

from stmvl.config import load_config
from stmvl.data.mixing import MediaSource, MixedBatchStream
from stmvl.data.quarantine import BrokenMediaGuard, TooManyBadSamples
from stmvl.data.video import MediaError
from stmvl.errors import UserError
from stmvl.tasks.data import StreamTask
from stmvl.train.distributed import cleanup_distributed, get_rank, get_world_size
from stmvl.train.engine import Trainer
from stmvl.train.logging import console_logging

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

    def __init__(self, seed: int, global_batch: int, dropout: float, fail: tuple[int, int, str] | None = None) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(NUM_SAMPLES, DIM, generator=g)
        self.y = self.x @ torch.randn(DIM, generator=g) + 0.1 * torch.randn(NUM_SAMPLES, generator=g)
        self.seed = seed
        self.global_batch = global_batch
        self.dropout = dropout
        self.steps_per_epoch = NUM_SAMPLES // global_batch
        self.fail = fail
        self.batches_loaded = 0
        self.failed_loads = 0

    def build_model(self) -> nn.Module:
        return ToyModel(self.dropout)

    def train_batches(self, epoch: int, start_step: int):
        order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        world, rank = get_world_size(), get_rank()
        local = self.global_batch // world
        for b in range(start_step, self.steps_per_epoch):
            idx = order[b * self.global_batch:(b + 1) * self.global_batch][rank * local:(rank + 1) * local]
            self.batches_loaded += 1
            self._maybe_fail(rank)
            yield self.x[idx], self.y[idx]

    def _maybe_fail(self, rank: int) -> None:
        if self.fail is None:
            return
        fail_rank, fail_batch, kind = self.fail
        if rank != fail_rank or self.batches_loaded < fail_batch:
            return
        if kind == "error":
            raise RuntimeError(f"decoder crashed on rank {rank} (test)")
        if kind == "bound":
            guard = BrokenMediaGuard(None, "toy", max_bad_fraction=0.1)

            def broken(index: int):
                raise MediaError(f"clip{index}.mp4", "undecodable", "test")

            for index in range(100):
                guard.load(index, NUM_SAMPLES, broken)
        if kind == "hang":
            time.sleep(600)
        if kind == "count":
            self.failed_loads += 2

    def train_step(self, model: nn.Module, batch, step: int) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = ((model(x).float() - y) ** 2).mean()
        return {"loss": loss}


class CountingToyTask(ToyTask):
    """ToyTask that reports its media loads to the engine (the `bad_sample_counts` hook)."""

    def bad_sample_counts(self) -> tuple[int, int]:
        """(attempted, failed) media loads on this rank (the engine bounds their sum over the ranks)."""
        local = self.global_batch // get_world_size()
        return self.batches_loaded * local + self.failed_loads, self.failed_loads


class GuardedSamples(torch.utils.data.Dataset):
    """The toy samples, each loaded through a real BrokenMediaGuard; on ``fail_rank`` every third load fails."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, fails: bool, max_bad_fraction: float) -> None:
        self.x, self.y, self.fails, self.loads = x, y, fails, 0
        self.guard = BrokenMediaGuard(None, "toy", max_bad_fraction=max_bad_fraction)

    def __len__(self) -> int:
        return len(self.x)

    def _load(self, index: int) -> int:
        self.loads += 1
        if self.fails and self.loads % 3 == 0:
            raise MediaError(f"clip{index}.mp4", "undecodable", "test")
        return index

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        used, _ = self.guard.load(index, len(self), self._load)
        return {"x": self.x[used], "y": self.y[used]}


class GuardedStreamTask(StreamTask):
    """The toy regression through the tasks' own stream plumbing (StreamTask: a MixedBatchStream, its
    ``bad_sample_counts()`` hook and, under DDP, the bound left to the engine)."""

    def __init__(self, cfg, toy: ToyTask, fail_rank: int) -> None:
        self.cfg, self.toy, self.fail_rank = cfg, toy, fail_rank

    def setup(self, ctx) -> None:
        self.ctx = ctx  # no corpus to look for

    def build_model(self) -> nn.Module:
        return self.toy.build_model()

    def build_stream(self) -> MixedBatchStream:
        ctx = self.ctx
        samples = GuardedSamples(self.toy.x, self.toy.y, ctx.rank == self.fail_rank, self.cfg.data.max_bad_fraction)
        source = MediaSource(samples, self.toy.global_batch // ctx.world_size, torch.utils.data.default_collate)
        return MixedBatchStream({"toy": source}, seed=self.toy.seed, rank=ctx.rank, world_size=ctx.world_size)

    def train_step(self, model: nn.Module, batch, step: int) -> dict[str, torch.Tensor]:
        return self.toy.train_step(model, (batch["x"], batch["y"]), step)


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
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--dist-timeout", type=float, default=60.0)
    ap.add_argument("--fail-rank", type=int)
    ap.add_argument("--fail-batch", type=int, default=1)
    ap.add_argument("--fail-kind", choices=("error", "bound", "hang", "count", "local"), default="error")
    ap.add_argument("--max-bad-fraction", type=float, default=0.01)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    console_logging()
    cfg = load_config(None, [
        f"runtime.out_dir={args.run_dir}", f"optim.max_steps={args.steps}", "optim.warmup_steps=2",
        "optim.lr=0.05", f"optim.precision={args.precision}", "optim.clip_grad=5.0",
        f"runtime.ckpt_every_steps={args.ckpt_every}", "runtime.keep_last=2", "runtime.log_every=1",
        "runtime.tensorboard=false", "runtime.progress=false", "runtime.seed=7", "runtime.device=cpu",
        f"runtime.resume={'true' if args.resume else 'false'}", f"runtime.grad_compression={args.grad_compression}",
        f"runtime.overwrite={'true' if args.overwrite else 'false'}", f"runtime.dist_timeout_s={args.dist_timeout}",
        f"data.max_bad_fraction={args.max_bad_fraction}",
    ])
    exit_after = int(os.environ.get("STMVL_TEST_EXIT_AFTER", "0"))

    def die_after(trainer: Trainer, step: int, metrics: dict) -> None:
        if exit_after and step == exit_after:
            sys.stdout.flush()
            os._exit(17)

    fail = None if args.fail_rank is None else (args.fail_rank, args.fail_batch, args.fail_kind)
    task = (CountingToyTask if args.fail_kind == "count" else ToyTask)(cfg.runtime.seed, args.global_batch,
                                                                        args.dropout, fail)
    if args.fail_kind == "local":
        task = GuardedStreamTask(cfg, ToyTask(cfg.runtime.seed, args.global_batch, args.dropout), args.fail_rank)
    try:
        summary = Trainer(cfg, task, callbacks=[die_after]).fit()
    except (UserError, TooManyBadSamples) as exc:  # as the commands do: one line, exit code 2
        print(f"stmvl: error: {exc}", file=sys.stderr, flush=True)
        cleanup_distributed()  # on the error path too: a live gloo group at exit can abort the process
        return 2
    except Exception:  # noqa: BLE001 - as the commands do: the traceback (a bug report), exit code 1
        traceback.print_exc()
        sys.stderr.flush()
        cleanup_distributed()
        return 1
    if get_rank() == 0:
        print(json.dumps(summary))
    cleanup_distributed()  # ranks leave together; a live gloo group at exit can abort the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
