"""Video and image reading: frame sampling, PyAV decoding (decord optional), Pillow images.

All readers return uint8 tensors ``[T, 3, H, W]`` (images: T = 1) and raise :class:`MediaError` with a ``reason`` in
``missing | empty | undecodable | too_short | too_large`` so that callers (quarantine, check-data) can classify
failures; ``error`` is the reason the broken-media guard gives any other exception raised while reading a sample.
:class:`MediaLimits` caps the pixels of an image or a video frame and the duration of a video: media over a cap are
rejected from their header (``too_large``) before their pixels are allocated.
"""

from __future__ import annotations

import bisect
import importlib.util
import io
import math
import os
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SAMPLING_MODES = ("rand", "middle", "fps")
BACKENDS = ("pyav", "decord")
FAILURE_REASONS = ("missing", "empty", "undecodable", "too_short", "too_large", "error")
# A container that claims more frames per second than this is lying (or hostile): its frame counts are not used.
MAX_PLAUSIBLE_FPS = 1000.0

# Decode forward instead of seeking when the next wanted frame is at most this many frames ahead: a seek lands on a
# keyframe and decodes forward anyway, so short gaps are cheaper to decode straight through.
SEEK_GAP_FRAMES = 64

Media = str | os.PathLike | bytes


class MediaError(RuntimeError):
    """A media file could not be used. ``reason`` is one of FAILURE_REASONS; ``path`` names the file."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown media failure reason {reason!r}")
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class MediaLimits:
    """Caps that turn decompression bombs and absurd containers into ``too_large`` instead of an allocation.

    The defaults (8192 x 8192 images, 8K UHD video frames, 6-hour videos) are far above any corpus of the recipes;
    ``data.max_image_pixels``, ``data.max_video_pixels`` and ``data.max_video_seconds`` set them per run.
    """

    max_image_pixels: int = 8192 * 8192
    max_video_pixels: int = 7680 * 4320
    max_video_seconds: float = 6 * 3600.0

    @classmethod
    def from_config(cls, data_cfg) -> "MediaLimits":
        """The limits of a ``DataConfig`` (any object with the three ``max_*`` attributes; missing ones default)."""
        defaults = cls()
        return cls(**{name: getattr(data_cfg, name, getattr(defaults, name))
                      for name in ("max_image_pixels", "max_video_pixels", "max_video_seconds")})


DEFAULT_LIMITS = MediaLimits()


def _check_pixels(name: str, width: int, height: int, cap: int, what: str) -> None:
    if width * height > cap:
        raise MediaError(name, "too_large", f"{what} is {width}x{height} = {width * height} pixels, over the cap of "
                                            f"{cap} (data.max_{'image' if what == 'image' else 'video'}_pixels)")


def sample_frame_indices(
    num_total: int,
    num_frames: int,
    mode: str = "rand",
    rng: np.random.Generator | None = None,
    fps: float | None = None,
    sample_fps: float = 1.0,
    first: int = 0,
) -> list[int]:
    """Indices of ``num_frames`` frames out of ``num_total`` (offset by ``first``, for trimmed clips).

    - ``rand``: split [0, num_total) into num_frames equal segments; one uniformly random frame per segment, both
      segment ends included.
    - ``middle``: the middle frame of each segment (evaluation).
    - ``fps``: frames at ``sample_fps`` per second from the start (``fps`` = the video's native rate), first
      num_frames of them.
    Videos shorter than num_frames (or fps sampling running out) repeat the last frame.
    """
    if num_total < 1:
        raise ValueError(f"cannot sample frames from a video with {num_total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; expected one of {SAMPLING_MODES}")
    if mode == "fps":
        if not fps or fps <= 0 or sample_fps <= 0:
            raise ValueError(f"fps sampling needs the video fps (> 0) and sample_fps (> 0), got {fps}, {sample_fps}")
        step = fps / sample_fps
        indices = [int(round(k * step)) for k in range(num_frames) if int(round(k * step)) < num_total]
    elif num_total < num_frames:
        indices = list(range(num_total))
    else:
        edges = np.linspace(0, num_total, num_frames + 1).astype(int)
        lows, highs = edges[:-1], edges[1:] - 1  # inclusive segment bounds
        if mode == "rand":
            if rng is None:
                raise ValueError("rand sampling needs an rng (numpy Generator)")
            indices = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs)]
        else:
            indices = [int((lo + hi) // 2) for lo, hi in zip(lows, highs)]
    indices += [indices[-1]] * (num_frames - len(indices))
    return [first + i for i in indices]


@dataclass
class VideoInfo:
    """Stream metadata: frame count (estimated when the container does not store one), fps, duration in seconds."""

    num_frames: int
    fps: float
    duration: float


def _check_file(media: Media) -> str:
    """Return a printable name for ``media`` after the missing/empty checks."""
    if isinstance(media, (bytes, bytearray)):
        if len(media) == 0:
            raise MediaError("<bytes>", "empty", "zero bytes")
        return "<bytes>"
    path = os.fspath(media)
    if not os.path.exists(path):
        raise MediaError(path, "missing", "file does not exist")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty", "zero bytes")
    return path


def _open_container(media: Media, name: str):
    import av

    source = io.BytesIO(media) if isinstance(media, (bytes, bytearray)) else os.fspath(media)
    try:
        container = av.open(source)
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise MediaError(name, "undecodable", f"cannot open: {err}") from err
    if not container.streams.video:
        container.close()
        raise MediaError(name, "undecodable", "no video stream")
    return container


def _stream_info(container, stream) -> VideoInfo:
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    else:
        duration = 0.0
    if not math.isfinite(duration) or duration < 0:
        duration = 0.0  # absurd metadata: trust the frame count, or the frames that actually decode
    num = int(stream.frames or 0)
    if num <= 0:  # webm and some streams store no frame count: estimate from the duration
        num = int(math.floor(duration * fps + 0.5))
    return VideoInfo(num_frames=num, fps=fps, duration=duration)


def _check_stream(name: str, stream, info: VideoInfo, limits: MediaLimits) -> None:
    """Reject a stream over the caps, or with a frame rate no real video has, from its header alone."""
    _check_pixels(name, int(stream.width or 0), int(stream.height or 0), limits.max_video_pixels, "a video frame")
    if not 0 < info.fps <= MAX_PLAUSIBLE_FPS:
        raise MediaError(name, "undecodable", f"implausible frame rate {info.fps} fps")
    _check_seconds(name, max(info.duration, info.num_frames / info.fps), limits)


def _check_seconds(name: str, seconds: float, limits: MediaLimits) -> None:
    if seconds > limits.max_video_seconds:
        raise MediaError(name, "too_large", f"{round(seconds, 2):g} s long, over the cap of {limits.max_video_seconds:g} s "
                                            f"(data.max_video_seconds)")


def _frame_index(frame, stream, fps: float, start_time: float) -> int | None:
    if frame.pts is None or stream.time_base is None:
        return None
    return int(round((float(frame.pts * stream.time_base) - start_time) * fps))


class _RGBConverter:
    """Converts decoded frames to HWC uint8 RGB arrays through one kept swscale context.

    ``frame.to_ndarray(format="rgb24")`` builds a fresh converter, and so a fresh swscale context, for every frame:
    on a 64 x 64 clip that costs 13x the conversion itself (0.49 vs 0.036 ms a frame). One converter per decoded
    clip keeps the context across its frames; nothing outlives the call, so forked loader workers share no state.
    """

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24").to_ndarray()


def _decode_wanted(container, stream, wanted: Sequence[int], fps: float, name: str,
                   limits: MediaLimits = DEFAULT_LIMITS, to_rgb=None) -> dict[int, np.ndarray]:
    """Decode the frames at the sorted unique indices ``wanted``: sequentially, seeking only across long gaps.

    ``to_rgb`` turns a decoded frame into an HWC uint8 array (default: a fresh :class:`_RGBConverter`).
    Returns index -> HWC uint8 array. Indices past the real end of the stream (frame counts estimated from the
    duration can overshoot) are absent; the caller repeats the last decoded frame for them. A stream without a time
    base cannot seek: it is decoded straight through. A frame over the pixel cap (a stream may change its size
    after the header) is ``too_large`` before it is converted.
    """
    import av

    to_rgb = to_rgb or _RGBConverter()
    start_time = float(stream.start_time * stream.time_base) if (stream.start_time is not None and
                                                                 stream.time_base is not None) else 0.0
    out: dict[int, np.ndarray] = {}
    pending = deque(wanted)
    can_seek = stream.time_base is not None
    need_seek = can_seek and pending[0] > SEEK_GAP_FRAMES
    position = -1  # index of the last decoded frame
    try:
        while pending:
            if need_seek:
                timestamp = int((pending[0] / fps + start_time) / stream.time_base)
                container.seek(timestamp, stream=stream, backward=True, any_frame=False)
                need_seek = False
            stream_ended = True
            for frame in container.decode(stream):
                index = _frame_index(frame, stream, fps, start_time)
                position = position + 1 if index is None else index
                if position < pending[0]:
                    continue
                _check_pixels(name, frame.width, frame.height, limits.max_video_pixels, "a video frame")
                array = to_rgb(frame)
                while pending and pending[0] <= position:
                    out[pending.popleft()] = array
                if not pending:
                    stream_ended = False
                    break
                if can_seek and pending[0] - position > SEEK_GAP_FRAMES:
                    need_seek, stream_ended = True, False
                    break
            if stream_ended:
                break
    except av.error.FFmpegError as err:
        if not out:
            raise MediaError(name, "undecodable", f"decode failed: {err}") from err
        # a corrupt tail after good frames: keep them; the caller repeats the last good frame
    if not out:
        raise MediaError(name, "undecodable", "no frame could be decoded")
    return out


@dataclass
class DecodedClip:
    """Every decoded frame of a clip's trimmed range [first, last): what :func:`read_video` samples from."""

    frames: dict[int, np.ndarray]  # frame index (untrimmed video) -> HWC uint8
    first: int
    last: int
    fps: float

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.frames.values())


