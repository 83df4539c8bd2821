"""Webdataset shards: written from the synthetic corpus, read back streaming, split over ranks and workers."""

import json
import shutil
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from stmvl.commands.data import shards_main
from stmvl.data import shards, synth
from stmvl.data.datasets import VideoTextDataset


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth.generate_corpus(root, seed=2, train=7, test=0, probe=0, size=32, frames=8, workers=1)
    out = root / "shards"
    assert shards_main(["write", str(root / "annotations" / "train_video.json"), "--media-root", str(root),
                            "--out", str(out), "--shard-size", "3"]) == 0
    return root, out


def _reference(root):
    return VideoTextDataset(root / "annotations" / "train_video.json", root, num_frames=4, img_size=16, seed=9)


def test_shard_layout_is_webdataset(sharded):
    root, out = sharded
    paths = sorted(out.glob("*.tar"))
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.mp4", "000000000.json"] and len(names) == 6
    samples = list(shards.iter_tar_samples(paths[1]))
    meta = json.loads(samples[0]["json"])
    record = json.loads((root / "annotations" / "train_video.json").read_text())[3]
    assert meta["index"] == 3 and meta["caption"] == record["caption"] and meta["foil"] == record["foil"]
    assert samples[0]["mp4"] == (root / record["video"]).read_bytes()


def test_shards_read_back_the_same_samples(sharded):
    root, out = sharded
    reference = _reference(root)
    streamed = list(shards.ShardDataset(out, num_frames=4, img_size=16, seed=9))
    assert sorted(s["index"] for s in streamed) == list(range(7))
    for sample in streamed:
        expected = reference[sample["index"]]
        assert torch.equal(sample["video"], expected["video"])  # same frames and crop as from the files
        assert sample["caption"] == expected["caption"] and sample["sample_id"] == expected["sample_id"]


def test_shards_split_over_ranks_and_workers(sharded):
    _, out = sharded
    seen = []
    for rank in range(2):
        ds = shards.ShardDataset(out, num_frames=2, img_size=16, rank=rank, world_size=2, train=False,
                                 sampling="middle")
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        seen.append([s["index"] for s in loader])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(7))
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        shards.ShardDataset(out, world_size=4, rank=0)


def test_writing_fails_on_missing_media(tmp_path):
    annotation = tmp_path / "a.json"
    annotation.write_text(json.dumps([{"video": "nope.mp4", "caption": "x"}]))
    with pytest.raises(FileNotFoundError, match="record 0: media file .*nope.mp4"):
        shards.write_shards(annotation, tmp_path, tmp_path / "out", 2)


def test_check_data_and_index_accept_shards(sharded, tmp_path, capsys):
    from stmvl.commands.data import check_data_main

    root, out = sharded
    assert check_data_main([str(out)]) == 0  # a shard folder: no --media-root
    assert "checked 7 shard samples" in capsys.readouterr().out
    written = json.loads((out / "index.json").read_text())
    assert shards_main(["index", str(out / "shard-{000000..000002}.tar"), "--out", str(tmp_path / "i.json")]) == 0
    counted = json.loads((tmp_path / "i.json").read_text())
    assert [s["samples"] for s in counted["shards"]] == [s["samples"] for s in written["shards"]] == [3, 3, 1]
    assert counted["records"] == written["records"] == 7
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / "shard-000001.tar").read_bytes()
    (broken / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    assert check_data_main([str(broken / "index.json"), "--report", str(tmp_path / "r.json")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"]["undecodable"] >= 1 and report["index_mismatch"][0]["url"].endswith("shard-000001.tar")


def test_writing_shards_refuses_hostile_clip_bounds_naming_the_record(tmp_path):
    from stmvl.errors import UserError

    annotation = tmp_path / "a.jsonl"
    annotation.write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4", "caption": "y", "end": Infinity}\n')
    with pytest.raises(UserError) as info:
        shards.write_shards(annotation, tmp_path, tmp_path / "out", 2)
    assert str(info.value) == (f"{annotation}: record 1: field 'end' must be a finite number of seconds in "
                               f"(0, 1e+06], got inf")
