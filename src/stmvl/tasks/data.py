"""Build datasets and batch streams from a RunConfig (shared by every task)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from stmvl.config import ConfigError, CorpusConfig, RunConfig
from stmvl.data.annotations import id_offsets, load_annotations, read_records
from stmvl.data.datasets import ProbeDataset, RetrievalDataset, VideoTextCollator, VideoTextDataset
from stmvl.data.mixing import MediaSource, MixedBatchStream
from stmvl.data.quarantine import Quarantine
from stmvl.data.transforms import to_float
from stmvl.data.video import MediaLimits, video_options

SYNTHETIC_MARKER = "manifest.json"
logger = logging.getLogger(__name__)


def ensure_synthetic_corpus(cfg: RunConfig, log=None) -> Path | None:
    """Generate the synthetic corpus of `data.synthetic` unless one is already in its folder (a corpus written with
    other settings is used as it is, with a warning naming the differences). `log(message)` reports progress
    (default: this module's logger)."""
    log = log or logger.info
    syn = cfg.data.synthetic
    if not syn.enabled:
        return None
    from stmvl.data.synth import generate_corpus

    root = Path(syn.dir)
    if (root / SYNTHETIC_MARKER).exists():
        differ = synthetic_corpus_differences(root, syn)
        if differ:  # kept as it is (other runs' annotations point into it), but never silently
            logger.warning(
                "data.synthetic: using the corpus already in %s, written with other settings than the config's: %s "
                "(point data.synthetic.dir at another folder for a corpus with the config's settings)", root,
                ", ".join(differ))
        return root
    log(f"writing the synthetic corpus to {root} ({syn.num_train} train / {syn.num_test} test / "
        f"{syn.num_probe} probe clips, {syn.num_images} images, {syn.size}px, {syn.frames} frames)")
    manifest = generate_corpus(root, seed=syn.seed, train=syn.num_train, test=syn.num_test, probe=syn.num_probe,
                               size=syn.size, frames=syn.frames, images=syn.num_images)
    log(f"synthetic corpus written in {manifest['seconds']:.1f}s")
    return root


def synthetic_corpus_differences(root: Path, syn) -> list[str]:
    """How the corpus already in ``root`` differs from SyntheticConfig ``syn`` ("num_train 300 (config: 3000)", ...;
    empty when it matches). A folder whose manifest cannot be read is a ConfigError."""
    try:
        manifest = json.loads((root / SYNTHETIC_MARKER).read_text(encoding="utf-8"))
        counts = manifest["counts"]
        found = {"seed": manifest["seed"], "size": manifest["size"], "frames": manifest["frames"],
                 "num_train": counts["train"], "num_test": counts["test"], "num_probe": counts["probe"],
                 "num_images": counts.get("images", counts["train"])}  # older corpora: one image per clip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"data.synthetic.dir: {root / SYNTHETIC_MARKER} is not a corpus manifest ({exc!r}); "
                          "delete the folder to write the corpus again") from None
    wanted = {key: getattr(syn, key) for key in found}
    return [f"{key} {found[key]} (config: {wanted[key]})" for key in found if found[key] != wanted[key]]


def tokenizer_for(text_cfg):
    """The WordPiece tokenizer of a text config: its `vocab`, else the weights folder's, else bert-base-uncased."""
    from stmvl.data.text import Tokenizer
    from stmvl.models.stm import text_weights_folder

    vocab = text_cfg.vocab
    folder = text_weights_folder(text_cfg)
    if vocab is None and folder is not None and (folder / "vocab.txt").is_file():
        vocab = str(folder)
    return Tokenizer(vocab, text_cfg.max_length, expected_vocab_size=text_cfg.vocab_size)


def _require(path: str, what: str) -> None:
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"{what}: {path!r} does not exist (set it in the recipe or with an override, "
                                f"e.g. paths.data=/your/data)")


def pretrain_datasets(cfg: RunConfig, run_dir: Path, seed: int) -> dict[str, list]:
    """Media type -> its pretraining datasets, with global sample ids unique across all corpora.

    A corpus with ``shards`` gives a :class:`~stmvl.data.stream.ShardStream` (its ``annotation``, when set, names
    the shard index file); the others a VideoTextDataset. Sample ids of a shard corpus span its index's
    ``records``, so they never collide with another corpus's.
    """
    from stmvl.data.stream import ShardIndex, ShardStream

    quarantine = Quarantine(run_dir)
    corpora = [c for c in cfg.data.corpora if c.kind == "pretrain"]
    if not corpora:
        raise ConfigError("data.corpora has no corpus of kind 'pretrain'")
    records = []
    for c in corpora:
        if c.shards:
            records.append(ShardIndex.load(c.shards, c.annotation or None))
            continue
        _require(c.annotation, f"corpus {c.name!r} annotation")
        records.append(load_annotations(c.annotation, c.media_type))
    offsets = id_offsets([r.records if isinstance(r, ShardIndex) else len(r) for r in records])
    by_media: dict[str, list] = {}
    for c, recs, offset in zip(corpora, records, offsets):
        common = dict(media_type=c.media_type, num_frames=cfg.data.num_frames, img_size=cfg.data.img_size,
                      sampling=cfg.data.sampling, train=True, hflip=cfg.data.flip,
                      crop_scale=tuple(cfg.data.crop_scale), seed=seed, corpus=c.name,
                      quarantine=quarantine, max_bad_fraction=cfg.data.max_bad_fraction,
                      limits=MediaLimits.from_config(cfg.data), video_kwargs=video_options(cfg.data))
        if isinstance(recs, ShardIndex):
            ds = ShardStream(recs, id_offset=offset, **common)
        else:
            ds = VideoTextDataset(recs, c.media_root, id_offset=offset, decoded_cache_mib=cfg.data.decoded_cache_mib,
                                  **common)
        by_media.setdefault(c.media_type, []).append(ds)
    return by_media


