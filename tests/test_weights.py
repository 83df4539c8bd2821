"""stmvl.models.weights: HF BERT / CLIP parity, real MiniLM, UMT import/export, strict loading, save/load."""

import json

import pytest
import torch
from torch import nn

from stmvl.data.text import Tokenizer, minilm_folder
from stmvl.models.config import TeacherConfig, TextConfig
from stmvl.models.teacher import CLIPTeacher
from stmvl.models.text import BertEncoder
from stmvl.models.vit import VideoViT, vit_config
from stmvl.models.weights import (
    WeightLoadError,
    convert_main,
    load_bert,
    load_clip_vision,
    load_model_dir,
    load_state_dict_strict,
    model_config_from_umt,
    read_state_dict,
    save_model,
    stmvl_to_umt,
    umt_to_stmvl,
)

transformers = pytest.importorskip("transformers")


def _padded_batch(vocab):
    ids = torch.randint(5, vocab, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("with_mlm", [False, True])
def test_bert_parity_with_transformers(tmp_path, with_mlm):
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    ref = (transformers.BertForMaskedLM(cfg) if with_mlm else transformers.BertModel(cfg, add_pooling_layer=True)).eval()
    ref.save_pretrained(tmp_path)
    ours = load_bert(tmp_path).eval()
    ids, mask = _padded_batch(60)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = ours(ids, mask)
    assert torch.allclose(states, out.hidden_states[-1], atol=1e-5)
    if with_mlm:
        assert torch.allclose(ours.mlm_logits(states), out.logits, atol=1e-5)
    else:
        assert any(k.startswith("pooler") for k in ours.load_report.ignored)
    # With fusion layers, forward() is the text-only part and the cross-attention is new (allowed missing).
    fused = load_bert(tmp_path, fusion_start=1, cross_width=24).eval()
    assert "layers" in fused.load_report.missing
    with torch.no_grad():
        assert torch.allclose(fused(ids, mask), out.hidden_states[1], atol=1e-5)


def test_load_bert_rejects_unknown_keys(tmp_path):
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=8)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    sd = read_state_dict(tmp_path / "model.safetensors")
    sd["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="rotary"):
        load_bert(tmp_path)


def test_real_minilm_paraphrases_are_closer():
    model = load_bert(minilm_folder()).eval()
    assert model.cfg.layers == 6 and model.cfg.hidden == 384
    tok = Tokenizer(minilm_folder())
    batch = tok(["a man is playing a guitar", "a person plays the guitar", "a bowl of soup on a kitchen table"])
    with torch.no_grad():
        states = model(batch["input_ids"], batch["attention_mask"])
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    paraphrase, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)


