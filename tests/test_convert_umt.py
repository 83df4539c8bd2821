"""UMT interop: checkpoints with UMT's real key layout (tests/umt_reference.py, written from UMT's classes) import,
convert and export; the converted model's student, decoders (UTA), teacher and text tower give the outputs of UMT's
own forward, re-implemented from UMT's code in tests/umt_reference.py."""

import dataclasses
import json

import pytest
import torch

import umt_reference as umt
from stmvl.api import load_model
from stmvl.commands.convert import convert_main
from stmvl.models.config import IMAGENET_MEAN, IMAGENET_STD
from stmvl.models.weights import (
    WeightLoadError,
    read_state_dict,
    stmvl_to_umt,
    umt_to_stmvl,
)

SIZES = umt.UmtSizes()
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)


def _video(seed: int = 1, b: int = 2, t: int = 2) -> torch.Tensor:
    return torch.rand(b, t, 3, SIZES.img, SIZES.img, generator=torch.Generator().manual_seed(seed))


def umt_input(video: torch.Tensor) -> torch.Tensor:
    """UMT's input: ImageNet-normalised (its data pipeline), [B, T, 3, H, W] -> [B, 3, T, H, W]."""
    return ((video - MEAN) / STD).permute(0, 2, 1, 3, 4)


def random_mask(b: int, total: int, visible: int, seed: int = 3) -> torch.Tensor:
    """UMT's mask convention: bool [B, T*N], True = masked, the same number visible per sample."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, total, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(total, generator=g)[:visible]] = False
    return mask


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """(path of a UMT stage-2 checkpoint {'model': ...}, its state dict)."""
    sd = umt.random_state(umt.stage2_shapes(SIZES))
    path = tmp_path_factory.mktemp("umt") / "umt_stage2.pth"
    torch.save({"model": sd}, path)
    return path, sd


@pytest.fixture(scope="module")
def converted(stage2, tmp_path_factory):
    path, _ = stage2
    out = tmp_path_factory.mktemp("converted") / "model"
    assert convert_main(["umt", str(path), str(out), "--img-size", str(SIZES.img)]) == 0
    return out


def test_the_fixture_is_umts_layout(stage2):
    _, sd = stage2
    # names straight from UMT's modules: PretrainVisionTransformer.encoder, Conv3d CLIP teacher, BertForMaskedLM
    assert sd["vision_encoder.encoder.patch_embed.proj.weight"].shape == (128, 3, 1, 8, 8)
    assert sd["clip_teacher.conv1.weight"].shape == (128, 3, 1, 8, 8)
    for key in ("vision_encoder.encoder.blocks.2.attn.q_bias", "vision_encoder.encoder.norm.weight",
                "vision_encoder.pool_norm.bias", "vision_encoder.clip_decoder.1.norm.weight",
                "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight",
                "text_encoder.cls.predictions.transform.LayerNorm.bias", "clip_teacher.transformer.resblocks.1.mlp.c_fc.bias",
                "vision_proj.weight", "text_proj.bias", "itm_head.weight", "temp"):
        assert key in sd, key
    assert not any(k.startswith("vision_encoder.blocks.") for k in sd)


def test_stage2_places_every_key_and_exports_exactly_umts_names(stage2):
    _, sd = stage2
    mapping = umt_to_stmvl({"model": sd})
    assert mapping.stage == 2 and mapping.unplaced == []
    assert set(mapping.ignored) == {"text_encoder.bert.embeddings.position_ids",
                                    "text_encoder.cls.predictions.decoder.weight",
                                    "text_encoder.cls.predictions.decoder.bias"}
    assert mapping.state_dict["teacher.conv1.weight"].shape == (128, 3, 8, 8)
    exported, unplaced = stmvl_to_umt(mapping.state_dict, stage=2)
    assert unplaced == []
    assert set(exported) == set(sd)
    for key, value in sd.items():
        assert exported[key].shape == value.shape and torch.equal(exported[key], value), key


def test_convert_infers_every_size_from_the_tensors(converted, capsys):
    meta = json.loads((converted / "config.json").read_text())
    cfg = meta["config"]
    assert cfg["preset"] == "umt" and cfg["decoder"] == "linear" and cfg["mvm_tokens"] == "visible"
    v = cfg["vision"]
    assert (v["width"], v["depth"], v["heads"], v["patch_size"], v["img_size"]) == (128, 3, 2, 8, 32)
    assert int(v["width"] * v["mlp_ratio"]) == SIZES.mlp  # 3x, not the ViT default
    assert tuple(v["mean"]) == IMAGENET_MEAN and tuple(v["std"]) == IMAGENET_STD
    t = cfg["teacher"]
    assert (t["width"], t["layers"], t["heads"], t["embed_dim"], t["return_layers"], t["input_norm"]) == (
        128, 2, 2, 48, 2, "imagenet")
    assert (cfg["text"]["layers"], cfg["text"]["fusion_start"], cfg["embed_dim"]) == (3, 2, 40)
    assert meta["missing_groups"] == {}


@pytest.fixture(scope="module")
def converted_model(converted):
    return load_model(converted)


def test_student_and_pooled_projection_match_umt(converted_model, stage2):
    _, sd = stage2
    model = converted_model
    video = _video()
    x_vis, x_pool, _ = umt.student_forward(sd, "vision_encoder.", SIZES, umt_input(video), mask=None, keep_temporal=True)
    with torch.no_grad():
        tokens, frames = model.video_features(video)
    expected = torch.nn.functional.normalize(
        torch.nn.functional.linear(x_pool, sd["vision_proj.weight"], sd["vision_proj.bias"]), dim=-1)
    torch.testing.assert_close(tokens, x_vis, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(frames, expected, atol=2e-5, rtol=1e-4)


def test_teacher_with_5d_conv1_matches_umt(converted_model, stage2):
    _, sd = stage2
    video = _video()
    targets, attn = umt.teacher_forward(sd, SIZES, umt_input(video))
    out = converted_model.teacher(video)
    torch.testing.assert_close(out.targets, targets, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.attn, attn, atol=2e-6, rtol=1e-4)


def test_uta_decoders_and_loss_match_umt(converted_model, stage2):
    """UTA: UMT adds clip_pos_embed (sincos over the T*N index, at the visible positions) before each decoder."""
    _, sd = stage2
    model = converted_model
    video = _video()
    total = 2 * (SIZES.img // SIZES.patch) ** 2
    mask = random_mask(2, total, visible=9)
    keep = ~mask
    _, _, x_clip = umt.student_forward(sd, "vision_encoder.", SIZES, umt_input(video), mask=mask, keep_temporal=False)
    targets, _ = umt.teacher_forward(sd, SIZES, umt_input(video))
    k, c = targets.shape[0], targets.shape[-1]
    clip_visible = targets[~mask.unsqueeze(0).repeat(k, 1, 1)].reshape(k, 2, -1, c)
    with torch.no_grad():
        layers = model.vision(video, keep=keep, return_layers=k).layers
        prediction = torch.stack([dec(layers[i], keep) for i, dec in enumerate(model.decoders)])
        loss, _ = model.masked_video_loss(video, keep, mask.float(), model.teacher(video), 2, 4, 4, None, None, False)
    torch.testing.assert_close(prediction, x_clip, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss, umt.uta_loss(x_clip, clip_visible), atol=1e-5, rtol=1e-5)
    assert loss.item() > 0.1  # random weights: far from aligned, so a wrong pairing would show


def test_text_tower_matches_bert(converted_model, stage2):
    """UMT's text mode runs BERT's layers below fusion_layer; compare with transformers' BertModel on them."""
    transformers = pytest.importorskip("transformers")
    _, sd = stage2
    cfg = transformers.BertConfig(vocab_size=SIZES.vocab, hidden_size=SIZES.t_hidden, num_hidden_layers=SIZES.fusion_layer,
                                  num_attention_heads=1, intermediate_size=SIZES.text_ffn,
                                  max_position_embeddings=SIZES.max_pos, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="eager")
    bert = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    prefix = "text_encoder.bert."
    wanted = bert.state_dict()
    bert.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k[len(prefix):] in wanted and k.startswith(prefix)},
                         strict=True)
    batch = converted_model.tokenize(["a red circle moves to the left", "a blue square grows"])
    with torch.no_grad():
        ours = converted_model.text(batch["input_ids"], batch["attention_mask"])
        ref = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_converted_model_exports_back_to_the_same_checkpoint(converted_model, stage2):
    _, sd = stage2
    exported, unplaced = stmvl_to_umt(converted_model.state_dict(), stage=2)
    assert unplaced == [] and set(exported) == set(sd)
    assert all(torch.equal(exported[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------------------------------- stage 1


def stage1_state(seed: int = 0) -> dict:
    """single_modality PretrainVisionTransformer.state_dict(): encoder.* + clip_decoder.* (no pool norm)."""
    return umt.random_state(umt.student_shapes(SIZES, "", pool_norm=False), seed)


@pytest.mark.parametrize("wrapper", ["bare", "model", "module"])
def test_stage1_layouts_import_and_export_exactly(wrapper):
    sd = stage1_state()
    wrapped = sd if wrapper == "bare" else {wrapper: sd}
    mapping = umt_to_stmvl(wrapped)
    assert mapping.stage == 1 and mapping.unplaced == [] and mapping.ignored == {}
    assert {k.split(".")[0] for k in mapping.state_dict} == {"vision", "decoders"}
    assert torch.equal(mapping.state_dict["vision.blocks.2.attn.v_bias"], sd["encoder.blocks.2.attn.v_bias"])
    exported, unplaced = stmvl_to_umt(mapping.state_dict, stage=1)
    assert unplaced == [] and set(exported) == set(sd) and all(torch.equal(exported[k], sd[k]) for k in sd)


def test_stage1_export_reports_the_pool_norm_it_cannot_write():
    mapping = umt_to_stmvl(stage1_state())
    with_pool = dict(mapping.state_dict, **{"vision.pool_norm.weight": torch.ones(128), "vision.pool_norm.bias": torch.zeros(128)})
    _, unplaced = stmvl_to_umt(with_pool, stage=1)
    assert unplaced == ["vision.pool_norm.bias", "vision.pool_norm.weight"]


def test_stage1_convert_writes_the_vision_folder(tmp_path, capsys):
    torch.save({"model": stage1_state()}, tmp_path / "stage1.pth")
    assert convert_main(["umt", str(tmp_path / "stage1.pth"), str(tmp_path / "out"), "--img-size", "32"]) == 0
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (meta["config"]["vision"]["width"], meta["config"]["vision"]["depth"]) == (128, 3)
    assert meta["config"]["teacher"]["return_layers"] == 2 and meta["config"]["teacher"]["embed_dim"] == 48
    converted = read_state_dict(tmp_path / "out" / "model.safetensors")
    assert torch.equal(converted["decoders.1.head.weight"], stage1_state()["clip_decoder.1.head.weight"])


# --------------------------------------------------------------------------------------------------- errors


def test_unknown_key_is_reported_by_name_and_blocks_the_write(stage2, tmp_path, capsys):
    _, sd = stage2
    bad = dict(sd, **{"vision_encoder.encoder.blocks.0.gamma_1": torch.ones(128), "extra_head.weight": torch.ones(2)})
    torch.save(bad, tmp_path / "bad.pth")
    assert convert_main(["umt", str(tmp_path / "bad.pth"), str(tmp_path / "bad")]) == 2
    printed = capsys.readouterr()
    assert "UNPLACED vision_encoder.encoder.blocks.0.gamma_1" in printed.out and "UNPLACED extra_head.weight" in printed.out
    assert printed.err.splitlines() == [f"stmvl convert: error: {tmp_path / 'bad.pth'}: refusing to write: 2 keys "
                                        "have no place in stmvl (listed above as UNPLACED); pass --allow-unplaced to "
                                        "drop them"]
    assert not (tmp_path / "bad").exists()
    assert convert_main(["umt", str(tmp_path / "bad.pth"), str(tmp_path / "dropped"), "--allow-unplaced",
                         "--img-size", "32"]) == 0
    meta = json.loads((tmp_path / "dropped" / "config.json").read_text())
    assert meta["source"]["dropped_unplaced"] == ["extra_head.weight", "vision_encoder.encoder.blocks.0.gamma_1"]


def test_the_old_flat_layout_is_not_taken_for_umts(stage2):
    """`vision_encoder.blocks.*` (no `encoder.`) is not a UMT layout: every such key is named, none placed."""
    _, sd = stage2
    flat = {k.replace("vision_encoder.encoder.", "vision_encoder."): v for k, v in sd.items()}
    unplaced = umt_to_stmvl(flat).unplaced
    assert "vision_encoder.blocks.0.attn.qkv.weight" in unplaced and "vision_encoder.norm.weight" in unplaced


def test_checkpoint_without_teacher_and_decoders_converts_and_loads(tmp_path, capsys):
    sd = umt.random_state(umt.stage2_shapes(SIZES, teacher=False))
    sd = {k: v for k, v in sd.items() if ".clip_decoder." not in k}
    torch.save(sd, tmp_path / "slim.pth")
    assert convert_main(["umt", str(tmp_path / "slim.pth"), str(tmp_path / "slim"), "--img-size", "32"]) == 0
    assert "absent group 'teacher'" in capsys.readouterr().out
    meta = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert set(meta["missing_groups"]) == {"teacher", "decoders"}
    model = load_model(tmp_path / "slim")
    assert not model.teacher_loaded
    torch.testing.assert_close(model.vision_proj.weight, sd["vision_proj.weight"])


def test_shape_that_does_not_fit_is_named(stage2, tmp_path, capsys):
    _, sd = stage2
    broken = dict(sd)
    broken["itm_head.weight"] = torch.zeros(3, 64)
    torch.save(broken, tmp_path / "broken.pth")
    assert convert_main(["umt", str(tmp_path / "broken.pth"), str(tmp_path / "broken"), "--img-size", "32"]) == 2
    printed = capsys.readouterr()
    assert "shape mismatch: itm_head.weight (model [2, 64] vs checkpoint [3, 64])" in printed.out
    err = printed.err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"stmvl convert: error: {tmp_path / 'broken.pth'}: refusing to write: "
                                               "the checkpoint does not fit the inferred STMModel (1 problems")
    assert not (tmp_path / "broken").exists()
    assert convert_main(["umt", str(tmp_path / "missing.pth"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"stmvl convert: error: checkpoint not found: "
                                                    f"{tmp_path / 'missing.pth'}"]


def test_teacher_conv_with_a_real_temporal_kernel_is_refused(stage2):
    _, sd = stage2
    bad = dict(sd, **{"clip_teacher.conv1.weight": torch.zeros(128, 3, 2, 8, 8)})
    with pytest.raises(WeightLoadError, match=r"clip_teacher.conv1.weight \[128, 3, 2, 8, 8\]"):
        umt_to_stmvl(bad)


def test_l16_and_odd_mlp_widths_are_inferred():
    from stmvl.models.weights import _vision_config_from_state
    from stmvl.models.vit import VideoViT

    with torch.device("meta"):
        sd = {"vision.patch_embed.proj.weight": torch.empty(1024, 3, 1, 16, 16),
              "vision.blocks.0.mlp.fc1.weight": torch.empty(4096, 1024)}
        sd.update({f"vision.blocks.{i}.norm1.weight": torch.empty(1024) for i in range(24)})
    vision = _vision_config_from_state(sd, 224)
    assert (vision.size, vision.heads, vision.mlp_ratio) == ("l16", 16, 4.0)
    assert dataclasses.asdict(vision)["patch_size"] == 16
    for hidden, width in ((1000, 192), (3000, 768), (2731, 640), (577, 64)):
        sd = {"vision.patch_embed.proj.weight": torch.empty(width, 3, 1, 16, 16),
              "vision.blocks.0.mlp.fc1.weight": torch.empty(hidden, width), "vision.blocks.0.norm1.weight": torch.empty(1)}
        cfg = _vision_config_from_state(sd, 224)
        with torch.device("meta"):
            assert VideoViT(cfg).blocks[0].mlp.fc1.out_features == hidden, (hidden, width)


def test_to_umt_writes_umts_layout_from_an_stmvl_folder(converted, stage2, tmp_path, capsys):
    _, sd = stage2
    assert convert_main(["to-umt", str(converted), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # stage 1 drops the text tower, heads and teacher: refused unless asked, then bare encoder.* + clip_decoder.*
    assert convert_main(["to-umt", str(converted), str(tmp_path / "s1.pth"), "--stage", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "refusing to write" in err[0] and not (tmp_path / "s1.pth").exists()
    assert convert_main(["to-umt", str(converted), str(tmp_path / "s1.pth"), "--stage", "1", "--allow-unplaced"]) == 0
    stage1 = torch.load(tmp_path / "s1.pth", weights_only=True)
    assert set(stage1) == set(umt.student_shapes(SIZES, "", pool_norm=False))
    assert torch.equal(stage1["encoder.blocks.1.attn.qkv.weight"], sd["vision_encoder.encoder.blocks.1.attn.qkv.weight"])
    assert convert_main(["to-umt", str(tmp_path / "nowhere"), str(tmp_path / "x.pth")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"stmvl convert: error: {tmp_path / 'nowhere'}: no "
                                                    "model.safetensors (to-umt needs an stmvl model folder)"]
