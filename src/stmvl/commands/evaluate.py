"""``stmvl evaluate RECIPE --checkpoint DIR``: score a model folder on the recipe's eval corpora."""

from __future__ import annotations

from typing import Sequence

from stmvl.commands.recipes import recipe_parser, run_config
from stmvl.commands.rule import command


@command("evaluate")
def evaluate_main(argv: Sequence[str]) -> int:
    """``stmvl evaluate RECIPE --checkpoint DIR [--out DIR] [key=value ...]``: eval.json in the run folder and one
    summary line per table on stdout."""
    from stmvl.tasks.evaluation import summary_lines
    from stmvl.tasks.runs import evaluate

    args = recipe_parser("evaluate", "evaluate a checkpoint", checkpoint=True).parse_intermixed_args(argv)
    results = evaluate(run_config(args), args.checkpoint)
    for line in summary_lines(results):
        print(line)
    return 0
