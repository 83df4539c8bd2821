"""Broken-media bookkeeping: the run folder's quarantine list and the replace-and-count policy.

A sample that fails while it is read or transformed (missing, empty, undecodable, too short, over a size cap, or any
other exception: reason ``error`` with the exception named) is replaced by another sample chosen deterministically
from (seed, index, attempt); the failure is appended to ``run_dir/quarantine.jsonl`` once per path (the file is
shared by all DataLoader workers and ranks, appends are serialised with an exclusive ``flock``); and the run stops
with :class:`TooManyBadSamples` when the failure fraction exceeds the bound, so a corpus that is mostly broken is
not silently trained on its few good files. ``MemoryError``, ``KeyboardInterrupt`` and ``SystemExit`` are never
taken for a broken sample: they propagate.

The counts behind the bound live in shared memory, one row per process (the one that built the dataset and each of
its DataLoader workers, each writing only its own row), so the bound holds for all workers of a process together.
:func:`bad_sample_counts` gives this process's totals, for the engine to add up over ranks. In a distributed run the
engine bounds those sums and each process's own check is switched off (:func:`defer_bound`): one rank whose shard
holds more of the broken files must not stop a run whose fraction over all ranks is within the bound.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch.utils.data import get_worker_info

from stmvl.errors import UserError

from .video import FAILURE_REASONS, MediaError

T = TypeVar("T")
QUARANTINE_FILE = "quarantine.jsonl"
# count rows: row 0 for the process that built the guard, one per DataLoader worker after it (ids past the last row
# share rows modulo; 256 workers per process is far beyond any real loader)
COUNT_ROWS = 257
MAX_DETAIL_CHARS = 300

log = logging.getLogger(__name__)


class TooManyBadSamples(UserError):
    """The fraction of broken samples exceeded the configured bound (the data's problem: a one-line error)."""


def as_media_error(err: BaseException, name: str) -> MediaError:
    """The MediaError a per-sample failure is recorded as: a MediaError as it is; a Pillow decompression bomb as
    ``too_large``; anything else as ``error`` with the exception's type and message (on one line)."""
    if isinstance(err, MediaError):
        return err
    detail = " ".join(f"{type(err).__name__}: {err}".split())[:MAX_DETAIL_CHARS]
    reason = "too_large" if type(err).__name__ == "DecompressionBombError" else "error"
    return MediaError(name, reason, detail)


def unwrap_worker_error(err: TooManyBadSamples) -> TooManyBadSamples:
    """A TooManyBadSamples re-raised by a DataLoader carries the worker's traceback in its message; the original
    one-line message is its last line."""
    text, marker = str(err), f"{TooManyBadSamples.__name__}: "
    if "Original Traceback" in text and marker in text:
        return TooManyBadSamples(text.rsplit(marker, 1)[1].strip())
    return err


class Quarantine:
    """Append-only JSONL list of broken media: one line ``{path, reason, corpus, index, detail}`` per distinct path
    (``detail``: what failed, e.g. the exception of reason ``error``).

    Each instance (one per process once DataLoader workers copy it) keeps the listed paths in memory and the byte
    offset up to which it has read the file: a report reads only the lines other processes appended since (each
    byte once per process), and a path already known is answered without opening the file. A line that is not an
    entry (torn by a crash, or garbage) is skipped, counted in ``torn_lines`` and logged once.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / QUARANTINE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._known: set[str] = set()
        self._offset = 0  # bytes of the file folded into _known
        self._lines = 0  # complete lines folded into _known (for the line numbers of warnings)
        self.torn_lines = 0
        self.bytes_read = 0  # bytes of the file this instance has read (reports must not re-read the file)

    def report(self, path: str, reason: str, corpus: str = "", index: int = -1, detail: str = "") -> bool:
        """Record a failure; returns False when this path was already listed (by any process)."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; expected one of {FAILURE_REASONS}")
        path = str(path)
        if path in self._known:
            return False
        entry = {"path": path, "reason": reason, "corpus": corpus, "index": int(index), "detail": detail}
        line = (json.dumps(entry) + "\n").encode()
        with open(self.path, "a+b") as handle:
            # the read-check-append must be atomic across worker processes, or two workers list the same file twice
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                tail = self._catch_up(handle)
                if path in self._known:
                    return False
                # a torn last line (a writer died mid-line) is closed first, so the new entry stays a line of its own
                if tail:
                    self._fold(tail)
                prefix = b"\n" if tail else b""
                handle.write(prefix + line)  # "a" mode: always at the end, whatever the position
                handle.flush()
                self._offset += len(tail) + len(prefix) + len(line)
                self._lines += 1
                self._known.add(path)
                return True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _catch_up(self, handle) -> bytes:
        """Fold the complete lines appended since the last look into the known paths; return the incomplete tail."""
        size = handle.seek(0, os.SEEK_END)
        if size < self._offset:  # the file was truncated or replaced under the run: read it again
            self._offset, self._lines = 0, 0
        handle.seek(self._offset)
        data = handle.read()
        self.bytes_read += len(data)
        complete = data.rfind(b"\n") + 1
        for raw in data[:complete].splitlines():
            self._fold(raw)
        self._offset += complete
        return data[complete:]

    def _fold(self, raw: bytes) -> None:
        self._lines += 1
        entry = _parse_entry(raw)
        if entry is not None:
            self._known.add(entry["path"])
        elif raw.strip():
            self._skip(self._lines, raw)

    def _skip(self, line_no: int, raw: bytes) -> None:
        self.torn_lines += 1
        log.warning("%s: line %d is not a quarantine entry (torn or garbage), skipped: %r", self.path, line_no,
                    raw[:80])

    def entries(self) -> list[dict]:
        """All recorded failures, in order (torn or garbage lines skipped, counted and logged)."""
        if not self.path.exists():
            return []
        out = []
        for line_no, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
            entry = _parse_entry(raw)
            if entry is not None:
                out.append(entry)
            elif raw.strip():
                self._skip(line_no, raw)
        return out


