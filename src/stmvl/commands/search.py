"""``stmvl search --checkpoint DIR --videos FOLDER "query"``: rank a folder of videos for a text query."""

from __future__ import annotations

import json
import sys
from typing import Sequence

from stmvl.commands.rule import CommandParser, UsageError, command


def _parser() -> CommandParser:
    parser = CommandParser(prog="stmvl search", description="search a folder of videos with a text query")
    parser.add_argument("query", help="text query")
    parser.add_argument("--checkpoint", required=True, help="model folder (model.safetensors + config.json) or run "
                                                            "folder")
    parser.add_argument("--videos", required=True, help="folder of videos (searched recursively)")
    parser.add_argument("--top", type=int, default=10, help="number of results")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-rerank", action="store_true", help="rank by ITC only (no VTM re-ranking)")
    parser.add_argument("--no-cache", action="store_true", help="embed every video again and write no cache")
    parser.add_argument("--device", default="cpu")
    return parser


def check_device(device: str) -> None:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:N``), else a UsageError naming the choices."""
    import torch

    if device == "cpu":
        return
    if device == "cuda" or device.startswith("cuda:"):
        count = torch.cuda.device_count()
        index = device.partition(":")[2]
        if count and (not index or (index.isdigit() and int(index) < count)):
            return
        raise UsageError(f"--device {device}: this machine has {count} CUDA device(s); use --device cpu"
                         + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N")


@command("search")
def search_main(argv: Sequence[str]) -> int:
    """``stmvl search --checkpoint DIR --videos FOLDER "query" [--top K] [--json] [--no-rerank] [--no-cache]``."""
    args = _parser().parse_args(argv)
    if not args.query.strip():
        raise UsageError("the search query is empty")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    check_device(args.device)
    from stmvl.api import format_table, load_model, search

    model = load_model(args.checkpoint, args.device)
    results = search(model, args.videos, args.query, top=args.top, rerank=not args.no_rerank,
                     cache=not args.no_cache)
    if args.json:
        print(json.dumps(dict(results.to_json(args.query), checkpoint=str(model.model_dir)), indent=2))
    else:
        print(format_table(results))
        print(f"({results.embedded} embedded, {results.cached} from cache, {len(results.skipped)} skipped, "
              f"{results.seconds:.2f}s)", file=sys.stderr)
    return 0
