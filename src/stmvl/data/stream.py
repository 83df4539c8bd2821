"""Training from webdataset shards: a streamed, resumable, rank- and worker-split batch source (docs/data.md).

The pipeline of one DataLoader worker (everything before decoding handles bytes only)::

    shard list of (seed, epoch, pass)  ->  this rank's shards (rank::world_size)  ->  this worker's (w::W)
      ->  webdataset.gopen (local path, http(s)://, pipe:CMD, ...)  ->  guarded tar reading (iter_raw_samples)
      ->  webdataset shuffle buffer (seeded)  ->  skip already-consumed samples (resume)  ->  decode + transform
      ->  batches of B, collated in the worker

A corpus is described by an **index file** (``index.json``, written by ``stmvl shards write`` or ``stmvl shards
index``) that lists the shards and their sample counts. Steps per epoch come from it:
``num_batches = total_samples // (batch_size * world_size)``, the same on every rank, and every rank's stream yields
exactly that many batches per epoch: a rank whose shards hold more samples stops early (truncation), one that holds
fewer continues into the next pass over the shard list (cycling). With equal-size shards whose count is a multiple
of ``world_size * W`` and per-worker shares that are multiples of B, every sample is seen exactly once per epoch.

Broken samples (a garbage or truncated tar, a sample without ``.json``, a bad ``index``, an unsafe member name, an
oversized member, undecodable media) are listed in the run's quarantine with the file corpora's reasons and bound
(:class:`~stmvl.data.quarantine.BrokenMediaGuard`). In a stream the broken sample's place in the batch is taken by
the last good sample of the same worker (as files take a deterministic replacement), so every raw position of the
stream gives exactly one training sample and the batch boundaries do not move.

Resume: the stream position recorded by the engine is (epoch, step). On resume each worker restarts the epoch's
shard order and shuffle buffer from the same seeds and skips the raw samples of the batches already consumed (they
are read from the tar but not decoded), so the batches after the restart are the ones an uninterrupted run would
have produced ("exact" at sample granularity), provided the shards, world size and ``num_workers`` are unchanged.
The one exception: when the first sample after the resume point is broken, its replacement is the next good
sample instead of the (not decoded) previous one.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stmvl.errors import UserError

from .annotations import AnnotationError, unencodable_field, validate_optional_fields
from .datasets import sample_generators
from .mixing import one_thread_per_worker
from .quarantine import BrokenMediaGuard, Quarantine, TooManyBadSamples, as_media_error
from .transforms import build_transform
from .video import MediaError, MediaLimits, read_image, read_media, sample_frame_indices

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_FORMAT = "stmvl-shards/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# Containers FFmpeg demuxes; a shard member keeps its file's own extension and the reader accepts any of these.
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "mpe", "m1v", "m2v", "ts", "m2ts",
                    "mts", "flv", "wmv", "asf", "3gp", "3g2", "ogv", "ogg", "gif", "vob", "mxf", "dv", "f4v")
FRAME_MEMBER = re.compile(r"^f(\d{3,})\.jpg$")  # pre-decoded frames: KEY.f000.jpg, KEY.f001.jpg, ...
DEFAULT_MAX_MEMBER_BYTES = 512 * 2**20  # a single tar member larger than this is not read into memory
DEFAULT_SHUFFLE_BUFFER = 256  # raw samples (compressed bytes) held per worker; ~0.5-1 GB for WebVid-size clips
PASS_STRIDE = 1000  # pass p of epoch e draws per-sample randomness as epoch e * 1000 + p, as the file corpora do


# ------------------------------------------------------------------------------------------------------------------
# The index file
# ------------------------------------------------------------------------------------------------------------------


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def is_single_local_path(spec: str) -> bool:
    """Whether a ``shards`` value names one local file or folder (not a URL, ``pipe:``, brace pattern or ``::``
    list), so that its existence can be checked up front."""
    return not _is_url(spec) and "{" not in spec and "::" not in spec


def read_json_url(url: str) -> Any:
    """JSON from a local path or anything webdataset.gopen opens."""
    if _is_url(url):
        import webdataset

        with webdataset.gopen(url, "rb") as stream:
            return json.loads(stream.read().decode("utf-8"))
    return json.loads(Path(url).read_text(encoding="utf-8"))


def _join(base: str, name: str) -> str:
    if _is_url(name) or name.startswith("/"):
        return name
    return posixpath.join(base, name) if _is_url(base) else str(Path(base) / name)


class ShardIndex:
    """The shards of one corpus with their sample counts.

    Attributes: ``urls: list[str]`` (openable by webdataset.gopen), ``counts: list[int]``, ``records: int`` (records
    of the source annotation: sample indices are in [0, records)), ``media_type``, ``source`` (the index path).
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], records: int, media_type: str = "video",
                 source: str = "", predecode: dict | None = None):
        self.urls, self.counts = list(urls), [int(c) for c in counts]
        self.records, self.media_type, self.source = int(records), media_type, source
        self.predecode = predecode

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @classmethod
    def load(cls, spec: str, index: str | None = None) -> "ShardIndex":
        """Resolve a corpus's ``shards`` value: an index file (``.json``), a folder holding ``index.json``, or a
        webdataset pattern (``/data/webvid/{000000..002499}.tar``, ``https://...``, ``pipe:CMD``; ``::`` joins
        several) whose sample counts come from ``index`` (default: ``index.json`` beside the first shard)."""
        spec = str(spec)
        if spec.endswith(".json"):
            return cls.from_file(spec)
        if not _is_url(spec) and Path(spec).is_dir():
            return cls.from_file(str(Path(spec) / INDEX_FILE))
        if is_single_local_path(spec) and not Path(spec).exists():
            raise UserError(f"shards {spec!r}: no such file or folder (expected an index.json, a folder holding "
                            f"one, or a shard pattern such as /data/webvid/shard-{{000000..002499}}.tar)")
        import webdataset

        urls = webdataset.shardlists.expand_urls(spec)
        if not urls:
            raise UserError(f"shards {spec!r}: the pattern expands to no shard")
        if index is None:
            if urls[0].startswith("pipe:"):
                raise UserError(f"shards {spec!r}: a pipe: pattern has no folder to find index.json in; name the "
                                f"index file in the corpus's `annotation` (write one with `stmvl shards index`)")
            index = _join(posixpath.dirname(urls[0]) if _is_url(urls[0]) else str(Path(urls[0]).parent), INDEX_FILE)
        full = cls.from_file(index)
        by_name = {posixpath.basename(u): c for u, c in zip(full.urls, full.counts)}
        missing = [u for u in urls if posixpath.basename(u) not in by_name]
        if missing:
            raise UserError(f"shards {spec!r}: {len(missing)} shard(s) are not listed in {index} (first: "
                            f"{missing[0]}); rewrite the index with `stmvl shards index`")
        return cls(urls, [by_name[posixpath.basename(u)] for u in urls], full.records, full.media_type, index,
                   full.predecode)

    @classmethod
    def from_file(cls, path: str) -> "ShardIndex":
        try:
            data = read_json_url(path)
        except FileNotFoundError:
            raise UserError(f"shard index {path} does not exist (write it with `stmvl shards write` or "
                            f"`stmvl shards index`)") from None
        except (OSError, ValueError) as err:
            raise UserError(f"shard index {path}: cannot be read as JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("shards"), list):
            raise UserError(f"shard index {path}: expected an object with a 'shards' list")
        base = posixpath.dirname(path) if _is_url(path) else str(Path(path).parent)
        urls, counts = [], []
        for i, entry in enumerate(data["shards"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or not isinstance(
                    entry.get("samples"), int) or entry["samples"] < 0:
                raise UserError(f"shard index {path}: shards[{i}] needs 'url' (str) and 'samples' (int >= 0)")
            if entry["samples"] == 0:
                continue  # an empty shard would give a worker nothing to read
            urls.append(_join(base, entry["url"]))
            counts.append(entry["samples"])
        if not urls:
            raise UserError(f"shard index {path}: lists no non-empty shard")
        records = int(data.get("records", sum(counts)))
        return cls(urls, counts, records, data.get("media_type", "video"), path, data.get("predecode"))


# ------------------------------------------------------------------------------------------------------------------
# Guarded tar reading
# ------------------------------------------------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's key/extension split: key = path up to the first dot of the base name."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _unsafe(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name.startswith("/") or ".." in parts or "\\" in name


def _error(url: str, key: str | None, reason: str, detail: str) -> dict[str, Any]:
    where = f"{url}:{key}" if key else url
    return {"__key__": key or "", "__url__": url, "__error__": MediaError(where, reason, detail)}


def iter_raw_samples(url: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[dict[str, Any]]:
    """Stream one shard: yields ``{"__key__", "__url__", ext: bytes, ...}`` per sample, or, for a broken sample,
    ``{"__key__", "__url__", "__error__": MediaError}``. Never raises for bad data.

    Opening goes through ``webdataset.gopen`` (local paths, ``http(s)://``, ``pipe:CMD``, ...). The members are
    read here rather than by webdataset's tar iterator because every failure must be tied to one sample for the
    quarantine: a member name with ``..`` or a leading ``/``, a member over ``max_member_bytes`` (checked from the
    header, before reading), a duplicate extension and a truncated tail each mark only their own sample; a file that
    is not a tar, or cannot be opened, gives one error entry for the shard.
    """
    import webdataset

    try:
        stream = webdataset.gopen(url, "rb")
    except Exception as err:  # gopen raises whatever its scheme's opener raises
        yield _error(url, None, "missing", f"cannot open shard: {err}")
        return
    current: dict[str, Any] | None = None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            yield _error(url, None, "undecodable", f"not a tar archive: {err}")
            return
        try:
            for member in tar:
                tar.members = []  # streaming mode keeps every header otherwise: memory would grow with the shard
                if not member.isreg():
                    continue  # directories, links (which could point anywhere) and devices carry no sample data
                key, ext = _split_name(member.name)
                if key is None:
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if "__error__" in current:
                    continue
                ext = ext.lower()
                if _unsafe(member.name):
                    current = _error(url, key, "undecodable", f"unsafe member name {member.name!r}")
                elif member.size > max_member_bytes:
                    # not read: streaming tarfile seeks/reads past it when the next header is requested
                    current = _error(url, key, "undecodable", f"member {member.name} is {member.size} bytes, over "
                                                              f"the {max_member_bytes}-byte limit")
                elif ext in current:
                    current = _error(url, key, "undecodable", f"duplicate member {member.name}")
                else:
                    handle = tar.extractfile(member)
                    current[ext] = handle.read() if handle is not None else b""
                    if len(current[ext]) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is truncated")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            # a truncated or corrupt tail: the samples before it were good; the one being read is lost
            if current is not None:
                yield _error(url, current["__key__"], "undecodable", f"shard truncated or corrupt: {err}")
                current = None
            else:
                yield _error(url, None, "undecodable", f"shard truncated or corrupt: {err}")
        if current is not None:
            yield current
    finally:
        try:
            stream.close()
        except Exception as err:  # a pipe: command that failed reports it here
            log.warning("closing shard %s: %s", url, err)


def media_member(sample: dict[str, Any], media_type: str, meta: dict | None = None) -> tuple[str, bytes] | None:
    """(extension, bytes) of the sample's media: the extension named in its metadata, else the first known one."""
    named = (meta or {}).get("media_ext")
    if isinstance(named, str) and named in sample:
        return named, sample[named]
    for ext in IMAGE_EXTENSIONS if media_type == "image" else VIDEO_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    return None


def frame_members(sample: dict[str, Any]) -> list[bytes]:
    """The pre-decoded JPEG frames of a sample (``KEY.f000.jpg`` ...), in frame order; empty when there are none."""
    frames = sorted((int(m.group(1)), ext) for ext in sample if (m := FRAME_MEMBER.match(ext)))
    return [sample[ext] for _, ext in frames]


def parse_meta(sample: dict[str, Any], records: int | None = None) -> tuple[dict, int]:
    """(metadata, record index) of a raw sample; MediaError (for the quarantine) when either is unusable."""
    where = f"{sample['__url__']}:{sample['__key__']}"
    if "json" not in sample:
        raise MediaError(where, "missing", "sample has no .json metadata")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise MediaError(where, "undecodable", f"bad .json: {err}") from None
    if not isinstance(meta, dict):
        raise MediaError(where, "undecodable", ".json is not an object")
    index = meta.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0 or (records is not None and
                                                                              index >= records):
        bound = f" in [0, {records})" if records is not None else " >= 0"
        raise MediaError(where, "undecodable", f"bad 'index' {index!r}: expected an integer{bound}")
    if not isinstance(meta.get("caption"), str):
        raise MediaError(where, "undecodable", "metadata has no 'caption' string")
    try:
        validate_optional_fields(meta, where)
    except AnnotationError as err:
        raise MediaError(where, "undecodable", f"bad metadata: {str(err).removeprefix(where + ': ')}") from None
    surrogate = unencodable_field(meta)
    if surrogate is not None:
        raise MediaError(where, "undecodable", f"bad metadata: field {surrogate} is not valid Unicode text")
    return meta, index


# ------------------------------------------------------------------------------------------------------------------
# The stream
# ------------------------------------------------------------------------------------------------------------------


class ShardStream:
    """A shard corpus as a batch source of :class:`~stmvl.data.mixing.MixedBatchStream` (see the module doc).

    Samples are the VideoTextDataset dicts ``{"video": uint8 [T,3,H,W], "caption", "sample_id", "index",
    "foil"?}``; frame sampling and crops are seeded by (seed, epoch * 1000 + pass, record index) like the files, so
    a sample decodes to the same tensor from a shard and from its file. Pre-decoded shards (``KEY.f000.jpg`` ...)
    sample ``num_frames`` of their stored frames instead of decoding the video.

    Args:
        index: the corpus's ShardIndex (or its ``shards`` spec, resolved with ``ShardIndex.load``).
        id_offset: added to the record index to give the global ``sample_id``.
        shuffle_buffer: raw samples in each worker's webdataset shuffle buffer (0: no sample shuffle; shard order
            is shuffled per epoch either way).
        max_member_bytes: larger tar members are quarantined without being read.
        limits: pixel and duration caps of the decoded media (default MediaLimits()).

    The broken-media guard (and its counts, shared by the DataLoader workers of every epoch) belongs to the stream.
    """

    streaming = True

    def __init__(self, index: ShardIndex | str, *, media_type: str | None = None, num_frames: int = 4,
                 img_size: int = 224, sampling: str = "rand", train: bool = True, hflip: bool = False,
                 crop_scale: tuple[float, float] = (0.5, 1.0), seed: int = 0,
                 id_offset: int = 0, corpus: str = "", quarantine: Quarantine | None = None,
                 max_bad_fraction: float = 0.1, min_frames: int = 1, video_kwargs: dict | None = None,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 limits: MediaLimits | None = None):
        self.index = index if isinstance(index, ShardIndex) else ShardIndex.load(index)
        self.media_type = media_type or self.index.media_type
        self.num_frames = 1 if self.media_type == "image" else int(num_frames)
        self.sampling, self.train = sampling, bool(train)
        self.transform = build_transform(train, img_size, hflip=hflip, scale=tuple(crop_scale))
        self.seed, self.id_offset, self.min_frames = int(seed), int(id_offset), int(min_frames)
        self.corpus = corpus or Path(self.index.source).parent.name
        self.quarantine, self.max_bad_fraction = quarantine, max_bad_fraction
        self.video_kwargs = dict(video_kwargs or {})
        self.limits = limits or MediaLimits()
        self.guard = BrokenMediaGuard(quarantine, self.corpus, max_bad_fraction=max_bad_fraction, seed=self.seed)
        self.shuffle_buffer, self.max_member_bytes = int(shuffle_buffer), int(max_member_bytes)
        if self.index.predecode and sampling == "fps":
            raise UserError(f"corpus {self.corpus!r}: data.sampling is 'fps' but the shards of {self.index.source} "
                            f"hold pre-decoded frames, not videos; use 'rand' or write the shards without --predecode")

    def __len__(self) -> int:
        """Samples per epoch over all ranks (from the index)."""
        return self.index.samples

    # -- sizes and assignment ------------------------------------------------------------------------------------

    def num_batches(self, batch_size: int, world_size: int = 1) -> int:
        """Batches per rank per epoch: ``total_samples // (batch_size * world_size)``, identical on all ranks."""
        if len(self.index.urls) < world_size:
            raise UserError(f"corpus {self.corpus!r}: {len(self.index.urls)} shards cannot feed {world_size} ranks "
                            f"({self.index.source}); write smaller shards (stmvl shards write --shard-size)")
        n = self.index.samples // (batch_size * world_size)
        if n == 0:
            raise UserError(f"corpus {self.corpus!r}: {self.index.samples} samples give no full batch of "
                            f"{batch_size} on each of {world_size} ranks; lower the batch size")
        return n

    def workers_for(self, num_workers: int, world_size: int) -> int:
        """Loader workers actually used: every worker needs at least one shard of its rank in every pass."""
        per_rank = len(self.index.urls) // world_size
        used = max(1, min(int(num_workers), per_rank))
        if num_workers > used:
            log.warning("corpus %r: %d shards over %d ranks feed only %d of the %d loader workers per rank",
                        self.corpus, len(self.index.urls), world_size, used, num_workers)
        return used

    def shard_order(self, epoch: int, pass_index: int) -> list[int]:
        """All shard indices in the order of (seed, epoch, pass); identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch, pass_index, 0x5A4D])
        return rng.permutation(len(self.index.urls)).tolist()

    def worker_shards(self, epoch: int, pass_index: int, rank: int, world_size: int, worker: int,
                      num_workers: int) -> list[str]:
        """The shards read by (rank, logical worker) in one pass: ``order[rank::world][worker::W]``."""
        mine = self.shard_order(epoch, pass_index)[rank::world_size][worker::num_workers]
        return [self.index.urls[i] for i in mine]

    # -- per-worker pipeline -------------------------------------------------------------------------------------

    def raw_samples(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int
                    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """(pass, raw sample) forever: pass after pass over this worker's shards, each through the shuffle buffer."""
        import webdataset

        for pass_index in itertools.count():
            urls = self.worker_shards(epoch, pass_index, rank, world_size, worker, num_workers)
            raw = itertools.chain.from_iterable(iter_raw_samples(u, self.max_member_bytes) for u in urls)
            if self.shuffle_buffer > 1:
                seed = int(np.random.default_rng([self.seed, epoch, pass_index, rank, worker, 0x5B0F]).integers(2**62))
                rng = random.Random(seed)
                # start yielding at a quarter full: a full buffer before the first batch would delay every epoch
                raw = webdataset.shuffle(self.shuffle_buffer, initial=max(1, self.shuffle_buffer // 4),
                                         rng=rng)(iter(raw))
            count = 0
            for sample in raw:
                count += 1
                yield pass_index, sample
            if count == 0:
                raise TooManyBadSamples(f"corpus {self.corpus!r}: the shards of rank {rank} worker {worker} gave no "
                                        f"sample in pass {pass_index} of epoch {epoch}: {urls}")

    def decode(self, raw: dict[str, Any], sample_epoch: int) -> dict[str, Any]:
        """One raw sample -> the training sample dict; MediaError when it is broken."""
        if "__error__" in raw:
            raise raw["__error__"]
        where = f"{raw['__url__']}:{raw['__key__']}"
        meta, index = parse_meta(raw, self.index.records)
        rng, generator = sample_generators(self.seed, sample_epoch, index)
        frames_jpeg = frame_members(raw) if self.media_type == "video" else []
        try:
            if frames_jpeg:
                if self.sampling == "fps":
                    raise MediaError(where, "undecodable", "fps sampling needs the video, the shard holds "
                                                           "pre-decoded frames")
                picks = sample_frame_indices(len(frames_jpeg), self.num_frames, self.sampling, rng)
                cache: dict[int, torch.Tensor] = {}
                for p in picks:
                    if p not in cache:
                        cache[p] = read_image(frames_jpeg[p], self.limits)[0]
                frames = torch.stack([cache[p] for p in picks])
            else:
                entry = media_member(raw, self.media_type, meta)
                if entry is None:
                    raise MediaError(where, "missing", f"no {self.media_type} member in the sample "
                                                       f"(members: {sorted(k for k in raw if not k.startswith('__'))})")
                kwargs = dict(self.video_kwargs)
                if self.media_type == "video":
                    kwargs.update(min_frames=self.min_frames, start=meta.get("start"), end=meta.get("end"))
                frames = read_media(entry[1], self.media_type, self.num_frames, self.sampling, rng,
                                    limits=self.limits, **kwargs)
            video = self.transform(frames, generator)
        except MemoryError:
            raise
        except Exception as err:  # any failure of reading or transforming is this sample's
            err = as_media_error(err, where)
            if err.path == where:
                raise err from None
            raise MediaError(where, err.reason, err.detail) from None
        out = {"video": video, "caption": meta["caption"],
               "sample_id": self.id_offset + index, "index": index}
        if "foil" in meta:
            out["foil"] = meta["foil"]
        return out

    def worker_samples(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
                       skip: int = 0) -> Iterator[dict[str, Any]]:
        """Decoded samples of one logical worker, forever, after skipping ``skip`` raw samples undecoded.

        A broken sample (any exception from decoding it but MemoryError) is quarantined and replaced by the last good
        one (or, before any good one, by the next), so raw position i always gives output sample i.
        """
        raw = itertools.islice(self.raw_samples(epoch, rank, world_size, worker, num_workers), skip, None)
        last_good: dict[str, Any] | None = None
        pending = 0
        for position, (pass_index, sample) in enumerate(raw, start=skip):
            self.guard.count_attempt()
            try:
                decoded = self.decode(sample, epoch * PASS_STRIDE + pass_index)
            except MemoryError:
                raise
            except Exception as err:
                where = f"{sample.get('__url__')}:{sample.get('__key__')}"
                self.guard.record_failure(as_media_error(err, where), position)
                if last_good is None:
                    pending += 1
                else:
                    yield last_good
                continue
            for _ in range(pending + 1):
                yield decoded
            pending, last_good = 0, decoded

    def stream_batches(self, epoch: int, skip: int, batch_size: int, collate_fn: Callable[[list], Any], *,
                       rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool | None = None,
                       prefetch_factor: int | None = None) -> Iterator[Any]:
        """Collated batches of this rank for ``epoch`` after the first ``skip``, forever (the caller takes
        ``num_batches`` per epoch). Batch j comes from logical worker ``j % W``: the DataLoader serves its workers
        round-robin, and worker ids are rotated by ``skip`` so that a resumed stream continues with the right one.
        """
        workers = self.workers_for(num_workers, world_size)
        dataset = _WorkerBatches(self, epoch, skip, batch_size, collate_fn, rank, world_size, workers)
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            # one intra-op thread per decoding worker, as for the file corpora (stmvl.data.mixing)
            kwargs["worker_init_fn"] = one_thread_per_worker
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers if num_workers > 0 else 0,
                            pin_memory=pin, **kwargs)
        return iter(loader)


class _WorkerBatches(IterableDataset):
    """The IterableDataset each DataLoader worker runs: its logical worker's samples, batched and collated."""

    def __init__(self, stream: ShardStream, epoch: int, skip: int, batch_size: int, collate_fn, rank: int,
                 world_size: int, workers: int):
        self.stream, self.epoch, self.skip, self.batch_size = stream, epoch, skip, batch_size
        self.collate_fn, self.rank, self.world_size, self.workers = collate_fn, rank, world_size, workers

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.skip) % self.workers
        # batches j < skip with j % W == logical were this worker's before the restart
        done = (self.skip - logical + self.workers - 1) // self.workers if self.skip > logical else 0
        samples = self.stream.worker_samples(self.epoch, self.rank, self.world_size, logical, self.workers,
                                             skip=done * self.batch_size)
        while True:
            batch = list(itertools.islice(samples, self.batch_size))
            yield self.collate_fn(batch)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation corpora from shards
# ------------------------------------------------------------------------------------------------------------------


def materialise_shards(spec: str, out_dir: str | Path, index: str | None = None,
                       media_type: str = "video") -> Path:
    """Unpack an evaluation corpus's shards into ``out_dir`` once: every media file under its original relative
    path, and ``annotation.json`` with the records in their original order. Returns the annotation path.

    Evaluation needs random access to every clip and the whole caption set (retrieval ranks all clips against all
    captions), which a stream does not give; evaluation sets are small (MSRVTT-1k: 1000 clips), so a local copy is
    the simple answer. Media keep their original paths so that records that name other clips (``gt``) still match.
    A broken sample, a pre-decoded shard set or an unsafe media path is a UserError: an evaluation with clips
    silently missing would report wrong numbers. Written to a temporary folder and renamed, so a finished copy is
    always complete and concurrent ranks agree.
    """
    out_dir = Path(out_dir)
    annotation = out_dir / "annotation.json"
    if annotation.is_file():
        return annotation
    shard_index = ShardIndex.load(spec, index)
    if shard_index.predecode:
        raise UserError(f"shards {spec!r}: pre-decoded shards cannot be evaluated (their frames are fixed); write "
                        "plain shards of the evaluation set")
    key_field = "image" if media_type == "image" else "video"
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    records: dict[int, dict] = {}
    try:
        for url in shard_index.urls:
            for sample in iter_raw_samples(url):
                if "__error__" in sample:
                    raise UserError(f"shards {spec!r}: {sample['__error__']}: an evaluation set must be complete")
                try:
                    meta, number = parse_meta(sample, shard_index.records)
                except MediaError as err:
                    raise UserError(f"shards {spec!r}: {err}: an evaluation set must be complete") from None
                member = media_member(sample, media_type, meta)
                relative = meta.get(key_field)
                if member is None or not isinstance(relative, str) or _unsafe(relative):
                    raise UserError(f"shards {spec!r}: sample {sample['__key__']} in {url} has no usable media "
                                    f"or media path ({relative!r})")
                target = tmp / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(member[1])
                records[number] = {k: v for k, v in meta.items() if k not in ("index", "media_type", "media_ext")}
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "annotation.json").write_text(json.dumps([records[i] for i in sorted(records)]), encoding="utf-8")
        try:
            os.replace(tmp, out_dir)
        except OSError:  # another rank finished first: its copy is the same
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("evaluation shards %s unpacked to %s (%d samples)", spec, out_dir, len(records))
    return annotation