def _parse_entry(raw: bytes) -> dict | None:
    try:
        entry = json.loads(raw)
    except (ValueError, RecursionError):  # also UnicodeDecodeError
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("path"), str) else None


class BrokenMediaGuard:
    """Replace failing samples, count failures and enforce ``max_bad_fraction``.

    Every exception raised by the loader is a failure of that sample (see the module doc for those that are not),
    recorded with its reason in the quarantine. Counts are kept in shared memory (see the module doc), so
    ``attempts`` and ``failures`` are those of the process and all its DataLoader workers together, and the bound
    applies to their sum. It is checked only after ``min_attempts`` loads so that one early failure does not stop a
    run. With ``local_bound=False`` (see :func:`defer_bound`) the guard still replaces, records and counts, but leaves
    the bound to whoever adds its counts up over the ranks; a sample whose ``max_replacements`` replacements all
    fail still stops the run.
    """

    def __init__(self, quarantine: Quarantine | None = None, corpus: str = "", max_bad_fraction: float = 0.1,
                 min_attempts: int = 20, max_replacements: int = 50, seed: int = 0, local_bound: bool = True):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.quarantine, self.corpus = quarantine, corpus
        self.max_bad_fraction, self.min_attempts = max_bad_fraction, min_attempts
        self.max_replacements, self.seed = max_replacements, seed
        self.local_bound = local_bound
        # [row, (attempts, failures)]; each process adds only to its own row, so no update is lost without a lock
        self._counts = torch.zeros((COUNT_ROWS, 2), dtype=torch.int64).share_memory_()

    @staticmethod
    def _row() -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (COUNT_ROWS - 1)

    @property
    def attempts(self) -> int:
        """Loads attempted by this process and its DataLoader workers."""
        return int(self._counts[:, 0].sum())

    @property
    def failures(self) -> int:
        """Failed loads of this process and its DataLoader workers."""
        return int(self._counts[:, 1].sum())

    def counts(self) -> tuple[int, int]:
        """(attempts, failures) of this process and its DataLoader workers."""
        attempts, failures = self._counts.sum(0).tolist()
        return int(attempts), int(failures)

    def count_attempt(self) -> None:
        """Count one load (call before trying it)."""
        self._counts[self._row(), 0] += 1

    def replacement_index(self, index: int, attempt: int, size: int) -> int:
        """A deterministic other index in [0, size) for the ``attempt``-th replacement of ``index``."""
        if size < 2:
            return index
        rng = np.random.default_rng([self.seed, index, attempt, 0x5EED])
        return int((index + 1 + rng.integers(0, size - 1)) % size)

    def load(self, index: int, size: int, loader: Callable[[int], T]) -> tuple[T, int]:
        """Call ``loader(i)`` starting at ``index``, replacing failures; returns (sample, index actually used)."""
        current = index
        for attempt in range(self.max_replacements + 1):
            self.count_attempt()
            try:
                return loader(current), current
            except (MemoryError, TooManyBadSamples):
                raise
            except Exception as err:  # any other failure is this sample's (module doc)
                self.record_failure(as_media_error(err, f"{self.corpus}: sample {current}"), current)
                current = self.replacement_index(index, attempt, size)
        attempts, failures = self.counts()
        raise TooManyBadSamples(
            f"corpus {self.corpus!r}: {self.max_replacements} replacements for sample {index} all failed "
            f"({failures} failures in {attempts} loads)"
        )

    def record_failure(self, err: BaseException, index: int) -> None:
        """Count a failed load (the caller counted the attempt), list it, and stop when over the bound."""
        err = as_media_error(err, f"{self.corpus}: sample {index}")
        self._counts[self._row(), 1] += 1
        if self.quarantine is None or self.quarantine.report(err.path, err.reason, self.corpus, index, err.detail):
            log.warning("quarantined %s", err)
        self._check_budget(err)

    def _check_budget(self, last: MediaError) -> None:
        if not self.local_bound:  # the caller bounds the counts of every rank together (defer_bound)
            return
        attempts, failures = self.counts()
        if attempts >= self.min_attempts and failures / attempts > self.max_bad_fraction:
            where = f" (see {self.quarantine.path})" if self.quarantine is not None else ""
            raise TooManyBadSamples(
                f"corpus {self.corpus!r}: {failures} of {attempts} media loads failed "
                f"({failures / attempts:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}); "
                f"last: {last}{where}. Run `stmvl check-data` on the annotation to list the broken files."
            )


