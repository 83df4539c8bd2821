"""Distributed batch sampling and the media-type mixing stream (docs/internals.md, Batch).

The stream keeps one loader per media type (video, image), each with its own batch size. Every step is one media
type; the order of media types in an epoch is a shuffle seeded by (seed, epoch) only, so it is identical on all
ranks (every rank runs the same media type at the same step, which DDP needs because the model runs different
code paths for T = 1 and T > 1). Which samples a rank gets depends on (seed, epoch, rank, world_size) only; the
content of a sample on (seed, epoch, index) (see datasets.py), so a run is reproducible independently of the
number of DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .quarantine import TooManyBadSamples, bad_sample_counts, defer_bound, unwrap_worker_error


def one_thread_per_worker(worker_id: int) -> None:
    """DataLoader worker set-up: one intra-op thread per decoding worker (N workers would otherwise each start as
    many threads as there are cores, and fight the training process for them), outside any torch dispatch mode.

    A forked worker inherits the dispatch modes active where its loader started: the FlopCounterMode around an
    evaluation (runtime.count_flops) would route every torch call of its decoding and transforms through Python, and
    its counts never reach the parent anyway."""
    from torch.utils._python_dispatch import _pop_mode

    torch.set_num_threads(1)
    while torch._C._len_torch_dispatch_stack():
        _pop_mode()


class DistributedBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch permutation, split across ranks, cut into batches.

    Each rank gets ``num_batches`` batches of ``batch_size`` indices; the permutation is padded by wrapping so that
    every rank has the same number of batches (with ``drop_last`` the incomplete tail batch is dropped instead).
    ``start_batch`` skips that many batches of the current epoch without touching the dataset (resume).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_batch = 0, 0
        per_rank = num_samples // world_size if drop_last else math.ceil(num_samples / world_size)
        self.num_batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{num_samples} samples give no full batch of {batch_size} on each of {world_size} ranks "
                             f"(drop_last=True): lower the batch size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def rank_indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in order (num_batches * batch_size or fewer)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0xBA7C]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        per_rank = self.num_batches * self.batch_size if self.drop_last else math.ceil(
            self.num_samples / self.world_size)
        total = per_rank * self.world_size
        if total > len(order):
            order = np.resize(order, total)  # wrap around so every rank gets the same count
        return order[self.rank:total:self.world_size][: self.num_batches * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.rank_indices().tolist()
        for b in range(self.start_batch, self.num_batches):
            batch = indices[b * self.batch_size:(b + 1) * self.batch_size]
            if batch:
                yield batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


def is_stream(dataset: Any) -> bool:
    """Whether a source's dataset is a streamed batch source (``num_batches`` + ``stream_batches``, e.g.
    :class:`stmvl.data.stream.ShardStream`) rather than a map-style dataset read through a batch sampler."""
    return bool(getattr(dataset, "streaming", False)) and callable(getattr(dataset, "stream_batches", None))


@dataclass
class MediaSource:
    """One source of the stream: its dataset (map-style, or a streamed source such as a ShardStream), per-rank batch
    size and collate function (whose batches carry ``media``: several sources may share one media type)."""

    dataset: Dataset
    batch_size: int
    collate_fn: Callable[[list], Any]


def media_schedule(counts: Mapping[str, int], seed: int, epoch: int) -> list[str]:
    """The media type of every step of an epoch: ``counts[m]`` entries of each, shuffled by (seed, epoch) only."""
    names = sorted(counts)  # sorted: the order must not depend on dict insertion order on different ranks
    steps = [name for name in names for _ in range(counts[name])]
    order = np.random.default_rng([seed, epoch, 0x3D1A]).permutation(len(steps))
    return [steps[i] for i in order]


class MixedBatchStream:
    """Iterate collated batches, one media type per step, over several per-media DataLoaders.

    Args:
        sources: media name -> MediaSource.
        weights: optional media name -> factor on that media's batches per epoch (1 = one pass over its data;
            0.5 = half of its batches; 2 = two passes). Default 1 for each.
        rank, world_size: this process's share of every dataset.
        num_workers: DataLoader workers per media loader (results do not depend on it).

    A streamed source (``is_stream``) gives ``num_batches(batch_size, world_size)`` batches per pass (from its
    index file, the same on all ranks) and produces them itself with ``stream_batches``.

    ``len(stream)`` = steps per epoch. ``state_dict()`` -> {"epoch", "step"}: after ``load_state_dict`` the next
    iteration continues the epoch at that step; the skipped batches are not loaded.
    """

    def __init__(self, sources: Mapping[str, MediaSource], seed: int = 0, weights: Mapping[str, float] | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool | None = None,
                 prefetch_factor: int | None = None):
        if not sources:
            raise ValueError("MixedBatchStream needs at least one media source")
        weights = dict(weights or {})
        unknown = set(weights) - set(sources)
        if unknown:
            raise ValueError(f"weights given for unknown media {sorted(unknown)}; sources are {sorted(sources)}")
        self.sources = dict(sources)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        # pinned host memory makes the non-blocking copies to a GPU asynchronous; useless without one
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # streamed sources (shards, stmvl.data.stream) size their epoch themselves; the file sources keep their
        # seeds (seed + position among the file sources) whatever streams are added next to them
        files = sorted((name, src) for name, src in self.sources.items() if not is_stream(src.dataset))
        self.samplers = {
            name: DistributedBatchSampler(len(src.dataset), src.batch_size, rank, world_size, seed=seed + i)
            for i, (name, src) in enumerate(files)
        }
        per_pass = {name: (src.dataset.num_batches(src.batch_size, world_size) if is_stream(src.dataset)
                           else self.samplers[name].num_batches) for name, src in self.sources.items()}
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.sources}
        for name, w in self.weights.items():
            if not w > 0:
                raise ValueError(f"weight of media {name!r} must be > 0, got {w}")
        self.counts = {name: max(1, round(self.weights[name] * per_pass[name])) for name in self.sources}
        self.epoch, self.step = 0, 0
        self._loaders: dict[str, DataLoader] = {}

    def __len__(self) -> int:
        return sum(self.counts.values())

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step."""
        self.epoch, self.step = int(epoch), 0

    def schedule(self, epoch: int | None = None) -> list[str]:
        """Media type of every step of ``epoch`` (default: the current one); identical on all ranks."""
        return media_schedule(self.counts, self.seed, self.epoch if epoch is None else epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _pass_iterator(self, name: str, pass_index: int, start_batch: int) -> Iterator[Any]:
        """Batches of one pass over a media's data; pass p of epoch e uses sampler epoch e * 1000 + p."""
        source, sampler = self.sources[name], self.samplers[name]
        sampler_epoch = self.epoch * 1000 + pass_index
        sampler.set_epoch(sampler_epoch, start_batch)
        if hasattr(source.dataset, "set_epoch"):
            source.dataset.set_epoch(sampler_epoch)
        return iter(self._loader(name))

    def _loader(self, name: str) -> DataLoader:
        """One DataLoader per media type for the whole run. Its workers persist across passes and epochs (no
        re-spawn, no re-import per epoch); the sampler runs in this process and the datasets keep their epoch in
        shared memory, so each pass still gets its own order and random crops."""
        if name not in self._loaders:
            source = self.sources[name]
            kwargs: dict[str, Any] = {}
            if self.num_workers > 0:
                kwargs.update(persistent_workers=True, worker_init_fn=one_thread_per_worker)
                if self.prefetch_factor is not None:
                    kwargs["prefetch_factor"] = self.prefetch_factor
            self._loaders[name] = DataLoader(source.dataset, batch_sampler=self.samplers[name],
                                             collate_fn=source.collate_fn, num_workers=self.num_workers,
                                             pin_memory=self.pin_memory, **kwargs)
        return self._loaders[name]

    def _media_batches(self, name: str, skip: int) -> Iterator[Any]:
        """All batches of ``name`` for this epoch after skipping ``skip`` of them (possibly several passes)."""
        source = self.sources[name]
        if is_stream(source.dataset):  # a stream cycles over its shards by itself (stmvl.data.stream)
            yield from source.dataset.stream_batches(
                self.epoch, skip, source.batch_size, source.collate_fn, rank=self.rank, world_size=self.world_size,
                num_workers=self.num_workers, pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor)
            return
        per_pass = self.samplers[name].num_batches
        pass_index, start = divmod(skip, per_pass)
        while True:
            yield from self._pass_iterator(name, pass_index, start)
            pass_index, start = pass_index + 1, 0

    def close(self, batch_iterators=()) -> None:
        """Stop every loader worker now (after an error: the error's traceback keeps the loaders alive in cyclic
        garbage, whose collection would wait for workers whose queues are already gone). The next iteration starts
        new workers. ``batch_iterators``: generators of ``_media_batches`` to close (the shard streams' loaders)."""
        for generator in batch_iterators:
            generator.close()
        for loader in self._loaders.values():
            iterator = getattr(loader, "_iterator", None)  # a persistent-workers loader keeps its iterator here
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
        self._loaders.clear()

    def bad_sample_counts(self) -> tuple[int, int]:
        """(loads attempted, loads failed) over every source of this stream in this process, its DataLoader workers
        included (the broken-media guards' shared counts). The engine adds them up over ranks to bound the fraction
        of broken samples of the whole run."""
        return bad_sample_counts(self.sources)

    def defer_bad_sample_bound(self) -> None:
        """Leave ``max_bad_fraction`` to the caller, who bounds :meth:`bad_sample_counts` summed over the ranks (the
        engine, in a distributed run): no guard of this stream stops on its own process's fraction any more. Must be
        called before the first iteration, whose loader workers copy the guards."""
        if self._loaders:
            raise RuntimeError("defer_bad_sample_bound() after the loader workers started: they keep the local bound")
        defer_bound(self.sources)

    def first_batch(self, name: str) -> Any:
        """The first batch of media ``name`` in the current epoch (for a dry run; the stream position is unchanged)."""
        return next(self._media_batches(name, 0))

    def __iter__(self) -> Iterator[Any]:
        schedule = self.schedule()
        done = schedule[: self.step]
        iterators = {name: self._media_batches(name, done.count(name)) for name in self.sources}
        # generators start their DataLoader lazily, so a media absent from the rest of the epoch costs nothing
        for name in schedule[self.step:]:
            try:
                batch = next(iterators[name])
            except Exception as err:
                self.close(iterators.values())
                if isinstance(err, TooManyBadSamples):
                    # re-raised from a worker, its message holds the worker's traceback: keep the one-line message
                    raise unwrap_worker_error(err) from None
                raise
            self.step += 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0