class DecodedClipCache:
    """Decoded clips kept in memory, least recently used first out, up to ``max_bytes``.

    For corpora small enough to stay decoded and read for many epochs (the demo's 3000 clips of 16 frames at 64 px
    take 590 MB): a clip is decoded whole once and every later epoch samples its frames from memory, so a loader
    worker spends its time on crops instead of on opening and decoding files. Each DataLoader worker holds its own
    cache (persistent workers keep it across epochs). A clip whose frames would take more than ``max_bytes`` (from
    its header) is read as without a cache: only its sampled frames are decoded, and nothing is kept.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self.nbytes, self.hits, self.misses = int(max_bytes), 0, 0, 0
        self._clips: OrderedDict[tuple, DecodedClip] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clips)

    def __contains__(self, key: tuple) -> bool:
        return key in self._clips

    def fits(self, nbytes: int) -> bool:
        """Whether a clip of ``nbytes`` can be kept at all (0 bytes: a header without a frame size)."""
        return _fits(nbytes, self.max_bytes)

    def get(self, key: tuple) -> DecodedClip | None:
        clip = self._clips.get(key)
        if clip is None:
            self.misses += 1
            return None
        self.hits += 1
        self._clips.move_to_end(key)
        return clip

    def put(self, key: tuple, clip: DecodedClip) -> None:
        size = clip.nbytes
        if size > self.max_bytes or key in self._clips:
            return
        while self._clips and self.nbytes + size > self.max_bytes:
            self.nbytes -= self._clips.popitem(last=False)[1].nbytes
        self._clips[key] = clip
        self.nbytes += size


def _fits(nbytes: int, max_bytes: int) -> bool:
    return 0 < nbytes <= max_bytes


def _open_checked(media: Media, name: str, start: float | None, end: float | None, min_frames: int,
                  limits: MediaLimits, threads: int):
    """(container, stream, info, first, last) of a video whose header passed every check; the caller closes it."""
    container = _open_container(media, name)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = int(threads)
        info = _stream_info(container, stream)
        _check_stream(name, stream, info, limits)
        first, last = _trim_range(info, start, end, name)
        _require_frames(name, last - first, min_frames)
    except BaseException:
        container.close()
        raise
    return container, stream, info, first, last


def _rgb_bytes(stream, num_frames: int) -> int:
    """Bytes of ``num_frames`` RGB frames at the stream's header size (0 when the header has no size)."""
    return num_frames * stream.codec_context.width * stream.codec_context.height * 3