def guards(source: Any) -> list[BrokenMediaGuard]:
    """Every broken-media guard in ``source``, each once: a dataset or stream with a ``guard``, a ConcatDataset, a
    :class:`~stmvl.data.mixing.MixedBatchStream` (its sources), a wrapper with a ``dataset``, or a list of these."""
    found: dict[int, BrokenMediaGuard] = {}
    seen: dict[int, Any] = {}  # holds every visited object, so that no id is reused while walking
    stack = [source]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen[id(item)] = item
        if isinstance(item, BrokenMediaGuard):
            found[id(item)] = item
        elif isinstance(item, (list, tuple)):
            stack += list(item)
        elif isinstance(item, dict):
            stack += list(item.values())
        else:
            for attribute in ("guard", "datasets", "dataset", "sources"):
                if hasattr(item, attribute):
                    stack.append(getattr(item, attribute))
    return list(found.values())


def bad_sample_counts(source: Any) -> tuple[int, int]:
    """(attempts, failures) of every broken-media guard in ``source`` (see :func:`guards`) in this process, its
    DataLoader workers included. For the engine to all-reduce over ranks."""
    attempts = failures = 0
    for guard in guards(source):
        a, f = guard.counts()
        attempts, failures = attempts + a, failures + f
    return attempts, failures


def defer_bound(source: Any) -> int:
    """Switch off the per-process ``max_bad_fraction`` check of every guard in ``source``: the caller bounds the
    :func:`bad_sample_counts` of all ranks together (the engine does, in a distributed run). Call it before the
    DataLoader workers start (they copy the guards). Returns the number of guards changed."""
    found = guards(source)
    for guard in found:
        guard.local_bound = False
    return len(found)
