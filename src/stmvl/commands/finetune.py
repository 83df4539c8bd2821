"""``stmvl finetune RECIPE --checkpoint DIR``: retrieval, VideoQA or multiple-choice finetuning."""

from __future__ import annotations

from typing import Any, Sequence

from stmvl.commands.recipes import recipe_parser, run_config
from stmvl.commands.rule import command


@command("finetune")
def finetune_main(argv: Sequence[str]) -> int:
    """``stmvl finetune RECIPE --checkpoint DIR [--out DIR] [key=value ...]``: the finetuned model in <run>/model
    and one summary line per evaluation table on stdout."""
    from stmvl.tasks.evaluation import summary_lines
    from stmvl.tasks.finetune import finetune

    args = recipe_parser("finetune", "finetune a pretrained checkpoint (retrieval, VideoQA, multiple choice)",
                         checkpoint=True).parse_intermixed_args(argv)  # overrides may follow --checkpoint
    result = finetune(run_config(args), args.checkpoint)
    for line in summary_lines(nest(result["eval"])):
        print(line)
    return 0


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Undo the engine's '/'-flattening of evaluation results: {"a/b/c": v} -> {"a": {"b": {"c": v}}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