def read_video(
    media: Media,
    num_frames: int,
    sampling: str = "rand",
    rng: np.random.Generator | None = None,
    *,
    backend: str = "pyav",
    start: float | None = None,
    end: float | None = None,
    min_frames: int = 1,
    sample_fps: float = 1.0,
    limits: MediaLimits | None = None,
    threads: int = 1,
    cache: DecodedClipCache | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Decode ``num_frames`` sampled frames of a video file (path) or in-memory bytes.

    Args:
        start, end: optional trimming in seconds; sampling then covers only [start, end).
        min_frames: fewer frames than this (after trimming) raises MediaError(reason="too_short").
        limits: pixel and duration caps (default :data:`DEFAULT_LIMITS`); over them: MediaError("too_large").
        threads: decoding threads per clip (0: the decoder's choice, about one per core). One by default: loader
            workers each take a core already, and the small clips of a batch decode no faster with more.
        cache: keep the whole decoded clip there and sample later reads from it (pyav; file paths only).
    Returns:
        (uint8 [T, 3, H, W], the sampled frame indices in the untrimmed video).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; expected one of {BACKENDS}")
    limits = limits or DEFAULT_LIMITS
    name = _check_file(media)
    if backend == "decord":
        if cache is not None:
            raise ValueError("the decoded-clip cache needs backend 'pyav'")
        return _read_video_decord(media, name, num_frames, sampling, rng, start, end, min_frames, sample_fps, limits,
                                  threads)
    key = (name, start, end)
    cacheable = cache is not None and not isinstance(media, (bytes, bytearray))
    clip = cache.get(key) if cacheable else None
    if clip is not None:
        _require_frames(name, clip.last - clip.first, min_frames)
        indices = sample_frame_indices(clip.last - clip.first, num_frames, sampling, rng, fps=clip.fps,
                                       sample_fps=sample_fps, first=clip.first)
        return _assemble(clip.frames, indices), indices
    container, stream, info, first, last = _open_checked(media, name, start, end, min_frames, limits, threads)
    try:
        indices = sample_frame_indices(last - first, num_frames, sampling, rng, fps=info.fps, sample_fps=sample_fps,
                                       first=first)
        # a clip whose frames cannot fit the cache is read as without one: only its sampled frames decoded
        whole = cacheable and cache.fits(_rgb_bytes(stream, last - first))
        wanted = range(first, last) if whole else sorted(set(indices))
        decoded = _decode_wanted(container, stream, wanted, info.fps, name, limits)
    finally:
        container.close()
    if whole:
        cache.put(key, DecodedClip(decoded, first, last, info.fps))
    return _assemble(decoded, indices), indices


ClipRange = tuple[str | os.PathLike, float | None, float | None]  # (video file, start, end) as read_video takes them


def prefill_decoded_cache(cache: DecodedClipCache, clips: Sequence[ClipRange], processes: int, *,
                          min_frames: int = 1, limits: MediaLimits | None = None, threads: int = 1) -> int:
    """Decode ``clips`` whole into ``cache`` with ``processes`` forked processes; returns how many were put.

    What the first epoch does clip by clip as it reads them (:func:`read_video` with ``cache``), done in parallel
    before training starts, when the cores have nothing else to do. The cached clips are exactly those the first
    reads would have kept, so every later read samples the same frames. Stops when the cache is full (the rest are
    decoded as they are read). A clip that fails a check or does not decode is left out without a word: the training
    read meets the same failure and counts and quarantines it as usual.
    """
    limits = limits or DEFAULT_LIMITS
    keys = dict.fromkeys((os.fspath(media), start, end) for media, start, end in clips)
    jobs = [(*key, min_frames, limits, threads, cache.max_bytes) for key in keys if key not in cache]
    put = 0

    def keep(results) -> None:
        nonlocal put
        for result in results:
            if result is None:
                continue
            key, clip = result
            if cache.nbytes + clip.nbytes > cache.max_bytes:
                return  # full: a put would evict an earlier clip
            cache.put(key, clip)
            put += 1

    if processes <= 1 or len(jobs) < 2:
        keep(map(_decode_for_cache, jobs))
    else:
        import multiprocessing

        # fork: the children only open and decode with PyAV and numpy (no torch op, whose thread pool a fork breaks)
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            keep(pool.imap(_decode_for_cache, jobs, chunksize=max(1, min(64, len(jobs) // (processes * 8)))))
    return put


def _decode_for_cache(job: tuple) -> tuple[tuple, DecodedClip] | None:
    """((path, start, end), the whole decoded clip) as read_video would cache it, or None (error, or too large)."""
    path, start, end, min_frames, limits, threads, max_bytes = job
    try:
        name = _check_file(path)
        container, stream, info, first, last = _open_checked(path, name, start, end, min_frames, limits, threads)
        try:
            if not _fits(_rgb_bytes(stream, last - first), max_bytes):  # read_video would not cache it either
                return None
            decoded = _decode_wanted(container, stream, range(first, last), info.fps, name, limits)
        finally:
            container.close()
    except Exception:  # noqa: BLE001 - the training read reports it (see prefill_decoded_cache)
        return None
    return (name, start, end), DecodedClip(decoded, first, last, info.fps)


def _require_frames(name: str, available: int, min_frames: int) -> None:
    if available < max(min_frames, 1):
        raise MediaError(name, "too_short", f"{available} frames, need at least {max(min_frames, 1)}")


def _trim_range(info: VideoInfo, start: float | None, end: float | None, name: str = "<media>") -> tuple[int, int]:
    """Frame range [first, last) of the clip [start, end) seconds; a bound that is no finite number of seconds is
    the record's fault (annotations are validated at load; this keeps any other caller from an OverflowError)."""
    for label, value in (("start", start), ("end", end)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise MediaError(name, "error", f"clip {label} {value!r} is not a finite number of seconds >= 0")
    first = _frame_at(start, info) if start else 0
    last = info.num_frames if end is None else _frame_at(end, info)
    return first, last


def _frame_at(seconds: float, info: VideoInfo) -> int:
    """The frame index at ``seconds``, clamped to the frame count before rounding (1e308 s x fps is inf)."""
    position = seconds * info.fps
    return info.num_frames if position >= info.num_frames else int(round(position))


def _assemble(decoded: dict[int, np.ndarray], indices: Sequence[int]) -> torch.Tensor:
    """Stack frames in sampling order; an index that did not decode reuses the closest earlier decoded frame."""
    keys = sorted(decoded)
    arrays = []
    for i in indices:
        earlier = bisect.bisect_right(keys, i)  # how many decoded indices are <= i
        arrays.append(decoded[keys[earlier - 1] if earlier else keys[0]])
    stacked = np.stack(arrays)  # [T, H, W, 3]
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def _read_video_decord(media, name, num_frames, sampling, rng, start, end, min_frames, sample_fps, limits, threads=1):
    if importlib.util.find_spec("decord") is None:
        raise ImportError("video backend 'decord' was chosen but the decord package is not installed; "
                          "install it (pip install decord) or use backend='pyav'")
    import decord

    source = io.BytesIO(media) if isinstance(media, (bytes, bytearray)) else os.fspath(media)
    try:
        reader = decord.VideoReader(source, num_threads=int(threads))
    except Exception as err:  # decord raises its own DECORDError and RuntimeError variants
        raise MediaError(name, "undecodable", f"decord cannot open: {err}") from err
    fps = float(reader.get_avg_fps()) or 25.0
    if not 0 < fps <= MAX_PLAUSIBLE_FPS:
        raise MediaError(name, "undecodable", f"implausible frame rate {fps} fps")
    info = VideoInfo(num_frames=len(reader), fps=fps, duration=len(reader) / fps)
    _check_seconds(name, info.duration, limits)
    first, last = _trim_range(info, start, end, name)
    _require_frames(name, last - first, min_frames)
    indices = sample_frame_indices(last - first, num_frames, sampling, rng, fps=fps, sample_fps=sample_fps,
                                   first=first)
    try:
        batch = reader.get_batch(indices).asnumpy()
    except Exception as err:
        raise MediaError(name, "undecodable", f"decord decode failed: {err}") from err
    # decord exposes no frame size before decoding: the cap is checked on the (num_frames) decoded frames
    _check_pixels(name, int(batch.shape[2]), int(batch.shape[1]), limits.max_video_pixels, "a video frame")
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(), indices


def video_info(media: Media) -> VideoInfo:
    """Container metadata (frame count estimated from duration x fps when the stream stores none)."""
    name = _check_file(media)
    container = _open_container(media, name)
    try:
        return _stream_info(container, container.streams.video[0])
    finally:
        container.close()


def count_decodable_frames(media: Media, limits: MediaLimits | None = None) -> int:
    """Decode every frame of a video and return how many decoded (used by check-data). Raises MediaError, with
    ``too_large`` for a video over ``limits`` (checked from the header, then frame by frame)."""
    import av

    limits = limits or DEFAULT_LIMITS
    name = _check_file(media)
    container = _open_container(media, name)
    count = 0
    try:
        stream = container.streams.video[0]
        _check_stream(name, stream, _stream_info(container, stream), limits)
        for frame in container.decode(stream):
            _check_pixels(name, frame.width, frame.height, limits.max_video_pixels, "a video frame")
            count += 1
    except av.error.FFmpegError as err:
        if count == 0:
            raise MediaError(name, "undecodable", f"decode failed: {err}") from err
        raise MediaError(name, "undecodable", f"decode failed after {count} frames: {err}") from err
    finally:
        container.close()
    if count == 0:
        raise MediaError(name, "undecodable", "no frame could be decoded")
    return count


def read_image(media: Media, limits: MediaLimits | None = None) -> torch.Tensor:
    """Read an image file (path or bytes) with Pillow as uint8 [1, 3, H, W] (RGB).

    The size in the header is checked against ``limits.max_image_pixels`` before any pixel is decoded: an image
    over it (or over Pillow's own decompression-bomb limit) is MediaError("too_large").
    """
    from PIL import Image, UnidentifiedImageError

    limits = limits or DEFAULT_LIMITS
    name = _check_file(media)
    source = io.BytesIO(media) if isinstance(media, (bytes, bytearray)) else os.fspath(media)
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; our own cap below decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_pixels(name, image.width, image.height, limits.max_image_pixels, "image")
                array = np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as err:
        raise MediaError(name, "too_large", f"Pillow refuses it as a decompression bomb: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as err:
        # SyntaxError and EOFError: what some Pillow plugins raise for a malformed header or a truncated file
        raise MediaError(name, "undecodable", f"Pillow cannot read: {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()


def video_options(data_cfg) -> dict:
    """The ``read_video`` keywords a ``DataConfig`` sets: ``backend`` (data.decoder), ``threads``
    (data.decode_threads) and, when given, ``sample_fps`` (data.fps, for sampling 'fps')."""
    options = {"backend": data_cfg.decoder, "threads": data_cfg.decode_threads}
    if data_cfg.fps is not None:
        options["sample_fps"] = float(data_cfg.fps)
    return options


def read_media(
    media: Media,
    media_type: str,
    num_frames: int,
    sampling: str = "rand",
    rng: np.random.Generator | None = None,
    limits: MediaLimits | None = None,
    **video_kwargs,
) -> torch.Tensor:
    """uint8 [T, 3, H, W] from a video (T = num_frames) or an image (T = 1), within ``limits``."""
    if media_type == "image":
        return read_image(media, limits)
    if media_type != "video":
        raise ValueError(f"unknown media type {media_type!r}; expected 'video' or 'image'")
    frames, _ = read_video(media, num_frames, sampling, rng, limits=limits, **video_kwargs)
    return frames


def resolve_media_path(media_root: str | os.PathLike, rel_path: str) -> Path:
    """Join a record's media path to the corpus media root (absolute record paths are kept)."""
    path = Path(rel_path)
    return path if path.is_absolute() else Path(media_root) / path
