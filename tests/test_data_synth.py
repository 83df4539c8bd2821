"""The synthetic temporal corpus: determinism, exact reversal, foils, ground truth, QA/MC, mp4 fidelity."""

import json

import numpy as np
import pytest

from stmvl.commands.data import synth_main
from stmvl.data import synth
from stmvl.data.annotations import load_annotations, load_answer_list
from stmvl.data.video import read_video

COUNTS = dict(train=8, test=6, probe=6)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("synth_a"), tmp_path_factory.mktemp("synth_b")
    synth.generate_corpus(a, seed=5, workers=2, **COUNTS)
    assert synth_main(["--out", str(b), "--seed", "5", "--workers", "1"] +
                          [f"--{k}={v}" for k, v in COUNTS.items()]) == 0
    return a, b


def test_same_seed_gives_identical_annotations_and_frames(corpora, tmp_path):
    a, b = corpora
    for name in ("train_video", "train_image", "test_video", "retrieval_test", "probe", "qa_train", "qa_test",
                 "qa_answers", "mc_test", "mc_edit_test"):
        assert (a / "annotations" / f"{name}.json").read_bytes() == (b / "annotations" / f"{name}.json").read_bytes()
    for rel in ("videos/train/train_00003.mp4", "videos/probe/probe_00005.mp4"):
        frames_a, _ = read_video(a / rel, 16, "middle")
        frames_b, _ = read_video(b / rel, 16, "middle")
        assert frames_a.shape == (16, 3, 64, 64) and np.array_equal(frames_a.numpy(), frames_b.numpy())
    synth.generate_corpus(tmp_path, seed=6, workers=1, train=2, test=0, probe=0)
    other = json.loads((tmp_path / "annotations" / "train_video.json").read_text())
    ours = json.loads((a / "annotations" / "train_video.json").read_text())
    assert [r["caption"] for r in other] != [r["caption"] for r in ours[:2]]


def test_reversed_attributes_render_the_reversed_frames():
    for seed in range(12):
        attrs = synth.sample_attributes(np.random.default_rng(seed), 48)
        frames = synth.render_clip(attrs, 48, 9)
        assert np.array_equal(frames[::-1], synth.render_clip(synth.reverse_attributes(attrs), 48, 9))
        assert not np.array_equal(frames[0], frames[-1])  # every clip has motion (no 'stays'-only clips)
        assert frames.std() > 20  # textured background + objects, not flat


def test_probe_foil_describes_the_reversed_motion(corpora):
    a, _ = corpora
    records = load_annotations(a / "annotations" / "probe.json", "probe")
    for record in records:
        attrs = record["attributes"]
        assert record["foil"] != record["caption"]
        assert any(o["motion"] != "stays" for o in attrs["objects"])
        reversed_attrs = synth.reverse_attributes(attrs)
        assert record["foil"] == synth.caption(reversed_attrs)
        assert [o["motion"] for o in reversed_attrs["objects"]] == [
            synth.REVERSED_MOTION[o["motion"]] for o in reversed(attrs["objects"])]
    # a hand-built clip: exact wording of caption and foil
    attrs = {"background": 1, "template": 0, "objects": [
        {"shape": "circle", "color": "red", "size": "small", "motion": "left", "start": [40, 20, 7], "end": [20, 20, 7],
         "z": 0, "noun": 0, "verb": 0, "say_size": True},
        {"shape": "square", "color": "blue", "size": "small", "motion": "grows", "start": [30, 45, 7],
         "end": [30, 45, 12], "z": 1, "noun": 1, "verb": 0, "say_size": True}]}
    assert synth.caption(attrs) == "first a small red circle moves to the left, then a blue box grows"
    assert synth.foil_caption(attrs) == "first a blue box shrinks, then a small red circle moves to the right"


def test_retrieval_ground_truth_lists_every_matching_clip():
    rng = np.random.default_rng(0)
    clip = synth.sample_attributes(rng, 64)
    clip["objects"] = clip["objects"][:1]
    clip["objects"][0].update(motion="left", say_size=False)
    same_tuple = json.loads(json.dumps(clip))
    same_tuple["objects"][0].update(size="large" if clip["objects"][0]["size"] == "small" else "small", verb=2)
    different = json.loads(json.dumps(clip))
    different["objects"][0]["motion"] = "right"
    records = [{"video": f"{i}.mp4", "caption": synth.caption(x), "attributes": x}
               for i, x in enumerate([clip, same_tuple, different])]
    gts = [r["gt"] for r in synth._retrieval_records(records)]
    assert gts == [[0, 1], [0, 1], [2]]  # size not said -> both sizes match; a paraphrase has the same gt


