"""The command layer: every ``stmvl <command>`` entry point, above the library.

One module per command family (``train``: pretrain and train-teacher, ``evaluate``, ``finetune``, ``search``,
``show_masks``, ``convert``, ``data``: synth, check-data and shards; ``stmvl demo`` keeps its own module). Each ``*_main(argv) -> int`` parses its arguments, calls plain library functions
(``stmvl.tasks.runs.pretrain(cfg)``, ``stmvl.api.search(...)``, ...) and prints what the user asked for. Only
``stmvl.cli`` imports this package; the library never does.

Every command follows one rule (:mod:`stmvl.commands.rule`): a user error prints one line
``stmvl <command>: error: <message>`` and exits 2; anything else is a bug in stmvl and prints its traceback with
where to report it, exit 1.
"""
