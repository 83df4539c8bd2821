"""`stmvl <command> [args]`: a thin dispatcher; every command parses its own arguments in its own module.

Every command runs under one rule (stmvl.commands.rule): a user error prints one line
``stmvl <command>: error: <message>`` and exits 2; any other exception is a bug in stmvl: its traceback, a line
saying so and where to report it, exit 1.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help). Modules are imported lazily so `stmvl --help` is instant.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("stmvl.commands.demo", "demo_main", "synthetic corpus -> teacher -> STM pretraining -> evaluation + report"),
    "synth": ("stmvl.commands.data", "synth_main", "write the synthetic temporal video-text corpus"),
    "check-data": ("stmvl.commands.data", "check_data_main", "decode a whole corpus and report missing/corrupt media"),
    "shards": ("stmvl.commands.data", "shards_main", "write webdataset tar shards from an annotation file"),
    "train-teacher": ("stmvl.commands.train", "train_teacher_main", "train the demo's tiny CLIP image teacher"),
    "pretrain": ("stmvl.commands.train", "pretrain_main", "pretrain an STM / UMT model from a recipe"),
    "finetune": ("stmvl.commands.finetune", "finetune_main", "finetune on retrieval, QA or multiple choice"),
    "evaluate": ("stmvl.commands.evaluate", "evaluate_main", "zero-shot / finetuned evaluation of a checkpoint"),
    "convert": ("stmvl.commands.convert", "convert_main", "convert UMT checkpoints to stmvl folders and back (to-umt)"),
    "search": ("stmvl.commands.search", "search_main", "search a folder of videos with a text query"),
    "show-masks": ("stmvl.commands.show_masks", "show_masks_main", "draw the masks of every strategy on a video"),
}


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: stmvl <command> [args]   (stmvl <command> --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"stmvl: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from stmvl.commands.rule import run_command

    module, func, _ = COMMANDS[name]
    try:
        # the import is inside the rule too: a command module that fails to import is a bug, reported as one
        return run_command(name, lambda args: getattr(importlib.import_module(module), func)(args), rest)
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Leave a torchrun job cleanly: a gloo/NCCL group still alive at interpreter exit can abort the process."""
    if "torch.distributed" in sys.modules:  # never import torch just to find out there is nothing to do
        from stmvl.train.distributed import cleanup_distributed

        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
