"""`stmvl check-data`: every kind of broken media is reported with its reason; exit codes."""

import json
import shutil

import pytest

from stmvl.commands.data import check_data_main
from stmvl.data import check, synth

from broken_media import forged_png, write_broken_media


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth.generate_corpus(root, seed=3, train=3, test=0, probe=0, size=32, frames=8, workers=1)
    return root


def _mixed_corpus(corpus, tmp_path):
    records = json.loads((corpus / "annotations" / "train_video.json").read_text())
    shutil.copytree(corpus / "videos", tmp_path / "videos")
    bad = write_broken_media(tmp_path, corpus / records[0]["video"], records[0]["attributes"])
    records += [{"video": name, "caption": "x"} for name in bad]
    records.append({"video": records[0]["video"], "caption": "the same clip again"})
    annotation = tmp_path / "mixed.json"
    annotation.write_text(json.dumps(records))
    return annotation, bad


@pytest.mark.parametrize("workers", [1, 2])
def test_check_data_reports_each_bad_file_with_its_reason(corpus, tmp_path, capsys, workers):
    annotation, bad = _mixed_corpus(corpus, tmp_path)
    report_path = tmp_path / "report.json"
    code = check_data_main([str(annotation), "--media-root", str(tmp_path), "--report", str(report_path),
                           "--min-frames", "4", "--workers", str(workers)])
    assert code == 1
    report = json.loads(report_path.read_text())
    assert report["files"] == 8  # the duplicated clip is decoded once
    assert report["counts"] == {"ok": 3, "missing": 1, "empty": 1, "undecodable": 2, "too_short": 1, "too_large": 0,
                                "error": 0}
    assert {e["path"]: e["reason"] for e in report["bad"]} == bad
    assert next(e for e in report["bad"] if e["path"] == "short.mp4")["records"] == [7]
    printed = capsys.readouterr().out
    assert "too_short" in printed and "missing.mp4" in printed


def test_clean_corpus_exits_zero_and_images_are_checked(corpus, capsys):
    assert check_data_main([str(corpus / "annotations" / "train_video.json"), "--media-root", str(corpus)]) == 0
    assert check_data_main([str(corpus / "annotations" / "train_image.json"), "--media-root", str(corpus),
                           "--media-type", "image"]) == 0
    assert "ok          3" in capsys.readouterr().out


def test_annotation_without_media_field_is_an_error(tmp_path, capsys):
    annotation = tmp_path / "a.json"
    annotation.write_text(json.dumps([{"video": "a.mp4", "caption": "x"}, {"caption": "y"}]))
    assert check_data_main([str(annotation), "--media-root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"stmvl check-data: error: {annotation}: record 1: missing or invalid field "
                                       f"'video' (expected a media path for --media-type video)\n")


def test_an_annotation_saved_as_latin1_is_one_line_exit_2(tmp_path, capsys):
    annotation = tmp_path / "latin1.jsonl"
    text = '{"video": "a.mp4", "caption": "x"}\n{"video": "b.mp4", "caption": "déjà vu"}\n'
    annotation.write_bytes(text.encode("latin-1"))
    assert check_data_main([str(annotation), "--media-root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"stmvl check-data: error: {annotation}: annotation file is not UTF-8 text: byte 0xe9 at "
                            f"offset {text.index('é')} (line 2); save it as UTF-8\n")
    assert captured.out == ""


def _image_corpus(tmp_path, corpus, files: dict[str, bytes]):
    records = json.loads((corpus / "annotations" / "train_image.json").read_text())[:1]
    shutil.copytree(corpus / "images", tmp_path / "images")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        records.append({"image": name, "caption": "hostile"})
    annotation = tmp_path / "images.json"
    annotation.write_text(json.dumps(records))
    return annotation


def test_image_bombs_are_broken_samples_with_a_reason(corpus, tmp_path, capsys):
    # 20000 x 20000: over Pillow's own bomb limit; 9000 x 9000: under it, over data.max_image_pixels (8192^2)
    annotation = _image_corpus(tmp_path, corpus, {"bomb.png": forged_png(20000, 20000),
                                                  "big.png": forged_png(9000, 9000)})
    report_path = tmp_path / "report.json"
    assert check_data_main([str(annotation), "--media-root", str(tmp_path), "--media-type", "image",
                           "--report", str(report_path)]) == 1
    report = json.loads(report_path.read_text())
    assert report["counts"] == {"ok": 1, "missing": 0, "empty": 0, "undecodable": 0, "too_short": 0, "too_large": 2,
                                "error": 0}
    details = {e["path"]: e["detail"] for e in report["bad"]}
    assert details["bomb.png"].startswith("Pillow refuses it as a decompression bomb: Image size (400000000 pixels)")
    assert details["big.png"] == ("image is 9000x9000 = 81000000 pixels, over the cap of 67108864 "
                                  "(data.max_image_pixels)")
    assert "BAD too_large   bomb.png" in capsys.readouterr().out


def test_size_caps_are_options_and_apply_to_videos(corpus, tmp_path):
    video_annotation = corpus / "annotations" / "train_video.json"
    image_annotation = corpus / "annotations" / "train_image.json"
    frames = check.check_corpus(video_annotation, corpus, limits=check.MediaLimits(max_video_pixels=32 * 32 - 1))
    assert frames["counts"]["too_large"] == 3
    assert frames["bad"][0]["detail"] == ("a video frame is 32x32 = 1024 pixels, over the cap of 1023 "
                                          "(data.max_video_pixels)")
    report = tmp_path / "r.json"
    assert check_data_main([str(video_annotation), "--media-root", str(corpus), "--max-video-seconds", "0.1",
                           "--report", str(report)]) == 1
    bad = json.loads(report.read_text())["bad"]
    assert [e["reason"] for e in bad] == ["too_large"] * 3
    assert bad[0]["detail"].endswith("s long, over the cap of 0.1 s (data.max_video_seconds)")
    assert check_data_main([str(image_annotation), "--media-root", str(corpus), "--media-type", "image",
                           "--max-image-pixels", "100", "--report", str(report)]) == 1
    assert json.loads(report.read_text())["counts"]["too_large"] == 3


def test_any_exception_of_one_file_is_reported_not_raised(corpus, monkeypatch):
    clip = json.loads((corpus / "annotations" / "train_video.json").read_text())[1]["video"]

    def hostile(path, limits=None):
        if str(path).endswith(clip):
            raise OverflowError("cannot convert float infinity to integer")
        return 8

    monkeypatch.setattr(check, "count_decodable_frames", hostile)
    report = check.check_corpus(corpus / "annotations" / "train_video.json", corpus)
    assert report["counts"]["ok"] == 2 and report["counts"]["error"] == 1
    assert report["bad"] == [{"path": clip, "reason": "error", "records": [1],
                              "detail": "OverflowError: cannot convert float infinity to integer"}]
    monkeypatch.setattr(check, "count_decodable_frames", lambda path, limits=None: (_ for _ in ()).throw(MemoryError))
    with pytest.raises(MemoryError):  # not a property of the file: it propagates
        check.check_corpus(corpus / "annotations" / "train_video.json", corpus)
