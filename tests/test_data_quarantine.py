"""quarantine.jsonl: torn and garbage lines are skipped and counted, reports read each byte of the file once per
process (no re-read per report) and still list a path once across processes. The bad-sample bound: checked by each
process alone, or left to the engine (which sums the counts over the ranks) in a distributed run."""

import builtins
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from stmvl.data.mixing import MediaSource, MixedBatchStream
from stmvl.data.quarantine import BrokenMediaGuard, Quarantine, TooManyBadSamples, guards
from stmvl.data.video import MediaError


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


# ------------------------------------------------------------------------------ the bound: local or left to the engine


class _Samples(torch.utils.data.Dataset):
    """Ten samples behind a real guard (bound 0.25 after 4 loads); every load of an odd index fails."""

    def __init__(self):
        self.guard = BrokenMediaGuard(None, "toy", max_bad_fraction=0.25, min_attempts=4, seed=1)

    def __len__(self):
        return 10

    def _load(self, index):
        if index % 2:
            raise MediaError(f"clip{index}.mp4", "undecodable", "test")
        return index

    def __getitem__(self, index):
        return self.guard.load(index, len(self), self._load)[0]


def _stream(samples):
    return MixedBatchStream({"toy": MediaSource(samples, 2, list)}, seed=0)


def test_a_single_process_stream_stops_on_its_own_fraction():
    with pytest.raises(TooManyBadSamples, match=r"^corpus 'toy': \d+ of \d+ media loads failed .* > max_bad_fraction "
                                                r"25\.0%\)"):
        list(_stream(_Samples()))


def test_a_deferred_stream_counts_every_failure_and_leaves_the_bound_to_its_caller():
    stream = _stream(_Samples())
    stream.defer_bad_sample_bound()
    samples = [x for batch in stream for x in batch]
    assert len(samples) == 10 and all(x % 2 == 0 for x in samples)  # the odd ones were replaced, none stopped it
    attempts, failures = stream.bad_sample_counts()  # what the engine sums over the ranks and bounds
    assert failures == attempts - 10 and failures >= 5
    with pytest.raises(RuntimeError, match="after the loader workers started"):
        stream.defer_bad_sample_bound()


def test_a_sample_whose_replacements_all_fail_still_stops_a_deferred_guard():
    guard = BrokenMediaGuard(None, "toy", max_replacements=2, local_bound=False)
    with pytest.raises(TooManyBadSamples, match=r"^corpus 'toy': 2 replacements for sample 0 all failed \(3 failures "
                                                r"in 3 loads\)$"):
        guard.load(0, 5, lambda i: (_ for _ in ()).throw(MediaError(f"c{i}.mp4", "missing")))


@pytest.mark.parametrize("world_size, local_bound", [(1, True), (2, False)])
def test_stream_tasks_leave_the_bound_to_the_engine_only_in_a_distributed_run(world_size, local_bound):
    from stmvl.tasks.data import StreamTask

    class Task(StreamTask):
        def build_stream(self):
            return _stream(_Samples())

    task = Task()
    task.ctx = SimpleNamespace(world_size=world_size)
    assert [g.local_bound for g in guards(task._stream())] == [local_bound]
