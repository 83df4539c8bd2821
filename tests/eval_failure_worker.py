"""One rank of a 2-rank evaluation (run by tests/test_engine_faults.py): map_clips over 8 clips, of which clip 6 (in
rank 1's shard) is corrupt. Prints a user error as one line `stmvl: error: ...` and exits 2, as the commands do."""

from __future__ import annotations

import sys

import torch

from stmvl.data.video import MediaError
from stmvl.errors import UserError
from stmvl.eval.features import map_clips
from stmvl.train.distributed import cleanup_distributed, init_distributed


class Clips:
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        if index == 6:
            raise MediaError("test/clip6.mp4", "undecodable", "moov atom not found")
        return {"video": torch.full((1, 3, 2, 2), index, dtype=torch.uint8)}


def main() -> int:
    torch.set_num_threads(1)
    init_distributed("gloo", "cpu", timeout_s=30)
    try:
        map_clips(Clips(), lambda batch: (batch["video"].flatten(1).mean(1),), batch_size=2)
    except UserError as exc:
        print(f"stmvl: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        # as stmvl.cli does: a gloo group still alive at interpreter exit can abort the process (SIGABRT,
        # "terminate called without an active exception"), seen on the error path here
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
