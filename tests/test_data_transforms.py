"""Clip transforms: one set of parameters per clip, reproducible from the generator, no torchvision."""

import pytest
import torch

from stmvl.data.transforms import (CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, normalize,
                                   random_resized_crop_params, resize_clip, to_float)


def _clip(frames=3, h=40, w=60):
    frame = torch.randint(0, 256, (1, 3, h, w), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return frame.repeat(frames, 1, 1, 1)


def test_train_crop_same_for_all_frames_and_reproducible():
    clip = _clip()
    out = TrainTransform(24)(clip, torch.Generator().manual_seed(3))
    assert out.shape == (3, 3, 24, 24) and out.dtype == torch.uint8
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])  # identical input frames stay identical
    again = TrainTransform(24)(clip, torch.Generator().manual_seed(3))
    other = TrainTransform(24)(clip, torch.Generator().manual_seed(4))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_crop_params_respect_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_params(40, 60, (0.5, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.45 * 2400 <= h * w <= 2400 * 1.0 + 60  # rounding slack
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_hflip_is_optional_and_flips_every_frame():
    clip = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    no_flip = TrainTransform(4, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    flip = TrainTransform(4, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    assert torch.equal(no_flip(clip, torch.Generator().manual_seed(0)), clip)
    flipped = [flip(clip, torch.Generator().manual_seed(s)) for s in range(20)]
    assert any(torch.equal(f, clip.flip(-1)) for f in flipped) and any(torch.equal(f, clip) for f in flipped)
    assert all(torch.equal(f, clip) or torch.equal(f, clip.flip(-1)) for f in flipped)


def test_eval_resize_and_center_crop():
    constant = torch.full((2, 3, 30, 50), 77, dtype=torch.uint8)
    assert torch.equal(EvalTransform(16)(constant), torch.full((2, 3, 16, 16), 77, dtype=torch.uint8))
    left_half_white = torch.zeros(1, 3, 20, 40, dtype=torch.uint8)
    left_half_white[..., :20] = 255
    cropped = EvalTransform(10, center_crop=True)(left_half_white)  # 20x40 -> 10x20 -> centre 10x10
    assert cropped.shape == (1, 3, 10, 10)
    assert cropped[..., :, :3].float().mean() > 250 and cropped[..., :, -3:].float().mean() < 5
    assert resize_clip(constant, (30, 50)) is constant
    with pytest.raises(ValueError, match="uint8"):
        EvalTransform(8)(constant.float())


def test_to_float_and_normalize():
    video = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2, 1).expand(1, 3, 2, 1).contiguous()
    as_float = to_float(video)
    assert as_float.min() == 0.0 and as_float.max() == 1.0
    normed = normalize(as_float, CLIP_MEAN, CLIP_STD)
    assert torch.allclose(normed[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))
    with pytest.raises(ValueError, match="float"):
        normalize(video)


def test_data_crop_scale_reaches_the_training_transforms_of_pretraining_and_finetuning(tmp_path):
    """`data.crop_scale` used to be validated and then ignored (every dataset kept the transform's default): the
    pretraining and finetuning datasets built from a config now crop with its value."""
    from stmvl.config import load_config
    from stmvl.data.synth import generate_corpus
    from stmvl.tasks.data import pretrain_datasets
    from stmvl.tasks.finetune import _train_dataset_kwargs

    root = tmp_path / "corpus"
    generate_corpus(root, seed=0, train=4, test=2, probe=2, size=32, frames=4, workers=1)
    corpus = (f"data.corpora=[{{name: v, media_type: video, annotation: {root}/annotations/train_video.json, "
              f"media_root: {root}}}]")
    for scale in ([0.9, 1.0], [1.0, 1.0]):
        cfg = load_config(None, [corpus, f"data.crop_scale={scale}", "data.img_size=32"])
        (dataset,) = pretrain_datasets(cfg, tmp_path / "run", seed=0)["video"]
        assert dataset.transform.scale == tuple(scale)
        assert _train_dataset_kwargs(cfg, tmp_path / "run", cfg.data.corpora[0])["crop_scale"] == tuple(scale)
    # with the whole frame as the only allowed area, every crop is the full frame
    item = dataset[0]["video"]
    uncropped = TrainTransform(32, scale=(1.0, 1.0))
    assert all(random_resized_crop_params(32, 32, (1.0, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(s))
               == (0, 0, 32, 32) for s in range(20))
    assert item.shape[-2:] == (32, 32) and uncropped.scale == dataset.transform.scale
