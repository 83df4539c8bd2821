"""WebDataset tar shards: ``stmvl shards write`` and a streaming :class:`ShardDataset`.

A shard is a plain tar in the webdataset layout: for each sample ``KEY.mp4`` (or the media's own extension) and
``KEY.json`` (the annotation record plus ``"index"``, the record's position in the source annotation file, which
gives the sample its id and its per-sample random seed). The files are readable by the ``webdataset`` library too;
reading here uses ``tarfile`` streaming so a shard is never extracted to disk.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .annotations import read_records
from .datasets import sample_generators
from .quarantine import BrokenMediaGuard, Quarantine
from .transforms import build_transform
from .video import MediaError, read_media, resolve_media_path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same input -> byte-identical shard
    tar.addfile(info, io.BytesIO(data))


def write_shards(annotation: str | Path, media_root: str | Path, out: str | Path, shard_size: int,
                 media_type: str = "video", prefix: str = "shard") -> list[Path]:
    """Write ``prefix-000000.tar`` ... with ``shard_size`` samples each; returns the shard paths.

    Raises FileNotFoundError naming the record when a media file is missing (shards are written from checked data;
    run ``stmvl check-data`` first).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    key_field = "image" if media_type == "image" else "video"
    records = read_records(annotation)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tar = None
    try:
        for index, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get(key_field), str):
                raise ValueError(f"{annotation}: record {index}: missing field {key_field!r}")
            if index % shard_size == 0:
                if tar is not None:
                    tar.close()
                paths.append(out / f"{prefix}-{len(paths):06d}.tar")
                tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
            media = resolve_media_path(media_root, record[key_field])
            if not media.is_file():
                raise FileNotFoundError(f"{annotation}: record {index}: media file {media} not found")
            key = f"{index:09d}"
            extension = media.suffix.lower().lstrip(".") or ("jpg" if media_type == "image" else "mp4")
            _add_bytes(tar, f"{key}.{extension}", media.read_bytes())
            meta = dict(record, index=index, media_type=media_type)
            _add_bytes(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()
    return paths


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Stream a webdataset tar: yields ``{"__key__": key, ext: bytes, ...}`` per sample (consecutive members)."""
    current: dict[str, Any] = {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(member.name), key)
            if current and current["__key__"] != key:
                yield current
                current = {}
            handle = tar.extractfile(member)
            if handle is None:
                raise ValueError(f"{path}: member {member.name} cannot be read")
            current["__key__"] = key
            current[ext.lower()] = handle.read()
    if current:
        yield current


def _media_entry(sample: dict[str, Any], media_type: str) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTENSIONS if media_type == "image" else VIDEO_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    return None


class ShardDataset(IterableDataset):
    """Stream samples from shards, split across ranks (``rank::world_size``) and DataLoader workers.

    Yields the same dicts as VideoTextDataset: ``{"video": uint8 [T,3,H,W], "caption", "sample_id", "index",
    "foil"?}``; frame sampling and crops are seeded by (seed, epoch, record index), so a sample decodes identically
    from a shard and from the original file. Broken samples are skipped, counted and quarantined (path
    ``SHARD:KEY``). The shard order is shuffled per epoch (seed, epoch) when ``shuffle_shards``.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], *, media_type: str = "video", num_frames: int = 4,
                 img_size: int = 224, sampling: str = "rand", train: bool = True, hflip: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, id_offset: int = 0, quarantine: Quarantine | None = None,
                 max_bad_fraction: float = 0.1, min_frames: int = 1, shuffle_shards: bool = True,
                 corpus: str = "", video_kwargs: dict | None = None):
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
        self.sampling, self.transform = sampling, build_transform(train, img_size, hflip=hflip)
        self.seed, self.epoch, self.rank, self.world_size = seed, 0, rank, world_size
        self.id_offset, self.min_frames, self.shuffle_shards = id_offset, min_frames, shuffle_shards
        self.video_kwargs = dict(video_kwargs or {})
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

    def _decode(self, shard: str, sample: dict[str, Any]) -> dict[str, Any]:
        where = f"{shard}:{sample['__key__']}"
        if "json" not in sample:
            raise ValueError(f"{where}: sample has no .json metadata")
        meta = json.loads(sample["json"])
        entry = _media_entry(sample, self.media_type)
        if entry is None:
            raise MediaError(where, "missing", f"no {self.media_type} member in the shard sample")
        index = int(meta["index"])
        rng, generator = sample_generators(self.seed, self.epoch, index)
        kwargs = dict(self.video_kwargs)
        if self.media_type == "video":
            kwargs.update(min_frames=self.min_frames, start=meta.get("start"), end=meta.get("end"))
        try:
            frames = read_media(entry[1], self.media_type, self.num_frames, self.sampling, rng, **kwargs)
        except MediaError as err:
            raise MediaError(where, err.reason, err.detail) from err
        out = {"video": self.transform(frames, generator), "caption": meta["caption"],
               "sample_id": self.id_offset + index, "index": index}
        if "foil" in meta:
            out["foil"] = meta["foil"]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.my_shards():
            for position, sample in enumerate(iter_tar_samples(shard)):
                self.guard.attempts += 1
                try:
                    yield self._decode(shard, sample)
                except MediaError as err:
                    self.guard.record_failure(err, position)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stmvl shards", description="webdataset tar shards")
    sub = parser.add_subparsers(dest="action", required=True)
    write = sub.add_parser("write", help="write shards from an annotation file")
    write.add_argument("annotation")
    write.add_argument("--media-root", required=True)
    write.add_argument("--out", required=True)
    write.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    write.add_argument("--media-type", choices=("video", "image"), default="video")
    write.add_argument("--prefix", default="shard")
    args = parser.parse_args(argv)
    paths = write_shards(args.annotation, args.media_root, args.out, args.shard_size, args.media_type, args.prefix)
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0

