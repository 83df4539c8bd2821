"""``stmvl check-data``: decode every media file of a corpus up front and report the broken ones.

Each distinct media path is decoded completely (every video frame), so truncated files that open fine but fail
half-way are found too. Exit code 0 when everything decodes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any

from .annotations import AnnotationError, read_records
from .video import FAILURE_REASONS, MediaError, count_decodable_frames, read_image, resolve_media_path


def _media_paths(annotation: str | Path, media_type: str) -> dict[str, list[int]]:
    """Distinct media path (as written in the records) -> indices of the records that use it."""
    key = "image" if media_type == "image" else "video"
    paths: dict[str, list[int]] = {}
    for index, record in enumerate(read_records(annotation)):
        if not isinstance(record, dict) or not isinstance(record.get(key), str) or not record[key]:
            raise AnnotationError(f"{annotation}: record {index}: missing or invalid field {key!r} "
                                  f"(expected a media path for --media-type {media_type})")
        paths.setdefault(record[key], []).append(index)
    return paths


def check_media(path: str | Path, media_type: str, min_frames: int = 1) -> tuple[str, str, int]:
    """Decode one file completely: (status, detail, frames). status is ``ok`` or a failure reason."""
    try:
        if media_type == "image":
            read_image(path)
            return "ok", "", 1
        frames = count_decodable_frames(path)
    except MediaError as err:
        return err.reason, err.detail, 0
    if frames < min_frames:
        return "too_short", f"{frames} frames, need at least {min_frames}", frames
    return "ok", "", frames


def _check_job(job: tuple[str, str, str, int]) -> tuple[str, str, str, int]:
    rel, full, media_type, min_frames = job
    status, detail, frames = check_media(full, media_type, min_frames)
    return rel, status, detail, frames


def check_corpus(annotation: str | Path, media_root: str | Path, media_type: str = "video", min_frames: int = 1,
                 workers: int = 1) -> dict[str, Any]:
    """Decode every distinct media file of ``annotation``; return the report dict.

    Report: ``{"annotation", "media_root", "media_type", "files", "counts": {ok, missing, empty, undecodable,
    too_short}, "bad": [{"path", "reason", "detail", "records": [indices]}]}``.
    """
    if media_type not in ("video", "image"):
        raise ValueError(f"media_type must be 'video' or 'image', got {media_type!r}")
    paths = _media_paths(annotation, media_type)
    jobs = [(rel, str(resolve_media_path(media_root, rel)), media_type, min_frames) for rel in paths]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_check_job, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    else:
        results = [_check_job(job) for job in jobs]
    counts = {"ok": 0, **{reason: 0 for reason in FAILURE_REASONS}}
    bad = []
    for rel, status, detail, _ in results:
        counts[status] += 1
        if status != "ok":
            bad.append({"path": rel, "reason": status, "detail": detail, "records": paths[rel]})
    return {"annotation": str(annotation), "media_root": str(media_root), "media_type": media_type,
            "files": len(jobs), "counts": counts, "bad": bad}


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stmvl check-data", description=__doc__.splitlines()[0])
    parser.add_argument("annotation", help="annotation file (JSON list or JSONL)")
    parser.add_argument("--media-root", required=True, help="folder the records' media paths are relative to")
    parser.add_argument("--media-type", choices=("video", "image"), default="video")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--workers", type=int, default=1, help="decode with this many processes")
    parser.add_argument("--min-frames", type=int, default=1, help="videos with fewer frames are 'too_short'")
    args = parser.parse_args(argv)
    try:
        report = check_corpus(args.annotation, args.media_root, args.media_type, args.min_frames, args.workers)
    except AnnotationError as err:
        print(f"stmvl check-data: {err}", file=sys.stderr)
        return 2
    counts = report["counts"]
    print(f"checked {report['files']} {args.media_type} files of {args.annotation}")
    for status, count in counts.items():
        print(f"  {status:<12}{count}")
    for entry in report["bad"][:20]:
        print(f"  BAD {entry['reason']:<12}{entry['path']}  {entry['detail']}")
    if len(report["bad"]) > 20:
        print(f"  ... and {len(report['bad']) - 20} more (see the report)")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"report: {args.report}")
    return 0 if counts["ok"] == report["files"] else 1