def test_all_annotation_files_validate_and_are_consistent(corpora):
    a, _ = corpora
    ann = a / "annotations"
    train = load_annotations(ann / "train_video.json", "video")
    images = load_annotations(ann / "train_image.json", "image")
    assert len(train) == len(images) == COUNTS["train"]
    assert all((a / r["image"]).is_file() for r in images)
    assert all("moves" not in r["caption"] and "grows" not in r["caption"] for r in images)
    retrieval = load_annotations(ann / "retrieval_test.json", "retrieval")
    assert all(i in r["gt"] for i, r in enumerate(retrieval))
    answers = load_answer_list(ann / "qa_answers.json")
    qa_test = load_annotations(ann / "qa_test.json", "qa")
    assert len(qa_test) == 3 * COUNTS["test"]  # a colour, a shape and a motion question per clip
    for record in qa_test:
        assert record["answer"] in answers
    kinds = [" ".join(r["question"].split()[:2]) for r in qa_test]
    assert kinds[:3] == ["what color", "what shape", "how does"]
    test_clips = load_annotations(ann / "test_video.json", "video")
    captions_of = {}  # caption text -> attributes of a test clip it was written for
    for clip in test_clips:
        captions_of.setdefault(clip["caption"], clip["attributes"])
    for name in ("mc_test.json", "mc_edit_test.json"):
        for record, clip in zip(load_annotations(ann / name, "mc"), test_clips):
            assert len(set(record["caption"])) == 5 and record["caption"][record["answer"]] == clip["caption"]
            assert clip["foil"] in record["caption"]
            # no distractor describes the clip (else it would be a second right answer)
            for text in record["caption"]:
                if text not in (clip["caption"], clip["foil"]) and text in captions_of:
                    assert not synth.clip_matches(synth.caption_key(captions_of[text]), clip["attributes"]), text
    # MSRVTT-MC style: in mc_test the three other distractors are captions of other test clips
    other = [t for r, c in zip(load_annotations(ann / "mc_test.json", "mc"), test_clips)
             for t in r["caption"] if t not in (c["caption"], c["foil"])]
    assert sum(t in captions_of for t in other) == len(other)
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 8, "test": 6, "probe": 6, "images": 8}


def test_num_images_writes_that_many_image_pairs_and_keeps_the_clips(tmp_path, corpora):
    """data.synthetic.num_images (it used to be ignored: one image per training clip whatever it said)."""
    from stmvl.config import ConfigError, load_config

    a, _ = corpora
    manifest = synth.generate_corpus(tmp_path / "c", seed=5, workers=1, images=3, **COUNTS)
    images = load_annotations(tmp_path / "c" / "annotations" / "train_image.json", "image")
    assert manifest["counts"]["images"] == 3 and len(images) == 3
    assert sorted(p.name for p in (tmp_path / "c" / "images" / "train").iterdir()) == [
        f"train_{i:05d}.png" for i in range(3)]
    # the clips, their captions and the images written are those of the full corpus with the same seed
    full_ann, few_ann = a / "annotations", tmp_path / "c" / "annotations"
    assert (few_ann / "train_video.json").read_text() == (full_ann / "train_video.json").read_text()
    full_images = load_annotations(full_ann / "train_image.json", "image")
    assert [images[i] for i in range(3)] == [full_images[i] for i in range(3)]
    with pytest.raises(ValueError, match=r"images \(9\) must lie in \[0, train\] = \[0, 8\]"):
        synth.generate_corpus(tmp_path / "d", train=8, test=1, probe=1, workers=1, images=9)
    with pytest.raises(ConfigError, match=r"data.synthetic.num_images \(9\) exceeds data.synthetic.num_train \(8\)"):
        load_config(None, ["data.synthetic.num_train=8", "data.synthetic.num_images=9"])


def test_mp4_keeps_colours(corpora):
    a, _ = corpora
    record = load_annotations(a / "annotations" / "train_video.json", "video")[0]
    rendered = synth.render_clip(record["attributes"], 64, 16).astype(np.float64)
    decoded, _ = read_video(a / record["video"], 16, "middle")
    decoded = decoded.permute(0, 2, 3, 1).numpy().astype(np.float64)
    assert np.abs(decoded - rendered).mean() < 4.0  # crf 10 + yuv420p: small error, colours intact


