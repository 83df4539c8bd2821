"""Map-style datasets (pretraining, retrieval, probe, QA, MC) and the collate that tokenizes.

Every dataset returns uint8 video ``[T, 3, H, W]`` (images: T = 1) plus its text fields. Randomness (frame sampling,
crop) comes from a per-sample generator seeded by (seed, epoch, index), so a sample is identical whichever worker
loads it and however many workers there are; call ``set_epoch`` before each epoch. The epoch lives in a shared-memory
tensor, so persistent DataLoader workers (which keep their copy of the dataset across epochs) see the new value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import AnnotationError, PackedRecords, load_annotations, load_answer_list, media_key
from .quarantine import BrokenMediaGuard, Quarantine, as_media_error
from .transforms import EvalTransform, TrainTransform, build_transform, to_float
from .video import DecodedClipCache, MediaLimits, prefill_decoded_cache, read_media, resolve_media_path

RETRIEVAL_MODES = ("single", "paragraph", "multi")


def sample_generators(seed: int, epoch: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """(numpy rng for frame sampling, torch generator for transforms) of one sample in one epoch."""
    rng = np.random.default_rng([seed, epoch, index])
    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    return rng, generator


class MediaDataset(Dataset):
    """Shared machinery: packed records, media reading, transforms, broken-media replacement.

    Args:
        records: a PackedRecords or an annotation path (loaded with ``kind``).
        media_root: folder the records' media paths are relative to.
        media_type: ``video`` or ``image`` (images give T = 1 regardless of num_frames).
        num_frames, img_size, sampling: frames per clip, output side, ``rand | middle | fps``.
        train: random resized crop (area fraction in ``crop_scale``, + ``hflip``) when True, eval resize otherwise.
        quarantine: where broken media are listed; ``max_bad_fraction`` bounds the failure rate.
        min_frames: videos with fewer frames are treated as broken (reason ``too_short``).
        video_kwargs: passed to ``read_video`` (``backend``, ``sample_fps``, ``threads``; see
            ``stmvl.data.video.video_options``).
        decoded_cache_mib: keep up to this many MiB of whole decoded clips in memory (per process; 0 = off) and
            sample later epochs' frames from them (``stmvl.data.video.DecodedClipCache``).
        limits: pixel and duration caps (``MediaLimits.from_config(cfg.data)``; default: MediaLimits()); media over
            them are broken (reason ``too_large``) before their pixels are allocated.
    """

    kind = "video"

    def __init__(
        self,
        records: PackedRecords | str | os.PathLike,
        media_root: str | os.PathLike,
        *,
        media_type: str = "video",
        num_frames: int = 4,
        img_size: int = 224,
        sampling: str = "rand",
        train: bool = True,
        hflip: bool = False,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        seed: int = 0,
        corpus: str = "",
        quarantine: Quarantine | None = None,
        max_bad_fraction: float = 0.1,
        min_frames: int = 1,
        video_kwargs: dict | None = None,
        limits: MediaLimits | None = None,
        decoded_cache_mib: int = 0,
    ):
        kind = self.kind if self.kind != "video" else ("image" if media_type == "image" else "video")
        self.records = records if isinstance(records, PackedRecords) else load_annotations(records, kind)
        self.media_root = Path(media_root)
        self.media_type = media_type
        self.train = bool(train)
        self.num_frames = 1 if media_type == "image" else int(num_frames)
        self.sampling = sampling
        self.transform: TrainTransform | EvalTransform = build_transform(train, img_size, hflip=hflip,
                                                                         scale=tuple(crop_scale))
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # shared with persistent workers
        self.corpus = corpus or Path(self.records.source).stem
        self.min_frames = int(min_frames)
        self.video_kwargs = dict(video_kwargs or {})
        self.limits = limits or MediaLimits()
        self.decoded_cache = (DecodedClipCache(int(decoded_cache_mib) * 2**20)
                              if decoded_cache_mib and media_type == "video" else None)
        self.guard = BrokenMediaGuard(quarantine, self.corpus, max_bad_fraction=max_bad_fraction, seed=self.seed)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random frame sampling / crops ``__getitem__`` reproduces (in this process and in
        every DataLoader worker that holds a copy of this dataset)."""
        self._epoch.fill_(int(epoch))

    def media_path(self, record: dict) -> Path:
        return resolve_media_path(self.media_root, record[media_key("image" if self.media_type == "image"
                                                                      else "video")])

    def load_clip(self, index: int) -> tuple[torch.Tensor, dict]:
        """(uint8 [T, 3, H, W] transformed, record) of ``index``.

        Raises MediaError naming the media file for any failure of reading or transforming it (an exception that is
        not a MediaError becomes reason ``error``, or ``too_large`` for a decompression bomb); MemoryError propagates.
        """
        record = self.records[index]
        path = self.media_path(record)
        rng, generator = sample_generators(self.seed, self.epoch, index)
        kwargs = dict(self.video_kwargs)
        if self.media_type == "video":
            kwargs.update(min_frames=self.min_frames, start=record.get("start"), end=record.get("end"),
                          cache=self.decoded_cache)
        try:
            frames = read_media(path, self.media_type, self.num_frames, self.sampling, rng, limits=self.limits,
                                **kwargs)
            return self.transform(frames, generator), record
        except MemoryError:
            raise
        except Exception as err:
            raise as_media_error(err, str(path)) from err

    def prefill_decoded_cache(self, processes: int) -> int:
        """Decode every clip of this dataset into its decoded-clip cache (``decoded_cache_mib``) with ``processes``
        processes, before the first epoch would decode them one by one; returns how many were put (0 without a
        cache). Reads afterwards return what they would have returned without it."""
        if self.decoded_cache is None:
            return 0
        records = (self.records[i] for i in range(len(self)))
        clips = [(self.media_path(r), r.get("start"), r.get("end")) for r in records]
        return prefill_decoded_cache(self.decoded_cache, clips, processes, min_frames=self.min_frames,
                                     limits=self.limits, threads=self.video_kwargs.get("threads", 1))

    def load_guarded(self, index: int) -> tuple[torch.Tensor, dict, int]:
        """load_clip with broken-media replacement: (video, record, index actually used)."""
        (video, record), used = self.guard.load(index, len(self), self.load_clip)
        return video, record, used