def _hf_clip(tmp_path):
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                        image_size=32, patch_size=8, projection_dim=24, attn_implementation="eager")
    ref = transformers.CLIPVisionModelWithProjection(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref


def _openai_layout(ref):
    """The OpenAI CLIP `visual.*` state dict of a HF CLIP vision model, written out by hand."""
    sd, v = {}, ref.vision_model
    sd["visual.conv1.weight"] = v.embeddings.patch_embedding.weight
    sd["visual.class_embedding"] = v.embeddings.class_embedding
    sd["visual.positional_embedding"] = v.embeddings.position_embedding.weight
    for name, mod in (("ln_pre", v.pre_layrnorm), ("ln_post", v.post_layernorm)):
        sd[f"visual.{name}.weight"], sd[f"visual.{name}.bias"] = mod.weight, mod.bias
    for i, layer in enumerate(v.encoder.layers):
        p = f"visual.transformer.resblocks.{i}."
        a = layer.self_attn
        sd[p + "attn.in_proj_weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        sd[p + "attn.in_proj_bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = a.out_proj.weight, a.out_proj.bias
        for ours, mod in (("ln_1", layer.layer_norm1), ("ln_2", layer.layer_norm2), ("mlp.c_fc", layer.mlp.fc1),
                          ("mlp.c_proj", layer.mlp.fc2)):
            sd[p + ours + ".weight"], sd[p + ours + ".bias"] = mod.weight, mod.bias
    sd["visual.proj"] = ref.visual_projection.weight.t()
    sd["token_embedding.weight"] = torch.zeros(10, 4)  # a text-tower key: ignored, and reported as such
    return {k: t.detach().clone() for k, t in sd.items()}


def test_clip_vision_parity_hf_folder_and_openai_file(tmp_path):
    ref = _hf_clip(tmp_path / "hf")
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        hidden = torch.stack(out.hidden_states[-2:])[:, :, 1:]
        expected = ref.visual_projection(ref.vision_model.post_layernorm(hidden))
    expected_attn = out.attentions[-1][:, :, 0, 1:].mean(1)
    torch.save(_openai_layout(ref), tmp_path / "openai.pt")
    # OpenAI files do not record the head count (CLIP's rule is width / 64), so the tiny test model names it.
    for source, extra in ((tmp_path / "hf", {}), (tmp_path / "openai.pt", {"heads": 4})):
        teacher = load_clip_vision(source, return_layers=2, input_norm="none", **extra)
        assert teacher.cfg.width == 64 and teacher.cfg.layers == 3 and teacher.cfg.embed_dim == 24
        got = teacher(pixels[:, None])  # [B, T=1, 3, H, W]
        assert torch.allclose(got.targets, expected, atol=1e-5), source
        assert torch.allclose(got.attn, expected_attn, atol=1e-5), source
        assert torch.allclose(got.tokens[:, 0], ref.vision_model.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2), atol=1e-5)
    assert "token_embedding.weight" in teacher.load_report.ignored


def test_clip_temporal_fusion_weights_load(tmp_path):
    ref = _hf_clip(tmp_path / "hf")
    sd = _openai_layout(ref)
    with pytest.raises(WeightLoadError, match="temporal"):
        load_clip_vision(tmp_path / "hf", temporal_fusion=True)
    fusion = CLIPTeacher(TeacherConfig(img_size=32, patch_size=8, width=64, layers=3, heads=4, embed_dim=64,
                                       temporal_fusion=True, temporal_fusion_layers=1, max_frames=8,
                                       return_layers=1)).temporal
    sd["visual.proj"] = torch.randn(64, 64)
    sd["fusion_model.frame_position_embeddings.weight"] = fusion.frame_position_embeddings.weight.clone()
    for k, v in fusion.blocks[0].state_dict().items():
        name = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias"}.get(k, k)
        name = name.replace("attn.proj", "attn.out_proj").replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj")
        sd[f"fusion_model.transformer.resblocks.0.{name}"] = v.clone()
    torch.save(sd, tmp_path / "actionclip.pt")
    teacher = load_clip_vision(tmp_path / "actionclip.pt", return_layers=1, heads=4)
    assert teacher.cfg.temporal_fusion and teacher.cfg.max_frames == 8
    assert torch.equal(teacher.temporal.blocks[0].mlp.fc2.weight, fusion.blocks[0].mlp.fc2.weight)


class _UmtLikeModel(nn.Module):
    """The STMModel submodules a UMT stage-2 checkpoint fills (vision, text, teacher, heads), at B/16 widths."""

    def __init__(self):
        super().__init__()
        self.vision = VideoViT(vit_config("b16"))
        self.text = BertEncoder(TextConfig(vocab_size=120, hidden=768, layers=2, heads=12, intermediate=256,
                                           max_position=40, fusion_start=1), cross_width=768)
        self.teacher = CLIPTeacher(TeacherConfig(width=768, layers=1, heads=12, embed_dim=512, return_layers=1))
        self.vision_proj = nn.Linear(768, 512)
        self.text_proj = nn.Linear(768, 512)
        self.itm_head = nn.Linear(768, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))


