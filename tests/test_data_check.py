"""`stmvl check-data`: every kind of broken media is reported with its reason; exit codes."""

import json
import shutil

import pytest

from stmvl.data import check, synth

from broken_media import write_broken_media


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
    code = check.cli_main([str(annotation), "--media-root", str(tmp_path), "--report", str(report_path),
                           "--min-frames", "4", "--workers", str(workers)])
    assert code == 1
    report = json.loads(report_path.read_text())
    assert report["files"] == 8  # the duplicated clip is decoded once
    assert report["counts"] == {"ok": 3, "missing": 1, "empty": 1, "undecodable": 2, "too_short": 1}
    assert {e["path"]: e["reason"] for e in report["bad"]} == bad
    assert next(e for e in report["bad"] if e["path"] == "short.mp4")["records"] == [7]
    printed = capsys.readouterr().out
    assert "too_short" in printed and "missing.mp4" in printed


def test_clean_corpus_exits_zero_and_images_are_checked(corpus, capsys):
    assert check.cli_main([str(corpus / "annotations" / "train_video.json"), "--media-root", str(corpus)]) == 0
    assert check.cli_main([str(corpus / "annotations" / "train_image.json"), "--media-root", str(corpus),
                           "--media-type", "image"]) == 0
    assert "ok          3" in capsys.readouterr().out


def test_annotation_without_media_field_is_an_error(tmp_path, capsys):
    annotation = tmp_path / "a.json"
    annotation.write_text(json.dumps([{"video": "a.mp4", "caption": "x"}, {"caption": "y"}]))
    assert check.cli_main([str(annotation), "--media-root", str(tmp_path)]) == 2
    assert "a.json: record 1" in capsys.readouterr().err
