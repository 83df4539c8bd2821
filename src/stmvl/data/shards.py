"""WebDataset tar shards: ``stmvl shards write`` / ``stmvl shards index`` and a simple streaming ShardDataset.

A shard is a plain tar in the webdataset layout: for each sample ``KEY.EXT`` (the media file's own bytes and
extension, e.g. ``.mp4``, ``.webm``, ``.mpg``) and ``KEY.json`` (the annotation record plus ``"index"``, the record's
position in the source annotation file, which gives the sample its id and its per-sample random seed, and
``"media_ext"``, the member holding the media). With ``--predecode T`` a video sample holds instead ``T`` frames
(``KEY.f000.jpg`` ...), sampled at the segment middles and resized to a short side, so that data-bound GPU runs
decode JPEGs instead of videos.

Writing is atomic (each shard is written under a temporary name and renamed when complete) and resumable (finished
shards are kept; ``index.json`` is rewritten after each shard). ``index.json`` lists the shards with their sample
counts; training (stmvl.data.stream) derives the steps per epoch from it. See docs/data.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from stmvl.errors import UserError

from .annotations import read_records, validate_optional_fields
from .datasets import sample_generators
from .quarantine import BrokenMediaGuard, Quarantine, as_media_error
from .stream import (IMAGE_EXTENSIONS, INDEX_FILE, INDEX_FORMAT, VIDEO_EXTENSIONS, iter_raw_samples,
                     media_member)
from .transforms import build_transform
from .video import MediaError, MediaLimits, read_media, read_video, resolve_media_path

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "write_shards", "write_index", "iter_tar_samples",
           "ShardDataset"]

log = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same input -> byte-identical shard
    tar.addfile(info, io.BytesIO(data))


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def predecode_frames(path: Path, frames: int, short_side: int, quality: int, start: float | None = None,
                     end: float | None = None) -> list[bytes]:
    """``frames`` frames at the segment middles of a video, resized so the short side is ``short_side``, as JPEG
    bytes (raises MediaError when the video is broken)."""
    from PIL import Image

    video, _ = read_video(path, frames, "middle", start=start, end=end)  # uint8 [T, 3, H, W]
    out = []
    for frame in video.permute(0, 2, 3, 1).numpy():
        image = Image.fromarray(frame)
        w, h = image.size
        scale = short_side / min(w, h)
        if scale < 1:  # never upsample: it costs bytes and adds nothing
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def _write_one_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Write shard ``job["path"]`` from ``job["records"]`` [(index, record)]; returns its index entry."""
    path, media_type, media_root = Path(job["path"]), job["media_type"], job["media_root"]
    key_field = "image" if media_type == "image" else "video"
    predecode = job["predecode"]
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    samples, skipped = 0, []
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, record in job["records"]:
                media = resolve_media_path(media_root, record[key_field])
                if not media.is_file():
                    raise FileNotFoundError(f"{job['annotation']}: record {index}: media file {media} not found")
                key = f"{index:09d}"
                meta = dict(record, index=index, media_type=media_type)
                if predecode and media_type == "video":
                    try:
                        jpegs = predecode_frames(media, predecode["frames"], predecode["short_side"],
                                                 predecode["quality"], record.get("start"), record.get("end"))
                    except MediaError as err:
                        # one broken file must not stop a day-long write: it is left out and listed in the index
                        skipped.append({"index": index, "path": str(media), "reason": err.reason, "detail": err.detail})
                        log.warning("record %d left out of %s: %s", index, path.name, err)
                        continue
                    # frame k of the shard is the middle of segment k of [start, end): the clip is already trimmed
                    meta.pop("start", None), meta.pop("end", None)
                    meta.update(predecoded=len(jpegs))
                    _add_bytes(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                    for k, data in enumerate(jpegs):
                        _add_bytes(tar, f"{key}.f{k:03d}.jpg", data)
                else:
                    extension = media.suffix.lower().lstrip(".") or ("jpg" if media_type == "image" else "mp4")
                    if "." in extension or extension == "json" or extension.startswith("f0"):
                        raise UserError(f"{job['annotation']}: record {index}: media file {media} has an extension "
                                        f"that cannot be a shard member name")
                    meta["media_ext"] = extension
                    _add_bytes(tar, f"{key}.{extension}", media.read_bytes())
                    _add_bytes(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                samples += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # an interrupted shard leaves nothing that looks like a shard
        raise
    os.replace(tmp, path)  # a shard under its final name is always complete
    return {"url": path.name, "samples": samples, "bytes": path.stat().st_size, "first": job["first"],
            "records": len(job["records"]), "skipped": skipped}


def count_samples(url: str) -> tuple[int, int]:
    """(samples, broken samples) of one shard, reading members but decoding nothing."""
    good = bad = 0
    for sample in iter_raw_samples(url):
        if "__error__" in sample:
            bad += 1
        else:
            good += 1
    return good, bad


def write_shards(annotation: str | Path, media_root: str | Path, out: str | Path, shard_size: int,
                 media_type: str = "video", prefix: str = "shard", *, predecode: int | None = None,
                 short_side: int = 256, quality: int = 90, workers: int = 1) -> list[Path]:
    """Write ``prefix-000000.tar`` ... with ``shard_size`` records each, and ``out/index.json``; returns the shard
    paths. Shard i holds records [i * shard_size, (i + 1) * shard_size).

    Args:
        predecode: store this many JPEG frames per video (resized to ``short_side``) instead of the video file.
        workers: write this many shards in parallel (processes).

    Re-running with the same arguments after an interruption keeps the finished shards and writes the rest; other
    arguments over an existing index are refused. Raises FileNotFoundError naming the record when a media file is
    missing (shards are written from checked data; run ``stmvl check-data`` first).
    """
    if shard_size < 1:
        raise UserError(f"shard_size must be >= 1, got {shard_size}")
    if media_type not in ("video", "image"):
        raise UserError(f"media_type must be 'video' or 'image', got {media_type!r}")
    key_field = "image" if media_type == "image" else "video"
    records = read_records(annotation)
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get(key_field), str):
            raise UserError(f"{annotation}: record {index}: missing field {key_field!r}")
        validate_optional_fields(record, f"{annotation}: record {index}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"annotation": str(annotation), "media_type": media_type, "shard_size": int(shard_size),
                "prefix": prefix, "records": len(records),
                "predecode": ({"frames": int(predecode), "short_side": int(short_side), "quality": int(quality)}
                              if predecode and media_type == "video" else None)}
    index_path = out / INDEX_FILE
    done: dict[str, dict] = {}
    if index_path.exists():
        previous = json.loads(index_path.read_text(encoding="utf-8"))
        changed = [k for k in ("media_type", "shard_size", "prefix", "records", "predecode")
                   if previous.get(k) != settings[k]]
        if changed:
            raise UserError(f"{index_path}: written with other settings (differ: {', '.join(changed)}); write to "
                            f"another --out or delete the folder")
        done = {e["url"]: e for e in previous.get("shards", [])}
    jobs = []
    for number, first in enumerate(range(0, len(records), shard_size)):
        path = out / f"{prefix}-{number:06d}.tar"
        entry = done.get(path.name)
        if path.exists() and entry is not None and entry.get("bytes") == path.stat().st_size:
            continue
        if path.exists():  # renamed into place but killed before the index was updated: count it
            good, bad = count_samples(str(path))
            if bad == 0 and good > 0:
                done[path.name] = {"url": path.name, "samples": good, "bytes": path.stat().st_size, "first": first,
                                   "records": min(shard_size, len(records) - first), "skipped": []}
                continue
        done.pop(path.name, None)
        jobs.append({"path": str(path), "records": [(i, records[i]) for i in range(first, min(first + shard_size,
                                                                                                   len(records)))],
                     "first": first, "media_type": media_type, "media_root": str(media_root),
                     "annotation": str(annotation), "predecode": settings["predecode"]})
    if jobs and len(jobs) < len(range(0, len(records), shard_size)):
        log.info("resuming: %d of %d shards left to write", len(jobs), len(range(0, len(records), shard_size)))

    def save_index() -> None:
        shards = sorted(done.values(), key=lambda e: e["url"])
        _atomic_json(index_path, {"format": INDEX_FORMAT, **settings, "samples": sum(e["samples"] for e in shards),
                                  "shards": shards})

    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_write_one_shard, job) for job in jobs]):
                entry = future.result()
                done[entry["url"]] = entry
                save_index()
    else:
        for job in jobs:
            entry = _write_one_shard(job)
            done[entry["url"]] = entry
            save_index()
    save_index()
    return [out / e["url"] for e in sorted(done.values(), key=lambda e: e["url"])]


