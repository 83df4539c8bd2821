"""`stmvl convert umt`: a UMT stage-2 state dict (B/16 vision, UMT key names, random values) becomes a model folder
that stmvl.load_model loads strictly and that gives the same features as the foundation importer path."""

import dataclasses
import json

import pytest
import torch

from stmvl.api import load_model
from stmvl.models.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, TeacherConfig, TextConfig
from stmvl.models.stm import STMModel, apply_preset
from stmvl.models.vit import vit_config
from stmvl.models.weights import convert_main, load_state_dict_strict, stmvl_to_umt, umt_to_stmvl

CAPTIONS = ["a red circle moves to the left", "a blue square grows"]


def _umt_b16_config() -> ModelConfig:
    """UMT B/16 stage-2 layout at B/16 vision size; the text tower and teacher depth are cut down for speed
    (their key names stay UMT's; BERT width 64 with one head)."""
    cfg = ModelConfig(
        vision=vit_config("b16"),
        teacher=TeacherConfig(img_size=224, patch_size=16, width=768, layers=1, heads=12, embed_dim=512,
                              return_layers=1, input_norm="imagenet"),
        text=TextConfig(hidden=64, layers=3, heads=1, intermediate=128, max_position=40, fusion_start=2, dropout=0.0),
        embed_dim=512,
    )
    return apply_preset(cfg, "umt")


def _empty_model(cfg: ModelConfig) -> STMModel:
    """An STMModel with uninitialised storage, only for producing a state dict (B/16 random init costs seconds and
    every exported value is overwritten); its non-persistent buffers are garbage, so never run it."""
    with torch.device("meta"):
        model = STMModel(cfg)
    return model.to_empty(device="cpu").eval()


@pytest.fixture(scope="module")
def umt_checkpoint(tmp_path_factory):
    """(path of a UMT-layout .pth, the UMT state dict, the config it came from)."""
    cfg = _umt_b16_config()
    source = _empty_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random values everywhere (norm weights near 1), so a misplaced tensor changes features
        for name, tensor in source.state_dict().items():
            if tensor.is_floating_point():
                is_norm_weight = name.endswith("weight") and tensor.dim() == 1
                tensor.copy_(float(is_norm_weight) + 0.02 * torch.randn(tensor.shape, generator=g))
        source.temp.fill_(0.07)
    umt, unplaced = stmvl_to_umt(source.state_dict(), stage=2)
    assert unplaced == []
    path = tmp_path_factory.mktemp("umt") / "umt_b16.pth"
    torch.save({"model": umt}, path)
    return path, umt, cfg


def test_the_fixture_uses_umt_key_names(umt_checkpoint):
    _, umt, _ = umt_checkpoint
    for key in ("vision_encoder.blocks.11.attn.q_bias", "vision_encoder.clip_decoder.0.head.weight",
                "text_encoder.bert.encoder.layer.2.crossattention.self.query.weight",
                "text_encoder.cls.predictions.transform.dense.weight", "clip_teacher.transformer.resblocks.0.attn.in_proj_weight",
                "clip_teacher.proj", "vision_proj.weight", "itm_head.weight", "temp"):
        assert key in umt, key
    assert umt["vision_encoder.patch_embed.proj.weight"].shape == (768, 3, 1, 16, 16)


