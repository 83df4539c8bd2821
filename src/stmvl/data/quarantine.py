"""Broken-media bookkeeping: the run folder's quarantine list and the replace-and-count policy.

A sample whose media fails (missing, empty, undecodable, too short) is replaced by another sample chosen
deterministically from (seed, index, attempt); the failure is appended to ``run_dir/quarantine.jsonl`` once per path
(the file is shared by all DataLoader workers and ranks, appends are serialised with an exclusive ``flock``); and the
run stops with :class:`TooManyBadSamples` when the failure fraction exceeds the bound, so a corpus that is mostly
broken is not silently trained on its few good files.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from .video import FAILURE_REASONS, MediaError

T = TypeVar("T")
QUARANTINE_FILE = "quarantine.jsonl"


class TooManyBadSamples(RuntimeError):
    """The fraction of broken samples exceeded the configured bound."""


class Quarantine:
    """Append-only JSONL list of broken media: one line ``{path, reason, corpus, index}`` per distinct path."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / QUARANTINE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def report(self, path: str, reason: str, corpus: str = "", index: int = -1) -> bool:
        """Record a failure; returns False when this path was already listed (by any process)."""
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; expected one of {FAILURE_REASONS}")
        line = json.dumps({"path": str(path), "reason": reason, "corpus": corpus, "index": int(index)}) + "\n"
        with open(self.path, "a+", encoding="utf-8") as handle:
            # the read-check-append must be atomic across worker processes, or two workers list the same file twice
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                handle.seek(0)
                known = {json.loads(existing)["path"] for existing in handle if existing.strip()}
                if str(path) in known:
                    return False
                handle.seek(0, os.SEEK_END)
                handle.write(line)
                handle.flush()
                return True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        """All recorded failures, in order."""
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]


class BrokenMediaGuard:
    """Replace failing samples, count failures and enforce ``max_bad_fraction``.

    Counts are per process (each DataLoader worker holds its own copy), which bounds the rate seen by every worker.
    The bound is checked only after ``min_attempts`` loads so that one early failure does not stop a run.
    """

    def __init__(self, quarantine: Quarantine | None = None, corpus: str = "", max_bad_fraction: float = 0.1,
                 min_attempts: int = 20, max_replacements: int = 50, seed: int = 0):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.quarantine, self.corpus = quarantine, corpus
        self.max_bad_fraction, self.min_attempts = max_bad_fraction, min_attempts
        self.max_replacements, self.seed = max_replacements, seed
        self.attempts = 0
        self.failures = 0

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
            self.attempts += 1
            try:
                return loader(current), current
            except MediaError as err:
                self.record_failure(err, current)
                current = self.replacement_index(index, attempt, size)
        raise TooManyBadSamples(
            f"corpus {self.corpus!r}: {self.max_replacements} replacements for sample {index} all failed "
            f"({self.failures} failures in {self.attempts} loads)"
        )

    def record_failure(self, err: MediaError, index: int) -> None:
        """Count a failed load (the caller counted the attempt), list it, and stop when over the bound."""
        self.failures += 1
        if self.quarantine is not None:
            self.quarantine.report(err.path, err.reason, self.corpus, index)
        self._check_budget(err)

    def _check_budget(self, last: MediaError) -> None:
        if self.attempts >= self.min_attempts and self.failures / self.attempts > self.max_bad_fraction:
            where = f" (see {self.quarantine.path})" if self.quarantine is not None else ""
            raise TooManyBadSamples(
                f"corpus {self.corpus!r}: {self.failures} of {self.attempts} media loads failed "
                f"({self.failures / self.attempts:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}); "
                f"last: {last}{where}. Run `stmvl check-data` on the annotation to list the broken files."
            )
