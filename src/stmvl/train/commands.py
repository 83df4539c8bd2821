"""`stmvl train-teacher | pretrain | finetune | evaluate`: parse arguments, build the task, run the one engine.

All of them work under `torchrun` (the engine reads the rank from the environment).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stmvl.config import ConfigError, RunConfig


def _parser(prog: str, description: str, checkpoint: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"stmvl {prog}", description=description)
    p.add_argument("recipe", help="packaged recipe name (e.g. demo, pretrain/stm_b16_5m) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-5 data.video_batch_size=16")
    p.add_argument("--out", help="run folder (default: the recipe's runtime.out_dir)")
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="model folder (model.safetensors + config.json), a run "
                                                           "folder or a step folder")
    else:
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run folder")
        p.add_argument("--dry-run", action="store_true", help="check every path, build everything, run one step of "
                       "each media type, print step time and memory, and exit (nothing is written to the run folder)")
    return p


def _config(args) -> RunConfig:
    from stmvl.tasks.pretrain import load_run_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"runtime.out_dir={args.out}")
    if getattr(args, "resume", False):
        overrides.append("runtime.resume=true")
    return load_run_config(args.recipe, overrides)


def _fail(exc: Exception) -> int:
    print(f"stmvl: error: {exc}", file=sys.stderr)
    return 2


def run_training(cfg: RunConfig, task) -> dict[str, Any]:
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
        print(f"[stmvl] teacher written to {out}")
    result["teacher_dir"] = str(out)
    return result


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Pretrain and export the final model to <run>/model; returns the engine's result (+ model_dir)."""
    from stmvl.tasks.pretrain import PretrainTask, export_model

    task = PretrainTask(cfg)
    result = run_training(cfg, task)
    result["results"] = task.last_results
    trainer = result["trainer"]
    result["precision"] = trainer.precision
    model_dir = Path(result["run_dir"]) / "model"
    if trainer.dist.is_main:
        export_model(trainer.model, cfg, model_dir)
        print(f"[stmvl] model written to {model_dir}")
    result["model_dir"] = str(model_dir)
    return result


def _train_main(argv: list[str], prog: str, description: str, run) -> int:
    args = _parser(prog, description).parse_intermixed_args(argv)
    try:
        cfg = _config(args)
    except (ConfigError, ValueError) as exc:
        return _fail(exc)
    from stmvl.errors import UserError

    try:
        if args.dry_run:
            dry_run(cfg, _TASKS[prog])
        else:
            run(cfg)
    except UserError as exc:
        return _fail(exc)
    return 0


def _pretrain_task(cfg: RunConfig):
    from stmvl.tasks.pretrain import PretrainTask

    return PretrainTask(cfg)


def _teacher_task(cfg: RunConfig):
    from stmvl.tasks.teacher import TeacherTask

    return TeacherTask(cfg)


_TASKS = {"pretrain": _pretrain_task, "train-teacher": _teacher_task}


def dry_run(cfg: RunConfig, make_task) -> list[dict[str, Any]]:
    """`--dry-run`: one step of each media type in a throw-away run folder; prints one line per media type."""
    import tempfile

    from stmvl.train.engine import Trainer

    cfg.runtime.resume, cfg.runtime.tensorboard, cfg.runtime.progress = False, False, False
    with tempfile.TemporaryDirectory(prefix="stmvl-dry-run-") as tmp:
        cfg.runtime.out_dir = tmp
        trainer = Trainer(cfg, make_task(cfg), run_dir=tmp)
        rows = trainer.dry_run()
        if trainer.dist.is_main:
            for row in rows:
                losses = " ".join(f"{k}={v:.4f}" for k, v in row["losses"].items())
                print(f"[dry-run] {row['media']}: one step {row['seconds']:.2f}s, peak memory "
                      f"{row['peak_memory_bytes'] / 2**30:.2f} GiB ({trainer.device.type}, {trainer.precision}) "
                      f"{losses}")
            print("[dry-run] every path exists and every media type ran one step; nothing was saved")
    return rows


def train_teacher_main(argv: list[str]) -> int:
    return _train_main(argv, "train-teacher", "train the demo's tiny CLIP image teacher", train_teacher)


def pretrain_main(argv: list[str]) -> int:
    return _train_main(argv, "pretrain", "pretrain an STM / UMT model", pretrain)


def evaluate(cfg: RunConfig, checkpoint: str | Path) -> dict[str, Any]:
    """Zero-shot (or finetuned) evaluation of a checkpoint on the recipe's eval corpora (retrieval, probe, multiple
    choice for a retrieval model; VideoQA for a folder written by QA finetuning); JSON in the run folder."""
    import torch

    from stmvl.tasks.finetune import evaluate_downstream
    from stmvl.train.distributed import init_distributed

    dist = init_distributed(cfg.runtime.backend, cfg.runtime.device)
    model = load_checkpoint_model(checkpoint, dist.device)
    from stmvl.train.precision import resolve

    results = evaluate_downstream(model, cfg, dist.device,
                                  autocast=resolve(cfg.optim.precision, dist.device).name == "bf16")
    if dist.rank == 0:
        out = Path(cfg.runtime.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
        print(f"[stmvl] evaluation written to {out / 'eval.json'}")
    torch.set_grad_enabled(True)
    return results


def load_checkpoint_model(checkpoint: str | Path, device):
    """The model of a model folder (or run folder): a VideoQAModel where config.json says so, else an STMModel."""
    from stmvl.api import load_model, resolve_model_dir
    from stmvl.tasks.finetune import load_qa_model

    meta = json.loads((resolve_model_dir(checkpoint) / "config.json").read_text(encoding="utf-8"))
    if meta.get("stmvl_config_type") == "VideoQAModel":
        return load_qa_model(checkpoint).to(device)
    return load_model(checkpoint, device=device)


def evaluate_main(argv: list[str]) -> int:
    from stmvl.api import ModelDirError

    args = _parser("evaluate", "evaluate a checkpoint", checkpoint=True).parse_intermixed_args(argv)
    try:
        cfg = _config(args)
        results = evaluate(cfg, args.checkpoint)
    except (ConfigError, ValueError, FileNotFoundError, ModelDirError) as exc:
        return _fail(exc)
    from stmvl.tasks.evaluation import summary_lines

    for line in summary_lines(results):
        print(line)
    return 0


def finetune_main(argv: list[str]) -> int:
    from stmvl.tasks.finetune import finetune_main as main

    return main(argv)
