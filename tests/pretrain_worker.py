"""Run a tiny real pretraining job (the PretrainTask on the one engine) for the resume and DDP tests.

    python tests/pretrain_worker.py RECIPE.yaml [overrides...]      (optionally under torchrun)

STMVL_TEST_EXIT_AFTER=k kills the process with os._exit right after optimizer step k (after its checkpoint), the
way a job dies when its node goes away.
"""

from __future__ import annotations

import os
import sys

import torch

from stmvl.tasks.pretrain import PretrainTask, load_run_config
from stmvl.train.distributed import cleanup_distributed
from stmvl.train.engine import Trainer


def main() -> int:
    torch.set_num_threads(1)
    recipe, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_run_config(recipe, overrides)
    exit_after = int(os.environ.get("STMVL_TEST_EXIT_AFTER", "0"))

    def die_after(trainer, step, metrics):
        if exit_after and step == exit_after:
            os._exit(17)

    Trainer(cfg, PretrainTask(cfg), callbacks=[die_after]).fit()
    cleanup_distributed()  # ranks leave together; a live gloo group at exit can abort the process
    return 0


if __name__ == "__main__":
    sys.exit(main())