@pytest.mark.slow
def test_convert_loads_strictly_and_matches_the_importer(umt_checkpoint, tmp_path, capsys):
    path, umt, cfg = umt_checkpoint
    out = tmp_path / "converted"
    assert convert_main(["umt", str(path), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0 unplaced" in printed and "ignored text_encoder.cls.predictions.decoder.weight" in printed

    meta = json.loads((out / "config.json").read_text())
    converted_cfg = meta["config"]
    assert converted_cfg["preset"] == "umt" and converted_cfg["mask"]["video_strategy"] == "attention"
    assert (converted_cfg["vision"]["size"], converted_cfg["vision"]["width"], converted_cfg["vision"]["depth"]) == ("b16", 768, 12)
    assert tuple(converted_cfg["vision"]["mean"]) == IMAGENET_MEAN and tuple(converted_cfg["vision"]["std"]) == IMAGENET_STD
    assert converted_cfg["teacher"]["input_norm"] == "imagenet" and converted_cfg["teacher"]["return_layers"] == 1
    assert (converted_cfg["text"]["layers"], converted_cfg["text"]["fusion_start"]) == (3, 2)
    assert meta["missing_groups"] == {} and meta["inference"]["num_frames"] == 4

    model = load_model(out)
    assert model.teacher_loaded and model.load_report.missing == {}

    # The foundation importer path: map the same UMT dict and load it strictly into an STMModel of the source config.
    reference = STMModel(cfg).eval()  # a real build: to_empty would leave the non-persistent buffers unset
    load_state_dict_strict(reference, umt_to_stmvl(umt).state_dict)
    video = torch.rand(1, 2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, frames = model.video_features(video)
        ref_tokens, ref_frames = reference.video_features(video)
        text, ref_text = model.encode_text(CAPTIONS), reference.encode_text(CAPTIONS)
        itm = model.itm_logits(tokens, *_states(model))
        ref_itm = reference.itm_logits(ref_tokens, *_states(reference))
    torch.testing.assert_close(frames, ref_frames)
    torch.testing.assert_close(text, ref_text)
    torch.testing.assert_close(itm, ref_itm)
    assert frames.shape == (1, 2, 512) and not torch.allclose(text[0], text[1])


def _states(model):
    batch = model.tokenize(CAPTIONS[:1])
    return model.text(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]


def test_unknown_key_is_reported_by_name_and_blocks_the_write(umt_checkpoint, tmp_path, capsys):
    path, umt, _ = umt_checkpoint
    bad = dict(umt, **{"vision_encoder.blocks.0.gamma_1": torch.ones(768), "extra_head.weight": torch.ones(2)})
    torch.save(bad, tmp_path / "bad.pth")
    assert convert_main(["umt", str(tmp_path / "bad.pth"), str(tmp_path / "bad")]) == 1
    printed = capsys.readouterr()
    assert "UNPLACED vision_encoder.blocks.0.gamma_1" in printed.out and "UNPLACED extra_head.weight" in printed.out
    assert "refusing to write" in printed.err and not (tmp_path / "bad").exists()
    # --allow-unplaced drops them, names them again, and the result still loads.
    assert convert_main(["umt", str(tmp_path / "bad.pth"), str(tmp_path / "dropped"), "--allow-unplaced"]) == 0
    assert "UNPLACED extra_head.weight (dropped)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "dropped" / "config.json").read_text())
    assert meta["source"]["dropped_unplaced"] == ["extra_head.weight", "vision_encoder.blocks.0.gamma_1"]


def test_checkpoint_without_teacher_and_decoders_converts_and_loads(umt_checkpoint, tmp_path, capsys):
    path, umt, _ = umt_checkpoint
    slim = {k: v for k, v in umt.items() if not k.startswith(("clip_teacher.", "vision_encoder.clip_decoder."))}
    torch.save(slim, tmp_path / "slim.pth")
    assert convert_main(["umt", str(tmp_path / "slim.pth"), str(tmp_path / "slim")]) == 0
    assert "absent group 'teacher'" in capsys.readouterr().out
    meta = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert set(meta["missing_groups"]) == {"teacher", "decoders"}
    model = load_model(tmp_path / "slim")
    assert not model.teacher_loaded
    assert "'teacher' tensors not in the checkpoint" in capsys.readouterr().err
    torch.testing.assert_close(model.vision_proj.weight, umt["vision_proj.weight"])


def test_shape_that_does_not_fit_is_named(umt_checkpoint, tmp_path, capsys):
    _, umt, _ = umt_checkpoint
    broken = dict(umt)
    broken["itm_head.weight"] = torch.zeros(3, 64)
    torch.save(broken, tmp_path / "broken.pth")
    assert convert_main(["umt", str(tmp_path / "broken.pth"), str(tmp_path / "broken")]) == 1
    assert "shape mismatch: itm_head.weight (model [2, 64] vs checkpoint [3, 64])" in capsys.readouterr().err
    assert convert_main(["umt", str(tmp_path / "missing.pth"), str(tmp_path / "x")]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_l16_shapes_infer_the_l16_preset():
    from stmvl.models.weights import _vision_config_from_state

    with torch.device("meta"):
        sd = {"vision.patch_embed.proj.weight": torch.empty(1024, 3, 1, 16, 16),
              "vision.blocks.0.mlp.fc1.weight": torch.empty(4096, 1024)}
        sd.update({f"vision.blocks.{i}.norm1.weight": torch.empty(1024) for i in range(24)})
    vision = _vision_config_from_state(sd, 224)
    assert (vision.size, vision.heads, vision.mlp_ratio) == ("l16", 16, 4.0)
    assert dataclasses.asdict(vision)["patch_size"] == 16
