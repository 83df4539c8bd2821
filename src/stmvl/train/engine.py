"""The one training loop of stmvl: pretraining, finetuning and teacher training are `Task`s run by `Trainer`.

The engine owns everything that is the same for every task (docs/internals.md): seeding, device and process group, AdamW
with parameter groups, the per-step warmup + cosine schedule, autocast (bf16, or fp16 with a grad scaler),
gradient accumulation, clipping, the NaN/inf guard, DDP, checkpoints and resume, logging and evaluation calls.
The task owns the model, the data and the loss.

Exact resume: the data position (epoch, batch in epoch) and every RNG state are saved with each checkpoint; a task
whose batch order depends only on (seed, epoch) and whose randomness comes from the global RNGs reproduces, after
`runtime.resume`, the losses of an uninterrupted run bit for bit on CPU. A checkpoint that does not load is set aside
(renamed `unreadable-step_...`, with a warning) and the previous one is used.

A run folder belongs to one run: a fresh run (`runtime.resume` false) refuses a folder that holds another run's
checkpoints or metrics unless `runtime.overwrite` is set, which deletes them first.

Partial failure under DDP: the batches of each step and each evaluation are agreed on by every rank
(`distributed.raise_if_any_failed`): an exception on one rank ends every rank at once with a message naming it;
anything else that stalls a rank ends the others after `runtime.dist_timeout_s`.

Progress and notices go to the `stmvl.train` loggers; commands install a handler that prints them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stmvl.config import RunConfig, save_config
from stmvl.errors import UserError
from stmvl.train import distributed as D
from stmvl.train.checkpoint import (MODEL_FILE, STATE_FILE, list_checkpoints, load_checkpoint, load_weights,
                                    save_checkpoint, set_aside)
from stmvl.train.logging import METRICS_FILE, MetricsWriter, Progress, truncate_metrics
from stmvl.train.optim import build_optimizer, default_param_groups
from stmvl.train.flops import count_flops, matmul_peak, mfu
from stmvl.train.precision import resolve as resolve_run_precision
from stmvl.train.schedule import WarmupCosineSchedule

log = logging.getLogger(__name__)

__all__ = [
    "Task",
    "TrainContext",
    "Trainer",
    "NonFiniteLossError",
    "ResumeError",
    "RunFolderInUseError",
    "BadSampleBoundError",
    "GradScalerError",
    "unwrap_model",
    "resolve_precision",
    "seed_everything",
    "capture_rng_state",
    "restore_rng_state",
]


class ResumeError(UserError):
    """A resume that cannot continue the checkpoint's run: another cut of the epoch into batches (the global batch
    changed with the number of ranks), or a checkpoint that this rank cannot read. A user error: exit code 2."""


class NonFiniteLossError(UserError, RuntimeError):
    """Raised when more than `optim.max_nonfinite_steps` steps had a non-finite loss or gradient.

    A user error under the command rule (one line, exit 2): a run diverges because of its settings (learning rate,
    precision, data), and the message says which to change; a RuntimeError too, for callers that catch that."""


class GradScalerError(NonFiniteLossError):
    """fp16: the grad scaler skipped more than `optim.max_consecutive_skips` optimizer steps in a row (the gradients
    stay non-finite however far the scale is lowered)."""


class RunFolderInUseError(UserError):
    """A fresh run was pointed at a folder holding another run's checkpoints or metrics."""


class BadSampleBoundError(UserError):
    """More than data.max_bad_fraction of the media loads failed, counted over every rank."""


MIN_LOADS_FOR_BOUND = 20  # as the per-process guard: one early failure must not stop a run

# Left by a previous run in its folder; a fresh run refuses them unless runtime.overwrite deletes them.
RUN_ARTIFACTS = ("checkpoints", METRICS_FILE, "tensorboard")
# What a training checkpoint's state file must hold for a resume.
_STATE_KEYS = ("global_step", "epoch", "batch_in_epoch", "optimizer", "schedule", "scaler", "rng", "nonfinite_steps",
               "best")


