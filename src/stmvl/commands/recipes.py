"""What the recipe-driven commands (pretrain, train-teacher, finetune, evaluate) share: their arguments and the
RunConfig those arguments describe."""

from __future__ import annotations

import argparse

from stmvl.commands.rule import CommandParser
from stmvl.config import RunConfig


def recipe_parser(prog: str, description: str, checkpoint: bool = False) -> CommandParser:
    """``RECIPE [key=value ...] [--out DIR]`` plus ``--checkpoint DIR`` (finetune, evaluate) or ``--resume``,
    ``--overwrite`` and ``--dry-run`` (training)."""
    p = CommandParser(prog=f"stmvl {prog}", description=description)
    p.add_argument("recipe", help="packaged recipe name (e.g. demo, pretrain/stm_b16_5m) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-5 data.video_batch_size=16")
    p.add_argument("--out", help="run folder (default: the recipe's runtime.out_dir)")
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="model folder (model.safetensors + config.json), a run "
                                                           "folder or a step folder")
    else:
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run folder")
        p.add_argument("--overwrite", action="store_true", help="start afresh in a run folder that holds another "
                       "run's checkpoints and metrics (they are replaced)")
        p.add_argument("--dry-run", action="store_true", help="check every path, build everything, run one step of "
                       "each media type, print step time and memory, and exit (nothing is written to the run folder)")
    return p


def run_config(args: argparse.Namespace) -> RunConfig:
    """The recipe with its overrides, ``--out``, ``--resume`` and ``--overwrite`` applied, validated (a
    ConfigError names the key)."""
    from stmvl.tasks.pretrain import load_run_config

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"runtime.out_dir={args.out}")
    if getattr(args, "resume", False):
        overrides.append("runtime.resume=true")
    if getattr(args, "overwrite", False):
        overrides.append("runtime.overwrite=true")
    return load_run_config(args.recipe, overrides)
