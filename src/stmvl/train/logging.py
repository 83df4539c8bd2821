"""Run logging on rank 0: metrics as JSON lines, optional TensorBoard, and a plain-text progress line.

The progress line is an ordinary line (no carriage returns, no tqdm), so it reads the same in a terminal, a log file
and a batch system's output. It goes to the `stmvl.train.progress` logger (INFO); commands show it, and the engine's
notices, with the handler of `console_logging()`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["MetricsWriter", "Progress", "console_logging", "format_duration", "read_metrics", "truncate_metrics"]

progress_log = logging.getLogger("stmvl.train.progress")


def console_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Show stmvl's log records (the engine's progress lines and notices) as plain lines on `stream` (stderr).
    For commands and scripts; idempotent (a second call returns the handler installed by the first)."""
    logger = logging.getLogger("stmvl")
    for handler in logger.handlers:
        if getattr(handler, "_stmvl_console", False):
            return handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._stmvl_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    """`H:MM:SS` (or `?` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information as text
    return value


class MetricsWriter:
    """Appends `{"step": ..., **metrics}` records to run_dir/metrics.jsonl and mirrors scalars to TensorBoard
    when `tensorboard` is True and the package is installed. Use only on rank 0."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional dependency: JSONL stays the record
                self._tb = None
            else:
                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        record = {"step": int(step), "split": split, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """All records of run_dir/metrics.jsonl (optionally one split), in file order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


def truncate_metrics(run_dir: str | os.PathLike, last_step: int) -> int:
    """Drop records with step > last_step (written by a killed run after its last checkpoint); returns how many."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    records = read_metrics(run_dir)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return len(records) - len(kept)


class Progress:
    """Logs `[tag] epoch e/E step s/S | key value ... | r it/s | elapsed | eta` lines (to the
    `stmvl.train.progress` logger, or to `stream` when one is given)."""

    def __init__(self, total_steps: int, start_step: int = 0, tag: str = "train", stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total = total_steps
        self.tag = tag
        self.stream = stream
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._start_step = start_step
        self._last_t = self._t0
        self._last_step = start_step

    def rate(self, step: int) -> float:
        """Optimizer steps per second since the previous call (over the whole run on the first call)."""
        now = time.perf_counter()
        dt = now - self._last_t
        rate = (step - self._last_step) / dt if dt > 0 else float("nan")
        self._last_t, self._last_step = now, step
        return rate

    def line(self, step: int, epoch: int, epochs: int, metrics: dict[str, float], rate: float) -> str:
        elapsed = time.perf_counter() - self._t0
        done = step - self._start_step
        avg = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        eta = (self.total - step) / avg if avg > 0 else float("nan")
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        # the engine advances `epoch` as soon as one ends, before the line is printed
        return (f"[{self.tag}] epoch {min(epoch + 1, epochs)}/{epochs} step {step}/{self.total} | {shown} | "
                f"{rate:.2f} it/s | elapsed {format_duration(elapsed)} | eta {format_duration(eta)}")

    def log(self, step: int, epoch: int, epochs: int, metrics: dict[str, float]) -> float:
        rate = self.rate(step)
        if self.enabled:
            line = self.line(step, epoch, epochs, metrics, rate)
            if self.stream is not None:
                print(line, file=self.stream, flush=True)
            else:
                progress_log.info(line)
        return rate


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4f}"
    return str(value)
