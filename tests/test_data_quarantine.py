"""quarantine.jsonl: torn and garbage lines are skipped and counted, reports read each byte of the file once per
process (no re-read per report) and still list a path once across processes."""

import builtins
import json
import logging

from stmvl.data.quarantine import Quarantine


def test_a_torn_line_does_not_break_later_reports(tmp_path, caplog):
    first = Quarantine(tmp_path)
    assert first.report("/data/a.mp4", "undecodable", "webvid", 3)
    with open(first.path, "ab") as handle:  # a garbage line, then a writer that died mid-line
        handle.write(b"\x00\xffnot json\n" + b'{"path": "/data/b.mp4", "rea')
    later = Quarantine(tmp_path)  # another worker or a resumed run
    with caplog.at_level(logging.WARNING, logger="stmvl.data.quarantine"):
        assert later.report("/data/c.mp4", "error", "webvid", 7)
        assert not later.report("/data/a.mp4", "missing")  # listed before the torn lines: still known
    assert later.torn_lines == 2
    torn = [r.getMessage() for r in caplog.records]
    assert torn[0].endswith("quarantine.jsonl: line 2 is not a quarantine entry (torn or garbage), skipped: "
                            "b'\\x00\\xffnot json'")
    assert "line 3 is not a quarantine entry" in torn[1]
    # the new entry went on a line of its own, after the torn one
    assert first.path.read_bytes().endswith(b'"rea\n{"path": "/data/c.mp4", "reason": "error", "corpus": "webvid", '
                                            b'"index": 7, "detail": ""}\n')
    assert first.report("/data/d.mp4", "too_large")  # the first instance reads past the torn lines as well
    assert [e["path"] for e in Quarantine(tmp_path).entries()] == ["/data/a.mp4", "/data/c.mp4", "/data/d.mp4"]


def test_reports_read_each_byte_once_and_known_paths_open_nothing(tmp_path, monkeypatch):
    one, two = Quarantine(tmp_path), Quarantine(tmp_path)  # e.g. two DataLoader workers
    for i in range(300):
        assert (one if i % 2 else two).report(f"/data/{i:04d}.mp4", "undecodable", "c", i)
    size = one.path.stat().st_size
    # quadratic re-reading would be ~150 x the file; here each instance reads what the other appended, once
    assert one.bytes_read <= size and two.bytes_read <= size
    assert not one.report("/data/0000.mp4", "missing")  # written by the other instance: listed once
    assert len(one.entries()) == 300
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    for i in range(300):
        assert not one.report(f"/data/{i:04d}.mp4", "undecodable")
    assert opened == []  # every path was known in memory


def test_a_truncated_quarantine_file_is_read_again(tmp_path):
    quarantine = Quarantine(tmp_path)
    assert quarantine.report("/data/a.mp4", "missing")
    quarantine.path.write_text(json.dumps({"path": "/data/z.mp4", "reason": "empty"}) + "\n")  # replaced
    assert quarantine.report("/data/b.mp4", "empty")
    assert not quarantine.report("/data/z.mp4", "empty")
    assert [e["path"] for e in quarantine.entries()] == ["/data/z.mp4", "/data/b.mp4"]
