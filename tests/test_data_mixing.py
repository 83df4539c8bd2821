"""Distributed batch sampling and the media mixing stream."""

import pytest
import torch
from torch.utils.data import Dataset

from stmvl.data.mixing import DistributedBatchSampler, MediaSource, MixedBatchStream, media_schedule


class _Indexed(Dataset):
    """Returns its index and epoch, so batches show exactly what was sampled."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        return i


def _collate(media):
    def collate(items):
        return {"media": media, "index": torch.tensor(items)}
    return collate


def _stream(rank=0, world_size=1, seed=0, workers=0, weights=None):
    sources = {"video": MediaSource(_Indexed(40), 4, _collate("video")),
               "image": MediaSource(_Indexed(60), 6, _collate("image"))}
    return MixedBatchStream(sources, seed=seed, rank=rank, world_size=world_size, num_workers=workers,
                            weights=weights)


def _run(stream):
    return [(b["media"], b["index"].tolist()) for b in stream]


def test_sampler_splits_ranks_without_overlap_and_reshuffles_per_epoch():
    samplers = [DistributedBatchSampler(23, 3, rank=r, world_size=2, seed=1) for r in range(2)]
    batches = [list(s) for s in samplers]
    assert [len(b) for b in batches] == [3, 3]  # 11 per rank -> 3 full batches of 3
    flat = [set(i for b in rank for i in b) for rank in batches]
    assert not flat[0] & flat[1]
    first = batches[0]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != first
    samplers[0].set_epoch(0, start_batch=2)
    assert list(samplers[0]) == first[2:]
    with pytest.raises(ValueError, match="no full batch"):
        DistributedBatchSampler(3, 4)


def test_a_corpus_smaller_than_one_batch_is_a_user_error_naming_the_key_and_corpus():
    from stmvl.config import ConfigError
    from stmvl.tasks.data import require_full_batch

    require_full_batch("image", ["synth_image"], 128, 128, 1)  # exactly one batch: fine
    with pytest.raises(ConfigError, match=r"data.image_batch_size=128: the image corpora synth_image hold 64 "):
        require_full_batch("image", ["synth_image"], 64, 128, 1)
    with pytest.raises(ConfigError, match="video corpora a, b hold 60 samples, less than one full batch on each of 2"):
        require_full_batch("video", ["a", "b"], 60, 32, 2)


def test_order_identical_on_ranks_and_different_between_epochs():
    rank0, rank1 = _stream(rank=0, world_size=2), _stream(rank=1, world_size=2)
    epoch0 = [_run(rank0), _run(rank1)]
    assert [m for m, _ in epoch0[0]] == [m for m, _ in epoch0[1]]  # same media at every step
    assert len(epoch0[0]) == 5 + 5  # video 20/4, image 30/6 per rank
    seen = [set(i for m, idx in run if m == "video" for i in idx) for run in epoch0]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40
    epoch1 = _run(rank0)  # the stream advanced to epoch 1
    assert epoch1 != epoch0[0]
    assert _stream().schedule(0) == media_schedule({"image": 10, "video": 10}, 0, 0)
    schedules = {tuple(_stream().schedule(e)) for e in range(4)}
    assert len(schedules) > 1


def test_reproducible_independent_of_workers_and_resumable():
    reference = _run(_stream(seed=3))
    assert _run(_stream(seed=3, workers=2)) == reference
    resumed = _stream(seed=3)
    resumed.load_state_dict({"epoch": 0, "step": 4})
    assert _run(resumed) == reference[4:]
    stream = _stream(seed=3)
    partial = []
    for batch in stream:
        partial.append((batch["media"], batch["index"].tolist()))
        if len(partial) == 6:
            break
    state = stream.state_dict()
    assert state == {"epoch": 0, "step": 6}
    restored = _stream(seed=3)
    restored.load_state_dict(state)
    assert partial + _run(restored) == reference


def test_weights_change_the_number_of_steps_per_media():
    stream = _stream(weights={"video": 2.0, "image": 0.5})
    media = [m for m, _ in _run(stream)]
    assert media.count("video") == 20 and media.count("image") == 5  # 10 batches x 2, 10 x 0.5
    with pytest.raises(ValueError, match="unknown media"):
        _stream(weights={"audio": 1.0})


def test_persistent_workers_follow_the_epoch_of_the_datasets(tmp_path):
    """Loader workers live for the whole run; the epoch reaches them through shared memory, so every epoch's random
    frames and crops equal those of a run without workers."""
    from stmvl.data.datasets import VideoTextDataset
    from stmvl.data.synth import generate_corpus

    generate_corpus(tmp_path, seed=0, train=8, test=0, probe=0, size=32, frames=4, workers=1)

    def clips(workers):
        ds = VideoTextDataset(tmp_path / "annotations" / "train_video.json", tmp_path, num_frames=2, img_size=24,
                              train=True, sampling="rand")
        collate = lambda items: {"video": torch.stack([x["video"] for x in items]), "media": "video"}  # noqa: E731
        stream = MixedBatchStream({"video": MediaSource(ds, 4, collate)}, seed=1, num_workers=workers)
        epochs = [[b["video"] for b in stream] for _ in range(2)]  # the stream moves to the next epoch by itself
        if workers:
            loader = stream._loaders["video"]
            assert loader.persistent_workers and loader._iterator is not None  # the same workers served both
        return epochs

    reference, pooled = clips(0), clips(2)
    assert not torch.equal(reference[0][0], reference[1][0])  # a new epoch draws new frames / crops
    for ref_epoch, got_epoch in zip(reference, pooled):
        assert all(torch.equal(a, b) for a, b in zip(ref_epoch, got_epoch))
