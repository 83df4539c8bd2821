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


def forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels (with a valid CRC) but holds one pixel's data: a
    decompression bomb as far as any reader that trusts the header goes, built in microseconds."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"  # signature (8) + chunk length (4), then the chunk type and its 13 data bytes
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)