def write_index(spec: str, out: str | Path, media_type: str = "video", records: int | None = None) -> dict:
    """Count the samples of existing shards (a webdataset pattern, any gopen URL) and write an index file, e.g. for
    shards made by other tools. ``records`` (the sample index bound) defaults to the largest ``index`` + 1."""
    import webdataset

    from .stream import parse_meta

    urls = webdataset.shardlists.expand_urls(spec)
    out = Path(out)
    base = out.parent.resolve()
    shards, highest = [], -1
    for url in urls:
        good = bad = 0
        for sample in iter_raw_samples(url):
            try:
                if "__error__" in sample:
                    raise sample["__error__"]
                _, index = parse_meta(sample)
                highest = max(highest, index)
                good += 1
            except MediaError as err:
                bad += 1
                log.warning("%s", err)
        local = Path(url)
        name = str(local.resolve().relative_to(base)) if not ("://" in url or url.startswith("pipe:")) and \
            local.resolve().is_relative_to(base) else url
        shards.append({"url": name, "samples": good, "broken": bad})
    data = {"format": INDEX_FORMAT, "media_type": media_type,
            "records": records if records is not None else highest + 1,
            "samples": sum(s["samples"] for s in shards), "shards": shards}
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(out, data)
    return data


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Stream a webdataset tar: yields ``{"__key__", "__url__", ext: bytes, ...}`` per sample; raises MediaError at
    the first broken sample (training uses stmvl.data.stream, which quarantines them instead)."""
    for sample in iter_raw_samples(str(path)):
        if "__error__" in sample:
            raise sample["__error__"]
        yield sample


class ShardDataset(IterableDataset):
    """Stream the samples of a shard folder once, split across ranks (``rank::world_size``) and DataLoader workers
    (for inspection and tests; training uses :class:`stmvl.data.stream.ShardStream`, which adds the shuffle buffer,
    equal batch counts on every rank and resume).

    Yields the VideoTextDataset dicts ``{"video": uint8 [T,3,H,W], "caption", "sample_id", "index", "foil"?}``;
    frame sampling and crops are seeded by (seed, epoch, record index), so a sample decodes identically from a shard
    and from the original file. Broken samples are skipped, counted and quarantined (path ``SHARD:KEY``).
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], *, media_type: str = "video", num_frames: int = 4,
                 img_size: int = 224, sampling: str = "rand", train: bool = True, hflip: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0), seed: int = 0, rank: int = 0, world_size: int = 1,
                 id_offset: int = 0, quarantine: Quarantine | None = None,
                 max_bad_fraction: float = 0.1, min_frames: int = 1, shuffle_shards: bool = True,
                 corpus: str = "", video_kwargs: dict | None = None, limits: MediaLimits | None = None):
        if isinstance(shards, (str, Path)) and Path(shards).is_dir():
            shards = sorted(Path(shards).glob("*.tar"))
        elif isinstance(shards, (str, Path)):
            shards = [shards]
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ValueError("ShardDataset got no shard files")
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards cannot feed {world_size} ranks: write smaller shards")
        self.media_type, self.num_frames = media_type, (1 if media_type == "image" else num_frames)
        self.sampling = sampling
        self.transform = build_transform(train, img_size, hflip=hflip, scale=tuple(crop_scale))
        self.seed, self.epoch, self.rank, self.world_size = seed, 0, rank, world_size
        self.id_offset, self.min_frames, self.shuffle_shards = id_offset, min_frames, shuffle_shards
        self.video_kwargs = dict(video_kwargs or {})
        self.limits = limits or MediaLimits()
        self.guard = BrokenMediaGuard(quarantine, corpus or Path(self.shards[0]).parent.name,
                                      max_bad_fraction=max_bad_fraction, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def my_shards(self) -> list[str]:
        """Shards read by this rank and DataLoader worker in the current epoch."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, self.epoch, 0x5A4D]).permutation(len(self.shards)).tolist()
        mine = order[self.rank::self.world_size]
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        return [self.shards[i] for i in mine]

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        from .stream import parse_meta

        if "__error__" in sample:
            raise sample["__error__"]
        where = f"{sample['__url__']}:{sample['__key__']}"
        meta, index = parse_meta(sample)
        entry = media_member(sample, self.media_type, meta)
        if entry is None:
            raise MediaError(where, "missing", f"no {self.media_type} member in the shard sample")
        rng, generator = sample_generators(self.seed, self.epoch, index)
        kwargs = dict(self.video_kwargs)
        if self.media_type == "video":
            kwargs.update(min_frames=self.min_frames, start=meta.get("start"), end=meta.get("end"))
        try:
            frames = read_media(entry[1], self.media_type, self.num_frames, self.sampling, rng, limits=self.limits,
                                **kwargs)
            video = self.transform(frames, generator)
        except MemoryError:
            raise
        except Exception as err:  # any failure of reading or transforming is this sample's
            err = as_media_error(err, where)
            raise MediaError(where, err.reason, err.detail) from None
        out = {"video": video, "caption": meta["caption"],
               "sample_id": self.id_offset + index, "index": index}
        if "foil" in meta:
            out["foil"] = meta["foil"]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.my_shards():
            for position, sample in enumerate(iter_raw_samples(shard)):
                self.guard.count_attempt()
                try:
                    decoded = self._decode(sample)
                except MemoryError:
                    raise
                except Exception as err:  # recorded with its reason; see stmvl.data.quarantine
                    self.guard.record_failure(as_media_error(err, f"{shard}:{sample.get('__key__')}"), position)
                    continue
                yield decoded