@runtime_checkable
class Task(Protocol):
    """What the engine needs from a task. Required members:

    - `build_model() -> nn.Module`: the full model on CPU (the engine moves it to the device).
    - `steps_per_epoch`: int (attribute or property), the number of batches `train_batches` yields per epoch on
      this rank; with `optim.grad_accum = A` an epoch has ceil(steps_per_epoch / A) optimizer steps.
    - `train_batches(epoch, start_step) -> Iterable`: the epoch's batches starting at batch index `start_step`
      (> 0 after a resume). For exact resume the order must depend only on (seed, epoch).
    - `train_step(model, batch, step) -> dict[str, Tensor]`: forward pass under the engine's autocast; returns
      scalar tensors, including the `"loss"` to minimise (the engine does backward and the optimizer step). Call
      `model(...)` (the DDP wrapper's forward) so that gradients are synchronised; `unwrap_model(model)` gives the
      plain module for other methods.

    Optional hooks, used when present:

    - `setup(ctx: TrainContext)`: called before `build_model`, with device, ranks, precision and flags
      (grad_checkpointing, compile); `ctx.total_steps` is filled in before the first step.
    - `frozen_submodules`: names of top-level submodules kept out of DDP, the optimizer and train mode (e.g.
      `("teacher",)`). Default: every child module whose parameters all have requires_grad False.
    - `param_groups(model) -> list[dict]`: optimizer groups (`params`, optional `lr` or `lr_scale`,
      `weight_decay`, `name`). Default: `default_param_groups` (no decay on biases, norms, 1-D, temp, pos*).
    - `evaluate(model, epoch) -> dict[str, float]`: called on every rank (model unwrapped, eval mode, no_grad).
    - `checkpoint_state_dict(model) -> dict[str, Tensor]`: the weights to save (default: the full state dict;
      submodules left out must be frozen ones, they are then not required when loading).
    - `compile_model(model) -> nn.Module`: how to compile when runtime.compile is on (default torch.compile).
    - `state_dict() -> dict` / `load_state_dict(dict)`: extra task state saved with checkpoints.
    - `prepare(model)`: one-off work before the first step (model unwrapped, on the device, no_grad, under the
      training autocast), e.g. encoding every caption of a frozen text tower once; its FLOPs are counted into the
      run's training FLOPs, so that the steps after it all cost the same and one counted step per kind stays exact.
    """

    def build_model(self) -> nn.Module: ...

    def train_batches(self, epoch: int, start_step: int) -> Iterable[Any]: ...

    def train_step(self, model: nn.Module, batch: Any, step: int) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainContext:
    """What a task may know about the run; handed to `task.setup(ctx)`."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    precision: str  # resolved: bf16 | fp16 | fp32
    grad_checkpointing: bool
    compile: bool
    total_steps: int = 0
    step: int = 0  # optimizer steps done, set by the engine before each evaluation
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def finished(self) -> bool:
        """Whether the run has done all its steps (an evaluation now is the run's final one)."""
        return self.step >= self.total_steps

    def autocast(self) -> contextlib.AbstractContextManager:
        """The engine's autocast context (for evaluation code that wants the training precision)."""
        return _autocast(self.device, self.precision)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision name (bf16 | fp16 | fp32) a run computes in; see stmvl.train.precision for the rules."""
    return resolve_run_precision(precision, device).name


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    return out


StepCallback = Callable[["Trainer", int, dict[str, float]], None]


class Trainer:
    """Runs `task` under `cfg` (optim / runtime / eval sections). `fit()` trains to the end and returns a summary.

    `callbacks` are called on every rank after each optimizer step (after logging and checkpointing) as
    `callback(trainer, global_step, step_metrics)`; device values in step_metrics (losses, grad_norm) are 0-d tensors,
    so that a callback that does not read them costs no synchronisation.
    """

    def __init__(self, cfg: RunConfig, task: Task, run_dir: str | Path | None = None,
                 callbacks: Iterable[StepCallback] = ()) -> None:
        for member in ("build_model", "train_batches", "train_step", "steps_per_epoch"):
            # look on the class too: a lazy property (e.g. built in setup()) must not be evaluated here
            if not (hasattr(type(task), member) or member in vars(task)):
                raise TypeError(f"task {type(task).__name__} lacks required member {member!r} (see stmvl.train.Task)")
        self.cfg = cfg
        self.task = task
        self.run_dir = Path(run_dir if run_dir is not None else cfg.runtime.out_dir)
        self.callbacks = list(callbacks)
        self.global_step = 0
        self.nonfinite_steps = 0
        self.skipped_steps = 0  # optimizer steps that left the weights unchanged (non-finite, or the fp16 scaler's)
        self.consecutive_skips = 0  # fp16: steps the grad scaler skipped in a row
        self.step_flops: dict[tuple, int] = {}  # FLOPs of one optimizer step per step kind (see _step_kind)
        # work done by this rank in this process (runtime.count_flops): training steps and evaluations
        self.flops: dict[str, int] = {"train": 0, "eval": 0}
        self.best: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        rt, o = self.cfg.runtime, self.cfg.optim
        if rt.threads:
            torch.set_num_threads(rt.threads)
        self.dist = D.init_distributed(rt.backend, rt.device, rt.dist_timeout_s)
        self.device = self.dist.device
        self._claim_run_dir()
        chosen = resolve_run_precision(o.precision, self.device)
        self.precision, self.precision_reason = chosen.name, chosen.reason
        if self.dist.is_main:
            log.info("[engine] precision %s (%s)", self.precision, chosen.reason)
        self.ctx = TrainContext(
            cfg=self.cfg, run_dir=self.run_dir, device=self.device, rank=self.dist.rank,
            world_size=self.dist.world_size, local_rank=self.dist.local_rank, precision=self.precision,
            grad_checkpointing=rt.grad_checkpointing, compile=rt.compile,
        )
        # same seed on every rank while building, so that every rank starts from identical weights
        seed_everything(rt.seed)
        if hasattr(self.task, "setup"):
            self.task.setup(self.ctx)
        model = self.task.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"task.build_model() returned {type(model).__name__}, expected torch.nn.Module")
        self.model = model.to(self.device)
        self.frozen = self._frozen_names()
        for name in self.frozen:
            self.model.get_submodule(name).requires_grad_(False)
        seed_everything(rt.seed + self.dist.rank)  # per-rank randomness (dropout, masks) from here on
        self._plan_steps()
        # the fp16 grad scaler unscales the gradients itself before the step; keep it on the per-parameter AdamW
        self.optimizer = build_optimizer(self._param_groups(), o.lr, o.weight_decay, o.betas, o.eps,
                                         fused=self.precision != "fp16")
        self.schedule = WarmupCosineSchedule(self.optimizer, self.total_steps, self.warmup_steps, o.min_lr_ratio,
                                             o.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.epoch, self.batch_in_epoch = 0, 0
        resumed = rt.resume and self._resume()
        if not resumed and rt.init_from:
            self._init_weights(rt.init_from)
        self._trainable = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.train_model = self._wrap(self.model)
        self.writer = MetricsWriter(self.run_dir, rt.tensorboard) if self.dist.is_main else None
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml",
                        header=f"optim.precision {self.cfg.optim.precision} -> {self.precision}: {self.precision_reason}")

    def _previous_run(self) -> list[str]:
        """What another run left in the run folder: checkpoint folders (complete or not) and a metrics file."""
        found = []
        ckpts = self.run_dir / "checkpoints"
        if ckpts.is_dir():
            names = sorted(p.name for p in ckpts.iterdir() if "step_" in p.name)
            if names:
                found.append(f"{len(names)} checkpoint folder(s) under checkpoints/, newest {names[-1]}")
        metrics = self.run_dir / METRICS_FILE
        if metrics.is_file() and metrics.stat().st_size > 0:
            found.append(METRICS_FILE)
        return found

    def _claim_run_dir(self) -> None:
        """A fresh run must not mix with another run's checkpoints and metrics (keep-last-N would prune the new ones,
        a later resume would pick the old ones): refuse, or with runtime.overwrite delete them first. Rank 0 decides
        for every rank."""
        rt = self.cfg.runtime
        error: Exception | None = None
        if self.dist.is_main and not rt.resume:
            previous = self._previous_run()
            if previous and rt.overwrite:
                log.warning("[engine] runtime.overwrite: deleting the previous run's %s in %s", "; ".join(previous),
                            self.run_dir)
                self._clear_previous_run()
            elif previous:
                error = RunFolderInUseError(
                    f"{self.run_dir} already holds another run ({'; '.join(previous)}): continue it with --resume "
                    "(runtime.resume=true), choose a new folder with --out, or pass --overwrite "
                    "(runtime.overwrite=true) to delete its checkpoints and metrics first")
        D.raise_if_any_failed(error, "the run folder check", self.device)

    def _clear_previous_run(self) -> None:
        import shutil

        for name in RUN_ARTIFACTS:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _frozen_names(self) -> tuple[str, ...]:
        declared = getattr(self.task, "frozen_submodules", None)
        if callable(declared):
            declared = declared()
        if declared is not None:
            names = tuple(declared)
            for name in names:
                try:
                    self.model.get_submodule(name)
                except AttributeError as exc:
                    children = ", ".join(n for n, _ in self.model.named_children())
                    raise ValueError(f"task.frozen_submodules names {name!r}, not a submodule; children: "
                                     f"{children}") from exc
            return names
        frozen = []
        for name, child in self.model.named_children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                frozen.append(name)
        return tuple(frozen)

    def _plan_steps(self) -> None:
        o = self.cfg.optim
        batches = getattr(self.task, "steps_per_epoch")
        batches = int(batches() if callable(batches) else batches)
        if batches < 1:
            raise ValueError(f"task.steps_per_epoch is {batches}: the training data yields no batch")
        self.batches_per_epoch = batches
        self.steps_per_epoch = math.ceil(batches / o.grad_accum)
        if o.max_steps is not None:
            self.total_steps = o.max_steps
        else:
            self.total_steps = o.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        if o.warmup_steps is not None:
            self.warmup_steps = o.warmup_steps
        else:
            self.warmup_steps = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.warmup_steps = min(self.warmup_steps, self.total_steps)
        self.ctx.total_steps = self.total_steps

    def _param_groups(self) -> list[dict[str, Any]]:
        o = self.cfg.optim
        if not hasattr(self.task, "param_groups"):
            return default_param_groups(self.model, o.weight_decay, o.no_decay_names, exclude=self.frozen)
        groups = self.task.param_groups(self.model)
        frozen_ids = {id(p) for n in self.frozen for p in self.model.get_submodule(n).parameters()}
        for g in groups:
            if any(id(p) in frozen_ids for p in g["params"]):
                raise ValueError(f"task.param_groups put a parameter of a frozen submodule {self.frozen} into group "
                                 f"{g.get('name', '?')}")
        return groups

    def _wrap(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.dist.world_size > 1:
            ignore = [f"{n}.{k}" for n in self.frozen for k in model.get_submodule(n).state_dict()]
            # frozen submodules (the teacher) are neither broadcast nor all-reduced by DDP
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
            wrapped = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.cfg.runtime.find_unused_parameters,
            )
            self._register_grad_compression(wrapped)
        if self.cfg.runtime.compile:
            compile_fn = getattr(self.task, "compile_model", None) or torch.compile
            wrapped = compile_fn(wrapped)
        return wrapped

    def _register_grad_compression(self, ddp: DistributedDataParallel) -> None:
        """runtime.grad_compression: all-reduce gradient buckets as bf16 / fp16 (torch's built-in DDP hooks)."""
        kind = self.cfg.runtime.grad_compression
        if kind == "none":
            return
        if kind == "bf16" and self.dist.backend != "nccl":
            raise UserError(f"runtime.grad_compression=bf16 needs the NCCL backend (GPUs); this run uses "
                            f"{self.dist.backend}: use runtime.grad_compression=fp16 or none")
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hook = default_hooks.bf16_compress_hook if kind == "bf16" else default_hooks.fp16_compress_hook
        ddp.register_comm_hook(state=None, hook=hook)
        if self.dist.is_main:
            log.info("[engine] DDP gradients are all-reduced in %s", kind)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _train_state(self) -> dict[str, Any]:
        task_state = self.task.state_dict() if hasattr(self.task, "state_dict") else {}
        return {
            "version": 1,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": D.all_gather_object(capture_rng_state()),
            "world_size": self.dist.world_size,
            "batches_per_epoch": self.batches_per_epoch,
            "grad_accum": self.cfg.optim.grad_accum,
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "best": dict(self.best),
            "task": task_state,
        }

    def _model_state(self) -> dict[str, torch.Tensor]:
        hook = getattr(self.task, "checkpoint_state_dict", None)
        return hook(self.model) if hook else self.model.state_dict()

    def save(self) -> Path | None:
        """Write a checkpoint of the current position (collective: call on every rank)."""
        train_state = self._train_state()  # gathers RNG states: every rank takes part
        path = None
        if self.dist.is_main:
            protect = (self.best["checkpoint"],) if self.best.get("checkpoint") else ()
            path = save_checkpoint(self.run_dir, self.global_step, self._model_state(), train_state,
                                   self.cfg.runtime.keep_last, protect=protect)
        D.barrier()
        self.last_checkpoint = path or self.run_dir / "checkpoints" / f"step_{self.global_step:08d}"
        return self.last_checkpoint

    def _load_model_state(self, state: dict[str, torch.Tensor], source: Path) -> None:
        # non-strict only to apply our own rule: frozen submodules (kept out of checkpoints) may be missing,
        # anything else missing or unexpected is an error that names the keys
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        allowed = tuple(f"{n}." for n in self.frozen)
        missing = [k for k in missing if not k.startswith(allowed)]
        if missing or unexpected:
            raise RuntimeError(f"weights in {source} do not match the model: missing {missing[:10]} "
                               f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")

    def _newest_loadable_checkpoint(self) -> tuple[Path, dict, dict] | None:
        """(folder, model state, train state) of the newest checkpoint that loads, or None when there is none.

        A newer checkpoint that does not load (truncated weights, a torn state file, keys missing) is skipped with a
        warning naming it and why, and once an older one loads, set aside as `unreadable-step_...` so that neither the
        next resume nor keep-last-N mistakes it for part of the run. When none loads: ResumeError listing them all.
        """
        skipped: list[tuple[Path, str]] = []
        for _, folder in reversed(list_checkpoints(self.run_dir)):
            try:
                model_state, st = load_checkpoint(folder, map_location="cpu")
                missing = [k for k in _STATE_KEYS if k not in st]
                if missing:
                    raise UserError(f"{folder / STATE_FILE}: no {', '.join(missing)} (not a training checkpoint)")
            except UserError as exc:  # CorruptWeightsError, CorruptCheckpointError, the check above
                reason = " ".join(str(exc).split())
                log.warning("[engine] resume: skipping checkpoint %s, it does not load: %s", folder.name, reason)
                skipped.append((folder, reason))
                continue
            for bad, _ in skipped:
                moved = set_aside(bad)
                log.warning("[engine] resume: %s set aside as %s; resuming from the older %s", bad.name, moved.name,
                            folder.name)
            return folder, model_state, st
        if skipped:
            listing = "; ".join(f"{folder.name}: {reason}" for folder, reason in skipped)
            raise ResumeError(f"cannot resume from {self.run_dir}: no checkpoint loads ({listing}); start a new run "
                              "with a new --out, or without --resume and with --overwrite to discard them")
        return None

    def _chosen_checkpoint(self) -> tuple[Path, dict, dict] | None:
        """Rank 0's newest loadable checkpoint, loaded on every rank (node-local folders could otherwise disagree)."""
        found, error = None, None
        if self.dist.is_main:
            try:
                found = self._newest_loadable_checkpoint()
            except UserError as exc:
                error = exc
        D.raise_if_any_failed(error, "choosing the checkpoint to resume from", self.device)
        chosen = D.broadcast_object(None if found is None else str(found[0]))
        if chosen is None:
            return None
        if found is not None:
            return found
        path, loaded = Path(chosen), None
        try:
            if not (path / STATE_FILE).is_file():
                raise ResumeError(f"rank {self.dist.rank} cannot read checkpoint {path} that rank 0 resumes from: "
                                  "every node must see the same run folder (a shared file system, or copy it to "
                                  "each node)")
            loaded = (path, *load_checkpoint(path, map_location="cpu"))
        except UserError as exc:
            error = exc
        D.raise_if_any_failed(error, f"loading checkpoint {path.name}", self.device)
        return loaded

    def _check_resume_geometry(self, st: dict[str, Any], ckpt: Path) -> None:
        """Refuse a resume whose epoch is cut into other batches than the checkpoint's (see ResumeError)."""
        old_world = int(st.get("world_size", self.dist.world_size))
        old_batches = st.get("batches_per_epoch")
        same = old_batches == self.batches_per_epoch if old_batches is not None else old_world == self.dist.world_size
        same = same and int(st.get("grad_accum", self.cfg.optim.grad_accum)) == self.cfg.optim.grad_accum
        if not same:
            raise ResumeError(
                f"cannot resume from {ckpt}: it was written by {old_world} rank(s) with {old_batches} batches per "
                f"epoch per rank (grad_accum {st.get('grad_accum', '?')}); this run has {self.dist.world_size} "
                f"rank(s) and {self.batches_per_epoch} (grad_accum {self.cfg.optim.grad_accum}), so its data "
                "position and schedule would not line up. Keep the global batch (per-rank batch x ranks x "
                "grad_accum) of the checkpoint, or start a new run with runtime.init_from pointing at it")

    def _resume(self) -> bool:
        chosen = self._chosen_checkpoint()
        if chosen is None:
            if self.dist.is_main:
                # metrics of an attempt that died before its first checkpoint would mix with this run's
                truncate_metrics(self.run_dir, 0)
                log.info("[engine] resume: no checkpoint in %s, starting from scratch", self.run_dir / "checkpoints")
            return False
        ckpt, model_state, st = chosen
        self._check_resume_geometry(st, ckpt)
        self._load_model_state(model_state, ckpt)
        self.optimizer.load_state_dict(st["optimizer"])
        # the saved groups carry the kernel choice of the run that wrote them; this run's precision decides it
        for group in self.optimizer.param_groups:
            group["fused"] = self.optimizer.defaults["fused"]
        self.schedule.load_state_dict(st["schedule"])
        self.scaler.load_state_dict(st["scaler"])
        self.global_step, self.epoch, self.batch_in_epoch = st["global_step"], st["epoch"], st["batch_in_epoch"]
        self.nonfinite_steps = st["nonfinite_steps"]
        self.skipped_steps = int(st.get("skipped_steps", 0))  # absent in checkpoints written before it was counted
        self.consecutive_skips = int(st.get("consecutive_skips", 0))
        self.best = dict(st["best"])
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(st["task"])
        rng = st["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        else:
            # Same global batch on another number of ranks: every optimizer step still sees the same samples (each
            # rank takes every world_size-th index of the epoch's permutation) and the schedule is unchanged, but the
            # per-rank RNG streams (dropout) cannot be continued; reseed them reproducibly.
            seed_everything(self.cfg.runtime.seed + self.dist.rank + 1000003 * self.global_step)
            if self.dist.is_main:
                log.warning("[engine] resume: checkpoint has %d ranks, run has %d: same samples per step and "
                            "schedule; RNG streams reseeded (dropout draws differ)", len(rng), self.dist.world_size)
        if self.dist.is_main:
            truncate_metrics(self.run_dir, self.global_step)
            log.info("[engine] resumed from %s (step %d, epoch %d, batch %d)", ckpt, self.global_step, self.epoch + 1,
                     self.batch_in_epoch)
        return True

    def _init_weights(self, source: str) -> None:
        path = Path(source)
        if path.is_file():
            state = load_weights(path)
        elif (path / MODEL_FILE).is_file():
            state = load_weights(path / MODEL_FILE)
        else:
            state, _ = load_checkpoint(path)
        self._load_model_state(state, path)

    # ---------------------------------------------------------------------------------------------- training
    def _set_train_mode(self) -> None:
        self.train_model.train()
        for name in self.frozen:
            self.model.get_submodule(name).eval()

    def _micro_batches(self, it: Iterator[Any], count: int) -> list[Any]:
        out = []
        for _ in range(count):
            try:
                out.append(next(it))
            except StopIteration:
                raise RuntimeError(
                    f"task.train_batches(epoch={self.epoch}) ran out of batches before steps_per_epoch="
                    f"{self.batches_per_epoch}") from None
        return out

    def _agreed_micro_batches(self, it: Iterator[Any], count: int) -> list[Any]:
        """The next step's micro-batches, agreed by every rank: an exception in one rank's data path (a decoder
        crash, the bad-sample bound) stops every rank now with a message naming it, instead of leaving the healthy
        ranks blocked in the step's gradient all-reduce. The task's bad-sample counts (optional hook
        `bad_sample_counts() -> (loads attempted, loads failed)` on this rank, its loader workers included) are
        summed in the same all-reduce and bounded over the whole run."""
        from stmvl.data.quarantine import TooManyBadSamples

        micro, error = [], None
        try:
            micro = self._micro_batches(it, count)
        except Exception as exc:  # noqa: BLE001 - every kind of failure must reach the other ranks
            error = exc
        hook = getattr(self.task, "bad_sample_counts", None)
        counts = tuple(hook()) if hook is not None and error is None else (0, 0)
        loads, failures = D.raise_if_any_failed(error, f"step {self.global_step + 1} (loading its batches)",
                                                self.device, counts=counts,
                                                user_errors=(UserError, TooManyBadSamples))
        if hook is not None:
            self._check_bad_samples(int(loads), int(failures))
        return micro

    def _check_bad_samples(self, loads: int, failures: int) -> None:
        """data.max_bad_fraction over every rank's loads (the same totals, so the same decision, on every rank)."""
        bound = self.cfg.data.max_bad_fraction
        if loads >= MIN_LOADS_FOR_BOUND and failures / loads > bound:
            raise BadSampleBoundError(
                f"{failures} of {loads} media loads failed over {self.dist.world_size} rank(s) "
                f"({failures / loads:.1%} > data.max_bad_fraction {bound:.1%}); the broken files are listed in "
                f"{self.run_dir / 'quarantine.jsonl'}; run `stmvl check-data` on the annotations")

    def _forward_backward(self, batches: list[Any]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        ddp = isinstance(unwrap_ddp(self.train_model), DistributedDataParallel)
        touch = ddp and not self.cfg.runtime.find_unused_parameters
        idle_in_all: set[int] | None = None
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if (last or not ddp) else unwrap_ddp(self.train_model).no_sync()
            with sync:
                with _autocast(self.device, self.precision):
                    out = self.task.train_step(self.train_model, batch, self.global_step)
                loss = self._check_outputs(out)
                if touch:
                    idle = idle_parameters(loss, self._trainable)
                    idle_in_all = set(map(id, idle)) if idle_in_all is None else idle_in_all & set(map(id, idle))
                    loss = touch_parameters(loss, idle)
                scaled = loss.float() / len(batches)
                if self.scaler.is_enabled():
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            for key, value in out.items():
                v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                sums[key] = sums.get(key, 0.0) + v
        if idle_in_all:
            # the zero touch only served DDP's bookkeeping: a parameter no micro-batch used keeps no gradient, so
            # AdamW skips it (no momentum step, no decay) exactly as in a one-process run
            for p in self._trainable:
                if id(p) in idle_in_all:
                    p.grad = None
        return {k: v / len(batches) for k, v in sums.items()}

    @staticmethod
    def _check_outputs(out: Any) -> torch.Tensor:
        if not isinstance(out, dict) or "loss" not in out:
            raise TypeError(f"task.train_step must return a dict with a 'loss' tensor, got {type(out).__name__}"
                            + (f" with keys {sorted(out)}" if isinstance(out, dict) else ""))
        loss = out["loss"]
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError("task.train_step()['loss'] must be a scalar tensor that requires grad")
        return loss

    def _grad_norm(self) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.zeros(())
        clip = self.cfg.optim.clip_grad
        if clip:
            return torch.nn.utils.clip_grad_norm_(params, clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def _optimizer_step(self, batches: list[Any]) -> dict[str, Any]:
        """Forward, backward and the optimizer update of one step. Returns its metrics: the losses and the gradient
        norm as 0-d tensors on the device (read at logging time, so a step waits for the device only once: for the
        skip decision), the learning rate and `skipped` as floats."""
        self.optimizer.zero_grad(set_to_none=True)
        means = self._forward_backward(batches)
        scaling = self.scaler.is_enabled()
        if scaling:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._grad_norm()
        loss = means["loss"].reshape(())
        # the one read-back of a step, agreed by every rank: a non-finite loss, and non-finite gradients (under fp16
        # the scaler's overflow: the inf/nan it finds in the unscaled gradients make their norm non-finite)
        bad_loss, bad_grads = D.any_rank_each(torch.stack([~torch.isfinite(loss),
                                                           ~torch.isfinite(grad_norm.to(loss.device))]))
        lr = self.optimizer.param_groups[0]["lr"]
        if bad_loss or (bad_grads and not scaling):
            self._count_nonfinite(float(loss), float(grad_norm))
            if scaling:
                self.scaler.update()
            skipped = True
        elif scaling:
            self.scaler.step(self.optimizer)  # skips the update itself when the gradients overflowed
            self.scaler.update()  # halves the scale after an overflow
            skipped = bad_grads
            self._count_scaler_skip(bad_grads)
        else:
            self.optimizer.step()
            skipped = False
        self.skipped_steps += int(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        metrics: dict[str, Any] = {k: v.detach() for k, v in means.items()}
        metrics.update(lr=lr, grad_norm=grad_norm.detach(), skipped=float(skipped))
        return metrics

    def _count_scaler_skip(self, skipped: bool) -> None:
        """fp16: the scaler skips a step whose gradients overflowed and halves its scale; a few skips while it finds
        its scale are normal, a long series means the gradients are non-finite at any scale: stop instead of halving
        the scale forever."""
        if not skipped:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        limit = self.cfg.optim.max_consecutive_skips
        log.debug("[engine] step %d: fp16 gradients overflowed, the grad scaler skipped it (%d in a row)",
                  self.global_step + 1, self.consecutive_skips)
        if self.consecutive_skips > limit:
            raise GradScalerError(
                f"the fp16 grad scaler skipped {self.consecutive_skips} optimizer steps in a row (steps "
                f"{self.global_step + 2 - self.consecutive_skips} to {self.global_step + 1}: non-finite gradients, "
                f"scale now {self.scaler.get_scale():.3g}), more than optim.max_consecutive_skips={limit}: lower "
                "optim.lr, set optim.clip_grad, use optim.precision=bf16 or fp32, or check the data")

    @staticmethod
    def _step_kind(batches: list[Any]) -> tuple:
        """What decides a step's FLOPs besides the config: the media type (and shape) of each micro-batch."""
        kinds = []
        for batch in batches:
            video = batch.get("video") if isinstance(batch, dict) else None
            kinds.append((batch.get("media") if isinstance(batch, dict) else None,
                          tuple(video.shape) if isinstance(video, torch.Tensor) else None))
        return tuple(kinds)

    def _counted_step(self, batches: list[Any]) -> tuple[dict[str, Any], int, bool]:
        """One optimizer step: (metrics, its FLOPs (0 when not counted), whether it ran under the counter). The first
        step of each kind runs under FlopCounterMode (runtime.count_flops); later ones reuse that count."""
        if not self.cfg.runtime.count_flops:
            return self._optimizer_step(batches), 0, False
        kind = self._step_kind(batches)
        if kind in self.step_flops:
            return self._optimizer_step(batches), self.step_flops[kind], False
        box: dict[str, dict[str, Any]] = {}
        self.step_flops[kind] = count_flops(lambda: box.update(metrics=self._optimizer_step(batches)))
        return box["metrics"], self.step_flops[kind], True

    def _rates(self, batches: list[Any], seconds: float, flops: int) -> dict[str, float]:
        """clips/s over all ranks, and MFU (this rank's counted FLOPs over the measured matmul peak)."""
        out: dict[str, float] = {}
        clips = sum(b["video"].shape[0] for b in batches if isinstance(b, dict) and "video" in b)
        if clips:
            out["clips_per_s"] = clips * self.dist.world_size / max(seconds, 1e-12)
        if flops:
            peak = matmul_peak(self.precision, self.device.type, self.device.index)
            out["tflops_per_s"] = flops / max(seconds, 1e-12) / 1e12
            out["mfu"] = mfu(flops, seconds, peak)
        return out

    def _count_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.nonfinite_steps += 1
        limit = self.cfg.optim.max_nonfinite_steps
        if self.dist.is_main:
            log.warning("[engine] step %d: non-finite loss %s / grad norm %s: step skipped (%d of at most %d)",
                        self.global_step + 1, loss, grad_norm, self.nonfinite_steps, limit)
        if self.nonfinite_steps > limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_steps} optimizer steps had a non-finite loss or gradient (last: step "
                f"{self.global_step + 1}, loss {loss}, grad norm {grad_norm}), more than "
                f"optim.max_nonfinite_steps={limit}: lower optim.lr, set optim.clip_grad, or check the data")

    def _log(self, window: dict[str, list[Any]], progress: Progress) -> None:
        # `skipped` is a count over the window (identical on all ranks), everything else a mean; device values are
        # read here, once per logging window
        window = {k: [float(x) for x in v] for k, v in window.items()}
        means = {k: sum(v) if k == "skipped" else sum(v) / len(v) for k, v in window.items()}
        means = D.all_reduce_mean(means, self.device)
        if self.dist.is_main:
            rate = progress.log(self.global_step, self.epoch, self.num_epochs,
                                {k: v for k, v in means.items()
                                 if k in ("loss", "lr", "clips_per_s", "mfu") or k.startswith("loss_")})
            self.writer.write(self.global_step, {"epoch": self.epoch, **means, "steps_per_s": rate,
                                                 "skipped_steps": self.skipped_steps})

    def _evaluate(self, epoch: int) -> dict[str, Any]:
        evaluate = getattr(self.task, "evaluate", None)
        if evaluate is None:
            return {}
        self.model.eval()
        self.ctx.step = self.global_step
        results, error = {}, None
        try:
            with torch.no_grad():
                if self.cfg.runtime.count_flops:
                    box: dict[str, Any] = {}
                    self.flops["eval"] += count_flops(lambda: box.update(results=evaluate(self.model, epoch)))
                    results = _flatten(box["results"] or {})
                else:
                    results = _flatten(evaluate(self.model, epoch) or {})
        except Exception as exc:  # noqa: BLE001 - a failure on one rank must stop all of them together
            error = exc
        # agreed after the evaluation: a rank that failed between the evaluator's own collectives reaches this point
        # while the others wait in one of those, and runtime.dist_timeout_s bounds that wait
        D.raise_if_any_failed(error, f"the evaluation after epoch {epoch + 1}", self.device)
        self._set_train_mode()
        self.last_eval = results
        if self.dist.is_main:
            self.writer.write(self.global_step, {"epoch": epoch, **results}, split="eval")
        key = self.cfg.eval.best_key
        if key:
            if key not in results:
                raise KeyError(f"eval.best_key {key!r} is not among the evaluation results: {sorted(results)}")
            if not self.best or results[key] > self.best["value"]:
                name = f"step_{self.global_step:08d}"
                self.best = {"key": key, "value": float(results[key]), "step": self.global_step,
                             "checkpoint": name}
        return results

    def _eval_due(self, epoch_done: int, finished: bool) -> bool:
        every = self.cfg.eval.every_epochs
        return finished or (every > 0 and epoch_done % every == 0)

    def dry_run(self) -> list[dict[str, Any]]:
        """Build everything (model, optimizer, data), then run one optimizer step on one batch of each media type the
        task offers (`task.sample_batches() -> {media: batch}`). Nothing is checkpointed.

        The task's `prepare(model)` hook runs first, as in `fit()`, so each step costs what a training step costs.

        Returns one row per media type: {media, seconds (the first step, so it includes one-off kernel set-up and,
        with runtime.count_flops, the FLOP counting), peak_memory_bytes (CUDA: allocated by tensors; CPU: the
        process's peak resident set), flops (of that optimizer step, as a training run counts its steps; 0 without
        runtime.count_flops), losses}.
        """
        self._setup()
        if not hasattr(self.task, "sample_batches"):
            raise TypeError(f"task {type(self.task).__name__} has no sample_batches(): it cannot be dry-run")
        self._prepare()  # as fit() does: without it a step would also pay for what prepare does once (its FLOPs too)
        self._set_train_mode()
        rows = []
        for media, batch in self.task.sample_batches().items():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            started = time.perf_counter()
            metrics, flops, _ = self._counted_step([batch])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
            else:
                import resource

                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
            rows.append({"media": media, "seconds": time.perf_counter() - started, "peak_memory_bytes": int(peak),
                         "flops": int(flops),
                         "losses": {k: v for k, v in metrics.items() if k == "loss" or k.startswith("loss_")}})
        if self.writer is not None:
            self.writer.close()
        return rows

    def fit(self) -> dict[str, Any]:
        """Train until optim.max_steps / optim.epochs; returns {global_step, run_dir, checkpoint, eval, best}."""
        self._setup()
        try:
            self._prepare()
            self._train_loop()
        finally:
            if self.writer is not None:
                self.writer.close()
        return {"global_step": self.global_step, "run_dir": str(self.run_dir),
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "eval": self.last_eval, "best": dict(self.best), "flops": dict(self.flops),
                "skipped_steps": self.skipped_steps}

    def _prepare(self) -> None:
        """The task's one-off `prepare(model)` hook, counted into the training FLOPs (runtime.count_flops)."""
        prepare = getattr(self.task, "prepare", None)
        if prepare is None:
            return
        model = unwrap_model(self.model)
        # under the training autocast: the hook does work a step would otherwise do, in the step's precision
        with torch.no_grad(), _autocast(self.device, self.precision):
            if self.cfg.runtime.count_flops:
                self.flops["train"] += count_flops(lambda: prepare(model))
            else:
                prepare(model)

    def _train_loop(self) -> None:
        rt, accum = self.cfg.runtime, self.cfg.optim.grad_accum
        progress = Progress(self.total_steps, self.global_step, enabled=self.dist.is_main and rt.progress)
        self._set_train_mode()
        window: dict[str, list[float]] = {}
        while self.global_step < self.total_steps:
            batches = iter(self.task.train_batches(self.epoch, self.batch_in_epoch))
            step_in_epoch = self.batch_in_epoch // accum
            end_of_epoch = False
            while not end_of_epoch and self.global_step < self.total_steps:
                n_micro = min(accum, self.batches_per_epoch - step_in_epoch * accum)
                waited = time.perf_counter()
                micro = self._agreed_micro_batches(batches, n_micro)
                computed = time.perf_counter()
                metrics, step_flops, counted = self._counted_step(micro)
                self.flops["train"] += step_flops
                # data wait vs compute time: tells whether the loader keeps up (target: wait < 10% of the step)
                metrics.update(data_wait_s=computed - waited, step_s=time.perf_counter() - waited)
                if counted:  # the step that ran under the FLOP counter is slower: keep it out of the rates
                    metrics["flops_counted"] = float(step_flops)
                else:
                    metrics.update(self._rates(micro, metrics["step_s"], step_flops))
                self.global_step += 1
                step_in_epoch += 1
                end_of_epoch = step_in_epoch >= self.steps_per_epoch
                self.batch_in_epoch = 0 if end_of_epoch else step_in_epoch * accum
                epoch_done = self.epoch + 1
                if end_of_epoch:
                    self.epoch += 1
                for key, value in metrics.items():
                    window.setdefault(key, []).append(value)
                finished = self.global_step >= self.total_steps
                if self.global_step % rt.log_every == 0 or finished:
                    self._log(window, progress)
                    window = {}
                if end_of_epoch or finished:
                    if self._eval_due(epoch_done, finished):
                        self._evaluate(epoch_done - 1)
                if end_of_epoch or finished or (rt.ckpt_every_steps and self.global_step % rt.ckpt_every_steps == 0):
                    self.save()
                for callback in self.callbacks:
                    callback(self, self.global_step, metrics)
            del batches  # release DataLoader workers before the next epoch starts its own


def idle_parameters(loss: torch.Tensor, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters among `params` that `loss` does not depend on (no path in its autograd graph).

    Under DDP without find_unused_parameters every parameter must take part in every step; a mixed image + video
    run leaves some idle on image steps (the temporal point predictor, lambda, the decoders' temporal branches).
    A walk over the graph costs a few milliseconds, far less than DDP's own search for unused parameters
    (`find_unused_parameters=True` traverses the same graph and also delays the gradient buckets' reduction).
    """
    used: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf parameter
        if variable is not None:
            used.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions if fn is not None and fn not in seen)
    return [p for p in params if id(p) not in used]


def touch_parameters(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """`loss` plus 0 x (a sum over `params`): same value, and every parameter now receives a (zero) gradient."""
    if not params:
        return loss
    return loss + sum(p.sum() for p in params) * 0.0


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The DDP wrapper inside a torch.compile wrapper (or the model itself)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model
