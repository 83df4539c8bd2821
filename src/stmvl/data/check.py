"""``stmvl check-data``: decode every media file of a corpus up front and report the broken ones.

Each distinct media path is decoded completely (every video frame), so truncated files that open fine but fail
half-way are found too. A shard corpus (no ``--media-root``: an ``index.json``, its folder or a webdataset pattern)
is read sample by sample with the training reader's checks (tar structure, member names and sizes, ``.json`` and
``index``), every sample decoded completely, and each shard's sample count compared with the index. Media over
the size caps (``--max-image-pixels``, ``--max-video-pixels``, ``--max-video-seconds``; the ``data.max_*`` defaults
of a recipe) are reported as ``too_large`` from their headers, and any other failure of a file as ``error`` with the
exception named: one file never stops the check. An annotation that is not UTF-8 or not JSON, or a record without
its media field, is an AnnotationError naming the file (a user error). The command (``stmvl.commands.data``) exits 0
when everything decodes, 1 otherwise, 2 for a user error.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any, Sequence

from .annotations import AnnotationError, read_records
from .quarantine import as_media_error
from .stream import DEFAULT_MAX_MEMBER_BYTES, ShardIndex, frame_members, iter_raw_samples, media_member, parse_meta
from .video import FAILURE_REASONS, MediaError, MediaLimits, count_decodable_frames, read_image, resolve_media_path


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


def check_media(path: str | Path, media_type: str, min_frames: int = 1,
                limits: MediaLimits | None = None) -> tuple[str, str, int]:
    """Decode one file completely: (status, detail, frames). status is ``ok`` or a failure reason (any exception
    but MemoryError is the file's failure: ``error`` with the exception named)."""
    try:
        if media_type == "image":
            read_image(path, limits)
            return "ok", "", 1
        frames = count_decodable_frames(path, limits)
    except MemoryError:
        raise
    except Exception as err:
        failure = as_media_error(err, str(path))
        return failure.reason, failure.detail, 0
    if frames < min_frames:
        return "too_short", f"{frames} frames, need at least {min_frames}", frames
    return "ok", "", frames


def _check_job(job: tuple[str, str, str, int, MediaLimits]) -> tuple[str, str, str, int]:
    rel, full, media_type, min_frames, limits = job
    status, detail, frames = check_media(full, media_type, min_frames, limits)
    return rel, status, detail, frames


def _empty_counts() -> dict[str, int]:
    return {"ok": 0, **{reason: 0 for reason in FAILURE_REASONS}}


def check_corpus(annotation: str | Path, media_root: str | Path, media_type: str = "video", min_frames: int = 1,
                 workers: int = 1, limits: MediaLimits | None = None) -> dict[str, Any]:
    """Decode every distinct media file of ``annotation``; return the report dict.

    Report: ``{"annotation", "media_root", "media_type", "files", "counts": {ok, missing, empty, undecodable,
    too_short, too_large, error}, "bad": [{"path", "reason", "detail", "records": [indices]}]}``.
    """
    if media_type not in ("video", "image"):
        raise ValueError(f"media_type must be 'video' or 'image', got {media_type!r}")
    limits = limits or MediaLimits()
    paths = _media_paths(annotation, media_type)
    jobs = [(rel, str(resolve_media_path(media_root, rel)), media_type, min_frames, limits) for rel in paths]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_check_job, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
    else:
        results = [_check_job(job) for job in jobs]
    counts = _empty_counts()
    bad = []
    for rel, status, detail, _ in results:
        counts[status] += 1
        if status != "ok":
            bad.append({"path": rel, "reason": status, "detail": detail, "records": paths[rel]})
    return {"annotation": str(annotation), "media_root": str(media_root), "media_type": media_type,
            "files": len(jobs), "counts": counts, "bad": bad}


def check_shard_sample(sample: dict, media_type: str, records: int | None, min_frames: int = 1,
                       limits: MediaLimits | None = None) -> int:
    """Check one raw shard sample completely; returns its frame count, raises MediaError naming ``SHARD:KEY`` (any
    exception but MemoryError becomes one, see :func:`check_media`)."""
    if "__error__" in sample:
        raise sample["__error__"]
    where = f"{sample['__url__']}:{sample['__key__']}"
    meta, _ = parse_meta(sample, records)
    try:
        jpegs = frame_members(sample) if media_type == "video" else []
        if jpegs:
            for data in jpegs:
                read_image(data, limits)
            frames = len(jpegs)
        else:
            entry = media_member(sample, media_type, meta)
            if entry is None:
                raise MediaError(where, "missing", f"no {media_type} member in the sample")
            if media_type == "image":
                read_image(entry[1], limits)
                frames = 1
            else:
                frames = count_decodable_frames(entry[1], limits)
    except MemoryError:
        raise
    except Exception as err:
        failure = as_media_error(err, where)
        raise MediaError(where, failure.reason, failure.detail) from None
    if frames < min_frames:
        raise MediaError(where, "too_short", f"{frames} frames, need at least {min_frames}")
    return frames


def _check_shard_job(job: tuple[str, str, int | None, int, int, MediaLimits]) -> tuple[str, int, int, list[dict]]:
    url, media_type, records, min_frames, max_member_bytes, limits = job
    ok, seen, bad = 0, 0, []
    for sample in iter_raw_samples(url, max_member_bytes):
        seen += 1
        try:
            check_shard_sample(sample, media_type, records, min_frames, limits)
            ok += 1
        except MediaError as err:
            bad.append({"path": err.path, "reason": err.reason, "detail": err.detail})
    return url, ok, seen, bad


def check_shards(source: str | Sequence[str], index: ShardIndex | None = None, media_type: str | None = None,
                 min_frames: int = 1, workers: int = 1, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 limits: MediaLimits | None = None) -> dict[str, Any]:
    """Read and decode every sample of a shard corpus; return the report dict.

    ``source``: a shards spec (``index.json``, its folder, a webdataset pattern) or a list of shard URLs (sample
    counts from ``index`` when given). Report: ``{"shards", "media_type", "samples", "counts": {ok, missing, empty,
    undecodable, too_short, too_large, error}, "bad": [{"path": "SHARD:KEY", "reason", "detail"}], "index_mismatch": [{"url",
    "index", "found"}]}``.
    """
    if isinstance(source, str):
        index = ShardIndex.load(source)
        urls = index.urls
    else:
        urls = list(source)
    media_type = media_type or (index.media_type if index is not None else "video")
    expected = dict(zip(index.urls, index.counts)) if index is not None else {}
    records = index.records if index is not None else None
    limits = limits or MediaLimits()
    jobs = [(url, media_type, records, min_frames, max_member_bytes, limits) for url in urls]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_check_shard_job, jobs, chunksize=1)
    else:
        results = [_check_shard_job(job) for job in jobs]
    counts = _empty_counts()
    bad, mismatch = [], []
    for url, ok, seen, shard_bad in results:
        counts["ok"] += ok
        for entry in shard_bad:
            counts[entry["reason"]] += 1
        bad += shard_bad
        if url in expected and expected[url] != seen:
            mismatch.append({"url": url, "index": expected[url], "found": seen})
    return {"shards": str(source) if isinstance(source, str) else len(urls), "media_type": media_type,
            "samples": sum(r[2] for r in results), "counts": counts, "bad": bad, "index_mismatch": mismatch}