def _umt_stage2_state(model: _UmtLikeModel) -> dict:
    """A UMT stage-2 state dict with UMT's own key names, random values, shapes taken from the model."""
    g = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"vision_encoder.patch_embed.proj.weight": rnd(*shapes["vision.patch_embed.proj.weight"]),
          "vision_encoder.patch_embed.proj.bias": rnd(768)}
    for i in range(12):
        p = f"vision_encoder.blocks.{i}."
        sd.update({p + "norm1.weight": rnd(768), p + "norm1.bias": rnd(768), p + "attn.qkv.weight": rnd(2304, 768),
                   p + "attn.q_bias": rnd(768), p + "attn.v_bias": rnd(768), p + "attn.proj.weight": rnd(768, 768),
                   p + "attn.proj.bias": rnd(768), p + "norm2.weight": rnd(768), p + "norm2.bias": rnd(768),
                   p + "mlp.fc1.weight": rnd(3072, 768), p + "mlp.fc1.bias": rnd(3072),
                   p + "mlp.fc2.weight": rnd(768, 3072), p + "mlp.fc2.bias": rnd(768)})
    for name in ("norm", "pool_norm"):
        sd[f"vision_encoder.{name}.weight"], sd[f"vision_encoder.{name}.bias"] = rnd(768), rnd(768)
    b = "text_encoder.bert."
    sd.update({b + "embeddings.word_embeddings.weight": rnd(120, 768), b + "embeddings.position_embeddings.weight": rnd(40, 768),
               b + "embeddings.token_type_embeddings.weight": rnd(2, 768), b + "embeddings.LayerNorm.weight": rnd(768),
               b + "embeddings.LayerNorm.bias": rnd(768), b + "embeddings.position_ids": torch.arange(40)[None]})
    for i in range(2):
        p = f"{b}encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i == 1 else [])
        for att in blocks:
            for qkv in ("query", "key", "value"):
                sd[f"{p}{att}.self.{qkv}.weight"], sd[f"{p}{att}.self.{qkv}.bias"] = rnd(768, 768), rnd(768)
            sd[f"{p}{att}.output.dense.weight"], sd[f"{p}{att}.output.dense.bias"] = rnd(768, 768), rnd(768)
            sd[f"{p}{att}.output.LayerNorm.weight"], sd[f"{p}{att}.output.LayerNorm.bias"] = rnd(768), rnd(768)
        sd.update({p + "intermediate.dense.weight": rnd(256, 768), p + "intermediate.dense.bias": rnd(256),
                   p + "output.dense.weight": rnd(768, 256), p + "output.dense.bias": rnd(768),
                   p + "output.LayerNorm.weight": rnd(768), p + "output.LayerNorm.bias": rnd(768)})
    c = "text_encoder.cls.predictions."
    sd.update({c + "bias": rnd(120), c + "transform.dense.weight": rnd(768, 768), c + "transform.dense.bias": rnd(768),
               c + "transform.LayerNorm.weight": rnd(768), c + "transform.LayerNorm.bias": rnd(768)})
    sd[c + "decoder.weight"] = sd[b + "embeddings.word_embeddings.weight"]
    sd[c + "decoder.bias"] = sd[c + "bias"]
    t = "clip_teacher."
    sd.update({t + "conv1.weight": rnd(768, 3, 16, 16), t + "class_embedding": rnd(768),
               t + "positional_embedding": rnd(197, 768), t + "ln_pre.weight": rnd(768), t + "ln_pre.bias": rnd(768),
               t + "ln_post.weight": rnd(768), t + "ln_post.bias": rnd(768), t + "proj": rnd(768, 512)})
    r = t + "transformer.resblocks.0."
    sd.update({r + "ln_1.weight": rnd(768), r + "ln_1.bias": rnd(768), r + "attn.in_proj_weight": rnd(2304, 768),
               r + "attn.in_proj_bias": rnd(2304), r + "attn.out_proj.weight": rnd(768, 768),
               r + "attn.out_proj.bias": rnd(768), r + "ln_2.weight": rnd(768), r + "ln_2.bias": rnd(768),
               r + "mlp.c_fc.weight": rnd(3072, 768), r + "mlp.c_fc.bias": rnd(3072),
               r + "mlp.c_proj.weight": rnd(768, 3072), r + "mlp.c_proj.bias": rnd(768)})
    sd.update({"vision_proj.weight": rnd(512, 768), "vision_proj.bias": rnd(512), "text_proj.weight": rnd(512, 768),
               "text_proj.bias": rnd(512), "itm_head.weight": rnd(2, 768), "itm_head.bias": rnd(2), "temp": torch.tensor(0.05)})
    return sd


@pytest.fixture(scope="module")
def umt_model():
    # Real shapes without spending time on random init: the UMT values are loaded over it anyway.
    with torch.device("meta"):
        model = _UmtLikeModel()
    return model.to_empty(device="cpu")


def test_umt_stage2_import_places_every_key_and_round_trips(umt_model, tmp_path):
    umt = _umt_stage2_state(umt_model)
    mapping = umt_to_stmvl({"model": umt})
    assert mapping.stage == 2 and mapping.unplaced == []
    assert set(mapping.ignored) == {"text_encoder.bert.embeddings.position_ids",
                                    "text_encoder.cls.predictions.decoder.weight",
                                    "text_encoder.cls.predictions.decoder.bias"}
    report = load_state_dict_strict(umt_model, mapping.state_dict)
    assert report.missing == {} and report.ok
    assert torch.equal(umt_model.teacher.proj.weight, umt["clip_teacher.proj"].t())
    assert torch.equal(umt_model.vision.blocks[3].attn.q_bias, umt["vision_encoder.blocks.3.attn.q_bias"])
    exported, unplaced = stmvl_to_umt(umt_model.state_dict(), stage=2)
    assert unplaced == []
    umt.pop("text_encoder.bert.embeddings.position_ids")
    assert set(exported) == set(umt)
    assert all(torch.equal(exported[k], umt[k]) for k in umt)
    cfg = model_config_from_umt(mapping.state_dict)
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.size) == (768, 12, "b16")
    assert (cfg.text.fusion_start, cfg.teacher.embed_dim, cfg.embed_dim) == (1, 512, 512)


