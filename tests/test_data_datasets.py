"""Datasets, collate, broken-media replacement + quarantine, and worker-count independence."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from stmvl.data import synth
from stmvl.data.datasets import (MCDataset, ProbeDataset, QADataset, RetrievalDataset, VideoTextCollator,
                                 VideoTextDataset, collate_eval)
from stmvl.data.annotations import AnnotationError
from stmvl.data.quarantine import Quarantine, TooManyBadSamples
from stmvl.data.text import Tokenizer

from broken_media import write_broken_media


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth.generate_corpus(root, seed=1, train=10, test=4, probe=3, size=32, frames=8, workers=1)
    return root


def _video_ds(corpus, **kwargs):
    kwargs.setdefault("num_frames", 4)
    kwargs.setdefault("img_size", 24)
    return VideoTextDataset(corpus / "annotations" / "train_video.json", corpus, **kwargs)


def test_video_text_samples_and_collate(corpus):
    ds = _video_ds(corpus, id_offset=100)
    sample = ds[3]
    assert sample["video"].shape == (4, 3, 24, 24) and sample["video"].dtype == torch.uint8
    assert sample["sample_id"] == 103 and sample["index"] == 3
    record = json.loads((corpus / "annotations" / "train_video.json").read_text())[3]
    assert sample["caption"] == record["caption"] and sample["foil"] == record["foil"]
    assert torch.equal(ds[3]["video"], sample["video"])  # same (seed, epoch, index) -> same sample
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["video"], sample["video"])  # new epoch -> new frames / crop
    tokenizer = Tokenizer(max_length=16)
    batch = VideoTextCollator(tokenizer)([ds[i] for i in range(3)])
    # uint8 through the loader and the copy to the device; the task scales it to [0, 1] there
    assert batch["video"].shape == (3, 4, 3, 24, 24) and batch["video"].dtype == torch.uint8
    assert torch.equal(batch["video"][1], ds[1]["video"]) and batch["video"].max() > 127
    assert batch["sample_id"].tolist() == [100, 101, 102] and batch["media"] == "video"
    expected = tokenizer([ds.records[i]["caption"] for i in range(3)])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    foil = tokenizer([ds.records[i]["foil"] for i in range(3)])
    assert torch.equal(batch["foil_input_ids"], foil["input_ids"])
    assert torch.equal(batch["foil_attention_mask"], foil["attention_mask"])


def test_image_corpus_gives_single_frames(corpus):
    ds = VideoTextDataset(corpus / "annotations" / "train_image.json", corpus, media_type="image", img_size=16,
                          num_frames=4)
    sample = ds[0]
    assert sample["video"].shape == (1, 3, 16, 16) and "foil" not in sample
    batch = VideoTextCollator(Tokenizer(), media="image")([ds[0], ds[1]])
    assert batch["media"] == "image" and "foil_input_ids" not in batch


def test_samples_do_not_depend_on_worker_count(corpus):
    ds = _video_ds(corpus)
    collate = VideoTextCollator(Tokenizer())
    runs = [torch.cat([b["video"] for b in DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=w)])
            for w in (0, 2)]
    assert torch.equal(runs[0], runs[1])


def _broken_corpus(corpus, tmp_path):
    """A copy of the train annotation where 5 of 15 records point to broken media of each kind."""
    media = tmp_path / "media"
    records = json.loads((corpus / "annotations" / "train_video.json").read_text())
    for record in records:
        target = media / record["video"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus / record["video"], target)
    bad = write_broken_media(media, corpus / records[0]["video"], records[0]["attributes"])
    for i, name in enumerate(bad):
        records.insert(2 * i + 1, {"video": name, "caption": "broken", "foil": "broken"})
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    return path, media, bad


def test_loader_skips_broken_media_and_quarantines_exactly_them(corpus, tmp_path):
    annotation, media, bad = _broken_corpus(corpus, tmp_path)
    quarantine = Quarantine(tmp_path / "run")
    ds = VideoTextDataset(annotation, media, num_frames=4, img_size=16, quarantine=quarantine, min_frames=4,
                          max_bad_fraction=0.5)
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=VideoTextCollator(Tokenizer()))
    captions = []
    for batch in loader:
        assert batch["video"].shape == (5, 4, 3, 16, 16)
        captions += [ds.records[i]["caption"] for i in batch["index"].tolist()]
    assert len(captions) == 15 and "broken" not in captions
    entries = quarantine.entries()
    assert sorted((e["path"].rsplit("/", 1)[-1], e["reason"]) for e in entries) == sorted(bad.items())
    assert all(e["corpus"] == "broken" for e in entries)


def test_a_prefilled_cache_changes_no_sample_and_leaves_broken_media_to_the_quarantine(corpus, tmp_path,
                                                                                       monkeypatch):
    import stmvl.data.video as video

    annotation, media, bad = _broken_corpus(corpus, tmp_path)
    kwargs = dict(num_frames=4, img_size=16, min_frames=4, max_bad_fraction=0.5, decoded_cache_mib=64)
    lazy = VideoTextDataset(annotation, media, quarantine=Quarantine(tmp_path / "lazy"), **kwargs)
    quarantine = Quarantine(tmp_path / "run")
    prefilled = VideoTextDataset(annotation, media, quarantine=quarantine, **kwargs)
    assert prefilled.prefill_decoded_cache(2) == 10  # the 10 good clips; the 5 broken files left to the reads
    assert len(prefilled.decoded_cache) == 10 and prefilled.decoded_cache.misses == 0
    decoded = []  # the files the reads decode from here on
    decode = video._decode_wanted
    monkeypatch.setattr(video, "_decode_wanted", lambda c, s, w, fps, name, *a: (decoded.append(name),
                                                                                 decode(c, s, w, fps, name, *a))[1])
    for epoch in range(2):
        lazy.set_epoch(epoch)
        prefilled.set_epoch(epoch)
        for i in range(len(lazy)):
            want, got = lazy[i], prefilled[i]
            assert torch.equal(got["video"], want["video"]) and got["index"] == want["index"]
    # each good clip decoded once, by the lazy dataset's first read: never again by the prefilled one; the broken
    # files are quarantined as without the prefill
    good = [name for name in decoded if Path(name).name not in bad]
    assert len(good) == len(set(good)) == 10 and len(prefilled.decoded_cache) == 10
    assert sorted((e["path"].rsplit("/", 1)[-1], e["reason"]) for e in quarantine.entries()) == sorted(bad.items())
    assert VideoTextDataset(annotation, media, **{**kwargs, "decoded_cache_mib": 0}).prefill_decoded_cache(2) == 0


def test_a_prefill_without_a_cache_is_refused_naming_both_keys():
    from stmvl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.decoded_cache_prefill=2 fills the decoded-clip cache, but "
                                          r"data.decoded_cache_mib is 0"):
        load_config("demo", ["data.decoded_cache_mib=0", "data.decoded_cache_prefill=2"])
    assert load_config("demo", []).data.decoded_cache_prefill == 2


def test_prefill_keeps_to_the_cache_budget(corpus):
    from stmvl.data.video import DecodedClipCache, prefill_decoded_cache

    clips = [(corpus / f"videos/train/train_{i:05d}.mp4", None, None) for i in range(6)]
    clip_bytes = 8 * 32 * 32 * 3
    cache = DecodedClipCache(3 * clip_bytes + 100)
    assert prefill_decoded_cache(cache, clips + clips[:2], 2) == 3  # full after three; duplicates decode once
    assert len(cache) == 3 and cache.nbytes == 3 * clip_bytes
    trimmed = DecodedClipCache(10 * clip_bytes)
    assert prefill_decoded_cache(trimmed, [(clips[0][0], 0.25, None)], 1) == 1
    (key, clip), = trimmed._clips.items()
    assert key == (str(clips[0][0]), 0.25, None) and clip.first > 0 and clip.last == 8


def test_failure_bound_stops_with_a_clear_error(corpus, tmp_path):
    annotation, media, _ = _broken_corpus(corpus, tmp_path)
    ds = VideoTextDataset(annotation, media, num_frames=2, img_size=16, min_frames=4, max_bad_fraction=0.1)
    ds.guard.min_attempts = 5
    with pytest.raises(TooManyBadSamples, match=r"max_bad_fraction 10\.0%.*check-data"):
        for i in range(len(ds)):
            ds[i]


def test_retrieval_modes_and_ground_truth(tmp_path, corpus):
    clip = "videos/test/test_00000.mp4"
    records = [{"video": clip, "caption": ["a b", "c d"]}, {"video": clip, "caption": "e f"},
               {"video": clip, "caption": ["g h"], "gt": [[1, 2]]}]
    path = tmp_path / "ret.json"
    path.write_text(json.dumps(records))
    multi = RetrievalDataset(path, corpus, mode="multi", num_frames=2, img_size=16)
    assert multi.texts == ["a b", "c d", "e f", "g h"]
    assert multi.txt2vid == [[0], [0], [1], [1, 2]] and multi.vid2txt == [[0, 1], [2, 3], [3]]
    para_path = tmp_path / "para.json"
    para_path.write_text(json.dumps(records[:2]))
    paragraph = RetrievalDataset(para_path, corpus, mode="paragraph", num_frames=2, img_size=16)
    assert paragraph.texts == ["a b c d", "e f"] and paragraph.txt2vid == [[0], [1]]
    single = RetrievalDataset(corpus / "annotations" / "retrieval_test.json", corpus, num_frames=2, img_size=16)
    gts = [r["gt"] for r in json.loads((corpus / "annotations" / "retrieval_test.json").read_text())]
    assert single.txt2vid == gts and all(t in single.vid2txt[v] for t, g in enumerate(gts) for v in g)
    batch = collate_eval([single[0], single[1]])
    assert batch["video"].shape == (2, 2, 3, 16, 16) and batch["index"].tolist() == [0, 1]
    records[2]["gt"] = [[7]]
    path.write_text(json.dumps(records))
    with pytest.raises(AnnotationError) as info:  # a user error: one line naming file, record and field
        RetrievalDataset(path, corpus, mode="multi")
    assert str(info.value) == (f"{path}: record 2: field 'gt' must be a non-empty list of video indices in [0, 3), "
                               "got [7]")


def test_probe_qa_mc_datasets(corpus):
    ann = corpus / "annotations"
    probe = ProbeDataset(ann / "probe.json", corpus, num_frames=8, img_size=32)
    sample = probe[0]
    assert sample["caption"] != sample["foil"] and sample["video"].shape == (8, 3, 32, 32)
    qa = QADataset(ann / "qa_test.json", corpus, ann / "qa_answers.json", num_frames=2, img_size=16)
    item = qa[1]
    assert qa.answer_list[item["answer_index"]] == item["answers"][0]
    mc = MCDataset(ann / "mc_test.json", corpus, num_frames=2, img_size=16)
    choice = mc[2]
    assert len(choice["options"]) == 5 and 0 <= choice["answer"] < 5
    test_captions = [r["caption"] for r in json.loads((ann / "test_video.json").read_text())]
    assert choice["options"][choice["answer"]] == test_captions[2]


# ------------------------------------------------------------------------- the broken-media guard, hostile input


def _as_list(samples):
    return samples


def _image_records(corpus):
    return json.loads((corpus / "annotations" / "train_image.json").read_text())


def test_every_exception_of_a_sample_is_quarantined_with_its_reason(corpus, tmp_path, monkeypatch):
    from PIL import Image

    from stmvl.data import datasets

    records = _image_records(corpus)
    hostile = {records[1]["image"]: OverflowError("cannot convert float infinity to integer"),
               records[2]["image"]: TypeError("unsupported operand type(s) for *: 'int' and 'NoneType'"),
               records[3]["image"]: Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit")}
    real = datasets.read_media

    def read(path, *args, **kwargs):
        if str(path).endswith(records[4]["image"]):
            return torch.zeros(1, 3, 8, 8)  # float frames: the transform raises ValueError
        for name, err in hostile.items():
            if str(path).endswith(name):
                raise err
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "read_media", read)
    quarantine = Quarantine(tmp_path / "run")
    ds = VideoTextDataset(corpus / "annotations" / "train_image.json", corpus, media_type="image", img_size=16,
                          quarantine=quarantine, max_bad_fraction=0.9, corpus="images")
    used = [ds[i]["index"] for i in range(len(ds))]
    assert not {1, 2, 3, 4} & set(used)  # every broken sample was replaced; loading went on
    listed = {e["path"].removeprefix(str(corpus) + "/"): (e["reason"], e["detail"]) for e in quarantine.entries()}
    assert listed == {
        records[1]["image"]: ("error", "OverflowError: cannot convert float infinity to integer"),
        records[2]["image"]: ("error", "TypeError: unsupported operand type(s) for *: 'int' and 'NoneType'"),
        records[3]["image"]: ("too_large", "DecompressionBombError: Image size (400000000 pixels) exceeds limit"),
        records[4]["image"]: ("error", "ValueError: expected a uint8 clip [T, 3, H, W], got torch.float32 "
                                       "(1, 3, 8, 8)"),
    }
    attempts, failures = ds.guard.counts()  # a replacement may fall on another broken sample: more than 4
    assert attempts == len(ds) + failures and failures >= 4


def test_interrupts_and_memory_errors_are_not_broken_samples(corpus, tmp_path, monkeypatch):
    from stmvl.data import datasets

    quarantine = Quarantine(tmp_path / "run")
    ds = VideoTextDataset(corpus / "annotations" / "train_image.json", corpus, media_type="image", img_size=16,
                          quarantine=quarantine)
    for error in (MemoryError, KeyboardInterrupt, SystemExit):
        monkeypatch.setattr(datasets, "read_media", lambda *a, **k: (_ for _ in ()).throw(error()))
        with pytest.raises(error):
            ds[0]
    assert quarantine.entries() == [] and ds.guard.failures == 0


def test_image_bombs_in_loader_workers_are_quarantined_and_training_goes_on(corpus, tmp_path):
    from broken_media import forged_png

    records = _image_records(corpus)
    (tmp_path / "bomb.png").write_bytes(forged_png(20000, 20000))
    (tmp_path / "big.png").write_bytes(forged_png(9000, 9000))
    hostile = records + [{"image": str(tmp_path / "bomb.png"), "caption": "bomb"},
                         {"image": str(tmp_path / "big.png"), "caption": "big"}]
    annotation = tmp_path / "hostile.json"
    annotation.write_text(json.dumps(hostile))
    quarantine = Quarantine(tmp_path / "run")
    ds = VideoTextDataset(annotation, corpus, media_type="image", img_size=16, quarantine=quarantine,
                          max_bad_fraction=0.5)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=_as_list))
    assert sum(len(b) for b in batches) == len(hostile)
    assert not {"bomb", "big"} & {s["caption"] for b in batches for s in b}
    assert sorted((Path(e["path"]).name, e["reason"]) for e in quarantine.entries()) == [("big.png", "too_large"),
                                                                                          ("bomb.png", "too_large")]


def _half_broken_images(corpus, tmp_path, **kwargs):
    """20 image records; records 3, 7, 11, 15, 19 name a missing file. With batch_size=1 and 2 loader workers,
    worker 1 loads the odd indices: every failure happens in worker 1."""
    records = _image_records(corpus)
    hostile = [{"image": "missing.png", "caption": f"broken {i}"} if i % 4 == 3 else records[i % len(records)]
               for i in range(20)]
    annotation = tmp_path / "half.json"
    annotation.write_text(json.dumps(hostile))
    return VideoTextDataset(annotation, corpus, media_type="image", img_size=16, corpus="half", **kwargs)


def _first_error(dataset) -> str:
    """The message of the TooManyBadSamples that iterating ``dataset`` with 2 workers raises. The workers are stopped
    here: the re-raised error's traceback holds the loader iterator in cyclic garbage, and the collector, whenever
    it runs, would wait seconds for workers whose queues it has already closed."""
    batches = iter(DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=_as_list))
    try:
        for _ in batches:
            pass
    except TooManyBadSamples as err:
        return str(err).splitlines()[-1].split("TooManyBadSamples: ")[-1]
    finally:
        batches._shutdown_workers()
    raise AssertionError("the bound was not reached")


def test_the_bad_sample_bound_is_global_across_loader_workers(corpus, tmp_path):
    from stmvl.data.quarantine import bad_sample_counts

    # the loads of worker 1 on their own, in this process: how far its own counts would go
    alone = _half_broken_images(corpus, tmp_path, max_bad_fraction=1.0)
    for i in range(1, 20, 2):
        alone[i]
    worker_attempts, worker_failures = alone.guard.counts()
    assert worker_failures >= 5
    # a bound that no single worker reaches (worker 0 never fails, worker 1 stays under min_attempts) ...
    ds = _half_broken_images(corpus, tmp_path, max_bad_fraction=0.01)
    ds.guard.min_attempts = worker_attempts + 1
    assert re.fullmatch(r"corpus 'half': \d+ of \d+ media loads failed .*", _first_error(ds))
    # ... is reached by the two workers together; and the process that built the dataset sees their counts
    counted = _half_broken_images(corpus, tmp_path, max_bad_fraction=1.0)
    list(DataLoader(counted, batch_size=1, num_workers=2, collate_fn=_as_list))
    assert bad_sample_counts(counted) == (10 + worker_attempts, worker_failures)


def test_the_stream_reports_a_workers_bound_as_one_line_and_its_counts(corpus, tmp_path):
    from stmvl.data.mixing import MediaSource, MixedBatchStream

    ds = _half_broken_images(corpus, tmp_path, max_bad_fraction=1.0)
    stream = MixedBatchStream({"image": MediaSource(ds, 2, _as_list)}, seed=3, num_workers=2)
    assert sum(len(batch) for batch in stream) == 20
    attempts, failures = stream.bad_sample_counts()  # the engine all-reduces these over ranks
    assert attempts == 20 + failures and failures >= 5
    strict = _half_broken_images(corpus, tmp_path, max_bad_fraction=0.01)
    strict.guard.min_attempts = 1
    stream = MixedBatchStream({"image": MediaSource(strict, 2, _as_list)}, seed=3, num_workers=2)
    with pytest.raises(TooManyBadSamples) as info:
        list(stream)
    message = str(info.value)
    assert "\n" not in message and message.startswith("corpus 'half': ")
    assert message.endswith("Run `stmvl check-data` on the annotation to list the broken files.")


def test_training_datasets_refuse_a_non_utf8_annotation_as_a_user_error(tmp_path):
    from stmvl.errors import UserError

    annotation = tmp_path / "train.json"
    annotation.write_bytes('[{"video": "a.mp4", "caption": "naïve"}]'.encode("latin-1"))
    with pytest.raises(UserError) as info:
        VideoTextDataset(annotation, tmp_path)
    assert str(info.value) == (f"{annotation}: annotation file is not UTF-8 text: byte 0xef at offset 34 (line 1); "
                               f"save it as UTF-8")


def test_the_data_decoder_fps_threads_and_cache_keys_reach_every_dataset(corpus, tmp_path):
    from stmvl.config import load_config
    from stmvl.tasks.data import eval_datasets, pretrain_datasets

    cfg = load_config("demo", [f"data.synthetic.dir={corpus}", "data.sampling=fps", "data.fps=2",
                               "data.decode_threads=0", "data.decoded_cache_mib=8"])
    expected = {"backend": "pyav", "threads": 0, "sample_fps": 2.0}
    by_media = pretrain_datasets(cfg, tmp_path, seed=0)
    video, image = by_media["video"][0], by_media["image"][0]
    assert video.video_kwargs == image.video_kwargs == expected
    assert video.decoded_cache.max_bytes == 8 * 2**20 and image.decoded_cache is None
    first = video[0]["video"]
    assert len(video.decoded_cache) == 1 and torch.equal(video[0]["video"], first)  # same epoch: same crop
    for _, dataset in eval_datasets(cfg).values():  # evaluation reads each clip once: no cache
        assert dataset.video_kwargs == expected and dataset.decoded_cache is None


def test_a_decoded_cache_without_pyav_is_refused_naming_both_keys():
    from stmvl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.decoded_cache_mib=8 needs data.decoder: pyav \(got 'decord'\)"):
        load_config("demo", ["data.decoder=decord", "data.decoded_cache_mib=8"])
