"""Broken media of every kind the loaders and `stmvl check-data` must report, for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stmvl.data import synth

# file name -> the reason the checks must give (missing.mp4 is never written)
BROKEN = {"zero.mp4": "empty", "truncated.mp4": "undecodable", "garbage.mp4": "undecodable",
          "missing.mp4": "missing", "short.mp4": "too_short"}


def write_broken_media(folder: Path, good_clip: Path, attributes: dict) -> dict[str, str]:
    """Write an empty file, a truncated copy of ``good_clip``, random bytes and a 2-frame clip of ``attributes``
    (32 px) into ``folder``; returns BROKEN."""
    good = good_clip.read_bytes()
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (folder / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    synth.write_mp4(folder / "short.mp4", synth.render_clip(attributes, 32, 2))
    return dict(BROKEN)