def test_umt_stage1_round_trip_and_convert_cli(tmp_path):
    vit = VideoViT(vit_config("tiny"))
    decoders = nn.ModuleList(nn.ModuleDict({"head": nn.Linear(64, 24), "norm": nn.LayerNorm(24)}) for _ in range(2))
    ours = {**{"vision." + k: v for k, v in vit.state_dict().items()},
            **{"decoders." + k: v for k, v in decoders.state_dict().items()}}
    umt, unplaced = stmvl_to_umt(ours, stage=1)
    assert unplaced == [] and "encoder.blocks.1.attn.q_bias" in umt and "clip_decoder.1.head.weight" in umt
    back = umt_to_stmvl(umt)
    assert back.stage == 1 and back.unplaced == []
    assert set(back.state_dict) == set(ours) and all(torch.equal(back.state_dict[k], ours[k]) for k in ours)
    # Through the CLI: a UMT file -> stmvl safetensors + a config inferred from the shapes.
    torch.save({"model": umt}, tmp_path / "umt.pth")
    assert convert_main(["umt", str(tmp_path / "umt.pth"), str(tmp_path / "out"), "--img-size", "32"]) == 0
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["config"]["vision"]["width"] == 64 and meta["config"]["vision"]["depth"] == 2
    converted = read_state_dict(tmp_path / "out" / "model.safetensors")
    assert set(converted) == set(ours) and torch.equal(converted["vision.norm.weight"], ours["vision.norm.weight"])
    umt["encoder.blocks.0.gamma_1"] = torch.ones(64)
    umt["some_head.weight"] = torch.ones(3)
    assert umt_to_stmvl(umt).unplaced == ["encoder.blocks.0.gamma_1", "some_head.weight"]
    torch.save(umt, tmp_path / "bad.pth")
    assert convert_main(["umt", str(tmp_path / "bad.pth"), str(tmp_path / "bad")]) == 1
    assert not (tmp_path / "bad").exists()


def test_strict_loading_reports_by_group():
    model = nn.ModuleDict({"vision": nn.Linear(2, 3), "text": nn.Linear(3, 3)})
    sd = {"vision.weight": torch.zeros(3, 2), "vision.bias": torch.zeros(4), "extra.w": torch.zeros(1)}
    with pytest.raises(WeightLoadError) as error:
        load_state_dict_strict(model, sd)
    message = str(error.value)
    assert "missing [text] (2): text.weight, text.bias" in message
    assert "unexpected [extra] (1): extra.w" in message
    assert "mismatched [vision] (1): vision.bias (model [3] vs checkpoint [4])" in message
    report = load_state_dict_strict(model, {"vision.weight": torch.ones(3, 2), "vision.bias": torch.ones(3)},
                                    allow_missing=("text",))
    assert report.missing == {"text": ["text.weight", "text.bias"]}
    assert torch.equal(model["vision"].weight, torch.ones(3, 2))


def test_save_and_load_model_dir(tmp_path):
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=40, hidden=32, layers=2, heads=4, intermediate=64, max_position=16, fusion_start=1)
    text = BertEncoder(cfg, cross_width=24).eval()
    save_model(text, cfg, tmp_path / "text")
    back = load_model_dir(tmp_path / "text").eval()
    assert back.cross_width == 24 and back.cfg == cfg
    ids = torch.randint(0, 40, (2, 5))
    assert torch.equal(back(ids, torch.ones_like(ids)), text(ids, torch.ones_like(ids)))
    vcfg = vit_config("tiny", stem="diff")
    save_model(VideoViT(vcfg), vcfg, tmp_path / "vit")
    assert load_model_dir(tmp_path / "vit").cfg == vcfg and isinstance(vcfg.mean, tuple)
    tcfg = TeacherConfig(img_size=32, patch_size=8, width=64, layers=2, heads=4, embed_dim=24, return_layers=1)
    teacher = CLIPTeacher(tcfg)
    save_model(teacher, tcfg, tmp_path / "teacher")
    loaded = load_clip_vision(tmp_path / "teacher")
    assert torch.equal(loaded.proj.weight, teacher.proj.weight)
    meta = json.loads((tmp_path / "vit" / "config.json").read_text())
    meta["config"]["widht"] = 3
    (tmp_path / "vit" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightLoadError, match="widht"):
        load_model_dir(tmp_path / "vit")
