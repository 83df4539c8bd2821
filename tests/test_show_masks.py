"""`stmvl show-masks`: every strategy's mask (and the STM temporal heatmap) drawn on a real clip, PNG of known size."""


import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stmvl.api import load_model, read_clip
from stmvl.models.stm import STMModel
from stmvl.models.weights import save_model
from stmvl.commands.show_masks import show_masks_main
from stmvl.report import LABEL_WIDTH_PX, mask_picture

from test_finetune import tiny_pretrain_config

FRAMES, CELL = 4, 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_pretrain_config()
    model = STMModel(cfg)
    return save_model(model, cfg, tmp_path_factory.mktemp("masks") / "model",
                      extra={"inference": {"num_frames": FRAMES, "img_size": 32}})


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from stmvl.data.synth import generate_corpus

    root = tmp_path_factory.mktemp("clip")
    generate_corpus(root, seed=1, train=1, test=0, probe=0, size=32, frames=8, workers=1)
    return root / "videos/train/train_00000.mp4"


def test_png_has_one_row_per_strategy_plus_heatmap(model_dir, video, tmp_path, capsys):
    out = tmp_path / "masks.png"
    assert show_masks_main(["--checkpoint", str(model_dir), "--video", str(video), "--out", str(out),
                            "--seed", "3", "--cell-px", str(CELL)]) == 0
    assert "random, tube, attention, stm, heatmap" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (LABEL_WIDTH_PX + FRAMES * CELL, 5 * CELL)  # heatmap + 4 strategies
        pixels = torch.tensor(list(image.convert("L").getdata()), dtype=torch.float32)
    assert pixels.std() > 10  # a picture, not a blank canvas


def test_each_strategy_masks_exactly_k_per_frame_and_is_seeded(model_dir, video):
    model = load_model(model_dir)
    frames = read_clip(model, video)
    picture = mask_picture(model, frames, ("random", "tube", "attention", "stm"), seed=5, ratio=0.5)
    assert picture.grid == (4, 4) and picture.notes == []
    assert picture.heatmap is not None and picture.heatmap.shape == (FRAMES, 16)
    assert torch.all(picture.heatmap >= 1.0)  # the heatmap's constant floor is 1
    for strategy, mask in picture.masks.items():
        assert mask.shape == (FRAMES * 16,) and mask.dtype == torch.bool
        assert mask.view(FRAMES, 16).sum(1).tolist() == [8] * FRAMES, strategy
    tube = picture.masks["tube"].view(FRAMES, 16)
    assert torch.equal(tube, tube[:1].expand_as(tube))
    again = mask_picture(model, frames, ("random", "stm"), seed=5, ratio=0.5)
    other = mask_picture(model, frames, ("random",), seed=6, ratio=0.5)
    assert torch.equal(again.masks["stm"], picture.masks["stm"])
    assert not torch.equal(other.masks["random"], picture.masks["random"])


def test_without_teacher_weights_the_score_strategies_are_left_out_with_a_message(model_dir, video, tmp_path, capsys):
    slim = tmp_path / "slim"
    slim.mkdir()
    weights = {k: v for k, v in load_file(model_dir / "model.safetensors").items() if not k.startswith("teacher.")}
    save_file(weights, slim / "model.safetensors")
    (slim / "config.json").write_text((model_dir / "config.json").read_text())
    out = tmp_path / "slim.png"
    assert show_masks_main(["--checkpoint", str(slim), "--video", str(video), "--out", str(out),
                            "--cell-px", str(CELL)]) == 0
    err = capsys.readouterr().err
    assert "attention: left out, the checkpoint holds no teacher weights" in err
    assert "stm: left out" in err
    with Image.open(out) as image:
        assert image.size == (LABEL_WIDTH_PX + FRAMES * CELL, 2 * CELL)  # random + tube, no heatmap


def test_bad_inputs_are_named(model_dir, video, tmp_path, capsys):
    args = ["--checkpoint", str(model_dir), "--out", str(tmp_path / "x.png")]
    assert show_masks_main(args + ["--video", str(video), "--strategies", "random,zigzag"]) == 2
    assert "zigzag" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00garbage" * 100)
    assert show_masks_main(args + ["--video", str(corrupt)]) == 2
    assert "corrupt.mp4" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