def test_a_corpus_written_with_other_settings_is_reused_with_a_warning_naming_the_differences(corpora, tmp_path,
                                                                                             caplog):
    import logging

    from stmvl.config import ConfigError, load_config
    from stmvl.tasks.data import ensure_synthetic_corpus

    a, _ = corpora
    same = [f"data.synthetic.{k}={v}" for k, v in dict(enabled="true", dir=a, seed=5, num_train=8, num_images=8,
                                                      num_test=6, num_probe=6, size=64, frames=16).items()]
    with caplog.at_level(logging.WARNING, logger="stmvl.tasks.data"):
        assert ensure_synthetic_corpus(load_config(None, same)) == a
        assert not caplog.records
        assert ensure_synthetic_corpus(load_config(None, same + ["data.synthetic.num_train=3000"])) == a
    assert "num_train 8 (config: 3000)" in caplog.text and "num_test" not in caplog.text
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a corpus manifest"):
        ensure_synthetic_corpus(load_config(None, [f"data.synthetic.dir={broken}", "data.synthetic.enabled=true"]))


def _full_grid_frame(attrs, size, frames, frame):
    """The blend of every object over the whole frame (what render_frame computes on each object's bounding box)."""
    image = synth.render_background(attrs["background"], size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    last = frames - 1
    for slot, obj in sorted(enumerate(attrs["objects"]), key=lambda so: so[1]["z"]):
        p = synth._progress(slot, len(attrs["objects"]), frame, last)
        x, y, r = ((s * (last - p) + e * p) / last for s, e in zip(obj["start"], obj["end"]))
        alpha = np.clip(0.5 - synth._shape_distance(obj["shape"], xx - x, yy - y, r), 0.0, 1.0)[..., None]
        image = image * (1.0 - alpha) + np.asarray(synth.COLORS[obj["color"]], dtype=np.float64) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", ["circle", "square", "diamond", "triangle", "star", "cross"])
def test_bounding_box_rendering_equals_blending_the_whole_frame(shape):
    # large objects at the borders and in the corners: a box cut too small would lose a rim of the shape
    objects = [{"shape": shape, "color": "red", "size": "large", "motion": "right", "start": [2.0, 3.0, 12.0],
                "end": [61.0, 60.0, 12.0], "z": 0},
               {"shape": shape, "color": "blue", "size": "small", "motion": "grows", "start": [50.0, 10.0, 7.0],
                "end": [50.0, 10.0, 12.0], "z": 1}]
    attrs = {"background": 5, "objects": objects}
    for frame in (0, 7, 15):
        got, want = synth.render_frame(attrs, 64, 16, frame), _full_grid_frame(attrs, 64, 16, frame)
        # exact on this machine (corpus of 3000 clips: byte-identical); a last-bit difference of a libm function
        # elsewhere may move a pixel by 1, a box cut too small would move a whole rim
        assert np.abs(got.astype(int) - want).max() <= 1 and (got == want).mean() > 0.999, (shape, frame)


def test_yuv_conversion_of_a_clip_equals_frame_by_frame():
    frames = synth.render_clip(synth.sample_attributes(synth.clip_rng(0, "train", 3), 64), 64, 16)
    clip = synth.rgb_to_yuv420p(frames)
    assert clip.shape == (16, 96, 64) and clip.dtype == np.uint8
    assert all(np.array_equal(clip[i], synth.rgb_to_yuv420p(frames[i])) for i in range(16))
    with pytest.raises(ValueError, match="even frame sides"):
        synth.rgb_to_yuv420p(frames[:, :63])


def _bt601_yuv420p_reference(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited range, pixel by pixel on interleaved channels, chroma averaged over each 2 x 2 block by
    numpy's mean: the plain form of the conversion."""
    x = rgb.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
    cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
    h, w = rgb.shape[:2]
    half = [plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for plane in (cb, cr)]
    return np.concatenate([np.clip(np.rint(p), 0, 255).astype(np.uint8).ravel() for p in (y, *half)]).reshape(-1, w)


def test_yuv_conversion_equals_the_plain_bt601_formula_bit_for_bit():
    # rendered clips (flat colours, antialiased rims) and uniform noise (every colour); the corpus bytes depend on it
    clips = [synth.render_clip(synth.sample_attributes(synth.clip_rng(0, "train", i), 64), 64, 4) for i in range(8)]
    clips.append(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    for clip in clips:
        converted = synth.rgb_to_yuv420p(clip)
        assert all(np.array_equal(converted[i], _bt601_yuv420p_reference(clip[i])) for i in range(len(clip)))
