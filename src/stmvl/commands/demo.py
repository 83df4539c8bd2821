"""``stmvl demo``: the embedded end-to-end run (stmvl.demo) with its summary lines."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from stmvl.commands.rule import CommandParser, UsageError, command


@command("demo")
def demo_main(argv: Sequence[str]) -> int:
    """``stmvl demo [--full] [--compare [--compare-at flops|steps] [--seeds N] [--jobs N]] [--resume] [--out DIR]
    [key=value ...]``."""
    from stmvl.demo import __doc__ as demo_doc
    from stmvl.demo import COMPARE_AT, run_demo

    parser = CommandParser(prog="stmvl demo", description=(demo_doc or "").split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (corpus, teacher, runs, report)")
    parser.add_argument("--full", action="store_true", help="the full tier (recipe demo_full): longer, better")
    parser.add_argument("--compare", action="store_true",
                        help="also pretrain umt and random masking, at STM's training FLOPs (see --compare-at)")
    parser.add_argument("--compare-at", choices=COMPARE_AT, default="flops",
                        help="what --compare holds equal: the training FLOPs (default) or the steps")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant with --compare (default 3)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --compare: train this many runs at once, sharing runtime.threads between them "
                             "(default 1; the demo recipe has 2 threads: --jobs 2 trains two one-thread runs side by "
                             "side, 1.3x faster on 2 cores)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the pretraining runs of --out that finished with the same settings (a --compare "
                             "cut short goes on with the first run it had not finished)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo recipe, e.g. optim.max_steps=50")
    args = parser.parse_intermixed_args(argv)
    if args.seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    summary = run_demo(Path(args.out), compare=args.compare, overrides=args.overrides, full=args.full,
                       seeds=args.seeds, compare_at=args.compare_at, resume=args.resume,
                       jobs=args.jobs)
    print(f"[demo] report: {summary['report']}")
    for name, numbers in summary["results"].items():
        print(f"[demo] {name}: " + ", ".join(f"{k}={v:.1f}" for k, v in numbers.items() if v is not None))
    print("[demo] stages (s / TFLOP): " + ", ".join(f"{k}={v['seconds']:.0f}/{v['flops'] / 1e12:.2f}"
                                                  for k, v in summary["stages"].items()))
    return 0