class VideoTextDataset(MediaDataset):
    """Pretraining video-text or image-text pairs.

    ``__getitem__(i) -> {"video": uint8 [T,3,H,W], "caption": str, "sample_id": int, "index": int,
    "foil": str (when the record has one)}``. ``sample_id = id_offset + index`` of the sample actually returned
    (after a broken-media replacement the replacement's id, so VTC positives stay correct).
    """

    def __init__(self, records, media_root, *, id_offset: int = 0, **kwargs):
        super().__init__(records, media_root, **kwargs)
        self.id_offset = int(id_offset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video, record, used = self.load_guarded(index)
        sample = {"video": video, "caption": record["caption"], "sample_id": self.id_offset + used, "index": used}
        if "foil" in record:
            sample["foil"] = record["foil"]
        return sample


class RetrievalDataset(MediaDataset):
    """Retrieval evaluation: videos by index plus the text side and the ground-truth maps.

    Modes: ``single`` (one caption per video; a list takes its first entry), ``paragraph`` (a list of captions joined
    into one text), ``multi`` (one text per caption). A record may carry ``"gt"``: for single/paragraph a list of video
    indices matching its text, for multi a list of such lists (one per caption); default: its own video.

    Attributes: ``texts: list[str]``, ``txt2vid: list[list[int]]``, ``vid2txt: list[list[int]]``.
    ``__getitem__(i) -> {"video": uint8 [T,3,H,W], "index": i}``.
    """

    kind = "retrieval"

    def __init__(self, records, media_root, *, mode: str = "single", sampling: str = "middle", train: bool = False,
                 **kwargs):
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"unknown retrieval mode {mode!r}; expected one of {RETRIEVAL_MODES}")
        super().__init__(records, media_root, sampling=sampling, train=train, **kwargs)
        self.mode = mode
        self.texts, self.txt2vid = self._build_texts()
        self.vid2txt: list[list[int]] = [[] for _ in range(len(self))]
        for t, videos in enumerate(self.txt2vid):
            for v in videos:
                self.vid2txt[v].append(t)

    def _build_texts(self) -> tuple[list[str], list[list[int]]]:
        texts, txt2vid = [], []
        for v, record in enumerate(self.records):
            captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
            gt = record.get("gt")
            if self.mode == "multi":
                gts = gt if gt is not None else [[v]] * len(captions)
                if len(gts) != len(captions) or not all(isinstance(g, list) for g in gts):
                    raise AnnotationError(f"{self.records.source}: record {v}: field 'gt' must be one list of video "
                                     f"indices per caption in multi mode")
                texts += captions
                txt2vid += [self._check_gt(g, v) for g in gts]
            else:
                texts.append(" ".join(captions) if self.mode == "paragraph" else captions[0])
                txt2vid.append(self._check_gt(gt if gt is not None else [v], v))
        return texts, txt2vid

    def _check_gt(self, gt: Any, record_index: int) -> list[int]:
        if not isinstance(gt, list) or not gt or not all(isinstance(g, int) and 0 <= g < len(self) for g in gt):
            raise AnnotationError(f"{self.records.source}: record {record_index}: field 'gt' must be a non-empty list of "
                             f"video indices in [0, {len(self)}), got {gt!r}")
        return sorted(set(gt))

    def __getitem__(self, index: int) -> dict[str, Any]:
        # evaluation must score every video: a broken one is an error, not a silent replacement
        video, _ = self.load_clip(index)
        return {"video": video, "index": index}


