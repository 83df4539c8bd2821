"""The data commands: ``stmvl synth`` (the synthetic corpus), ``stmvl check-data`` (decode a corpus, report the broken
files) and ``stmvl shards write | index`` (webdataset tar shards).

The work is done by plain library functions (``stmvl.data.synth.generate_corpus``, ``stmvl.data.check.check_corpus``
and ``check_shards``, ``stmvl.data.shards.write_shards`` and ``write_index``); these functions parse the arguments,
check the numeric options before anything is written or decoded, and print what the user asked for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from stmvl.commands.rule import CommandParser, UsageError, command


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def _require_folder(option: str, path: str) -> None:
    """An output folder that is absent (it is made) or a folder; not a file in the way."""
    _require(not Path(path).exists() or Path(path).is_dir(), f"{option} {path}: exists and is not a folder")


# ------------------------------------------------------------------------------------------------------------- synth


def _synth_parser() -> CommandParser:
    parser = CommandParser(prog="stmvl synth", description="write the synthetic temporal video-text corpus "
                                                           "(docs/synthetic_corpus.md)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=3000, help="train clips")
    parser.add_argument("--images", type=int, default=None,
                        help="image-text pairs, one frame each of the first N train clips (default: one per clip)")
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--probe", type=int, default=500)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (even, at least 32)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    return parser


@command("synth")
def synth_main(argv: Sequence[str]) -> int:
    """``stmvl synth --out DIR [--train N] [--images N] [--test N] [--probe N] [--size PX] [--frames T]
    [--seed S]``."""
    from stmvl.data.synth import generate_corpus

    args = _synth_parser().parse_args(argv)
    for name in ("train", "test", "probe"):
        value = getattr(args, name)
        _require(0 <= value <= 10_000_000, f"--{name} must lie in [0, 10000000], got {value}")
    # the H.264 writer needs even frame sides (yuv420p); the renderer's shapes need at least 32 px
    _require(32 <= args.size <= 4096 and args.size % 2 == 0, f"--size must be an even number in [32, 4096], got "
                                                              f"{args.size}")
    _require(args.images is None or 0 <= args.images <= args.train,
             f"--images must lie in [0, --train] = [0, {args.train}], got {args.images}")
    _require(2 <= args.frames <= 10_000, f"--frames must lie in [2, 10000], got {args.frames}")
    _require(args.workers is None or 1 <= args.workers <= 1024, f"--workers must lie in [1, 1024], got "
                                                                 f"{args.workers}")
    _require_folder("--out", args.out)
    manifest = generate_corpus(args.out, seed=args.seed, train=args.train, test=args.test, probe=args.probe,
                               size=args.size, frames=args.frames, workers=args.workers, images=args.images)
    counts = manifest["counts"]
    print(f"wrote {counts['train']} train / {counts['test']} test / {counts['probe']} probe clips and "
          f"{counts['images']} images ({args.size}px, {args.frames} frames) to {args.out} "
          f"in {manifest['seconds']:.1f}s")
    return 0


# -------------------------------------------------------------------------------------------------------- check-data


def _check_parser() -> CommandParser:
    from stmvl.data.video import MediaLimits

    parser = CommandParser(prog="stmvl check-data",
                           description="decode every media file of a corpus up front and report the broken ones "
                                       "(exit 0: all decode; 1: some are broken, listed; 2: a user error)")
    parser.add_argument("annotation", help="annotation file (JSON list or JSONL); without --media-root, a shard "
                                           "corpus: its index.json, the folder holding it, or a webdataset pattern")
    parser.add_argument("--media-root", help="folder the records' media paths are relative to (annotation files)")
    parser.add_argument("--media-type", choices=("video", "image"), default=None, help="default: video, or the "
                                                                                        "shard index's")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--workers", type=int, default=1, help="decode with this many processes")
    parser.add_argument("--min-frames", type=int, default=1, help="videos with fewer frames are 'too_short'")
    defaults = MediaLimits()
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help="images with more pixels are 'too_large' (default: data.max_image_pixels's)")
    parser.add_argument("--max-video-pixels", type=int, default=defaults.max_video_pixels,
                        help="videos whose frames have more pixels are 'too_large' (default: data.max_video_pixels's)")
    parser.add_argument("--max-video-seconds", type=float, default=defaults.max_video_seconds,
                        help="longer videos are 'too_large' (default: data.max_video_seconds's)")
    return parser


@command("check-data")
def check_data_main(argv: Sequence[str]) -> int:
    """``stmvl check-data ANNOTATION [--media-root DIR] [--media-type video|image] [--report FILE.json]``: exit 0
    when every file decodes, 1 when some do not (each listed with its reason), 2 for a user error."""
    from stmvl.data.check import check_corpus, check_shards
    from stmvl.data.video import MediaLimits

    args = _check_parser().parse_args(argv)
    _require(1 <= args.workers <= 1024, f"--workers must lie in [1, 1024], got {args.workers}")
    _require(args.min_frames >= 1, f"--min-frames must be at least 1, got {args.min_frames}")
    _require(args.max_image_pixels >= 1 and args.max_video_pixels >= 1,
             f"--max-image-pixels and --max-video-pixels must be at least 1, got {args.max_image_pixels} and "
             f"{args.max_video_pixels}")
    _require(math.isfinite(args.max_video_seconds) and args.max_video_seconds > 0,
             f"--max-video-seconds must be a positive number, got {args.max_video_seconds}")
    limits = MediaLimits(args.max_image_pixels, args.max_video_pixels, args.max_video_seconds)
    if args.media_root is None:
        report = check_shards(args.annotation, media_type=args.media_type, min_frames=args.min_frames,
                              workers=args.workers, limits=limits)
        what, total = "shard samples", report["samples"]
    else:
        report = check_corpus(args.annotation, args.media_root, args.media_type or "video", args.min_frames,
                              args.workers, limits)
        what, total = f"{report['media_type']} files", report["files"]
    for line in check_report_lines(report, args.annotation, what, total):
        print(line)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"report: {args.report}")
    return 0 if report["counts"]["ok"] == total and not report.get("index_mismatch") else 1


def check_report_lines(report: dict, annotation: str, what: str, total: int, shown: int = 20) -> list[str]:
    """What ``check-data`` prints: the counts per status, the first ``shown`` broken files, index mismatches."""
    lines = [f"checked {total} {what} of {annotation}"]
    lines += [f"  {status:<12}{count}" for status, count in report["counts"].items()]
    lines += [f"  BAD {entry['reason']:<12}{entry['path']}  {entry['detail']}" for entry in report["bad"][:shown]]
    if len(report["bad"]) > shown:
        lines.append(f"  ... and {len(report['bad']) - shown} more (see the report)")
    lines += [f"  INDEX {entry['url']}: the index lists {entry['index']} samples, the shard holds {entry['found']}"
              for entry in report.get("index_mismatch", [])]
    return lines


# ------------------------------------------------------------------------------------------------------------ shards


def _shards_parser() -> CommandParser:
    parser = CommandParser(prog="stmvl shards", description="webdataset tar shards (docs/data.md)")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=CommandParser)
    write = sub.add_parser("write", help="write shards and index.json from an annotation file (atomic, resumable)")
    write.add_argument("annotation")
    write.add_argument("--media-root", required=True)
    write.add_argument("--out", required=True)
    write.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    write.add_argument("--media-type", choices=("video", "image"), default="video")
    write.add_argument("--prefix", default="shard")
    write.add_argument("--predecode", type=int, default=None, metavar="T",
                       help="store T JPEG frames per video instead of the video file")
    write.add_argument("--short-side", type=int, default=256, help="pre-decoded frames: resize to this short side")
    write.add_argument("--quality", type=int, default=90, help="pre-decoded frames: JPEG quality")
    write.add_argument("--workers", type=int, default=1, help="write this many shards in parallel")
    index = sub.add_parser("index", help="count the samples of existing shards and write an index file")
    index.add_argument("shards", help="webdataset pattern, e.g. '/data/webvid/{000000..002499}.tar'")
    index.add_argument("--out", required=True, help="the index file to write (index.json)")
    index.add_argument("--media-type", choices=("video", "image"), default="video")
    return parser


@command("shards")
def shards_main(argv: Sequence[str]) -> int:
    """``stmvl shards write ANNOTATION --media-root DIR --out DIR [...]`` or ``stmvl shards index PATTERN --out
    FILE``; progress goes through the ``stmvl`` loggers (stderr)."""
    from stmvl.data.shards import write_index, write_shards
    from stmvl.data.stream import INDEX_FILE, ShardIndex

    args = _shards_parser().parse_args(argv)
    if args.action == "index":
        data = write_index(args.shards, args.out, args.media_type)
        print(f"indexed {len(data['shards'])} shards ({data['samples']} samples) in {args.out}")
        return 0
    _require(args.shard_size >= 1, f"--shard-size must be at least 1, got {args.shard_size}")
    _require(args.predecode is None or 1 <= args.predecode <= 1024, f"--predecode must lie in [1, 1024], got "
                                                                    f"{args.predecode}")
    _require(16 <= args.short_side <= 4096, f"--short-side must lie in [16, 4096], got {args.short_side}")
    _require(1 <= args.quality <= 100, f"--quality must lie in [1, 100], got {args.quality}")
    _require(1 <= args.workers <= 1024, f"--workers must lie in [1, 1024], got {args.workers}")
    _require_folder("--out", args.out)
    paths = write_shards(args.annotation, args.media_root, args.out, args.shard_size, args.media_type, args.prefix,
                         predecode=args.predecode, short_side=args.short_side, quality=args.quality,
                         workers=args.workers)
    data = ShardIndex.from_file(str(Path(args.out) / INDEX_FILE))
    print(f"wrote {len(paths)} shards ({data.samples} samples) and {Path(args.out) / INDEX_FILE}")
    return 0