def prefill_decoded_caches(cfg: RunConfig, datasets: Iterable[Any]) -> None:
    """data.decoded_cache_prefill: decode the clips of every dataset that keeps a decoded-clip cache (the parts of a
    ConcatDataset too) with that many processes, before the first step."""
    processes = cfg.data.decoded_cache_prefill
    if not processes:
        return
    for dataset in datasets:
        for part in getattr(dataset, "datasets", [dataset]):
            if getattr(part, "decoded_cache", None) is None:
                continue
            started = time.perf_counter()
            count = part.prefill_decoded_cache(processes)
            logger.info("decoded-clip cache of %s: %d of %d clips decoded by %d processes in %.1f s (%d MiB)",
                        part.corpus, count, len(part), processes, time.perf_counter() - started,
                        part.decoded_cache.nbytes // 2**20)


def require_full_batch(media: str, corpora: Sequence[str], samples: int, batch_size: int, world_size: int) -> None:
    """A ConfigError when the file corpora of one media type hold less than one full batch per rank (every batch of
    a training step is full, so such a corpus would yield no step); the message names the corpora and the key."""
    if samples // world_size < batch_size:
        ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
        raise ConfigError(f"data.{media}_batch_size={batch_size}: the {media} corpora {', '.join(corpora)} hold "
                          f"{samples} samples, less than one full batch{ranks}; lower data.{media}_batch_size or "
                          f"add samples")


def pretrain_stream(cfg: RunConfig, run_dir: Path, tokenizer, rank: int, world_size: int) -> MixedBatchStream:
    """The mixed video/image batch stream of a pretraining run (one media type per step)."""
    seed = cfg.runtime.seed
    by_media = pretrain_datasets(cfg, run_dir, seed)
    prefill_decoded_caches(cfg, (ds for datasets in by_media.values() for ds in datasets))
    batch_sizes = {"video": cfg.data.video_batch_size, "image": cfg.data.image_batch_size}
    sources, weights = {}, {}
    for media, all_datasets in by_media.items():
        # each shard corpus is a source of its own ("video:webvid"), weighted by its corpus weight; the file corpora
        # of a media type are concatenated into one source named after the media type, as before
        for ds in (d for d in all_datasets if getattr(d, "streaming", False)):
            collate = VideoTextCollator(tokenizer, media=media, max_length=cfg.model.text.max_length)
            sources[f"{media}:{ds.corpus}"] = MediaSource(ds, batch_sizes[media], collate)
            weights[f"{media}:{ds.corpus}"] = next(c.weight for c in cfg.data.corpora
                                                   if c.kind == "pretrain" and c.name == ds.corpus)
        datasets = [d for d in all_datasets if not getattr(d, "streaming", False)]
        if not datasets:
            continue
        dataset = datasets[0] if len(datasets) == 1 else _concat(datasets)
        require_full_batch(media, [d.corpus for d in datasets], len(dataset), batch_sizes[media], world_size)
        collate = VideoTextCollator(tokenizer, media=media, max_length=cfg.model.text.max_length)
        sources[media] = MediaSource(dataset, batch_sizes[media], collate)
        weights[media] = sum(c.weight for c in cfg.data.corpora if c.kind == "pretrain" and c.media_type == media
                             and not c.shards) / len(datasets)
    return MixedBatchStream(sources, seed=seed, weights=weights, rank=rank, world_size=world_size,
                            num_workers=cfg.data.num_workers)


def _concat(datasets: list[VideoTextDataset]):
    from torch.utils.data import ConcatDataset

    class _EpochConcat(ConcatDataset):
        def set_epoch(self, epoch: int) -> None:
            for d in self.datasets:
                d.set_epoch(epoch)

    return _EpochConcat(datasets)


def local_eval_corpus(cfg: RunConfig, c: CorpusConfig) -> CorpusConfig:
    """An evaluation corpus given as shards, unpacked once under <runtime.out_dir>/eval_shards/<name> (see
    stmvl.data.stream.materialise_shards); a file corpus unchanged. The corpus's `annotation`, when set, names the
    shards' index file."""
    if not c.shards:
        return c
    import dataclasses

    from stmvl.data.stream import materialise_shards

    folder = Path(cfg.runtime.out_dir) / "eval_shards" / c.name
    annotation = materialise_shards(c.shards, folder, c.annotation or None, c.media_type)
    return dataclasses.replace(c, annotation=str(annotation), media_root=str(folder), shards=None)


def eval_datasets(cfg: RunConfig, kinds: tuple[str, ...] = ("retrieval", "probe")) -> dict[str, tuple[CorpusConfig, Any]]:
    """Evaluation corpus name -> (its config, its dataset) for the requested kinds."""
    ev = cfg.eval
    img_size = ev.img_size or cfg.data.img_size
    out = {}
    for c in ev.corpora:
        if c.kind not in kinds:
            continue
        c = local_eval_corpus(cfg, c)
        _require(c.annotation, f"eval corpus {c.name!r} annotation")
        common = dict(num_frames=ev.num_frames, img_size=img_size, sampling=ev.sampling, train=False,
                      corpus=c.name, seed=cfg.runtime.seed, limits=MediaLimits.from_config(cfg.data),
                      video_kwargs=video_options(cfg.data))
        if c.kind == "retrieval":
            ds = RetrievalDataset(c.annotation, c.media_root, mode=c.caption_mode, **common)
        else:
            ds = ProbeDataset(c.annotation, c.media_root, **common)
        out[c.name] = (c, ds)
    return out


def corpus_texts(cfg: RunConfig, fields: Sequence[str] = ("caption",)) -> list[str]:
    """Every distinct text under ``fields`` (a str or a list of str per record) of the run's pretraining corpora
    with an annotation file, in first-seen order. Shard corpora have no annotation file to read and are left out."""
    texts: dict[str, None] = {}
    for corpus in cfg.data.corpora:
        if corpus.kind != "pretrain" or corpus.shards or not corpus.annotation or not Path(corpus.annotation).is_file():
            continue
        for record in read_records(corpus.annotation):
            for field_name in fields:
                value = record.get(field_name)
                for text in [value] if isinstance(value, str) else list(value or []):
                    texts[text] = None
    return list(texts)


class StreamTask:
    """Engine plumbing shared by every task (pretraining, teacher, finetuning): set-up (the synthetic corpus is
    written once, by rank 0) and batches from a resumable MixedBatchStream that subclasses build in
    `build_stream()`, lazily, because the rank and run folder are only known after `setup(ctx)`."""

    cfg: RunConfig
    ctx: Any = None
    stream: MixedBatchStream | None = None

    # whether the run reads model.teacher.weights (pretraining with MVM or attention masks); checked before step 1
    reads_teacher_weights: bool = False

    def setup(self, ctx) -> None:
        from stmvl.errors import MissingPathsError
        from stmvl.tasks.preflight import describe_missing, missing_paths
        from stmvl.train.distributed import all_gather_object

        self.ctx = ctx
        if ctx.is_main:
            ensure_synthetic_corpus(self.cfg)
        # every rank looks (node-local disks differ) and every rank raises the same error, so none waits alone
        found = all_gather_object(missing_paths(self.cfg, self.reads_teacher_weights))
        bad = [(rank, missing) for rank, missing in enumerate(found) if missing]
        if bad:
            rank, missing = bad[0]
            raise MissingPathsError(describe_missing(missing, f"rank {rank}: " if ctx.world_size > 1 else ""))
        if ctx.world_size > 1:
            torch.distributed.barrier()

    def _stream(self) -> MixedBatchStream:
        if self.stream is None:
            self.stream = self.build_stream()
            if self.ctx is not None and self.ctx.world_size > 1:
                # the engine bounds the bad-sample fraction over every rank (bad_sample_counts below): a rank whose
                # share holds more broken files must not stop the run on its own fraction
                self.stream.defer_bad_sample_bound()
        return self.stream

    @property
    def steps_per_epoch(self) -> int:
        return len(self._stream())

    def bad_sample_counts(self) -> tuple[int, int]:
        """(loads attempted, loads failed) on this rank; the engine bounds their sum over the ranks."""
        return self._stream().bad_sample_counts()

    def sample_batches(self) -> dict[str, dict]:
        """One batch of each media type of the stream, on the device (for `--dry-run`)."""
        stream = self._stream()
        return {name: self._to_device(stream.first_batch(name)) for name in sorted(stream.sources)}

    def _to_device(self, batch: dict) -> dict:
        """Tensors to the device (non-blocking: the loader pins memory on CUDA); uint8 video becomes float in
        [0, 1] there, after the copy."""
        device = self.ctx.device
        out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        video = out.get("video")
        if torch.is_tensor(video) and video.dtype == torch.uint8:
            out["video"] = to_float(video)
        return out

    def train_batches(self, epoch: int, start_step: int) -> Iterable[dict]:
        stream = self._stream()
        stream.load_state_dict({"epoch": epoch, "step": start_step})
        for batch in stream:
            yield self._to_device(batch)
