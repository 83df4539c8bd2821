"""The recipe's media caps (data.max_image_pixels, max_video_pixels, max_video_seconds) reach every dataset the tasks
build: pretraining, finetuning and evaluation. Media over a cap are quarantined as too_large (training) or fail as
too_large (evaluation), before their pixels are allocated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stmvl.config import load_config
from stmvl.data.quarantine import Quarantine, TooManyBadSamples
from stmvl.data.synth import write_mp4
from stmvl.data.video import MediaError, MediaLimits
from stmvl.tasks.data import eval_datasets, pretrain_datasets
from stmvl.tasks.finetune import _eval_common, retrieval_train_dataset

RECIPE = """
data:
  corpora:
    - {{name: pics, kind: pretrain, media_type: image, annotation: "{root}/images.json", media_root: "{root}"}}
    - {{name: clips, kind: retrieval, media_type: video, annotation: "{root}/clips.json", media_root: "{root}"}}
  num_frames: 2
  img_size: 8
  num_workers: 0
eval:
  corpora:
    - {{name: test, kind: retrieval, annotation: "{root}/clips.json", media_root: "{root}"}}
  num_frames: 2
  img_size: 8
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """An 8x8 and a 16x16 image, a 16x16 and a 32x32 clip (record 1 is the larger one each time), and a recipe."""
    root = tmp_path_factory.mktemp("caps")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "small.png")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(root / "big.png")
    write_mp4(root / "small.mp4", np.full((4, 16, 16, 3), 90, dtype=np.uint8))
    write_mp4(root / "big.mp4", np.full((4, 32, 32, 3), 160, dtype=np.uint8))
    (root / "images.json").write_text(json.dumps([{"image": "small.png", "caption": "a small picture"},
                                                  {"image": "big.png", "caption": "a big picture"}]))
    (root / "clips.json").write_text(json.dumps([{"video": "small.mp4", "caption": "a small clip"},
                                                 {"video": "big.mp4", "caption": "a big clip"}]))
    (root / "caps.yaml").write_text(RECIPE.format(root=root))
    return root


def _config(root: Path, *overrides: str):
    return load_config(str(root / "caps.yaml"), list(overrides))


def test_a_pretraining_corpus_quarantines_images_over_the_recipes_pixel_cap(corpus, tmp_path):
    run = tmp_path / "run"
    image = pretrain_datasets(_config(corpus, "data.max_image_pixels=100"), run, seed=0)["image"][0]
    assert image[1]["caption"] == "a small picture"  # the 16x16 image was replaced
    assert Quarantine(run).entries() == [{
        "path": str(corpus / "big.png"), "reason": "too_large", "corpus": "pics", "index": 1,
        "detail": "image is 16x16 = 256 pixels, over the cap of 100 (data.max_image_pixels)"}]
    # without the override the default caps let both through
    default = pretrain_datasets(_config(corpus), tmp_path / "default", seed=0)["image"][0]
    assert default[1]["caption"] == "a big picture" and Quarantine(tmp_path / "default").entries() == []


def test_a_finetuning_corpus_quarantines_clips_over_the_recipes_caps(corpus, tmp_path):
    pairs = retrieval_train_dataset(_config(corpus, "data.max_video_pixels=300"), tmp_path / "pixels")
    assert pairs[1]["caption"] == "a small clip"
    assert [(e["path"], e["reason"], e["detail"]) for e in Quarantine(tmp_path / "pixels").entries()] == [
        (str(corpus / "big.mp4"), "too_large",
         "a video frame is 32x32 = 1024 pixels, over the cap of 300 (data.max_video_pixels)")]
    # 4 frames at the writer's rate last well over 0.01 s: every clip is over that cap, so the guard gives up
    pairs = retrieval_train_dataset(_config(corpus, "data.max_video_seconds=0.01", "data.max_bad_fraction=1.0"),
                                    tmp_path / "seconds")
    pairs.guard.max_replacements = 1
    with pytest.raises(TooManyBadSamples) as info:
        pairs[0]
    assert str(info.value) == "corpus 'clips': 1 replacements for sample 0 all failed (2 failures in 2 loads)"
    # (a clip shorter than a second is named as such, not rounded to "0 s long")
    assert [(e["path"], e["reason"], e["detail"]) for e in Quarantine(tmp_path / "seconds").entries()] == [
        (str(corpus / name), "too_large", "0.5 s long, over the cap of 0.01 s (data.max_video_seconds)")
        for name in ("small.mp4", "big.mp4")]


def test_evaluation_datasets_read_within_the_recipes_caps(corpus):
    cfg = _config(corpus, "data.max_video_pixels=300", "runtime.out_dir=" + str(corpus / "runs"))
    expected = MediaLimits(max_image_pixels=8192 * 8192, max_video_pixels=300, max_video_seconds=6 * 3600.0)
    _, dataset = eval_datasets(cfg)["test"]
    assert dataset.limits == expected
    assert dataset.load_clip(0)[0].shape[0] == 2
    with pytest.raises(MediaError) as info:
        dataset.load_clip(1)
    assert (info.value.path, info.value.reason) == (str(corpus / "big.mp4"), "too_large")
    # the multiple-choice and QA evaluations of finetuning share these dataset arguments
    assert _eval_common(cfg, cfg.eval.corpora[0])["limits"] == expected
