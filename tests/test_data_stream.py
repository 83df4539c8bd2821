"""Streaming webdataset shards (stmvl.data.stream): equal steps on every rank, every sample once per epoch across
ranks x workers, exact resume, pre-decoded frames, hostile shards quarantined sample by sample."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from stmvl.data import shards, synth
from stmvl.data.check import check_shards
from stmvl.data.datasets import VideoTextDataset
from stmvl.data.mixing import MediaSource, MixedBatchStream
from stmvl.data.quarantine import Quarantine, TooManyBadSamples
from stmvl.data.stream import VIDEO_EXTENSIONS, ShardIndex, ShardStream
from stmvl.errors import UserError


def _collate(samples):
    return {"media": "video", "index": torch.tensor([s["index"] for s in samples]),
            "sample_id": torch.tensor([s["sample_id"] for s in samples]),
            "video": torch.stack([s["video"] for s in samples])}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    synth.generate_corpus(root, train=32, test=4, probe=2, size=32, frames=4, workers=1)
    out = root / "shards"
    shards.write_shards(root / "annotations" / "train_video.json", root, out, 4)
    return root, out


def _stream(out, **kwargs):
    kwargs = {"num_frames": 2, "img_size": 16, "sampling": "middle", "train": False, "seed": 5, **kwargs}
    return ShardStream(str(out / "index.json"), **kwargs)


def _epoch(out, rank, world_size, workers, epoch=0, step=0, **kwargs):
    mixed = MixedBatchStream({"video:s": MediaSource(_stream(out, **kwargs), 4, _collate)}, seed=1, rank=rank,
                             world_size=world_size, num_workers=workers)
    mixed.load_state_dict({"epoch": epoch, "step": step})
    return len(mixed), [b["index"].tolist() for b in mixed]


def test_index_lists_every_shard_and_its_samples(corpus):
    root, out = corpus
    index = json.loads((out / "index.json").read_text())
    assert [s["url"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(8)]
    assert index["samples"] == index["records"] == 32 and all(s["samples"] == 4 for s in index["shards"])
    pattern = ShardIndex.load(str(out / "shard-{000000..000007}.tar"))  # index.json found beside the pattern
    assert pattern.counts == [4] * 8 and pattern.samples == 32
    assert not list(out.glob("*.partial"))


def test_every_sample_once_per_epoch_across_two_ranks_and_two_workers(corpus):
    root, out = corpus
    files = MixedBatchStream({"video": MediaSource(VideoTextDataset(root / "annotations" / "train_video.json", root,
                                                                    num_frames=2, img_size=16), 4, _collate)},
                             world_size=2)
    seen = []
    for rank in range(2):
        steps, batches = _epoch(out, rank, 2, workers=2)
        assert steps == len(files) == len(batches) == 4  # same steps per epoch as the file corpus, on each rank
        assert all(len(b) == 4 for b in batches)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(32))  # every sample exactly once
    _, next_epoch = _epoch(out, 0, 2, workers=2, epoch=1)
    assert [i for b in next_epoch for i in b] != [i for b in _epoch(out, 0, 2, workers=2)[1] for i in b]


def test_resume_continues_at_the_recorded_batch(corpus):
    _, out = corpus
    _, full = _epoch(out, 1, 2, workers=2, train=True, sampling="rand")
    _, resumed = _epoch(out, 1, 2, workers=2, step=3, train=True, sampling="rand")
    assert resumed == full[3:]


def test_samples_decode_as_from_the_files(corpus):
    root, out = corpus
    reference = VideoTextDataset(root / "annotations" / "train_video.json", root, num_frames=2, img_size=16,
                                 sampling="middle", train=False, seed=5)
    stream = _stream(out)
    samples = list(itertools.islice(stream.worker_samples(0, 0, 1, 0, 1), 6))
    for s in samples:
        expected = reference[s["index"]]
        assert torch.equal(s["video"], expected["video"]) and s["caption"] == expected["caption"]


def test_every_video_extension_round_trips(tmp_path):
    import av

    source = tmp_path / "src"
    synth.generate_corpus(source, train=2, test=1, probe=1, size=32, frames=4, workers=1)
    clip = next((source / "videos" / "train").glob("*.mp4"))
    videos = tmp_path / "media"
    videos.mkdir()
    records = []
    for ext in VIDEO_EXTENSIONS:
        shutil.copy(clip, videos / f"clip.{ext}")
        records.append({"video": f"clip.{ext}", "caption": ext})
    # and one real MPEG-1 program stream, the container of .mpg files
    with av.open(str(videos / "real.mpg"), "w", format="mpeg") as container:
        stream = container.add_stream("mpeg1video", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(8):
            frame = av.VideoFrame.from_ndarray(torch.full((32, 32, 3), 30 * k, dtype=torch.uint8).numpy(), "rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    records.append({"video": "real.mpg", "caption": "mpg"})
    annotation = tmp_path / "a.json"
    annotation.write_text(json.dumps(records))
    shards.write_shards(annotation, videos, tmp_path / "out", 8)
    quarantine = Quarantine(tmp_path / "run")
    stream = ShardStream(str(tmp_path / "out" / "index.json"), num_frames=2, img_size=16, train=False,
                         sampling="middle", quarantine=quarantine, shuffle_buffer=0)
    got = list(itertools.islice(stream.worker_samples(0, 0, 1, 0, 1), len(records)))
    assert sorted(s["caption"] for s in got) == sorted(r["caption"] for r in records)
    assert quarantine.entries() == []


def test_predecoded_shards_give_frames_at_the_short_side(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "pre"
    shards.write_shards(root / "annotations" / "train_video.json", root, out, 16, predecode=4, short_side=24)
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:5] == ["000000000.json"] + [f"000000000.f{k:03d}.jpg" for k in range(4)]
    stream = ShardStream(str(out / "index.json"), num_frames=2, img_size=16, seed=1)
    assert stream.index.predecode == {"frames": 4, "short_side": 24, "quality": 90}
    steps, batches = _epoch(out, 0, 1, workers=0)
    assert steps == 8 and sorted(i for b in batches for i in b) == list(range(32))


def test_write_is_atomic_and_resumable(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    annotation = root / "annotations" / "train_video.json"
    out = tmp_path / "w"
    calls = {"n": 0}
    real = shards._add_bytes

    def dies_in_shard_three(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 2 * 4 * 2 + 3:  # the middle of the third shard
            raise KeyboardInterrupt
        real(tar, name, data)

    monkeypatch.setattr(shards, "_add_bytes", dies_in_shard_three)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(annotation, root, out, 4)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    assert len(json.loads((out / "index.json").read_text())["shards"]) == 2
    first = (out / "shard-000000.tar").stat().st_mtime_ns
    monkeypatch.setattr(shards, "_add_bytes", real)
    paths = shards.write_shards(annotation, root, out, 4)
    assert len(paths) == 8 and (out / "shard-000000.tar").stat().st_mtime_ns == first  # finished shards kept
    assert ShardIndex.from_file(str(out / "index.json")).samples == 32
    with pytest.raises(UserError, match="differ: shard_size"):
        shards.write_shards(annotation, root, out, 5)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_hostile_shards_are_quarantined_sample_by_sample(corpus, tmp_path):
    root, out = corpus
    bad = tmp_path / "hostile"
    bad.mkdir()
    good = [out / f"shard-{i:06d}.tar" for i in range(2)]  # samples 0-7
    clip = (root / json.loads((root / "annotations" / "train_video.json").read_text())[0]["video"]).read_bytes()

    def meta(i):
        return json.dumps({"index": i, "caption": f"clip {i}"}).encode()

    (bad / "garbage.tar").write_bytes(b"this is not a tar file at all" * 100)
    _tar(bad / "mixed.tar", [("000000100.mp4", clip), ("000000100.json", meta(8)),  # good
                             ("000000101.mp4", clip),  # no json
                             ("../000000102.mp4", clip), ("../000000102.json", meta(9)),  # escapes the folder
                             ("000000103.mp4", clip * 40), ("000000103.json", meta(10)),  # oversized member
                             ("000000104.mp4", clip), ("000000104.json", b'{"index": "x", "caption": "c"}'),
                             ("000000105.mp4", clip), ("000000105.json", meta(11))])  # good
    _tar(bad / "whole.tar", [("000000200.mp4", clip), ("000000200.json", meta(12)),
                             ("000000201.mp4", clip), ("000000201.json", meta(13))])
    data = (bad / "whole.tar").read_bytes()
    padded = -(-len(clip) // 512) * 512
    (bad / "truncated.tar").write_bytes(data[: 4 * 512 + padded + 300])  # cut inside the 2nd sample's media
    (bad / "whole.tar").unlink()
    # the garbage shard first: a broken sample before any good one takes the next good one
    urls = [str(bad / "garbage.tar")] + [str(p) for p in good] + [str(bad / n) for n in ("mixed.tar", "truncated.tar")]
    index = ShardIndex(urls, [1, 4, 4, 6, 2], records=32)
    quarantine = Quarantine(tmp_path / "run")
    stream = ShardStream(index, num_frames=2, img_size=16, train=False, sampling="middle", quarantine=quarantine,
                         max_bad_fraction=0.6, max_member_bytes=len(clip) * 10, shuffle_buffer=0, corpus="hostile",
                         seed=12)
    assert urls[stream.shard_order(0, 0)[0]].endswith("garbage.tar")  # seed 12 reads the garbage shard first
    got = list(itertools.islice(stream.worker_samples(0, 0, 1, 0, 1), 17))
    def name(path):  # "SHARD.tar:KEY" -> "shard.tar:KEY" without the folder
        shard, _, key = path.partition(".tar:")
        return Path(shard).name + (".tar:" + key if key else "")

    listed = sorted((name(e["path"]), e["reason"]) for e in quarantine.entries())
    assert ("garbage.tar", "undecodable") in listed
    assert ("mixed.tar:000000101", "missing") in listed  # no .json
    assert ("mixed.tar:../000000102", "undecodable") in listed
    assert ("mixed.tar:000000103", "undecodable") in listed  # oversized, never read
    assert ("mixed.tar:000000104", "undecodable") in listed  # bad index
    assert ("truncated.tar:000000201", "undecodable") in listed
    assert len(listed) == 6
    # iteration continued: every good sample came through, each broken place filled by the previous good sample
    assert {8, 11, 12} | set(range(8)) == {s["index"] for s in got}
    # each broken place holds the last good sample (the next good one when none came before)
    raw = {"garbage.tar": [None], "shard-000000.tar": [0, 1, 2, 3], "shard-000001.tar": [4, 5, 6, 7],
           "mixed.tar": [8, None, None, None, None, 11], "truncated.tar": [12, None]}
    flat = [i for k in stream.shard_order(0, 0) for i in raw[Path(urls[k]).name]]
    expected, last, pending = [], None, 0
    for i in flat:
        if i is None and last is None:
            pending += 1
        elif i is None:
            expected.append(last)
        else:
            expected += [i] * (pending + 1)
            pending, last = 0, i
    assert [s["index"] for s in got] == expected and expected[:2] == [expected[1]] * 2
    report = check_shards(urls, index=index, max_member_bytes=len(clip) * 10)
    assert report["counts"]["ok"] == 11 and len(report["bad"]) == 6


def test_too_few_shards_for_the_ranks_is_one_clear_error(corpus):
    _, out = corpus
    with pytest.raises(UserError, match="8 shards cannot feed 9 ranks"):
        _stream(out).num_batches(1, 9)
    with pytest.raises(UserError, match="'/nowhere/shards': no such file or folder"):
        ShardIndex.load("/nowhere/shards")


def test_shard_streams_mix_with_file_corpora_by_weight(corpus, tmp_path):
    root, out = corpus
    image_out = tmp_path / "images"
    shards.write_shards(root / "annotations" / "train_image.json", root, image_out, 4, media_type="image")

    def collate(media):
        def fn(samples):
            return {**_collate(samples), "media": media}
        return fn

    def build(rank, with_streams=True):
        files = VideoTextDataset(root / "annotations" / "train_video.json", root, num_frames=2, img_size=16)
        sources = {"video": MediaSource(files, 4, collate("video"))}
        if with_streams:
            sources["video:s"] = MediaSource(_stream(out), 4, collate("video"))
            sources["image:i"] = MediaSource(ShardStream(str(image_out / "index.json"), img_size=16, seed=2), 8,
                                             collate("image"))
        return MixedBatchStream(sources, weights={"video:s": 0.5} if with_streams else None, rank=rank,
                                world_size=2, num_workers=1)

    ranks = [build(0), build(1)]
    assert ranks[0].counts == {"video": 4, "video:s": 2, "image:i": 2}  # 32 images / (8 x 2 ranks) = 2 steps
    assert ranks[0].schedule() == ranks[1].schedule() and len(ranks[0]) == 8
    batches = [list(r) for r in ranks]
    for rank in batches:
        assert [b["media"] for b in rank] == [n.split(":")[0] for n in ranks[0].schedule(0)]
        assert all(b["video"].shape[1] == (1 if b["media"] == "image" else 2) for b in rank)
    # the file corpus's own batches are those of a stream without shards: its sampler seed did not move
    alone = [b["index"].tolist() for b in build(0, with_streams=False)]
    mixed_files = [b["index"].tolist() for b, n in zip(batches[0], ranks[0].schedule(0)) if n == "video"]
    assert mixed_files == alone


def test_pipe_urls_stream_through_webdataset_gopen(corpus):
    _, out = corpus
    index = ShardIndex.load(f"pipe:cat {out}/shard-{{000000..000007}}.tar", str(out / "index.json"))
    assert index.urls[0] == f"pipe:cat {out}/shard-000000.tar" and index.samples == 32
    with pytest.raises(UserError, match="pipe: pattern has no folder"):
        ShardIndex.load(f"pipe:cat {out}/shard-{{000000..000007}}.tar")
    steps, batches = _epoch_of(ShardStream(index, num_frames=2, img_size=16, sampling="middle", train=False))
    assert steps == 8 and sorted(i for b in batches for i in b) == list(range(32))


def _epoch_of(stream):
    mixed = MixedBatchStream({"video:p": MediaSource(stream, 4, _collate)}, num_workers=2)
    return len(mixed), [b["index"].tolist() for b in mixed]


def test_an_evaluation_corpus_given_as_shards_scores_as_its_files(corpus, tmp_path):
    """Retrieval and probe corpora can be shards: unpacked once under the run folder (paths kept, so `gt` still
    matches), they give the same datasets and so the same numbers as the annotation files."""
    from stmvl.config import load_config
    from stmvl.tasks.data import eval_datasets

    root, _ = corpus
    for name in ("retrieval_test", "probe"):
        shards.write_shards(root / "annotations" / f"{name}.json", root, tmp_path / name, 2)

    def corpora(use_shards: bool) -> str:
        def one(name, kind, ann):
            where = f"shards: {tmp_path / name}" if use_shards else f"annotation: {root}/annotations/{ann}"
            return f"{{name: {name}, kind: {kind}, caption_mode: single, {where}, media_root: {root}}}"
        return f"eval.corpora=[{one('retrieval_test', 'retrieval', 'retrieval_test.json')}, " \
               f"{one('probe', 'probe', 'probe.json')}]"

    common = [f"runtime.out_dir={tmp_path / 'run'}", "eval.num_frames=2", "data.img_size=32"]
    files = eval_datasets(load_config(None, [corpora(False), *common]))
    from_shards = eval_datasets(load_config(None, [corpora(True), *common]))
    assert (tmp_path / "run" / "eval_shards" / "probe" / "annotation.json").is_file()
    for name in ("retrieval_test", "probe"):
        a, b = files[name][1], from_shards[name][1]
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert torch.equal(x["video"], y["video"])
            assert {k: v for k, v in x.items() if k != "video"} == {k: v for k, v in y.items() if k != "video"}
    # a broken evaluation shard is refused, not silently scored on fewer clips
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "probe", broken)
    first = sorted(broken.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:700])
    with pytest.raises(UserError, match="an evaluation set must be complete"):
        eval_datasets(load_config(None, [f"eval.corpora=[{{name: p, kind: probe, shards: {broken}}}]",
                                         f"runtime.out_dir={tmp_path / 'run2'}"]))


def test_hostile_shard_metadata_and_any_decode_exception_are_quarantined(corpus, tmp_path):
    root, out = corpus
    clip = (root / json.loads((root / "annotations" / "train_video.json").read_text())[0]["video"]).read_bytes()

    def meta(i, **fields):
        return json.dumps({"index": i, "caption": f"clip {i}", **fields}).encode()

    members = [("000000300.mp4", clip), ("000000300.json", meta(0)),
               ("000000301.mp4", clip), ("000000301.json", meta(1, start=1e308)),
               ("000000302.mp4", clip), ("000000302.json", meta(2, end=float("inf"))),
               ("000000303.mp4", clip), ("000000303.json", meta(3, caption="...")),
               ("000000304.mp4", clip), ("000000304.json", b'{"index": 4, "caption": "x \\ud800"}'),
               ("000000305.mp4", clip), ("000000305.json", meta(5))]
    _tar(tmp_path / "hostile.tar", members)
    quarantine = Quarantine(tmp_path / "run")
    stream = ShardStream(ShardIndex([str(tmp_path / "hostile.tar")], [6], records=32), num_frames=2, img_size=16,
                         train=False, sampling="middle", quarantine=quarantine, max_bad_fraction=0.9,
                         shuffle_buffer=0, corpus="hostile")
    got = list(itertools.islice(stream.worker_samples(0, 0, 1, 0, 1), 6))
    assert [s["index"] for s in got] == [0, 0, 0, 0, 0, 5]  # each broken place holds the last good sample
    details = {e["path"].rsplit(":", 1)[1]: (e["reason"], e["detail"]) for e in quarantine.entries()}
    assert details == {
        "000000301": ("undecodable", "bad metadata: field 'start' must be a finite number of seconds in [0, 1e+06], "
                                     "got 1e+308"),
        "000000302": ("undecodable", "bad metadata: field 'end' must be a finite number of seconds in (0, 1e+06], "
                                     "got inf"),
        "000000303": ("undecodable", "bad metadata: field 'caption' = '...' is empty after caption cleaning "
                                     "(punctuation and whitespace only)"),
        "000000304": ("undecodable", "bad metadata: field 'caption' (lone surrogate '\\ud800' at character 2) is not "
                                     "valid Unicode text"),
    }
    # an exception that is no MediaError (here from the transform) is the sample's failure too: recorded, and the
    # stream goes on until the bound (every sample fails now)
    stream.transform = lambda frames, generator: frames.permute(9, 9)
    with pytest.raises(TooManyBadSamples, match=r"corpus 'hostile': \d+ of \d+ media loads failed"):
        list(itertools.islice(stream.worker_samples(1, 0, 1, 0, 1), 1))
    reason, detail = {e["path"].rsplit(":", 1)[1]: (e["reason"], e["detail"])
                      for e in quarantine.entries()}["000000300"]
    assert reason == "error" and detail.startswith("RuntimeError: permute")
