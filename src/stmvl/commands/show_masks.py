"""``stmvl show-masks --checkpoint DIR --video FILE --out FILE.png``: the masks of every strategy on one clip."""

from __future__ import annotations

import sys
from typing import Sequence

from stmvl.commands.rule import CommandParser, UsageError, command

def _parser() -> CommandParser:
    from stmvl.report import SHOW_MASK_STRATEGIES

    parser = CommandParser(prog="stmvl show-masks",
                           description="draw the masks of every strategy and the temporal heatmap on a video")
    parser.add_argument("--checkpoint", required=True, help="model folder (model.safetensors + config.json)")
    parser.add_argument("--video", required=True, help="video file")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--strategies", default=",".join(SHOW_MASK_STRATEGIES),
                        help="comma-separated: random, tube, attention, attention_inverse, stm")
    parser.add_argument("--seed", type=int, default=0, help="mask seed")
    parser.add_argument("--ratio", type=float, default=None, help="masked fraction in [0, 1) (default: the "
                                                                  "model's video ratio)")
    parser.add_argument("--frames", type=int, default=None, help="frames to sample (default: the model's)")
    parser.add_argument("--cell-px", type=int, default=128, help="pixel size of one frame in the picture")
    return parser


def _check(args) -> list[str]:
    """The strategies asked for; the numeric options checked before the model is loaded."""
    import math

    if args.ratio is not None and not (math.isfinite(args.ratio) and 0.0 <= args.ratio < 1.0):
        raise UsageError(f"--ratio must lie in [0, 1), got {args.ratio}")
    if args.frames is not None and not 1 <= args.frames <= 1024:
        raise UsageError(f"--frames must lie in [1, 1024], got {args.frames}")
    if not 8 <= args.cell_px <= 2048:
        raise UsageError(f"--cell-px must lie in [8, 2048], got {args.cell_px}")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
        raise UsageError("--strategies names no strategy")
    return strategies


@command("show-masks")
def show_masks_main(argv: Sequence[str]) -> int:
    """``stmvl show-masks --checkpoint DIR --video FILE --out FILE.png [--strategies ...] [--seed S]``."""
    args = _parser().parse_args(argv)
    strategies = _check(args)
    from stmvl.api import load_model, read_clip
    from stmvl.report import draw_masks, mask_picture

    model = load_model(args.checkpoint)
    frames = read_clip(model, args.video, args.frames)  # a MediaError names the file: a user error
    picture = mask_picture(model, frames, strategies, seed=args.seed, ratio=args.ratio)
    for note in picture.notes:
        print(f"stmvl show-masks: {note}", file=sys.stderr)
    out = draw_masks(picture.frames, picture.masks, picture.grid, args.out, heatmap=picture.heatmap,
                     cell_px=args.cell_px)
    print(f"wrote {out} ({', '.join(picture.masks)}{', heatmap' if picture.heatmap is not None else ''})")
    return 0
