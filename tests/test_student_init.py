"""model.vision.init: the student (and its decoders) start from a UMT stage-1 checkpoint or an stmvl model folder,
loaded strictly; the result runs UMT's forward (tests/umt_reference.py) on the same weights."""

import dataclasses
import json
import logging

import pytest
import torch

import umt_reference as umt
from stmvl.models.config import ModelConfig, PredictorConfig, TeacherConfig, TextConfig, VisionConfig
from stmvl.models.decoder import LinearDecoder, STDecoder
from stmvl.models.stm import STMModel, apply_preset
from stmvl.models.weights import WeightLoadError, save_model
from test_convert_umt import SIZES, _video, random_mask, umt_input


def model_config(preset: str = "umt", init: str | None = None, **vision) -> ModelConfig:
    """A small STM/UMT model whose student has the UMT fixture's sizes (width 128, depth 3, 3x MLP, patch 8)."""
    cfg = ModelConfig(
        vision=VisionConfig(size="custom", img_size=32, patch_size=8, width=128, depth=3, heads=2, mlp_ratio=3.0,
                            drop_path=0.0, init=init, **vision),
        teacher=TeacherConfig(img_size=32, patch_size=8, width=64, layers=2, heads=1, embed_dim=48, return_layers=2),
        text=TextConfig(hidden=64, layers=3, heads=1, intermediate=96, fusion_start=2, max_length=16, dropout=0.0),
        predictor=PredictorConfig(dim=16, hidden=16, head_hidden=8),
        embed_dim=32,
    )
    return apply_preset(cfg, preset)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """(path of the UMT stage-1 file, its state dict) -- the layout of b16_ptk710_f8_res224.pth, bare."""
    sd = umt.random_state(umt.student_shapes(SIZES, "", pool_norm=False), seed=5)
    path = tmp_path_factory.mktemp("umt1") / "b16_ptk710_f8_res224.pth"
    torch.save(sd, path)
    return path, sd


def test_umt_stage1_initialises_student_and_linear_decoders(stage1, caplog):
    path, sd = stage1
    with caplog.at_level(logging.INFO, logger="stmvl.models.weights.umt"):
        model = STMModel(model_config(init=str(path))).eval()
    assert "student initialised from" in caplog.text and "loaded all 2 decoders" in caplog.text
    assert model.student_init.kind == "umt-stage1" and model.student_init.vision.missing == {"pool_norm": [
        "pool_norm.weight", "pool_norm.bias"]}
    assert isinstance(model.decoders[0], LinearDecoder)
    # UMT stage 2 loads this file into PretrainVisionTransformer: same student, same decoders (UTA), fresh pool norm
    video = _video(seed=7)
    mask = random_mask(2, 32, visible=11, seed=8)
    x_vis, _, x_clip = umt.student_forward(sd, "", SIZES, umt_input(video), mask=mask, keep_temporal=False)
    keep = ~mask
    with torch.no_grad():
        out = model.vision(video, keep=keep, return_layers=2)
        prediction = torch.stack([dec(out.layers[i], keep) for i, dec in enumerate(model.decoders)])
    torch.testing.assert_close(out.tokens, x_vis, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(prediction, x_clip, atol=2e-5, rtol=1e-4)


def test_stm_decoders_take_the_prediction_heads(stage1):
    path, sd = stage1
    model = STMModel(model_config("stm", init=str(path)))
    assert isinstance(model.decoders[0], STDecoder)
    assert model.student_init.decoders == "loaded the prediction heads of 2 decoders"
    assert torch.equal(model.decoders[1].head.head.weight, sd["clip_decoder.1.head.weight"])
    assert torch.equal(model.decoders[0].head.norm.bias, sd["clip_decoder.0.norm.bias"])


def test_decoder_count_mismatch_keeps_them_and_says_why(stage1, caplog):
    path, _ = stage1
    cfg = model_config(init=str(path))
    cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, return_layers=1))
    with caplog.at_level(logging.INFO, logger="stmvl.models.weights.umt"):
        model = STMModel(cfg)
    assert "the checkpoint has 2 decoders, the model 1" in caplog.text
    assert model.student_init.vision.ok


