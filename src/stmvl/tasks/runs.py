"""Whole runs as plain functions: train the demo teacher, pretrain, dry-run, evaluate a checkpoint.

The same functions the ``stmvl`` commands call (stmvl.commands); they log what they wrote and return their results,
and print nothing. All of them work under ``torchrun`` (the engine reads the rank from the environment).

Example::

    from stmvl.tasks.pretrain import load_run_config
    from stmvl.tasks.runs import pretrain

    result = pretrain(load_run_config("demo", ["optim.max_steps=100", "runtime.out_dir=runs/mine"]))
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

from stmvl.config import RunConfig

log = logging.getLogger(__name__)

__all__ = ["run_training", "train_teacher", "pretrain", "dry_run", "evaluate", "load_checkpoint_model"]


def run_training(cfg: RunConfig, task) -> dict[str, Any]:
    """``Trainer(cfg, task).fit()``; the result also holds the ``trainer``."""
    from stmvl.train.engine import Trainer

    trainer = Trainer(cfg, task)
    result = trainer.fit()
    result["trainer"] = trainer
    return result


def train_teacher(cfg: RunConfig) -> dict[str, Any]:
    """Train the demo teacher and export it to <paths.models>/teacher. Returns the engine's result (+ teacher_dir)."""
    from stmvl.tasks.teacher import TeacherTask, export_teacher

    result = run_training(cfg, TeacherTask(cfg))
    out = Path(cfg.paths.models) / "teacher"
    if result["trainer"].dist.is_main:
        export_teacher(result["trainer"].model, out)
        log.info("teacher written to %s", out)
    result["teacher_dir"] = str(out)
    return result


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Pretrain and export the final model to <run>/model; returns the engine's result (+ model_dir, results, the
    evaluation of the last epoch, and precision)."""
    from stmvl.tasks.pretrain import PretrainTask, export_model

    task = PretrainTask(cfg)
    result = run_training(cfg, task)
    result["results"] = task.last_results
    trainer = result["trainer"]
    result["precision"] = trainer.precision
    model_dir = Path(result["run_dir"]) / "model"
    if trainer.dist.is_main:
        export_model(trainer.model, cfg, model_dir)
        log.info("model written to %s", model_dir)
    result["model_dir"] = str(model_dir)
    return result


def pretrain_task(cfg: RunConfig):
    """The engine task of ``stmvl pretrain``."""
    from stmvl.tasks.pretrain import PretrainTask

    return PretrainTask(cfg)


def teacher_task(cfg: RunConfig):
    """The engine task of ``stmvl train-teacher``."""
    from stmvl.tasks.teacher import TeacherTask

    return TeacherTask(cfg)


def dry_run(cfg: RunConfig, make_task: Callable[[RunConfig], Any]) -> tuple[list[dict[str, Any]], Any]:
    """One step of each media type in a throw-away run folder (``--dry-run``): every path is checked and every
    part built, nothing is saved.

    Returns:
        (one row per media type: ``media``, ``seconds``, ``peak_memory_bytes``, ``losses``; the trainer, for its
        ``device``, ``precision`` and ``dist``).
    """
    from stmvl.train.engine import Trainer

    cfg.runtime.resume, cfg.runtime.tensorboard, cfg.runtime.progress = False, False, False
    with tempfile.TemporaryDirectory(prefix="stmvl-dry-run-") as tmp:
        cfg.runtime.out_dir = tmp
        trainer = Trainer(cfg, make_task(cfg), run_dir=tmp)
        return trainer.dry_run(), trainer


def evaluate(cfg: RunConfig, checkpoint: str | Path) -> dict[str, Any]:
    """Zero-shot (or finetuned) evaluation of a checkpoint on the recipe's eval corpora (retrieval, probe, multiple
    choice for a retrieval model; VideoQA for a folder written by QA finetuning); JSON in the run folder."""
    import torch

    from stmvl.tasks.finetune import evaluate_downstream
    from stmvl.train.distributed import init_distributed
    from stmvl.train.precision import resolve

    dist = init_distributed(cfg.runtime.backend, cfg.runtime.device)
    model = load_checkpoint_model(checkpoint, dist.device)
    results = evaluate_downstream(model, cfg, dist.device,
                                  autocast=resolve(cfg.optim.precision, dist.device).name == "bf16")
    if dist.rank == 0:
        out = Path(cfg.runtime.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
        log.info("evaluation written to %s", out / "eval.json")
    torch.set_grad_enabled(True)
    return results


def load_checkpoint_model(checkpoint: str | Path, device):
    """The model of a model folder (or run folder): a VideoQAModel where config.json says so, else an STMModel.
    The folder's config.json is validated before anything is built (stmvl.api.read_model_meta)."""
    from stmvl.api import load_model, read_model_meta, resolve_model_dir
    from stmvl.tasks.finetune import load_qa_model

    directory = resolve_model_dir(checkpoint)
    meta = read_model_meta(directory, kinds=("ModelConfig", "VideoQAModel"))
    if meta["stmvl_config_type"] == "VideoQAModel":
        return load_qa_model(directory).to(device)
    return load_model(directory, device=device)
