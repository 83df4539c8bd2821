"""``stmvl pretrain`` and ``stmvl train-teacher``: a recipe (+ overrides) through the one engine, or ``--dry-run``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from stmvl.commands.recipes import recipe_parser, run_config
from stmvl.commands.rule import command


def _train(argv: Sequence[str], prog: str, description: str, run: Callable, make_task: Callable) -> int:
    args = recipe_parser(prog, description).parse_intermixed_args(argv)
    cfg = run_config(args)
    if args.dry_run:
        from stmvl.tasks.runs import dry_run

        rows, trainer = dry_run(cfg, make_task)
        if trainer.dist.is_main:
            for line in dry_run_lines(rows, trainer.device.type, trainer.precision):
                print(line)
    else:
        run(cfg)
    return 0


def dry_run_lines(rows: list[dict[str, Any]], device: str, precision: str) -> list[str]:
    """What ``--dry-run`` prints: one line per media type, then what was (not) done."""
    lines = []
    for row in rows:
        losses = " ".join(f"{k}={v:.4f}" for k, v in row["losses"].items())
        flops = f", {row['flops'] / 1e9:.1f} GFLOP" if row.get("flops") else ""
        lines.append(f"[dry-run] {row['media']}: one step {row['seconds']:.2f}s{flops}, peak memory "
                     f"{row['peak_memory_bytes'] / 2**30:.2f} GiB ({device}, {precision}) {losses}")
    lines.append("[dry-run] every path exists and every media type ran one step; nothing was saved")
    return lines


@command("pretrain")
def pretrain_main(argv: Sequence[str]) -> int:
    """``stmvl pretrain RECIPE [key=value ...] [--out DIR] [--resume | --overwrite] [--dry-run]``."""
    from stmvl.tasks.runs import pretrain, pretrain_task

    return _train(argv, "pretrain", "pretrain an STM / UMT model", pretrain, pretrain_task)


@command("train-teacher")
def train_teacher_main(argv: Sequence[str]) -> int:
    """``stmvl train-teacher RECIPE [key=value ...] [--out DIR] [--resume | --overwrite] [--dry-run]``."""
    from stmvl.tasks.runs import teacher_task, train_teacher

    return _train(argv, "train-teacher", "train the demo's tiny CLIP image teacher", train_teacher, teacher_task)