def test_mismatched_student_is_an_error_naming_keys(stage1):
    path, _ = stage1
    cfg = model_config(init=str(path))
    deeper = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, depth=4))
    with pytest.raises(WeightLoadError) as error:
        STMModel(deeper)
    message = str(error.value)
    assert "model.vision.init" in message and "missing [blocks] (13): blocks.3.norm1.weight" in message


def test_partial_checkpoint_is_an_error_naming_keys(stage1, tmp_path):
    _, sd = stage1
    partial = {k: v for k, v in sd.items() if k != "encoder.blocks.1.mlp.fc2.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightLoadError, match=r"missing \[blocks\] \(1\): blocks\.1\.mlp\.fc2\.weight"):
        STMModel(model_config(init=str(tmp_path / "partial.pth")))
    wide = dict(sd, **{"encoder.blocks.0.mlp.fc1.weight": torch.zeros(512, 128)})
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(WeightLoadError, match=r"blocks\.0\.mlp\.fc1\.weight \(model \[384, 128\] vs checkpoint \[512, 128\]\)"):
        STMModel(model_config(init=str(tmp_path / "wide.pth")))
    stray = dict(sd, **{"encoder.blocks.0.gamma_1": torch.ones(128)})
    torch.save(stray, tmp_path / "stray.pth")
    with pytest.raises(WeightLoadError, match="encoder.blocks.0.gamma_1"):
        STMModel(model_config(init=str(tmp_path / "stray.pth")))


def test_missing_file_says_what_it_is(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.vision.init: student initialisation checkpoint not found"):
        STMModel(model_config(init=str(tmp_path / "b16_ptk710_f8_res224.pth")))


def test_stmvl_folder_initialises_and_saved_configs_drop_the_init(stage1, tmp_path):
    path, _ = stage1
    first = STMModel(model_config(init=str(path)))
    save_model(first, first.cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    # the folder holds the student's tensors, so rebuilding it must not need the original file
    assert meta["config"]["vision"]["init"] is None and meta["initialised_from"] == str(path)
    second = STMModel(model_config(init=str(tmp_path / "run")))
    assert second.student_init.kind == "stmvl" and second.student_init.decoders == "loaded all 2 decoders"
    assert second.student_init.vision.missing == {}
    for (name, a), b in zip(first.vision.state_dict().items(), second.vision.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(first.decoders[1].norm.weight, second.decoders[1].norm.weight)


def test_recipes_point_the_student_at_umt_stage1_and_stm_at_actionclip():
    from stmvl.config import load_config

    for name, file in (("pretrain/stm_b16_5m", "b16_ptk710_f8_res224.pth"), ("pretrain/umt_b16_5m", "b16_ptk710_f8_res224.pth"),
                       ("pretrain/stm_l16_25m", "l16_ptk710_f8_res224.pth")):
        cfg = load_config(name, ["paths.models=/weights"])
        assert cfg.model.vision.init == f"/weights/umt/{file}", name
    teachers = {name: load_config(f"pretrain/{name}", ["paths.models=/w"]).model.teacher
                for name in ("stm_b16_5m", "stm_b16_17m", "umt_b16_5m", "stm_l16_25m")}
    assert {n: (t.weights, t.temporal_fusion) for n, t in teachers.items()} == {
        "stm_b16_5m": ("/w/actionclip/actionclip_vit-b-16-8f.pt", True),
        "stm_b16_17m": ("/w/actionclip/actionclip_vit-b-16-8f.pt", True),
        "umt_b16_5m": ("/w/clip/ViT-B-16.pt", False),
        "stm_l16_25m": ("/w/clip/ViT-L-14.pt", False)}


def test_umt_stage2_checkpoint_gives_its_vision_part(tmp_path):
    sd = umt.random_state(umt.stage2_shapes(SIZES), seed=9)
    torch.save({"model": sd}, tmp_path / "umt_stage2.pth")
    model = STMModel(model_config(init=str(tmp_path / "umt_stage2.pth")))
    assert model.student_init.kind == "umt-stage2" and model.student_init.vision.missing == {}
    assert torch.equal(model.vision.pool_norm.weight, sd["vision_encoder.pool_norm.weight"])
    assert torch.equal(model.decoders[0].head.weight, sd["vision_encoder.clip_decoder.0.head.weight"])
    assert not torch.equal(model.vision_proj.weight, sd["vision_proj.weight"])  # only the student and decoders