class ProbeDataset(MediaDataset):
    """Temporal probe: ``{"video": uint8 [T,3,H,W], "caption": str, "foil": str, "index": int}``."""

    kind = "probe"

    def __init__(self, records, media_root, *, sampling: str = "middle", train: bool = False, **kwargs):
        super().__init__(records, media_root, sampling=sampling, train=train, **kwargs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video, record = self.load_clip(index)
        return {"video": video, "caption": record["caption"], "foil": record["foil"], "index": index}


class QADataset(MediaDataset):
    """Video QA: ``{"video", "question": str, "answers": list[str], "answer_index": int (-1 if not in the list),
    "question_id", "index"}``; ``answer_list`` is the answer vocabulary (classification targets)."""

    kind = "qa"

    def __init__(self, records, media_root, answer_list: str | os.PathLike | Sequence[str], *, sampling: str = "middle",
                 train: bool = False, **kwargs):
        super().__init__(records, media_root, sampling=sampling, train=train, **kwargs)
        self.answer_list = list(answer_list) if isinstance(answer_list, (list, tuple)) else load_answer_list(
            answer_list)
        self.answer_to_index = {a: i for i, a in enumerate(self.answer_list)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.train:  # finetuning replaces broken clips; evaluation must fail loudly instead
            video, record, index = self.load_guarded(index)
        else:
            video, record = self.load_clip(index)
        answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
        return {"video": video, "question": record["question"], "answers": answers,
                "answer_index": self.answer_to_index.get(answers[0], -1), "question_id": record["question_id"],
                "index": index}


class MCDataset(MediaDataset):
    """Multiple choice: ``{"video", "options": list[str], "answer": int, "index"}``."""

    kind = "mc"

    def __init__(self, records, media_root, *, sampling: str = "middle", train: bool = False, **kwargs):
        super().__init__(records, media_root, sampling=sampling, train=train, **kwargs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        video, record = self.load_clip(index)
        return {"video": video, "options": record["caption"], "answer": record["answer"], "index": index}


class VideoTextCollator:
    """Collate pretraining samples into the batch dict of docs/internals.md.

    ``tokenizer`` is any callable ``tok(list[str], max_length=None) -> {"input_ids", "attention_mask"}`` (long [B, L]).
    Output: ``video`` float [B,T,3,H,W] in [0,1], ``input_ids``/``attention_mask`` long [B,L], ``sample_id`` long
    [B], ``index`` long [B], ``media`` str, and ``foil_input_ids``/``foil_attention_mask`` when every sample has a
    foil. Picklable (a class, not a closure) so DataLoader workers can use it. Texts go to the tokenizer as they
    are: stmvl's Tokenizer applies the UMT caption cleaning itself, in training and evaluation alike.
    """

    def __init__(self, tokenizer: Callable, media: str = "video", max_length: int | None = None):
        self.tokenizer, self.media, self.max_length = tokenizer, media, max_length

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, max_length=self.max_length)

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, Any] = {
            # uint8: a quarter of float32's bytes through the loader and the host-to-device copy; the task scales it
            # to [0, 1] on the device (stmvl.tasks.data.StreamTask)
            "video": torch.stack([s["video"] for s in samples]),
            "sample_id": torch.tensor([s["sample_id"] for s in samples], dtype=torch.long),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "media": self.media,
        }
        captions = [s["caption"] for s in samples]
        foils = [s.get("foil") for s in samples]
        has_foils = all(f is not None for f in foils)
        if not has_foils and any(f is not None for f in foils):
            raise ValueError("some samples of the batch have a 'foil' caption and some do not; a corpus must give "
                             "foils for all records or none")
        # captions and foils in one call: both get the same padded length, so the model can stack them
        tokens = self._tokenize(captions + foils if has_foils else captions)
        b = len(samples)
        batch["input_ids"], batch["attention_mask"] = tokens["input_ids"][:b], tokens["attention_mask"][:b]
        if has_foils:
            batch["foil_input_ids"], batch["foil_attention_mask"] = (tokens["input_ids"][b:],
                                                                     tokens["attention_mask"][b:])
        return batch


def collate_eval(samples: list[dict]) -> dict[str, Any]:
    """Collate evaluation samples: ``video`` -> float [B,T,3,H,W] in [0,1], ``index`` -> long [B], the other fields
    as lists (captions, options, answers ...), tokenized later by the evaluator."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    batch: dict[str, Any] = {"video": to_float(torch.stack([s["video"] for s in samples])),
                             "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}
    for key in samples[0]:
        if key not in batch:
            batch[key] = [s[key] for s in samples]
    return batch
